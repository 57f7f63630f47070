//go:build tools

// Package jaeger pins the Jaeger release that the local stack builds: `go build` of
// github.com/jaegertracing/jaeger/cmd/jaeger from this folder takes the version named in
// go.mod, with the dependency versions recorded in go.sum.
package jaeger

import (
	_ "github.com/jaegertracing/jaeger/cmd/jaeger"
)
