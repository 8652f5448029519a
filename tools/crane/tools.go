//go:build tools

// Package tools records the crane command as a dependency of this module, so that go.sum pins it.
package tools

import _ "github.com/google/go-containerregistry/cmd/crane"
