# The real node of the local cluster (NODE=real): containerd with runc, a kubelet, kube-proxy, the CNI
# bridge + host-local plugins, CoreDNS as the node's DNS server and kube-router's NetworkPolicy
# controller, all built from Go modules by e2e/node/build.sh. Sourced by e2e/cluster.sh, whose
# helpers (log, die, start, wait_for, free_port, stop_component, DIR, KUBECTL) it uses.
#
# Network: the bridge $RN_BRIDGE holds the node's pod gateway $RN_GW (pods get addresses from
# $RN_POD_CIDR). The API server advertises $RN_GW, so pods reach it through the `kubernetes` Service
# (kube-proxy) and NetworkPolicies can name it as an ipBlock; CoreDNS listens on $RN_GW:53 and is the
# pods' nameserver (like NodeLocal DNSCache). Everything the node adds to the host (bridge, iptables
# chains, ipsets, mounts, cgroups, network namespaces) is removed again by realnode_cleanup.

RN_POD_CIDR=10.88.0.0/16
RN_GW=10.88.0.1
RN_BRIDGE=caduceus0
RN_SANDBOX_IMAGE=registry.k8s.io/pause:3.10.1
RN_CLUSTER_DOMAIN=cluster.local
# Stop order (start order is the reverse); the containers' shims are found as strays.
RN_COMPONENTS=(kube-router coredns kube-proxy kubelet containerd)

# Why this machine cannot run the real node, or nothing when it can.
realnode_unsupported() {
  [[ $(id -u) == 0 ]] || { echo "not root"; return; }
  grep -qw overlay /proc/filesystems || { echo "no overlayfs"; return; }
  [[ -d /sys/fs/cgroup/pids || -f /sys/fs/cgroup/cgroup.controllers ]] || { echo "no cgroup hierarchy"; return; }
  local c
  for c in iptables ipset ip gcc python3; do command -v "$c" >/dev/null || { echo "'$c' is not installed"; return; }; done
  [[ -f /usr/include/seccomp.h ]] || { echo "libseccomp-dev is not installed (runc needs it for seccomp)"; return; }
  ip link add caduceus-probe type bridge 2>/dev/null || { echo "cannot create a bridge device"; return; }
  ip link del caduceus-probe
}

# Builds (once, cached) the node's binaries; sets RN_BIN[component].
declare -A RN_BIN
realnode_build() {
  local line
  while IFS= read -r line; do RN_BIN[${line%%=*}]=${line#*=}; done < <("$here/node/build.sh") ||
    die "building the real node's binaries failed (e2e/node/build.sh)"
  for c in runc containerd kubelet cni coredns router; do
    [[ -n ${RN_BIN[$c]:-} ]] || die "e2e/node/build.sh did not build $c"
  done
}

# Remembers where the binaries are, for realnode_cleanup in a later `down`.
realnode_save_bins() {
  local c
  for c in "${!RN_BIN[@]}"; do echo "$c=${RN_BIN[$c]}"; done >"$DIR/node.bins"
}

realnode_load_bins() {
  local line
  [[ -f $DIR/node.bins ]] || return 0
  while IFS= read -r line; do RN_BIN[${line%%=*}]=${line#*=}; done <"$DIR/node.bins"
}

# Host settings the node needs: forwarding, bridged traffic through iptables (for NetworkPolicies on
# pods of one bridge), and the bridge with the gateway address (the API server advertises it).
realnode_host() {
  sysctl -qw net.ipv4.ip_forward=1
  modprobe br_netfilter 2>/dev/null || true
  sysctl -qw net.bridge.bridge-nf-call-iptables=1
  ip link show "$RN_BRIDGE" >/dev/null 2>&1 || ip link add "$RN_BRIDGE" type bridge
  ip addr replace "$RN_GW/${RN_POD_CIDR#*/}" dev "$RN_BRIDGE"
  ip link set "$RN_BRIDGE" up
}

realnode_start() {
  local rn=$DIR/node
  mkdir -p "$rn"/{containerd/root,containerd/state,cni/net.d,cni/ipam,kubelet,logs}
  PATH=${RN_BIN[containerd]}:${RN_BIN[runc]}:$PATH
  export PATH

  # containerd (CRI), with runc and the CNI plugins; its sandbox image is built here (no registry).
  cat >"$rn/containerd.toml" <<EOF
version = 3
root = "$rn/containerd/root"
state = "$rn/containerd/state"
[grpc]
  address = "$rn/containerd/containerd.sock"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$RN_SANDBOX_IMAGE"
[plugins.'io.containerd.cri.v1.runtime']
  # Root here may lack CAP_SYS_RESOURCE (as in a container): no score below containerd's own.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["${RN_BIN[cni]}"]
    conf_dir = "$rn/cni/net.d"
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "${RN_BIN[runc]}/runc"
        SystemdCgroup = false
EOF
  cat >"$rn/cni/net.d/10-caduceus.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "caduceus",
  "plugins": [
    {
      "type": "bridge", "bridge": "$RN_BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": {"type": "host-local", "dataDir": "$rn/cni/ipam", "ranges": [[{"subnet": "$RN_POD_CIDR", "gateway": "$RN_GW"}]], "routes": [{"dst": "0.0.0.0/0"}]}
    }
  ]
}
EOF
  log "starting containerd (runc ${RN_BIN[runc]##*/runc-})"
  start containerd "$rn/logs/containerd.log" "${RN_BIN[containerd]}/containerd" --config "$rn/containerd.toml"
  wait_for "containerd" "$rn/logs/containerd.log" ctr version
  gcc -static -Os -o "$rn/pause" "$here/node/pause.c" || die "compiling the sandbox (pause) program failed"
  python3 "$here/node/sandbox-image.py" "$rn/pause" "$RN_SANDBOX_IMAGE" "$rn/pause.tar" >/dev/null ||
    die "writing the sandbox image failed"
  ctr images import "$rn/pause.tar" >"$rn/logs/import.log" 2>&1 || { cat "$rn/logs/import.log" >&2; die "importing the sandbox image failed"; }
  realnode_import_images

  # kubelet: cgroupfs driver (this host has cgroup v1 or v2), authenticated as system:node:$NODE_NAME
  # (the Node authorizer and NodeRestriction apply), no read-only port, its own ports.
  local kubelet_port kubelet_healthz proxy_healthz proxy_metrics router_health router_metrics
  kubelet_port=$(free_port); kubelet_healthz=$(free_port); proxy_healthz=$(free_port); proxy_metrics=$(free_port)
  router_health=$(free_port); router_metrics=$(free_port)
  echo "nameserver $RN_GW" >"$rn/resolv.conf"
  cat >"$rn/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$rn/containerd/containerd.sock
address: $RN_GW
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $kubelet_healthz
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $DIR/pki/ca.crt}
authorization: {mode: Webhook}
clusterDomain: $RN_CLUSTER_DOMAIN
clusterDNS: [$RN_GW]
resolvConf: $rn/resolv.conf
failSwapOn: false
podCIDR: $RN_POD_CIDR
maxPods: 110
serializeImagePulls: false
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
enforceNodeAllocatable: []
cgroupsPerQOS: true
localStorageCapacityIsolation: true
EOF
  log "starting kubelet (node $NODE_NAME)"
  start kubelet "$rn/logs/kubelet.log" "${RN_BIN[kubelet]}/kubelet" --config "$rn/kubelet.yaml" \
    --kubeconfig "$DIR/node.kubeconfig" --root-dir "$rn/kubelet" --hostname-override "$NODE_NAME" \
    --node-ip "$RN_GW" --cert-dir "$rn/kubelet/pki" --v 1

  cat >"$rn/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $DIR/proxy.kubeconfig}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $RN_POD_CIDR
healthzBindAddress: 127.0.0.1:$proxy_healthz
metricsBindAddress: 127.0.0.1:$proxy_metrics
conntrack: {maxPerCore: 0}
EOF
  log "starting kube-proxy (iptables)"
  start kube-proxy "$rn/logs/kube-proxy.log" "${RN_BIN[kubelet]}/kube-proxy" --config "$rn/kube-proxy.yaml"

  cat >"$rn/Corefile" <<EOF
.:53 {
    bind $RN_GW
    errors
    kubernetes $RN_CLUSTER_DOMAIN in-addr.arpa ip6.arpa {
        kubeconfig $DIR/dns.kubeconfig
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 5
}
EOF
  log "starting CoreDNS on $RN_GW:53"
  start coredns "$rn/logs/coredns.log" "${RN_BIN[coredns]}/coredns" -conf "$rn/Corefile"

  RN_ROUTER_HEALTH=$router_health RN_ROUTER_METRICS=$router_metrics
}

# kube-router's NetworkPolicy controller, once the Node exists (it exits when it cannot find its Node).
realnode_start_policy() {
  local rn=$DIR/node router_health=$RN_ROUTER_HEALTH router_metrics=$RN_ROUTER_METRICS
  log "starting kube-router (NetworkPolicy controller only)"
  start kube-router "$rn/logs/kube-router.log" "${RN_BIN[router]}/kube-router" \
    --kubeconfig "$DIR/netpol.kubeconfig" --hostname-override "$NODE_NAME" \
    --run-firewall=true --run-router=false --run-service-proxy=false --run-loadbalancer=false \
    --health-port "$router_health" --metrics-port "$router_metrics" --v 1
  wait_for "kube-router /healthz" "$rn/logs/kube-router.log" curl -sf --max-time 2 "http://127.0.0.1:$router_health/healthz"
  wait_for "kube-router's iptables chains" "$rn/logs/kube-router.log" iptables -S KUBE-ROUTER-FORWARD
}

# Images for the node: the tarballs in $CADUCEUS_NODE_IMAGES (a directory of *.tar, from `make images`),
# imported into containerd's k8s.io namespace. Without it, only the sandbox image is there.
realnode_import_images() {
  local dir=${CADUCEUS_NODE_IMAGES:-} t
  [[ -n $dir ]] || return 0
  [[ -d $dir ]] || die "CADUCEUS_NODE_IMAGES=$dir is not a directory"
  for t in "$dir"/*.tar; do
    [[ -f $t ]] || continue
    log "importing image $(basename "$t")"
    ctr images import --local "$t" >>"$DIR/node/logs/import.log" 2>&1 ||
      { tail -5 "$DIR/node/logs/import.log" >&2; die "importing $t into containerd failed"; }
  done
}

ctr() { "${RN_BIN[containerd]:-$(dirname "$(command -v containerd)")}/ctr" --address "$DIR/node/containerd/containerd.sock" -n k8s.io "$@"; }

# Removes what the node added to the host. Safe to run when nothing is there.
realnode_cleanup() {
  local rn=$DIR/node cg p m ns
  [[ -n ${RN_BIN[kubelet]:-} ]] || realnode_load_bins
  # The pods' processes: every process in the kubelet's cgroups (cgroup v1: one tree per controller).
  for cg in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods /sys/fs/cgroup/kubepods.slice; do
    [[ -d $cg ]] || continue
    for p in $(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
  done
  sleep 0.2
  for cg in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
    [[ -d $cg ]] && find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  # Mounts under the node's state (overlay rootfs, volumes, shm, netns bind mounts), deepest first.
  if [[ -d $rn ]]; then
    for m in $(awk -v d="$rn" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r); do
      umount -l "$m" 2>/dev/null || true
    done
  fi
  for ns in $(ip netns list 2>/dev/null | awk '/^cni-/{print $1}'); do ip netns del "$ns" 2>/dev/null || true; done
  # iptables and ipsets of kube-proxy and kube-router, then the bridge.
  if [[ -n ${RN_BIN[kubelet]:-} && -x ${RN_BIN[kubelet]}/kube-proxy ]]; then
    "${RN_BIN[kubelet]}/kube-proxy" --cleanup >/dev/null 2>&1 || true
  fi
  if [[ -n ${RN_BIN[router]:-} && -x ${RN_BIN[router]}/kube-router ]]; then
    "${RN_BIN[router]}/kube-router" --cleanup-config >/dev/null 2>&1 || true
  fi
  # What is left of the kubelet's own chains (KUBE-FIREWALL, KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT)
  # and of any KUBE-* chain: the jumps to them from the built-in chains, then the chains.
  local ipt t rule c
  for ipt in iptables ip6tables; do
    command -v "$ipt" >/dev/null || continue
    for t in filter nat mangle; do
      "$ipt" -t "$t" -S 2>/dev/null | grep -E '^-A (INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) .*-j KUBE-' |
        while IFS= read -r rule; do eval "$ipt -t $t ${rule/-A/-D}" 2>/dev/null || true; done || true
      for c in $("$ipt" -t "$t" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}'); do
        "$ipt" -t "$t" -F "$c" 2>/dev/null || true
      done
      for c in $("$ipt" -t "$t" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}'); do
        "$ipt" -t "$t" -X "$c" 2>/dev/null || true
      done
    done
  done
  ip link del "$RN_BRIDGE" 2>/dev/null || true
}
