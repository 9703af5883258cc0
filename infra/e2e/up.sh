#!/usr/bin/env bash
# Bring up a throwaway single-node Kubernetes v1.20.2 on this machine, state in $XRDSCALE_E2E_RUN:
# openssl PKI, etcd, dockerd (private socket, no bridge, no iptables), the pause, base and xrdscale
# images, kube-apiserver, controller-manager, scheduler, kubelet (dockershim, CNI bridge), kube-proxy,
# a DNS shim for services (dnsmasq), a blackhole route for the service range and FORWARD rules that
# keep pods on this machine. Everything it starts is recorded in $XRDSCALE_E2E_RUN/pids and
# everything it adds to the network in $XRDSCALE_E2E_RUN/undo, for down.sh.
# Usage: up.sh [pki|etcd|docker|images|control-plane|node|dns]...   (default: all, in this order)
set -euo pipefail
# shellcheck source=infra/e2e/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
NODE_NAME=xrdscale-e2e
NODE_IP=${NODE_IP:-$(node_ip)}
DOCKER_SOCK=$E2E_RUN/docker.sock
export DOCKER_HOST=unix://$DOCKER_SOCK DOCKER_BUILDKIT=0

undo() { echo "$*" >> "$E2E_RUN/undo"; }   # a command down.sh runs (in reverse order)

# ---------------------------------------------------------------- PKI (openssl, valid 2 days)
up_pki() {
  mkdir -p "$PKI"; cd "$PKI"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj "/CN=xrdscale-e2e-ca" 2>/dev/null
  cert() { # name subject extensions
    openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
    printf '%b\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile "$1.ext" \
      -out "$1.crt" 2>/dev/null
  }
  local serve="keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth"
  local client="keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth"
  cert apiserver "/CN=kube-apiserver" "$serve\nsubjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:$API_SVC_IP,IP:$NODE_IP,IP:127.0.0.1"
  cert kubelet "/CN=$NODE_NAME" "$serve\nsubjectAltName=DNS:$NODE_NAME,IP:$NODE_IP"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client"
  cert admin "/O=system:masters/CN=xrdscale-e2e-admin" "$client"
  cert node "/O=system:nodes/CN=system:node:$NODE_NAME" "$client"
  cert controller-manager "/CN=system:kube-controller-manager" "$client"
  cert scheduler "/CN=system:kube-scheduler" "$client"
  cert proxy "/CN=system:kube-proxy" "$client"
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  local who
  for who in admin node controller-manager scheduler proxy; do
    cat > "$who.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster: {server: "https://$NODE_IP:6443", certificate-authority: "$PKI/ca.crt"}
users:
- name: $who
  user: {client-certificate: "$PKI/$who.crt", client-key: "$PKI/$who.key"}
contexts:
- name: e2e
  context: {cluster: e2e, user: $who}
current-context: e2e
EOF
  done
  rm -f ./*.csr ./*.ext
  chmod 600 ./*.key
  cd - > /dev/null
}

# ---------------------------------------------------------------- etcd (loopback only)
up_etcd() {
  start_bg etcd /usr/bin/etcd --name e2e --data-dir "$E2E_RUN/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster e2e=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381
  wait_for 60 etcd curl -sf http://127.0.0.1:2379/health
}

# ---------------------------------------------------------------- dockerd
# Its image store lives in the cache (layer cache between runs); no docker0 bridge and no
# iptables rules of its own (pods get their network from CNI; image builds need none).
up_docker() {
  mkdir -p "$E2E_CACHE/docker" "$E2E_RUN/docker-exec"
  start_bg dockerd /usr/sbin/dockerd --host "$DOCKER_HOST" --data-root "$E2E_CACHE/docker" \
    --exec-root "$E2E_RUN/docker-exec" --pidfile "$E2E_RUN/docker-exec/dockerd.pid" \
    --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
    --exec-opt native.cgroupdriver=cgroupfs --storage-driver=overlay2 --log-level=warn
  wait_for 60 dockerd "$DOCKER" info
  # leftovers of an interrupted run in the cached store
  local stale; stale=$("$DOCKER" ps -aq --filter name=k8s_)
  [ -z "$stale" ] || "$DOCKER" rm -f $stale > /dev/null
}

# ---------------------------------------------------------------- images (nothing is pulled)
up_images() {
  # shellcheck source=infra/e2e/prepare.sh
  source "$E2E_DIR/prepare.sh"   # BASE_TAR, WHEELS
  local ctx=$E2E_RUN/pause-context
  if ! "$DOCKER" image inspect "$PAUSE_IMAGE" > /dev/null 2>&1; then
    mkdir -p "$ctx"; cp "$BIN/pause" "$ctx/pause"
    printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' > "$ctx/Dockerfile"
    "$DOCKER" build -q --network none -t "$PAUSE_IMAGE" "$ctx" > /dev/null
  fi
  if ! "$DOCKER" image inspect "$BASE_IMAGE" > /dev/null 2>&1; then
    "$DOCKER" import -c 'CMD ["python3"]' "$BASE_TAR" "$BASE_IMAGE" > /dev/null
  fi
  # The repository's Dockerfile, CPU variant, on the local base; wheels from the host, offline.
  ctx=$E2E_RUN/image-context
  rm -rf "$ctx"; mkdir -p "$ctx/infra"
  cp "$REPO/Dockerfile" "$REPO/pyproject.toml" "$REPO/README.md" "$ctx/"
  cp "$REPO/infra/requirements.lock" "$ctx/infra/"
  rsync -a --exclude __pycache__ --exclude '*.pyc' "$REPO/xrdscale" "$ctx/"
  cp -al "$WHEELS" "$ctx/wheels" 2>/dev/null || cp -a "$WHEELS" "$ctx/wheels"
  rm -f "$ctx/wheels/.complete" "$ctx/wheels/requirements.txt"
  "$DOCKER" build --network none --build-arg "BASE=$BASE_IMAGE" --build-arg VARIANT=cpu \
    -t "$IMAGE" "$ctx" > "$LOGS/image-build.log" 2>&1 \
    || { tail -30 "$LOGS/image-build.log" >&2; die "docker build of $IMAGE failed"; }
  rm -rf "$ctx"
  "$DOCKER" run --rm --network none "$IMAGE" python -c 'import xrdscale, torch, dask_kubernetes, ray; print("image ok", torch.__version__, ray.__version__)'
}

# ---------------------------------------------------------------- control plane
up_control_plane() {
  start_bg kube-apiserver "$BIN/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --bind-address="$NODE_IP" --advertise-address="$NODE_IP" --secure-port=6443 \
    --service-cluster-ip-range=$SERVICE_CIDR --authorization-mode=Node,RBAC \
    --client-ca-file="$PKI/ca.crt" --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$PKI/ca.crt" --kubelet-preferred-address-types=InternalIP \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --enable-admission-plugins=NodeRestriction --allow-privileged=false --profiling=false
  wait_for 90 kube-apiserver kc get --raw /readyz
  start_bg kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig="$PKI/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$PKI/controller-manager.kubeconfig" --authorization-kubeconfig="$PKI/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --service-cluster-ip-range=$SERVICE_CIDR --profiling=false
  start_bg kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$PKI/scheduler.kubeconfig" \
    --authentication-kubeconfig="$PKI/scheduler.kubeconfig" --authorization-kubeconfig="$PKI/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false --profiling=false
  wait_for 60 "default service account" kc -n default get serviceaccount default
}

# ---------------------------------------------------------------- network + node
up_node() {
  # Packets bridged on cni0 pass iptables (kube-proxy's DNAT); routed pod <-> service traffic
  # needs forwarding. The previous values are restored by down.sh.
  local v
  v=$(sysctl -n net.ipv4.ip_forward); undo "sysctl -qw net.ipv4.ip_forward=$v"
  sysctl -qw net.ipv4.ip_forward=1
  v=$(sysctl -n net.bridge.bridge-nf-call-iptables); undo "sysctl -qw net.bridge.bridge-nf-call-iptables=$v"
  sysctl -qw net.bridge.bridge-nf-call-iptables=1
  # cni0 now, so dnsmasq can listen on the pods' gateway before the first pod; the CNI bridge
  # plugin takes it over.
  ip link add cni0 type bridge; undo "ip link del cni0"
  ip addr add "$CNI_GW/24" dev cni0
  ip link set cni0 up
  # A service IP without a kube-proxy rule must not leave through the default route.
  ip route add blackhole $SERVICE_CIDR; undo "ip route del blackhole $SERVICE_CIDR"
  # Pods reach each other, services and this node, nothing else (they have no default route
  # either); accept cni0 traffic ahead of any FORWARD DROP policy.
  iptables -I FORWARD 1 -i cni0 ! -o cni0 -j REJECT; undo "iptables -D FORWARD -i cni0 ! -o cni0 -j REJECT"
  iptables -I FORWARD 1 -i cni0 -o cni0 -j ACCEPT; undo "iptables -D FORWARD -i cni0 -o cni0 -j ACCEPT"
  iptables -I FORWARD 1 -o cni0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
  undo "iptables -D FORWARD -o cni0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"

  mkdir -p "$E2E_RUN/cni" "$E2E_RUN/kubelet"
  sed -e "s#@POD_CIDR@#$POD_CIDR#" -e "s#@SERVICE_CIDR@#$SERVICE_CIDR#" -e "s#@IPAM_DIR@#$E2E_RUN/ipam#" \
    "$E2E_DIR/node/10-bridge.conflist" > "$E2E_RUN/cni/10-bridge.conflist"
  sed -e "s#@PKI@#$PKI#g" -e "s#@CNI_GW@#$CNI_GW#" "$E2E_DIR/node/kubelet.yaml" > "$E2E_RUN/kubelet.yaml"
  undo "umount-kubelet $E2E_RUN/kubelet"
  start_bg kubelet "$BIN/kubelet" --config="$E2E_RUN/kubelet.yaml" --kubeconfig="$PKI/node.kubeconfig" \
    --container-runtime=docker --docker-endpoint="$DOCKER_HOST" \
    --network-plugin=cni --cni-bin-dir=/usr/lib/cni --cni-conf-dir="$E2E_RUN/cni" --cni-cache-dir="$E2E_RUN/cni-cache" \
    --pod-infra-container-image=$PAUSE_IMAGE --root-dir="$E2E_RUN/kubelet" \
    --node-ip="$NODE_IP" --hostname-override=$NODE_NAME --v=1
  undo "kube-proxy-cleanup"
  start_bg kube-proxy "$BIN/kube-proxy" --kubeconfig="$PKI/proxy.kubeconfig" --proxy-mode=iptables \
    --hostname-override=$NODE_NAME --cluster-cidr=$POD_CIDR --conntrack-max-per-core=0 \
    --bind-address=127.0.0.1 --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256
  wait_for 120 "node $NODE_NAME" kc wait --for=condition=Ready "node/$NODE_NAME" --timeout=1s
}

# ---------------------------------------------------------------- service DNS
# dnsmasq answers <svc>.<ns>.svc.cluster.local from a hosts file that a loop rewrites from the
# API every 2 s; it has no upstream servers, so no name outside the cluster resolves.
up_dns() {
  : > "$E2E_RUN/svc.hosts"
  start_bg dnsmasq /usr/sbin/dnsmasq --keep-in-foreground --no-resolv --no-hosts --user=root \
    --addn-hosts="$E2E_RUN/svc.hosts" --listen-address=$CNI_GW --bind-interfaces --except-interface=lo \
    --local=/cluster.local/ --domain-needed --bogus-priv --no-negcache --log-facility=-
  start_bg dns-sync "$E2E_DIR/dns-sync.sh" "$PKI/admin.kubeconfig" "$E2E_RUN/svc.hosts" "$PIDS/dnsmasq"
  wait_for 30 "service DNS" grep -q "kubernetes.default.svc.cluster.local" "$E2E_RUN/svc.hosts"
}

main() {
  mkdir -p "$E2E_RUN" "$LOGS" "$PIDS"
  [ $# -gt 0 ] || set -- pki etcd docker images control-plane node dns
  local what
  for what in "$@"; do
    case $what in
      pki) up_pki ;; etcd) up_etcd ;; docker) up_docker ;; images) up_images ;;
      control-plane) up_control_plane ;; node) up_node ;; dns) up_dns ;;
      *) die "up.sh: unknown step $what" ;;
    esac
  done
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
