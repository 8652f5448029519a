#!/usr/bin/env bash
# A real local Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler (built from Go modules by e2e/controlplane/build.sh) and one node, all on this host:
#   NODE=localnode  localnode, a test stand-in for kubelet that runs Pods as local processes (default)
#   NODE=real       containerd, runc, a real kubelet, kube-proxy, CNI, CoreDNS and a NetworkPolicy
#                   controller (e2e/node/realnode.sh); needs root, overlayfs, cgroups and bridges
#   NODE=auto       real where this machine allows it, else localnode (says which, and why)
#
#   e2e/cluster.sh up       start (or reuse a healthy running one); prints the kubeconfig path
#   e2e/cluster.sh down     stop everything (no stray processes); keeps logs in the state dir
#   e2e/cluster.sh status   show what runs; exit 0 only if the cluster is healthy
#
# State dir: ${CADUCEUS_CLUSTER_DIR:-/tmp/caduceus-cluster} (pids, logs, certs, kubeconfig, etcd data,
# localnode pod dirs). Environment: LOCALNODE_BIN (use this localnode binary instead of building it
# with cargo), CADUCEUS_BIN_DIR (where localnode finds caduceus-* binaries; default: next to localnode),
# CLUSTER_UP_TIMEOUT (seconds to wait for each readiness step, default 90), CLUSTER_APISERVER_EXTRA_ARGS
# (more kube-apiserver flags, split on whitespace; e.g. an audit policy and log outside the state dir).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
DIR=${CADUCEUS_CLUSTER_DIR:-/tmp/caduceus-cluster}
mkdir -p "$(dirname "$DIR")"
DIR=$(cd "$(dirname "$DIR")" && pwd)/$(basename "$DIR")
TIMEOUT=${CLUSTER_UP_TIMEOUT:-90}
# shellcheck source=node/realnode.sh
source "$here/node/realnode.sh"
NODE=${NODE:-localnode}
if [[ $NODE == auto && ${1:-} == up ]]; then
  why=$(realnode_unsupported)
  if [[ -z $why ]]; then NODE=real; else echo "cluster: NODE=auto: localnode, since the real node cannot run here: $why" >&2; NODE=localnode; fi
fi
# A running cluster's node kind wins for down and status.
[[ -f $DIR/node.kind && ${1:-} != up ]] && NODE=$(cat "$DIR/node.kind")
[[ $NODE == auto ]] && NODE=localnode
case $NODE in
  localnode) NODE_NAME=localnode; NODE_COMPONENTS=(localnode) ;;
  real) NODE_NAME=realnode; NODE_COMPONENTS=("${RN_COMPONENTS[@]}") ;;
  *) echo "cluster: ERROR: NODE=$NODE (expected localnode, real or auto)" >&2; exit 2 ;;
esac
# Stop order; start order is the reverse.
COMPONENTS=("${NODE_COMPONENTS[@]}" kube-scheduler kube-controller-manager kube-apiserver etcd)
# Processes of either kind of node are strays once their component is stopped.
STRAYS=(localnode "${RN_COMPONENTS[@]}" containerd-shim-runc-v2 kube-scheduler kube-controller-manager kube-apiserver etcd)

T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
log() { echo "cluster [$(elapsed)s]: $*" >&2; }
die() { echo "cluster: ERROR: $*" >&2; exit 1; }

# --- processes -----------------------------------------------------------------------------------

# Is $1 a live process whose command line mentions our state dir (so a reused pid is never ours)?
ours() {
  local pid=$1
  [[ -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "$DIR"
}

pid_of() { local f="$DIR/pids/$1.pid"; [[ -f $f ]] && cat "$f" || true; }

running() { local pid; pid=$(pid_of "$1"); [[ -n $pid ]] && ours "$pid"; }

# Every process of a cluster with this state dir, found by command line (components) or by the
# environment marker localnode puts on the processes of Pods.
stray_pids() {
  local f p exe
  # One pass with grep over /proc (fast even when the machine is busy); unreadable entries are skipped.
  for f in $(grep -lsF -- "$DIR" /proc/[0-9]*/cmdline 2>/dev/null); do
    p=${f#/proc/}; p=${p%/cmdline}
    [[ $p == "$$" || $p == "$BASHPID" ]] && continue
    exe=$(tr '\0' '\n' 2>/dev/null <"$f" | head -n1) || continue
    exe=$(basename -- "${exe:-none}")
    case " ${STRAYS[*]} " in *" $exe "*) echo "$p" ;; esac
  done
  for f in $(grep -lsxzF -- "CADUCEUS_LOCALNODE_STATE_DIR=$DIR/localnode" /proc/[0-9]*/environ 2>/dev/null); do
    p=${f#/proc/}; p=${p%/environ}
    [[ $p == "$$" || $p == "$BASHPID" ]] || echo "$p"
  done
}

wait_gone() { # pid seconds
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    # A zombie counts as gone.
    [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) == Z ]] && return 0
    sleep 0.1
  done
  return 1
}

stop_component() {
  local name=$1 pid
  pid=$(pid_of "$name")
  if [[ -n $pid ]] && ours "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    # localnode needs a moment to stop its Pods' processes.
    if ! wait_gone "$pid" 15; then
      log "$name (pid $pid) did not stop on SIGTERM; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      wait_gone "$pid" 5 || true
    fi
  fi
  rm -f "$DIR/pids/$name.pid"
}

do_down() {
  local name pids
  for name in "${COMPONENTS[@]}"; do stop_component "$name"; done
  pids=$(stray_pids | tr '\n' ' ')
  if [[ -n ${pids// /} ]]; then
    log "killing stray processes: $pids"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    for p in $pids; do wait_gone "$p" 5 || log "process $p survived SIGKILL"; done
  fi
  if [[ $NODE == real || $(cat "$DIR/node.kind" 2>/dev/null) == real ]]; then realnode_cleanup; fi
  return 0
}

start() { # name logfile binary args...
  local name=$1 logf=$2; shift 2
  # fd 9 holds the lock of this script; the components must not inherit it.
  setsid "$@" </dev/null >"$logf" 2>&1 9>&- &
  echo $! >"$DIR/pids/$name.pid"
}

# --- helpers -------------------------------------------------------------------------------------

used_ports=" "
free_port() {
  local p i
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + RANDOM % 30000))
    [[ $used_ports == *" $p "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      used_ports+="$p "
      echo "$p"
      return 0
    fi
  done
  die "no free TCP port found on 127.0.0.1"
}

wait_for() { # description logfile command...
  local what=$1 logf=$2 i; shift 2
  for ((i = 0; i < TIMEOUT * 4; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.25
  done
  log "timed out after ${TIMEOUT}s waiting for $what; last lines of $logf:"
  tail -n 30 "$logf" >&2 || true
  do_down
  exit 1
}

write_kubeconfig() { # file user token
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: caduceus-local
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority: $DIR/pki/ca.crt
users:
- name: $2
  user:
    token: $3
contexts:
- name: caduceus-local
  context:
    cluster: caduceus-local
    user: $2
    namespace: default
current-context: caduceus-local
EOF
  chmod 600 "$1"
}

make_pki() {
  local pki=$DIR/pki
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 365 \
      -subj "/CN=caduceus-local-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -new -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver"
    printf '%s\n' \
      "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,IP:$RN_GW,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc" \
      "extendedKeyUsage=serverAuth" "keyUsage=critical,digitalSignature,keyEncipherment" >apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
      -extfile apiserver.ext -out apiserver.crt
    # The API server's client certificate for the kubelets' API (logs, exec), in system:masters.
    openssl req -new -newkey rsa:2048 -nodes -keyout kubelet-client.key -out kubelet-client.csr \
      -subj "/O=system:masters/CN=kube-apiserver-kubelet-client"
    printf '%s\n' "extendedKeyUsage=clientAuth" "keyUsage=critical,digitalSignature,keyEncipherment" >kubelet-client.ext
    openssl x509 -req -in kubelet-client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
      -extfile kubelet-client.ext -out kubelet-client.crt
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
  ) >"$DIR/logs/pki.log" 2>&1 || { cat "$DIR/logs/pki.log" >&2; die "generating certificates with openssl failed"; }
  chmod 600 "$pki"/*.key
}

api_ready() {
  [[ $(curl -s --max-time 2 --cacert "$DIR/pki/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" \
    "https://127.0.0.1:$API_PORT/readyz") == ok ]]
}

node_ready() {
  [[ $("$KUBECTL" --kubeconfig "$DIR/kubeconfig" get node "$NODE_NAME" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}{" "}{.spec.taints}') == "True " ]]
}

healthz() { [[ $(curl -sk --max-time 2 "https://127.0.0.1:$1/healthz") == ok ]]; }

cluster_healthy() {
  local n
  [[ -f $DIR/kubeconfig && -f $DIR/cluster.env ]] || return 1
  for n in "${COMPONENTS[@]}"; do running "$n" || return 1; done
  # shellcheck disable=SC1091
  source "$DIR/cluster.env"
  api_ready && node_ready
}

localnode_bin() {
  if [[ -n ${LOCALNODE_BIN:-} ]]; then
    [[ -x $LOCALNODE_BIN ]] || die "LOCALNODE_BIN=$LOCALNODE_BIN is not an executable"
    echo "$LOCALNODE_BIN"
    return
  fi
  log "building localnode (cargo build -p caduceus-e2e --bin localnode)"
  (cd "$repo" && cargo build -q -p caduceus-e2e --bin localnode) >&2 || die "building localnode failed"
  local target
  target=$(cd "$repo" && cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  [[ -x $target/debug/localnode ]] || die "localnode not found at $target/debug/localnode"
  echo "$target/debug/localnode"
}

# --- up ------------------------------------------------------------------------------------------

do_up() {
  local bins lnbin controllers
  if cluster_healthy; then
    log "already up"
    echo "$DIR/kubeconfig"
    return 0
  fi
  # Anything left from a killed or half-started run goes first.
  do_down
  bins=$("$here/controlplane/build.sh") || exit $?
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    [[ -x $bins/$b ]] || die "$bins/$b missing (e2e/controlplane/build.sh did not finish?)"
  done
  if [[ $NODE == real ]]; then
    local why
    why=$(realnode_unsupported)
    [[ -z $why ]] || die "NODE=real: this machine cannot run the real node: $why"
    realnode_build
  else
    lnbin=$(localnode_bin)
  fi

  rm -rf "$DIR"
  mkdir -p "$DIR"/{pids,logs,etcd,kcm,scheduler,localnode,bin}
  chmod 700 "$DIR"
  echo "$NODE" >"$DIR/node.kind"
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl; do ln -s "$bins/$b" "$DIR/bin/$b"; done
  if [[ $NODE == real ]]; then realnode_save_bins; else ln -s "$lnbin" "$DIR/bin/localnode"; fi
  KUBECTL=$DIR/bin/kubectl

  ETCD_PORT=$(free_port)
  API_PORT=$(free_port)
  KCM_PORT=$(free_port)
  SCHED_PORT=$(free_port)
  make_pki
  ADMIN_TOKEN=$(openssl rand -hex 24)
  local kcm_token sched_token node_token proxy_token dns_token netpol_token
  kcm_token=$(openssl rand -hex 24)
  sched_token=$(openssl rand -hex 24)
  node_token=$(openssl rand -hex 24)
  proxy_token=$(openssl rand -hex 24)
  dns_token=$(openssl rand -hex 24)
  netpol_token=$(openssl rand -hex 24)
  {
    echo "$ADMIN_TOKEN,caduceus-admin,caduceus-admin,\"system:masters\""
    echo "$kcm_token,system:kube-controller-manager,system:kube-controller-manager,\"\""
    echo "$sched_token,system:kube-scheduler,system:kube-scheduler,\"\""
    echo "$node_token,system:node:$NODE_NAME,system:node:$NODE_NAME,\"system:nodes\""
    if [[ $NODE == real ]]; then
      echo "$proxy_token,system:kube-proxy,system:kube-proxy,\"\""
      echo "$dns_token,system:caduceus-node:coredns,system:caduceus-node:coredns,\"\""
      echo "$netpol_token,system:caduceus-node:kube-router,system:caduceus-node:kube-router,\"\""
    fi
  } >"$DIR/pki/tokens.csv"
  chmod 600 "$DIR/pki/tokens.csv"
  write_kubeconfig "$DIR/kubeconfig" caduceus-admin "$ADMIN_TOKEN"
  write_kubeconfig "$DIR/kcm.kubeconfig" system:kube-controller-manager "$kcm_token"
  write_kubeconfig "$DIR/scheduler.kubeconfig" system:kube-scheduler "$sched_token"
  if [[ $NODE == real ]]; then
    write_kubeconfig "$DIR/node.kubeconfig" "system:node:$NODE_NAME" "$node_token"
    write_kubeconfig "$DIR/proxy.kubeconfig" system:kube-proxy "$proxy_token"
    write_kubeconfig "$DIR/dns.kubeconfig" system:caduceus-node:coredns "$dns_token"
    write_kubeconfig "$DIR/netpol.kubeconfig" system:caduceus-node:kube-router "$netpol_token"
  else
    write_kubeconfig "$DIR/localnode.kubeconfig" "system:node:$NODE_NAME" "$node_token"
  fi
  cat >"$DIR/cluster.env" <<EOF
KUBECONFIG=$DIR/kubeconfig
KUBECTL=$KUBECTL
ETCD_PORT=$ETCD_PORT
API_PORT=$API_PORT
KCM_PORT=$KCM_PORT
SCHED_PORT=$SCHED_PORT
ADMIN_TOKEN=$ADMIN_TOKEN
NODE_KIND=$NODE
NODE_NAME=$NODE_NAME
EOF
  chmod 600 "$DIR/cluster.env"

  log "starting etcd on 127.0.0.1:$ETCD_PORT"
  start etcd "$DIR/logs/etcd.log" "$bins/etcd" --name caduceus --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:0" --unsafe-no-fsync --log-level warn
  wait_for "etcd" "$DIR/logs/etcd.log" curl -sf --max-time 2 "http://127.0.0.1:$ETCD_PORT/health"

  log "starting kube-apiserver on https://127.0.0.1:$API_PORT"
  local apiserver_extra=() apiserver_node=()
  read -r -a apiserver_extra <<<"${CLUSTER_APISERVER_EXTRA_ARGS:-}"
  if [[ $NODE == real ]]; then
    # Pods reach the API server through the `kubernetes` Service, whose endpoint is the advertised
    # address on the node's bridge; the kubelet is authorized by the Node authorizer.
    realnode_host
    apiserver_node=(--bind-address 0.0.0.0 --advertise-address "$RN_GW" --authorization-mode Node,RBAC
      --enable-admission-plugins NodeRestriction --kubelet-preferred-address-types InternalIP
      --kubelet-client-certificate "$DIR/pki/kubelet-client.crt" --kubelet-client-key "$DIR/pki/kubelet-client.key")
  else
    apiserver_node=(--bind-address 127.0.0.1 --advertise-address 127.0.0.1 --authorization-mode RBAC
      --endpoint-reconciler-type none)
  fi
  start kube-apiserver "$DIR/logs/kube-apiserver.log" "$bins/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" "${apiserver_node[@]}" --secure-port "$API_PORT" \
    --tls-cert-file "$DIR/pki/apiserver.crt" --tls-private-key-file "$DIR/pki/apiserver.key" \
    --client-ca-file "$DIR/pki/ca.crt" --token-auth-file "$DIR/pki/tokens.csv" \
    --service-account-issuer "https://127.0.0.1:$API_PORT" \
    --service-account-key-file "$DIR/pki/sa.pub" --service-account-signing-key-file "$DIR/pki/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=true \
    --cert-dir "$DIR/pki/apiserver-generated" "${apiserver_extra[@]}"
  wait_for "kube-apiserver /readyz" "$DIR/logs/kube-apiserver.log" api_ready

  # localnode's permissions (it is not a real kubelet, so the Node authorizer is not used), or those
  # of the real node's CoreDNS and NetworkPolicy controller.
  local rbac=$here/localnode-rbac.yaml
  [[ $NODE == real ]] && rbac=$here/node/rbac.yaml
  "$KUBECTL" --kubeconfig "$DIR/kubeconfig" apply -f "$rbac" >"$DIR/logs/rbac.log" 2>&1 ||
    { cat "$DIR/logs/rbac.log" >&2; do_down; die "applying $rbac failed"; }

  controllers=job-controller,garbage-collector-controller,namespace-controller,ttl-after-finished-controller
  controllers+=,serviceaccount-controller,serviceaccount-token-controller,root-ca-certificate-publisher-controller
  controllers+=,deployment-controller,replicaset-controller,statefulset-controller,cronjob-controller
  controllers+=,endpointslice-controller,persistentvolume-binder-controller,persistentvolumeclaim-protection-controller,persistentvolume-protection-controller,pod-garbage-collector-controller
  # A real kubelet registers its Node with the not-ready taint; the node lifecycle controller lifts it.
  [[ $NODE == real ]] && controllers+=,node-lifecycle-controller
  log "starting kube-controller-manager (:$KCM_PORT) and kube-scheduler (:$SCHED_PORT)"
  start kube-controller-manager "$DIR/logs/kube-controller-manager.log" "$bins/kube-controller-manager" \
    --kubeconfig "$DIR/kcm.kubeconfig" \
    --authentication-kubeconfig "$DIR/kcm.kubeconfig" --authorization-kubeconfig "$DIR/kcm.kubeconfig" \
    --leader-elect=false --controllers "$controllers" \
    --service-account-private-key-file "$DIR/pki/sa.key" --root-ca-file "$DIR/pki/ca.crt" \
    --use-service-account-credentials=true \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --cert-dir "$DIR/kcm"
  start kube-scheduler "$DIR/logs/kube-scheduler.log" "$bins/kube-scheduler" \
    --kubeconfig "$DIR/scheduler.kubeconfig" \
    --authentication-kubeconfig "$DIR/scheduler.kubeconfig" --authorization-kubeconfig "$DIR/scheduler.kubeconfig" \
    --leader-elect=false --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" --cert-dir "$DIR/scheduler"

  local node_log=$DIR/logs/localnode.log
  if [[ $NODE == real ]]; then
    realnode_start
    node_log=$DIR/node/logs/kubelet.log
  else
    log "starting localnode (a test stand-in for kubelet)"
    local bin_dir_args=()
    [[ -n ${CADUCEUS_BIN_DIR:-} ]] && bin_dir_args=(--bin-dir "$CADUCEUS_BIN_DIR")
    start localnode "$DIR/logs/localnode.log" "$lnbin" --kubeconfig "$DIR/localnode.kubeconfig" \
      --node-name "$NODE_NAME" --state-dir "$DIR/localnode" --image-map "localnode=$lnbin" --image-map "kubectl=$bins/kubectl" \
      --pass-env RUST_LOG "${bin_dir_args[@]}"
  fi

  wait_for "kube-controller-manager /healthz" "$DIR/logs/kube-controller-manager.log" healthz "$KCM_PORT"
  wait_for "kube-scheduler /healthz" "$DIR/logs/kube-scheduler.log" healthz "$SCHED_PORT"
  wait_for "Node $NODE_NAME Ready and untainted" "$node_log" node_ready
  [[ $NODE == real ]] && realnode_start_policy
  wait_for "ServiceAccount default/default" "$DIR/logs/kube-controller-manager.log" \
    "$KUBECTL" --kubeconfig "$DIR/kubeconfig" -n default get serviceaccount default
  wait_for "ConfigMap default/kube-root-ca.crt" "$DIR/logs/kube-controller-manager.log" \
    "$KUBECTL" --kubeconfig "$DIR/kubeconfig" -n default get configmap kube-root-ca.crt
  log "up (node: $NODE_NAME, $NODE); kubectl: $KUBECTL"
  echo "$DIR/kubeconfig"
}

do_status() {
  local n ok=0 pid
  for n in "${COMPONENTS[@]}"; do
    pid=$(pid_of "$n")
    if running "$n"; then printf '%-24s running (pid %s)\n' "$n" "$pid"; else printf '%-24s stopped\n' "$n"; ok=1; fi
  done
  if ((ok == 0)) && cluster_healthy; then
    echo "healthy; KUBECONFIG=$DIR/kubeconfig"
  else
    echo "not healthy (state dir $DIR)"
    return 1
  fi
}

with_lock() {
  exec 9>"$DIR.lock"
  flock -w 300 9 || die "another cluster.sh holds $DIR.lock"
  "$@"
}

case ${1:-} in
  up) with_lock do_up ;;
  down) with_lock do_down; log "down (logs kept in $DIR/logs)" ;;
  status) do_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
