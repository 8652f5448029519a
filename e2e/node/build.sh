#!/usr/bin/env bash
# Builds the binaries of a real Kubernetes node from Go modules and caches them outside the
# repository, one directory per component keyed by its version:
#   runc (with seccomp), containerd + ctr + containerd-shim-runc-v2, kubelet + kube-proxy (the
#   control plane's k8s.io/kubernetes), the CNI bridge/host-local/loopback plugins, CoreDNS (cluster
#   DNS) and kube-router (its NetworkPolicy controller only, see docs/node.md for why not
#   kube-network-policies).
# Prints one line per component, `NAME=DIR`. Only the first build on a machine pays for it.
#   e2e/node/build.sh [component ...]   (default: all; components: runc containerd kubelet cni coredns router)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
e2e=$(dirname "$here")
modver() { awk -v m="$1" '($1=="require" && $2==m) {print $3} ($1==m && $2 ~ /^v/) {print $2}' "$2" | head -n1; }
cache=${CADUCEUS_CACHE:-$HOME/.cache/caduceus}/node
mkdir -p "$cache"
# One build at a time (.ci/run starts one in the background while cargo compiles; `make node` may follow).
exec 9>"$cache/.build.lock"
flock 9

# name | module dir | module whose version keys the cache | cgo | tags | packages (bin=pkg ...)
components() {
  cat <<EOF
runc|$here/runc|github.com/opencontainers/runc|1|seccomp urfave_cli_no_docs|runc=github.com/opencontainers/runc
containerd|$here/containerd|github.com/containerd/containerd/v2|0|no_btrfs no_devmapper no_zfs urfave_cli_no_docs|containerd=github.com/containerd/containerd/v2/cmd/containerd ctr=github.com/containerd/containerd/v2/cmd/ctr containerd-shim-runc-v2=github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2
kubelet|$here/kubelet|k8s.io/kubernetes|0||kubelet=k8s.io/kubernetes/cmd/kubelet kube-proxy=k8s.io/kubernetes/cmd/kube-proxy
cni|$here/cni|github.com/containernetworking/plugins|0||bridge=github.com/containernetworking/plugins/plugins/main/bridge host-local=github.com/containernetworking/plugins/plugins/ipam/host-local loopback=github.com/containernetworking/plugins/plugins/main/loopback
coredns|$here/coredns|github.com/coredns/coredns|0||coredns=github.com/coredns/coredns
router|$here/router|github.com/cloudnativelabs/kube-router/v2|0||kube-router=github.com/cloudnativelabs/kube-router/v2/cmd/kube-router
EOF
}

build() {
  local name=$1 dir=$2 mod=$3 cgo=$4 tags=$5 pkgs=$6 ver out log
  ver=$(modver "$mod" "$dir/go.mod")
  [[ -n $ver ]] || { echo "ERROR: cannot read the version of $mod from $dir/go.mod" >&2; return 1; }
  out="$cache/$name-$ver"
  local complete=1 p
  for p in $pkgs; do [[ -x "$out/${p%%=*}" ]] || complete=0; done
  if (( complete )); then echo "$name=$out"; return 0; fi
  log="$out.build.log"
  echo "building $name $ver into $out (log: $log)" >&2
  rm -rf "$out.tmp"; mkdir -p "$out.tmp"
  (cd "$dir" && go mod download) >"$log" 2>&1 || {
    echo "ERROR: cannot download the Go modules of $name ($mod $ver). Is the Go module proxy reachable? GOPROXY=$(go env GOPROXY); see $log" >&2
    return 3
  }
  local ldflags="-s -w"
  case $name in
    kubelet)
      local minor=${ver#v1.}; minor=${minor%%.*}
      ldflags="$ldflags -X k8s.io/component-base/version.gitVersion=$ver -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
      ;;
    runc) ldflags="$ldflags -X main.version=${ver#v}" ;;
    containerd) ldflags="$ldflags -X github.com/containerd/containerd/v2/version.Version=$ver" ;;
    coredns) ldflags="$ldflags -X github.com/coredns/coredns/coremain.GitCommit=$ver" ;;
  esac
  for p in $pkgs; do
    (cd "$dir" && CGO_ENABLED=$cgo go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$out.tmp/${p%%=*}" "${p#*=}") >>"$log" 2>&1 || {
      echo "ERROR: building $name (${p#*=}) failed; see $log" >&2; tail -20 "$log" >&2; return 1
    }
  done
  rm -rf "$out" && mv "$out.tmp" "$out"
  echo "$name=$out"
}

want=" $* "
while IFS='|' read -r name dir mod cgo tags pkgs; do
  [[ $# -eq 0 || $want == *" $name "* ]] || continue
  build "$name" "$dir" "$mod" "$cgo" "$tags" "$pkgs"
done < <(components)
