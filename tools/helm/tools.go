//go:build tools

// Package tools records the Helm command as a dependency of this module, so that go.sum pins it.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
