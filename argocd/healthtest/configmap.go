package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"sigs.k8s.io/yaml"
)

// Generated files: their name under argocd/ and how each embeds the scripts.
const (
	ConfigMapFile  = "argocd-cm-patch.yaml"
	HelmValuesFile = "argo-cd-values.yaml"
	regenerate     = "cd argocd/healthtest && go run . -write-configmap"
)

const header = "# GENERATED from argocd/resource_customizations/<group>/<kind>/health.lua: do not edit.\n" +
	"# Regenerate with: " + regenerate + "\n"

// block writes a YAML literal block scalar holding text at the given indentation.
func block(b *bytes.Buffer, text, indent string) error {
	if !strings.HasSuffix(text, "\n") || strings.HasSuffix(text, "\n\n") {
		return fmt.Errorf("a script must end with exactly one newline")
	}
	for _, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		if strings.TrimRight(line, " \t") != line {
			return fmt.Errorf("a script line has trailing whitespace: %q", line)
		}
		if line == "" {
			b.WriteString("\n")
		} else {
			b.WriteString(indent + line + "\n")
		}
	}
	return nil
}

// Generate renders the argocd-cm patch and the argo-cd Helm chart values from the scripts.
func Generate(scripts []Script) (map[string][]byte, error) {
	var cm, values bytes.Buffer
	cm.WriteString(header)
	cm.WriteString("# Apply: kubectl -n argocd patch configmap argocd-cm --type merge --patch-file argocd/" + ConfigMapFile + "\n")
	cm.WriteString("# or list it under `patches:` of a kustomization that installs Argo CD.\n")
	cm.WriteString("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: argocd-cm\n  labels:\n    app.kubernetes.io/name: argocd-cm\n    app.kubernetes.io/part-of: argocd\ndata:\n")
	values.WriteString(header)
	values.WriteString("# Values for the argo-cd Helm chart: helm upgrade argocd argo/argo-cd -n argocd -f argocd/" + HelmValuesFile + "\n")
	values.WriteString("configs:\n  cm:\n")
	for _, s := range scripts {
		cm.WriteString("  " + s.Key() + ": |\n")
		if err := block(&cm, s.Text, "    "); err != nil {
			return nil, fmt.Errorf("%s/%s/health.lua: %w", s.Group, s.Kind, err)
		}
		values.WriteString("    " + s.Key() + ": |\n")
		if err := block(&values, s.Text, "      "); err != nil {
			return nil, fmt.Errorf("%s/%s/health.lua: %w", s.Group, s.Kind, err)
		}
	}
	out := map[string][]byte{ConfigMapFile: cm.Bytes(), HelmValuesFile: values.Bytes()}
	if err := verifyRoundTrip(out, scripts); err != nil {
		return nil, err
	}
	return out, nil
}

// verifyRoundTrip parses the generated YAML and checks that each script comes back byte for byte.
func verifyRoundTrip(out map[string][]byte, scripts []Script) error {
	var cm struct {
		Data map[string]string `json:"data"`
	}
	if err := yaml.Unmarshal(out[ConfigMapFile], &cm); err != nil {
		return fmt.Errorf("%s: %w", ConfigMapFile, err)
	}
	var values struct {
		Configs struct {
			Cm map[string]string `json:"cm"`
		} `json:"configs"`
	}
	if err := yaml.Unmarshal(out[HelmValuesFile], &values); err != nil {
		return fmt.Errorf("%s: %w", HelmValuesFile, err)
	}
	for _, s := range scripts {
		if cm.Data[s.Key()] != s.Text {
			return fmt.Errorf("%s: %s does not round-trip", ConfigMapFile, s.Key())
		}
		if values.Configs.Cm[s.Key()] != s.Text {
			return fmt.Errorf("%s: %s does not round-trip", HelmValuesFile, s.Key())
		}
	}
	if len(cm.Data) != len(scripts) || len(values.Configs.Cm) != len(scripts) {
		return fmt.Errorf("generated files hold other keys than the %d scripts", len(scripts))
	}
	return nil
}

// WriteGenerated writes the generated files into dir.
func WriteGenerated(dir string, out map[string][]byte) error {
	for name, data := range out {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// CheckGenerated returns an error naming every generated file in dir that differs from out.
func CheckGenerated(dir string, out map[string][]byte) error {
	var stale []string
	for _, name := range []string{ConfigMapFile, HelmValuesFile} {
		have, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || !bytes.Equal(have, out[name]) {
			stale = append(stale, "argocd/"+name)
		}
	}
	if len(stale) > 0 {
		return fmt.Errorf("%s out of date with the health.lua files; regenerate with: %s",
			strings.Join(stale, " and "), regenerate)
	}
	return nil
}
