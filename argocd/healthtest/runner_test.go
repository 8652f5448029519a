package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const root = "../resource_customizations"

// The real suite: every health_test.yaml of the Caduceus kinds passes in both library sets.
func TestHealthChecks(t *testing.T) {
	res, err := Run(root)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if !Report(&out, res) {
		t.Fatal(out.String())
	}
	for _, kind := range []string{"FederatedStudy", "HospitalClient", "TrainingRound"} {
		found := false
		for _, k := range res.Kinds {
			found = found || k == "fl.caduceus.dev/"+kind
		}
		if !found {
			t.Errorf("no health check for fl.caduceus.dev/%s (have %v)", kind, res.Kinds)
		}
	}
	t.Log(out.String())
}

// The committed argocd-cm patch and Helm values match the scripts.
func TestGeneratedFilesInSync(t *testing.T) {
	scripts, err := FindScripts(root)
	if err != nil {
		t.Fatal(err)
	}
	gen, err := Generate(scripts)
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckGenerated("..", gen); err != nil {
		t.Fatal(err)
	}
}

// writeTree makes a resource_customizations tree with one kind.
func writeTree(t *testing.T, script, tests string, data map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	kind := filepath.Join(dir, "example.com", "Widget")
	if err := os.MkdirAll(filepath.Join(kind, "testdata"), 0o755); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{"health.lua": script, "health_test.yaml": tests}
	for name, text := range data {
		files[filepath.Join("testdata", name)] = text
	}
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(kind, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

const widget = `apiVersion: example.com/v1
kind: Widget
metadata: {name: w, generation: 2}
status:
  observedGeneration: 2
  conditions:
    - {type: Ready, status: "True", reason: Up, message: all good}
`

const widgetScript = `local hs = {}
for _, c in ipairs(obj.status.conditions) do
  if c.type == "Ready" and c.status == "True" then
    hs.status = "Healthy"
    hs.message = c.reason .. ": " .. c.message .. " at generation " .. obj.status.observedGeneration
    return hs
  end
end
hs.status = "Degraded"
return hs
`

// Self-test: the runner passes a right expectation ...
func TestRunnerPassesRightExpectation(t *testing.T) {
	dir := writeTree(t, widgetScript, `tests:
- healthStatus:
    status: Healthy
    message: "Up: all good at generation 2"
  inputPath: testdata/ok.yaml
`, map[string]string{"ok.yaml": widget})
	var stdout, stderr bytes.Buffer
	if code := run([]string{"-root", dir}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d\n%s%s", code, stdout.String(), stderr.String())
	}
}

// ... and fails, with a diff, on a wrong one.
func TestRunnerFailsOnWrongExpectation(t *testing.T) {
	dir := writeTree(t, widgetScript, `tests:
- healthStatus:
    status: Progressing
    message: "Up: all good at generation 2"
  inputPath: testdata/ok.yaml
- healthStatus:
    status: Healthy
    message: "this is not the message"
  inputPath: testdata/ok.yaml
`, map[string]string{"ok.yaml": widget})
	var stdout, stderr bytes.Buffer
	code := run([]string{"-root", dir}, &stdout, &stderr)
	if code == 0 {
		t.Fatalf("a wrong expectation passed:\n%s", stdout.String())
	}
	out := stdout.String()
	for _, want := range []string{
		"FAIL example.com/Widget/testdata/ok.yaml [argocd-cm sandbox]",
		"FAIL example.com/Widget/testdata/ok.yaml [open libs]",
		`status:  want "Progressing"`,
		`got  "Healthy"`,
		`message: want "this is not the message"`,
		`got  "Up: all good at generation 2"`,
		"4 of 4 case runs failed",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

// Missing test files, unused testdata and invalid returned statuses are failures too.
func TestRunnerFailsOnIncompleteTree(t *testing.T) {
	dir := writeTree(t, `return {status = "Fine"}`, `tests:
- healthStatus: {status: Healthy}
  inputPath: testdata/ok.yaml
`, map[string]string{"ok.yaml": widget, "orphan.yaml": widget})
	res, err := Run(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if Report(&out, res) {
		t.Fatal("passed")
	}
	for _, want := range []string{"orphan.yaml", "not used by any case", `got  "Unknown"`, `"Lua returned an invalid health status"`} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

// The sandbox is Argo CD's: no io, no real os, and (as in argocd-cm without useOpenLibs) no string or
// math library. require("os") gives only time and date.
func TestSandboxRejectsUnsafeLibraries(t *testing.T) {
	obj := map[string]any{"metadata": map[string]any{"name": "w"}}
	for _, script := range []string{
		`local f = io.open("/etc/hostname") return {status = "Healthy"}`,
		`return {status = "Healthy", message = os.getenv("HOME")}`,
		`os.execute("true") return {status = "Healthy"}`,
		`local o = require("os") o.execute("true") return {status = "Healthy"}`,
		`local o = require("io") return {status = "Healthy"}`,
		`return {status = "Healthy", message = string.format("%s", obj.metadata.name)}`,
		`return {status = "Healthy", message = obj.metadata.name:upper()}`,
		`return {status = "Healthy", message = tostring(math.floor(1.5))}`,
		`dofile("/etc/hostname") return {status = "Healthy"}`,
	} {
		if h, err := Evaluate(script, obj, Sandbox); err == nil {
			t.Errorf("sandbox ran %q: %+v", script, h)
		}
	}
	// What the sandbox keeps: base, table and os.time via require.
	h, err := Evaluate(`local o = require("os")
local parts = {}
table.insert(parts, obj.metadata.name)
table.insert(parts, tostring(o.time() > 0))
return {status = "Healthy", message = table.concat(parts, " ")}`, obj, Sandbox)
	if err != nil || h != (Health{Status: "Healthy", Message: "w true"}) {
		t.Errorf("got %+v, %v", h, err)
	}
	// The same string call is fine with open libraries, which is why every case runs in both.
	if _, err := Evaluate(`return {status = "Healthy", message = string.format("%s", obj.metadata.name)}`, obj, OpenLibs); err != nil {
		t.Errorf("open libs: %v", err)
	}
}

// A health check that never returns is stopped, as Argo CD stops it after a second.
func TestScriptTimeout(t *testing.T) {
	if _, err := Evaluate(`while true do end`, map[string]any{}, Sandbox); err == nil {
		t.Fatal("an endless loop returned")
	}
}

// Objects convert as in Argo CD: arrays are 1-indexed, numbers are numbers, null is nil.
func TestObjectConversion(t *testing.T) {
	obj, err := ReadObject(filepath.Join(root, "fl.caduceus.dev", "TrainingRound", "testdata", "succeeded.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	obj["extra"] = map[string]any{"null": nil, "int": 3, "int64": int64(4)}
	h, err := Evaluate(`
local s = obj.status
assert(type(obj.metadata.generation) == "number")
assert(obj.metadata.generation + 1 == 2)
assert(type(s.accuracy) == "number" and s.accuracy > 0.5)
assert(s.conditions[1] ~= nil and s.conditions[0] == nil)
assert(#obj.spec.participants == 2)
assert(obj.extra.null == nil and obj.extra.int == 3 and obj.extra.int64 == 4)
return {status = "Healthy", message = obj.spec.participants[1]}`, obj, Sandbox)
	if err != nil {
		t.Fatal(err)
	}
	if h.Message != "hospital-riverside/riverside" {
		t.Errorf("got %+v", h)
	}
}
