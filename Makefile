# Caduceus developer entry points. `make demo` runs the main job, `make test` runs everything CI runs.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
# Reuse a target directory outside the clone when one is given (CI sets it to a cache that survives clones).
export CARGO_TARGET_DIR ?= $(CURDIR)/target
BIN_DIR := $(CARGO_TARGET_DIR)/debug
export CADUCEUS_BIN_DIR ?= $(BIN_DIR)
export CADUCEUS_DATA_DIR ?= $(abspath $(CURDIR)/../shared/data)
export CADUCEUS_CLUSTER_DIR ?= /tmp/caduceus-cluster-$(shell id -u)
KUBECONFIG_FILE := $(CADUCEUS_CLUSTER_DIR)/kubeconfig

.PHONY: help
help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

.PHONY: build
build: ## Build every binary of the workspace
	$(CARGO) build --workspace --bins

.PHONY: crds
crds: ## Regenerate the CRD YAML under crds/ from the Rust types
	$(CARGO) run -q -p caduceus-crds --bin crdgen

.PHONY: check-crds
check-crds: ## Fail when the committed CRD YAML differs from the Rust types
	$(CARGO) run -q -p caduceus-crds --bin crdgen -- --check

.PHONY: lint
lint: ## rustfmt and clippy, warnings are errors
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: controlplane
controlplane: ## Build (once, cached by version) kube-apiserver, controller-manager, scheduler, kubectl and etcd
	e2e/controlplane/build.sh

.PHONY: cluster-up
cluster-up: build controlplane ## Start a real local control plane and the localnode; prints the kubeconfig path
	e2e/cluster.sh up

.PHONY: cluster-down
cluster-down: ## Stop the local control plane
	e2e/cluster.sh down

.PHONY: unit
unit: ## Unit and crate-level integration tests that need no cluster
	$(CARGO) test --workspace --exclude caduceus-e2e

.PHONY: e2e
e2e: ## Tests against the real local control plane (starts and stops it)
	$(MAKE) cluster-up
	trap 'e2e/cluster.sh down' EXIT; KUBECONFIG=$(KUBECONFIG_FILE) $(CARGO) test -p caduceus-e2e -- --test-threads=1

.PHONY: test
test: lint check-crds build controlplane unit e2e ## Everything CI runs
	@echo "make test: all checks passed"

.PHONY: demo
demo: cluster-up ## The main job. Until the data path lands: a smoke flow on the real local control plane
	trap 'e2e/cluster.sh down' EXIT; \
	k="$(CADUCEUS_CLUSTER_DIR)/bin/kubectl --kubeconfig $(KUBECONFIG_FILE)"; \
	$$k apply -f crds/ && $$k wait --for condition=Established crd --all --timeout=60s && \
	$$k apply -f examples/00-namespaces.yaml && $$k apply -f examples/ && \
	$$k get caduceus -A && \
	echo "demo: the CRDs, example studies, hospitals and a round are on a real API server (the federated" && \
	echo "demo: training run itself comes with the data-path issue)"

.PHONY: bench
bench: ## Benchmarks, each reported as a ratio against a baseline measured in the same run
	@echo "see docs/benchmarks.md"

.PHONY: clean
clean:
	$(CARGO) clean
