#!/usr/bin/env bash
# Builds the real Kubernetes control plane (kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl) and etcd from Go modules, and caches them outside the repository, keyed by version.
# Prints the directory that holds the binaries. Only the first build on a machine pays for it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
modver() { awk -v m="$1" '($1=="require" && $2==m) {print $3} ($1==m && $2 ~ /^v/) {print $2}' "$2" | head -n1; }
K8S_VERSION=$(modver k8s.io/kubernetes "$here/k8s/go.mod")
ETCD_VERSION=$(modver go.etcd.io/etcd/server/v3 "$here/etcd/go.mod")
[[ -n $K8S_VERSION && -n $ETCD_VERSION ]] || { echo "ERROR: cannot read the pinned versions from $here/*/go.mod" >&2; exit 1; }
cache=${CADUCEUS_CACHE:-$HOME/.cache/caduceus}
out="$cache/controlplane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"
bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd)

complete=1
for b in "${bins[@]}"; do [[ -x "$out/$b" ]] || complete=0; done
if (( complete )); then echo "$out"; exit 0; fi

mkdir -p "$out.tmp"
log="$out.build.log"
echo "building the control plane (k8s $K8S_VERSION, etcd $ETCD_VERSION) into $out; log: $log" >&2
echo "a cold build on 2 cores takes several minutes" >&2

fail_proxy() {
  echo "ERROR: cannot download Go modules for the control plane (k8s.io/kubernetes $K8S_VERSION," >&2
  echo "go.etcd.io/etcd/server/v3 $ETCD_VERSION). Is the Go module proxy reachable? GOPROXY=$(go env GOPROXY)" >&2
  echo "The control-plane tests cannot run without these binaries; see $log." >&2
  exit 3
}
(cd "$here/k8s" && go mod download) >"$log" 2>&1 || fail_proxy
(cd "$here/etcd" && go mod download) >>"$log" 2>&1 || fail_proxy

minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
ldflags="$ldflags -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
(cd "$here/k8s" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$out.tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl) >>"$log" 2>&1 \
  || { echo "ERROR: building Kubernetes failed; see $log" >&2; tail -20 "$log" >&2; exit 1; }
(cd "$here/etcd" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3) >>"$log" 2>&1 \
  || { echo "ERROR: building etcd failed; see $log" >&2; tail -20 "$log" >&2; exit 1; }
rm -rf "$out" && mv "$out.tmp" "$out"
echo "$out"
