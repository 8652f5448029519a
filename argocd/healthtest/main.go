// Command healthtest runs the Argo CD health checks of the Caduceus kinds with gopher-lua, the Lua
// interpreter Argo CD embeds, and generates the argocd-cm patch that installs them.
//
//	go run .                      run every resource_customizations/<group>/<kind>/health_test.yaml
//	go run . -check-configmap     also fail when the generated files are out of date
//	go run . -write-configmap     regenerate ../argocd-cm-patch.yaml and ../argo-cd-values.yaml
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("healthtest", flag.ContinueOnError)
	fs.SetOutput(stderr)
	root := fs.String("root", "../resource_customizations", "directory holding <group>/<kind>/health.lua")
	out := fs.String("out", "..", "directory of the generated argocd-cm patch and argo-cd Helm values")
	write := fs.Bool("write-configmap", false, "regenerate the argocd-cm patch and Helm values from the health.lua files")
	check := fs.Bool("check-configmap", false, "fail when the generated files differ from the health.lua files")
	if err := fs.Parse(args); err != nil {
		return 2
	}

	res, err := Run(*root)
	if err != nil {
		fmt.Fprintln(stderr, "healthtest:", err)
		return 1
	}
	ok := Report(stdout, res)

	if *write || *check {
		scripts, err := FindScripts(*root)
		if err != nil {
			fmt.Fprintln(stderr, "healthtest:", err)
			return 1
		}
		gen, err := Generate(scripts)
		if err != nil {
			fmt.Fprintln(stderr, "healthtest:", err)
			return 1
		}
		if *write {
			if err := WriteGenerated(*out, gen); err != nil {
				fmt.Fprintln(stderr, "healthtest:", err)
				return 1
			}
			fmt.Fprintf(stdout, "wrote %s and %s\n", ConfigMapFile, HelmValuesFile)
		} else if err := CheckGenerated(*out, gen); err != nil {
			fmt.Fprintln(stderr, "healthtest:", err)
			return 1
		} else {
			fmt.Fprintf(stdout, "%s and %s are up to date\n", ConfigMapFile, HelmValuesFile)
		}
	}
	if !ok {
		return 1
	}
	return 0
}
