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

.PHONY: jaeger
jaeger: ## Build (once, cached by version) Jaeger all-in-one from its Go module (the tracing e2e test); prints its path
	e2e/jaeger/build.sh

.PHONY: node
node: ## Build (once, cached by version) the real node: runc, containerd, kubelet, kube-proxy, CNI plugins, CoreDNS, kube-router
	e2e/node/build.sh

# NODE=localnode (default: the kubelet stand-in), real (containerd, runc, kubelet; e2e/node/) or auto.
.PHONY: cluster-up
cluster-up: build controlplane ## Start a real local control plane and its node (NODE=localnode|real|auto); prints the kubeconfig path
	e2e/cluster.sh up

.PHONY: cluster-down
cluster-down: ## Stop the local control plane
	e2e/cluster.sh down

.PHONY: unit
unit: ## Unit and crate-level integration tests that need no cluster
	$(CARGO) test --workspace --exclude caduceus-e2e

.PHONY: e2e
e2e: ## Tests against the real local control plane (starts and stops it), the Helm chart's install included
	$(MAKE) cluster-up
	export CADUCEUS_HELM=$$(tools/helm/build.sh) CADUCEUS_PROMETHEUS_CRDS=$$(tools/prometheus-operator/crds.sh) \
	  CADUCEUS_JAEGER=$$(e2e/jaeger/build.sh); \
	trap 'e2e/cluster.sh down' EXIT; echo "make e2e: node $$(cat $(CADUCEUS_CLUSTER_DIR)/node.kind)"; \
	KUBECONFIG=$(KUBECONFIG_FILE) $(CARGO) test -p caduceus-e2e -- --test-threads=1

# The chart on the real node (e2e/tests/node.rs): a cluster of its own under NODE_CLUSTER_DIR, with the
# images of `make images` imported into its containerd.
NODE_CLUSTER_DIR ?= /tmp/caduceus-node-cluster-$(shell id -u)

.PHONY: e2e-node
e2e-node: build controlplane node images ## The chart from its images on the real node: securityContext, tokens, NetworkPolicies, spans to Jaeger
	export CADUCEUS_CLUSTER_DIR=$(NODE_CLUSTER_DIR) CADUCEUS_HELM=$$(tools/helm/build.sh) CADUCEUS_JAEGER=$$(e2e/jaeger/build.sh); \
	trap 'e2e/cluster.sh down' EXIT; \
	NODE=real CADUCEUS_NODE_IMAGES=$(IMAGES_DIR) e2e/cluster.sh up >/dev/null; \
	CADUCEUS_REQUIRE_REAL_NODE=1 KUBECONFIG=$(NODE_CLUSTER_DIR)/kubeconfig \
	  $(CARGO) test -p caduceus-e2e --test node -- --test-threads=1 --nocapture

# The sites test (docs/sites.md) starts three clusters of its own (coordinator, two hospitals) under
# SITES_DIR (e2e/sites.sh up|down|status for a look by hand); the trap stops them even when the test is killed.
SITES_DIR ?= /tmp/sites-e2e/$(shell id -u)
SITES_DOWN := CADUCEUS_SITES_DIR=$(SITES_DIR) e2e/sites.sh down

.PHONY: e2e-sites
e2e-sites: build controlplane ## Sites: a coordinator and two hospital clusters, a TFHE + DP-SGD study, fault cases
	trap '$(SITES_DOWN)' EXIT; CADUCEUS_SITES_E2E=1 CADUCEUS_SITES_DIR=$(SITES_DIR) \
	  $(CARGO) test -p caduceus-e2e --test sites -- --test-threads=1 --nocapture

.PHONY: e2e-sites-long
e2e-sites-long: build controlplane ## The sites test with more rounds (CADUCEUS_SITES_LONG=1)
	trap '$(SITES_DOWN)' EXIT; CADUCEUS_SITES_E2E=1 CADUCEUS_SITES_LONG=1 CADUCEUS_SITES_DIR=$(SITES_DIR) \
	  $(CARGO) test -p caduceus-e2e --test sites -- --test-threads=1 --nocapture

.PHONY: helm
helm: ## Build (once, cached by version) the Helm CLI from its Go module; prints its path
	tools/helm/build.sh

.PHONY: chart-check
chart-check: ## Offline chart checks: helm lint, template (default and full), schema violations, alerts vs metrics
	HELM=$$(tools/helm/build.sh) charts/caduceus/tests/check-chart.sh

.PHONY: argocd-check
argocd-check: ## Argo CD Lua health checks against their health_test.yaml cases (gopher-lua), generated ConfigMap in sync
	argocd/check.sh

.PHONY: terraform-check
terraform-check: ## tofu fmt -check, validate and tests of the Terraform module and example (OpenTofu from its Go module)
	terraform/check.sh

# Daemonless images (images/build-oci.sh): OCI layouts and docker-archive tarballs of the binaries of
# `make build` (PROFILE=release: of a release build), written to IMAGES_DIR, outside the source.
PROFILE ?= debug
IMAGES_DIR ?= $(CARGO_TARGET_DIR)/images
IMAGES_ENV := PROFILE=$(PROFILE) IMAGES_DIR=$(IMAGES_DIR)

.PHONY: build-profile
build-profile:
ifeq ($(PROFILE),release)
	$(CARGO) build --release --workspace --bins
else
	$(CARGO) build --workspace --bins
endif

.PHONY: images-check
images-check: build-profile ## Dockerfile static checks; build the images twice (same digests), check config, layer, SBOM, run
	images/check.sh
	$(IMAGES_ENV) images/check-oci.sh

.PHONY: images
images: build-profile ## Images without a daemon: IMAGES_DIR/caduceus-{operator,trainer,aggregator}.{oci/,tar,cdx.json}
	$(IMAGES_ENV) images/build-oci.sh

.PHONY: images-docker
images-docker: ## Build the three images with Docker and BuildKit from images/Dockerfile (release build inside)
	images/build.sh

.PHONY: packaging
packaging: chart-check argocd-check terraform-check images-check ## Every packaging check that needs no cluster

.PHONY: test
test: lint check-crds build controlplane unit packaging e2e e2e-sites e2e-node ## Everything CI runs
	@echo "make test: all checks passed"

# Results of `make demo` (a directory; replaced on each run). Extra simulate flags: DEMO_FLAGS="--rounds 3".
DEMO_RESULTS ?= results/demo
DEMO_FLAGS ?=

.PHONY: demo
demo: build ## The main job: a local federated study (4 hospitals on loopback with mTLS) and its bias report
	$(BIN_DIR)/caduceus simulate --results $(DEMO_RESULTS) --overwrite $(DEMO_FLAGS)
	$(BIN_DIR)/caduceus report --results $(DEMO_RESULTS) -o $(DEMO_RESULTS)/report.html
	@echo "demo: bias report written to $(abspath $(DEMO_RESULTS))/report.html"

# The demo study under DP-SGD: every hospital's own σ for ε = DP_EPSILON (δ = 1e-5) over the whole
# study, with the settings docs/privacy.md ("Choosing C, the batch and the learning rate") measured.
DP_EPSILON ?= 8
DP_RESULTS ?= results/demo-dp
DP_FLAGS ?= --optimizer sgd --lr 0.03 --momentum 0.9 --batch-size 256 --dp-clip-norm 10

.PHONY: demo-dp
demo-dp: build ## The demo study with DP-SGD at epsilon DP_EPSILON per hospital (about 6 min on 2 cores)
	$(BIN_DIR)/caduceus simulate --results $(DP_RESULTS) --overwrite --dp-target-epsilon $(DP_EPSILON) --dp-delta 1e-5 $(DP_FLAGS) $(DEMO_FLAGS)
	$(BIN_DIR)/caduceus report --results $(DP_RESULTS) -o $(DP_RESULTS)/report.html
	@echo "demo-dp: bias report written to $(abspath $(DP_RESULTS))/report.html"

.PHONY: api-demo
api-demo: cluster-up ## The API on a real local control plane: CRDs and every example, shown with kubectl
	trap 'e2e/cluster.sh down' EXIT; \
	k="$(CADUCEUS_CLUSTER_DIR)/bin/kubectl --kubeconfig $(KUBECONFIG_FILE)"; \
	$$k apply -f crds/ && $$k wait --for condition=Established crd --all --timeout=60s && \
	$$k apply -f examples/00-namespaces.yaml && $$k apply -f examples/ && \
	$$k get caduceus -A

# Benchmarks run in the dev profile that the demo and the tests use: dependencies at opt-level 2, our hot
# crates, candle and gemm at 3 without debug assertions (see Cargo.toml), so no second (release) build of
# candle and tfhe is needed. The PyTorch baseline is installed from PyPI into a cached venv
# (tools/torch/setup.sh) on first use.
BENCH_IMAGES ?= 1024
BENCH_STEPS ?= 24
# Rounds of the trainer-vs-PyTorch comparison (ours and PyTorch alternate; medians are compared).
BENCH_ROUNDS ?= 3

EXAMPLES := $(CARGO_TARGET_DIR)/debug/examples

.PHONY: bench
bench: ## Benchmarks, each reported as a ratio against a baseline measured in the same run
	@# Built for the whole workspace at once: `cargo run -p X` alone would resolve other dependency features
	@# and rebuild candle and tfhe.
	$(CARGO) build -q --workspace --examples
	@echo "== FedAvg over 10 updates of 11M float32 parameters vs a plain copy of the same bytes"
	$(EXAMPLES)/fedavg_bench --updates 10 --params 11000000 --reps 5
	@echo "== Trainer throughput per model (images/s, forward+backward+AdamW) against PyTorch 2.15 (CPU), same run"
	BENCH_IMAGES=$(BENCH_IMAGES) BENCH_STEPS=$(BENCH_STEPS) ROUNDS=$(BENCH_ROUNDS) bench/training.sh $(EXAMPLES)/throughput
	@echo "== The same with candle's own conv2d instead of the fused im2col + GEMM convolution"
	$(EXAMPLES)/throughput --images $(BENCH_IMAGES) --steps 4 --batch 64 --archs small-cnn,resnet8 --conv candle
	@echo "== Secure aggregation (TFHE packed additive codec) per 1M parameters and 10 hospitals vs plaintext"
	RAYON_NUM_THREADS=1 $(EXAMPLES)/he_bench --values 1000000 --hospitals 10 --reps 2
	@echo "== Exact discrete-Gaussian DP noise"
	$(EXAMPLES)/noise_bench 1000000
	@echo "== DP-SGD step vs a non-private step of the same model and batch (same run)"
	$(EXAMPLES)/dp_overhead --batch 64 --reps 5

.PHONY: bench-operator
bench-operator: build controlplane ## Operator RSS and reconcile throughput with 200 hospitals and 20 studies (local control plane)
	$(MAKE) cluster-up
	trap 'e2e/cluster.sh down' EXIT; KUBECONFIG=$(KUBECONFIG_FILE) bench/operator.sh

.PHONY: bench-sites
bench-sites: build controlplane ## Site gateway memory with SITES (50) simulated sites connected vs none (local control plane)
	$(CARGO) build -q -p caduceus-operator --examples
	$(MAKE) cluster-up
	trap 'e2e/cluster.sh down' EXIT; KUBECONFIG=$(KUBECONFIG_FILE) bench/sites.sh

# Short fuzz run of the secure-aggregation wire decoder (needs a nightly toolchain and cargo-fuzz).
FUZZ_SECS ?= 30

.PHONY: fuzz
fuzz: ## Fuzz the secagg wire decoder for FUZZ_SECS seconds (cargo +nightly fuzz)
	@if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then \
		echo "make fuzz: no nightly toolchain (rustup toolchain install nightly); fuzzing skipped" >&2; exit 1; \
	fi
	@if ! cargo +nightly fuzz --version >/dev/null 2>&1; then \
		echo "make fuzz: cargo-fuzz is not installed (cargo install cargo-fuzz); fuzzing skipped" >&2; exit 1; \
	fi
	mkdir -p secagg/fuzz/corpus/decode
	cd secagg/fuzz && cargo +nightly fuzz run decode -s none corpus/decode seeds/decode -- \
		-max_total_time=$(FUZZ_SECS) -max_len=16384

.PHONY: clean
clean:
	$(CARGO) clean
