package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	lua "github.com/yuin/gopher-lua"
	"sigs.k8s.io/yaml"
)

// Health is what a health.lua returns, as Argo CD reads it (gitops-engine's health.HealthStatus).
type Health struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

// testFile is the layout of argo-cd's resource_customizations/<group>/<kind>/health_test.yaml.
type testFile struct {
	Tests []testCase `json:"tests"`
}

type testCase struct {
	HealthStatus Health `json:"healthStatus"`
	InputPath    string `json:"inputPath"`
}

// Mode is the set of Lua libraries a script runs with.
type Mode int

const (
	// Sandbox is how Argo CD runs health scripts from argocd-cm (util/lua/lua.go, UseOpenLibs false):
	// only the package, base and table libraries, plus an `os` module with time and date that
	// must be `require`d. No string, math, io or the real os library.
	Sandbox Mode = iota
	// OpenLibs is every gopher-lua library: how Argo CD runs its built-in scripts and its own
	// health_test.yaml suite, and argocd-cm scripts with resource.customizations.useOpenLibs.
	OpenLibs
)

func (m Mode) String() string {
	if m == Sandbox {
		return "argocd-cm sandbox"
	}
	return "open libs"
}

// Modes are the library sets every case runs under; a script must give the same result in each.
var Modes = []Mode{Sandbox, OpenLibs}

// validStatuses are the health codes Argo CD accepts from Lua (util/lua isValidHealthStatusCode).
var validStatuses = map[string]bool{
	"Unknown": true, "Progressing": true, "Suspended": true, "Healthy": true, "Degraded": true, "Missing": true,
}

// scriptTimeout matches the context deadline Argo CD gives each script.
const scriptTimeout = time.Second

// toLua converts a JSON-shaped Go value as Argo CD's decodeValue does: maps become tables with string
// keys, arrays 1-indexed tables, numbers Lua numbers, null nil.
func toLua(l *lua.LState, v any) lua.LValue {
	switch x := v.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(x)
	case string:
		return lua.LString(x)
	case float64:
		return lua.LNumber(x)
	case int:
		return lua.LNumber(x)
	case int32:
		return lua.LNumber(x)
	case int64:
		return lua.LNumber(x)
	case json.Number:
		return lua.LString(x)
	case []any:
		t := l.CreateTable(len(x), 0)
		for _, item := range x {
			t.Append(toLua(l, item))
		}
		return t
	case map[string]any:
		t := l.CreateTable(0, len(x))
		for k, item := range x {
			t.RawSetH(lua.LString(k), toLua(l, item))
		}
		return t
	}
	return lua.LNil
}

// safeOsLoader is the `os` module Argo CD lets scripts require: time and date only.
func safeOsLoader(l *lua.LState) int {
	mod := l.SetFuncs(l.NewTable(), map[string]lua.LGFunction{
		"time": func(l *lua.LState) int {
			l.Push(lua.LNumber(time.Now().Unix()))
			return 1
		},
		"date": func(l *lua.LState) int {
			l.Push(lua.LString(time.Now().UTC().Format(time.RFC3339)))
			return 1
		},
	})
	l.Push(mod)
	return 1
}

func newState(mode Mode) *lua.LState {
	if mode == OpenLibs {
		return lua.NewState()
	}
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			panic(err)
		}
	}
	l.PreloadModule(lua.OsLibName, safeOsLoader)
	return l
}

// Evaluate runs a health script on an object the way Argo CD's ExecuteHealthLua does.
func Evaluate(script string, object map[string]any, mode Mode) (Health, error) {
	l := newState(mode)
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), scriptTimeout)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, object))
	if err := l.DoString(script); err != nil {
		// Like Argo CD, report the error without the Lua stack trace.
		var apiErr *lua.ApiError
		if errors.As(err, &apiErr) && apiErr.Type == lua.ApiErrorRun {
			apiErr.StackTrace = ""
		}
		return Health{}, err
	}
	ret := l.Get(-1)
	switch ret.Type() {
	case lua.LTNil:
		return Health{}, nil
	case lua.LTTable:
	default:
		return Health{}, fmt.Errorf("expect table output from Lua script, not %s", ret.Type())
	}
	t := ret.(*lua.LTable)
	var h Health
	for _, f := range []struct {
		key string
		dst *string
	}{{"status", &h.Status}, {"message", &h.Message}} {
		switch v := t.RawGetString(f.key).(type) {
		case *lua.LNilType:
		case lua.LString:
			*f.dst = string(v)
		default:
			return Health{}, fmt.Errorf("the returned table's %s is a %s, not a string", f.key, v.Type())
		}
	}
	if !validStatuses[h.Status] {
		return Health{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
	}
	return h, nil
}

// Failure is one case that did not give the expected health.
type Failure struct {
	Case string // <group>/<kind>/<inputPath>, or a file for problems outside a case
	Mode string
	Want *Health
	Got  *Health
	Err  error
}

func (f Failure) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "FAIL %s", f.Case)
	if f.Mode != "" {
		fmt.Fprintf(&b, " [%s]", f.Mode)
	}
	b.WriteString("\n")
	if f.Err != nil {
		fmt.Fprintf(&b, "  error: %v\n", f.Err)
	}
	if f.Want != nil && f.Got != nil {
		if f.Want.Status != f.Got.Status {
			fmt.Fprintf(&b, "  status:  want %q\n           got  %q\n", f.Want.Status, f.Got.Status)
		}
		if f.Want.Message != f.Got.Message {
			fmt.Fprintf(&b, "  message: want %q\n           got  %q\n", f.Want.Message, f.Got.Message)
		}
	}
	return b.String()
}

// Result of a run over a resource_customizations tree.
type Result struct {
	Cases    int // (case, mode) pairs evaluated
	Kinds    []string
	Failures []Failure
}

// Script is one health.lua: its group, kind and text.
type Script struct {
	Group, Kind, Dir, Text string
}

// Key is the argocd-cm key of the script.
func (s Script) Key() string {
	return "resource.customizations.health." + s.Group + "_" + s.Kind
}

// FindScripts lists every <group>/<kind>/health.lua under root, sorted.
func FindScripts(root string) ([]Script, error) {
	var scripts []Script
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() || d.Name() != "health.lua" {
			return nil
		}
		rel, err := filepath.Rel(root, filepath.Dir(path))
		if err != nil {
			return err
		}
		parts := strings.Split(filepath.ToSlash(rel), "/")
		if len(parts) != 2 {
			return fmt.Errorf("%s: expected <root>/<group>/<kind>/health.lua", path)
		}
		text, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		scripts = append(scripts, Script{Group: parts[0], Kind: parts[1], Dir: filepath.Dir(path), Text: string(text)})
		return nil
	})
	sort.Slice(scripts, func(i, j int) bool { return scripts[i].Key() < scripts[j].Key() })
	return scripts, err
}

// ReadObject reads a YAML object as Argo CD's tests do (YAML to JSON, numbers as float64).
func ReadObject(path string) (map[string]any, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	obj := map[string]any{}
	if err := yaml.Unmarshal(data, &obj); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return obj, nil
}

// Run evaluates every health_test.yaml under root in every mode. Every directory with a
// health.lua must have a health_test.yaml with at least one case, and every testdata file must be
// used by a case.
func Run(root string) (Result, error) {
	var res Result
	scripts, err := FindScripts(root)
	if err != nil {
		return res, err
	}
	if len(scripts) == 0 {
		return res, fmt.Errorf("no <group>/<kind>/health.lua under %s", root)
	}
	for _, s := range scripts {
		name := s.Group + "/" + s.Kind
		res.Kinds = append(res.Kinds, name)
		testPath := filepath.Join(s.Dir, "health_test.yaml")
		data, err := os.ReadFile(testPath)
		if err != nil {
			res.Failures = append(res.Failures, Failure{Case: name, Err: err})
			continue
		}
		var tf testFile
		if err := yaml.UnmarshalStrict(data, &tf); err != nil {
			res.Failures = append(res.Failures, Failure{Case: testPath, Err: err})
			continue
		}
		if len(tf.Tests) == 0 {
			res.Failures = append(res.Failures, Failure{Case: testPath, Err: errors.New("no tests")})
		}
		used := map[string]bool{}
		for _, tc := range tf.Tests {
			caseName := name + "/" + tc.InputPath
			used[filepath.Clean(tc.InputPath)] = true
			obj, err := ReadObject(filepath.Join(s.Dir, tc.InputPath))
			if err != nil {
				res.Failures = append(res.Failures, Failure{Case: caseName, Err: err})
				continue
			}
			for _, mode := range Modes {
				res.Cases++
				want := tc.HealthStatus
				got, err := Evaluate(s.Text, obj, mode)
				if err != nil {
					res.Failures = append(res.Failures, Failure{Case: caseName, Mode: mode.String(), Err: err})
					continue
				}
				if got != want {
					res.Failures = append(res.Failures, Failure{Case: caseName, Mode: mode.String(), Want: &want, Got: &got})
				}
			}
		}
		files, _ := filepath.Glob(filepath.Join(s.Dir, "testdata", "*"))
		for _, f := range files {
			rel, _ := filepath.Rel(s.Dir, f)
			if !used[rel] {
				res.Failures = append(res.Failures, Failure{Case: name + "/" + filepath.ToSlash(rel), Err: errors.New("testdata file is not used by any case in health_test.yaml")})
			}
		}
	}
	return res, nil
}

// Report prints the failures and a summary; it returns whether everything passed.
func Report(w io.Writer, res Result) bool {
	for _, f := range res.Failures {
		fmt.Fprint(w, f.String())
	}
	if len(res.Failures) > 0 {
		fmt.Fprintf(w, "argocd health checks: %d of %d case runs failed (%s)\n", len(res.Failures), res.Cases, strings.Join(res.Kinds, ", "))
		return false
	}
	fmt.Fprintf(w, "argocd health checks: %d cases passed in %d modes (%s)\n", res.Cases/len(Modes), len(Modes), strings.Join(res.Kinds, ", "))
	return true
}
