#!/usr/bin/env bash
# What the e2e needs before a cluster can start, each piece cached in $XRDSCALE_E2E_CACHE:
#   packages  Debian packages (installed only when missing)
#   k8s       kube-apiserver, -controller-manager, -scheduler, kubelet, kube-proxy v1.20.2 and the
#             pause binary, built from Debian's `kubernetes` source package (≈10 min on 2 cores)
#   base      a debootstrapped Debian base image (python3, venv, tini) as a tarball
#   wheels    the wheels of the CPU image, from the host's pip (its index and mirrors)
# Usage: prepare.sh [packages|k8s|base|wheels|all]...
set -euo pipefail
# shellcheck source=infra/e2e/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export DEBIAN_FRONTEND=noninteractive

PACKAGES=(golang-go jq rsync golang-github-modern-go-reflect2-dev dpkg-dev gcc libc6-dev openssl curl
  iptables conntrack socat ethtool containerd runc docker.io etcd-server containernetworking-plugins
  debootstrap busybox-static dnsmasq-base)

prepare_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then log "packages: all installed"; return; fi
  log "packages: installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" > "$E2E_CACHE/apt.log" 2>&1 \
    || { tail -20 "$E2E_CACHE/apt.log" >&2; die "apt-get install failed"; }
}

# The cache key of the binaries: the version and the edits below.
K8S_KEY="$K8S_VERSION oom-adj-0 reflect2-debian cgo0"

prepare_k8s() {
  if [ -f "$BIN/.key" ] && [ "$(cat "$BIN/.key")" = "$K8S_KEY" ]; then log "k8s: cached in $BIN"; return; fi
  local work=$E2E_CACHE/build
  rm -rf "$work"; mkdir -p "$work/lists/partial" "$work/src"
  # Debian's source package, through a private apt source list (the machine's lists stay as they are).
  cat > "$work/src.list" <<EOF
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $DEBIAN_MIRROR $DEBIAN_SUITE main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $DEBIAN_MIRROR $DEBIAN_SUITE-updates main
EOF
  local aptopts=(-o "Dir::Etc::SourceList=$work/src.list" -o "Dir::Etc::SourceParts=-"
                 -o "Dir::State::Lists=$work/lists" -o "APT::Sandbox::User=root")
  log "k8s: fetching Debian's kubernetes source package"
  apt-get "${aptopts[@]}" update -qq
  (cd "$work/src" && apt-get "${aptopts[@]}" source --download-only -qq kubernetes)
  local dsc; dsc=$(ls "$work"/src/kubernetes_*.dsc)
  dpkg-source --no-check -x "$dsc" "$work/k8s" > /dev/null
  cd "$work/k8s"
  # Go >= 1.18 breaks the vendored reflect2 1.0.1 (map iteration); Debian ships the fixed 1.0.2.
  rm -f vendor/github.com/modern-go/reflect2/*.go
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go vendor/github.com/modern-go/reflect2/
  # This machine's root may not lower oom_score_adj (no CAP_SYS_RESOURCE): the kubelet gives pod
  # sandboxes -998 and Guaranteed pods -997, and runc then fails every pod. Use 0 instead.
  sed -i 's/^\(\s*defaultSandboxOOMAdj int = \)-998$/\10/' pkg/kubelet/dockershim/docker_sandbox.go
  sed -i 's/^\(\s*guaranteedOOMScoreAdj int = \)-997$/\10/' pkg/kubelet/qos/policy.go
  grep -q 'defaultSandboxOOMAdj int = 0$' pkg/kubelet/dockershim/docker_sandbox.go || die "k8s: sandbox OOM edit did not apply"
  grep -q 'guaranteedOOMScoreAdj int = 0$' pkg/kubelet/qos/policy.go || die "k8s: guaranteed OOM edit did not apply"
  mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
  log "k8s: building $K8S_VERSION (about 10 min on 2 cores; log: $work/make.log)"
  env GOPATH="$PWD/.go" GOCACHE="$work/gocache" HOME="$work" CGO_ENABLED=0 \
      KUBE_GIT_COMMIT=$K8S_COMMIT KUBE_GIT_VERSION=$K8S_VERSION KUBE_GIT_TREE_STATE=clean \
      KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 \
      make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kube-proxy" \
      > "$work/make.log" 2>&1 || { tail -30 "$work/make.log" >&2; die "k8s build failed"; }
  mkdir -p "$BIN.new"
  cp _output/bin/kube-apiserver _output/bin/kube-controller-manager _output/bin/kube-scheduler \
     _output/bin/kubelet _output/bin/kube-proxy "$BIN.new/"
  gcc -Os -static -DVERSION=v3.2-xrdscale -o "$BIN.new/pause" build/pause/linux/pause.c
  "$BIN.new/kube-apiserver" --version | grep -q "$K8S_VERSION" || die "k8s: wrong version built"
  echo "$K8S_KEY" > "$BIN.new/.key"
  cd /; rm -rf "$BIN"; mv "$BIN.new" "$BIN"; rm -rf "$work"
  log "k8s: binaries in $BIN"
}

BASE_INCLUDE=python3,python3-venv,libgomp1,ca-certificates,tini
BASE_TAR=$E2E_CACHE/base-$DEBIAN_SUITE-$(echo "$BASE_INCLUDE" | md5sum | cut -c1-8).tar

prepare_base() {
  if [ -s "$BASE_TAR" ]; then log "base: cached $BASE_TAR"; return; fi
  local root=$E2E_CACHE/rootfs
  rm -rf "$root"
  log "base: debootstrap $DEBIAN_SUITE (minbase + $BASE_INCLUDE)"
  debootstrap --variant=minbase --include="$BASE_INCLUDE" "$DEBIAN_SUITE" "$root" "$DEBIAN_MIRROR" \
    > "$E2E_CACHE/debootstrap.log" 2>&1 || { tail -20 "$E2E_CACHE/debootstrap.log" >&2; die "debootstrap failed"; }
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/tmp/*
  tar -C "$root" -cf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
  rm -rf "$root"
}

# The CPU image's requirements: the lock without the CUDA packages (torch comes as the CPU build).
cpu_requirements() {
  grep -v -E '^(torch|nvidia-|cupy-|dask-cuda)' "$REPO/infra/requirements.lock" | grep -v '^#'
  echo "torch==2.13.0"
}
WHEELS=$E2E_CACHE/wheels-$( (cpu_requirements; echo py311) | md5sum | cut -c1-12)

host_python() { # a Python 3.11 whose wheels fit Debian bookworm's python3.11
  local py
  for py in "$REPO/.venv/bin/python" python3.11 python3; do
    if command -v "$py" > /dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "$py"; return
    fi
  done
  return 1
}

prepare_wheels() {
  if [ -f "$WHEELS/.complete" ]; then log "wheels: cached in $WHEELS"; return; fi
  local py; py=$(host_python) || die "wheels: no Python 3.11 on the host"
  rm -rf "$WHEELS.tmp"; mkdir -p "$WHEELS.tmp"
  cpu_requirements > "$WHEELS.tmp/requirements.txt"
  log "wheels: pip wheel of $(wc -l < "$WHEELS.tmp/requirements.txt") requirements with $py"
  "$py" -m pip wheel -q --disable-pip-version-check -r "$WHEELS.tmp/requirements.txt" \
      setuptools wheel -w "$WHEELS.tmp" > "$E2E_CACHE/wheels.log" 2>&1 \
    || { tail -20 "$E2E_CACHE/wheels.log" >&2; die "pip wheel failed"; }
  ls "$WHEELS.tmp"/torch-2.13.0+cpu-*.whl > /dev/null || die "wheels: no CPU build of torch 2.13.0"
  touch "$WHEELS.tmp/.complete"
  rm -rf "$WHEELS"; mv "$WHEELS.tmp" "$WHEELS"
}

main() {
  mkdir -p "$E2E_CACHE"
  [ $# -gt 0 ] || set -- all
  local what
  for what in "$@"; do
    case $what in
      packages|k8s|base|wheels) "prepare_$what" ;;
      all) prepare_packages; prepare_k8s; prepare_base; prepare_wheels ;;
      *) die "prepare.sh: unknown step $what" ;;
    esac
  done
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
