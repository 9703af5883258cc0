# shellcheck shell=bash
# Shared settings and helpers of the Kubernetes e2e (sourced by run.sh, prepare.sh, up.sh, down.sh).

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$E2E_DIR/../.." && pwd)
# What survives between runs on one machine: the Kubernetes binaries, the base image tarball,
# the wheels of the image and Docker's image store (layer cache).
E2E_CACHE=${XRDSCALE_E2E_CACHE:-/var/cache/xrdscale-e2e}
# The state of one cluster: PKI, logs, PID files, the workspace. run.sh sets it; up/down take it.
E2E_RUN=${XRDSCALE_E2E_RUN:-/tmp/xrdscale-e2e}

K8S_VERSION=v1.20.2
K8S_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=${XRDSCALE_E2E_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SERVICE_CIDR=10.0.0.0/24
POD_CIDR=10.244.0.0/24
CNI_GW=10.244.0.1          # cni0's address: the pods' gateway and their DNS server
API_SVC_IP=10.0.0.1
NAMESPACE=xrdscale
IMAGE=xrdscale:e2e
BASE_IMAGE=xrdscale-e2e/debian-python:$DEBIAN_SUITE
PAUSE_IMAGE=k8s.gcr.io/pause:3.2   # the kubelet's default sandbox image, built here
DOCKER=/usr/bin/docker             # docker.io's client (talks to the dockerd started here)
KUBECTL=${KUBECTL:-$(command -v kubectl || true)}

BIN=$E2E_CACHE/k8s-$K8S_VERSION/bin
PKI=$E2E_RUN/pki
LOGS=$E2E_RUN/logs
PIDS=$E2E_RUN/pids

log() { printf '%s e2e: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

node_ip() { ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | head -1; }

# Phase timing: `phase NAME` ends the running phase and starts NAME; `phase_end` ends the last.
PHASE_FILE=${PHASE_FILE:-$E2E_RUN/phases.tsv}
_phase_name=${_phase_name:-}; _phase_t0=${_phase_t0:-0}
phase() {
  phase_end
  _phase_name=$1; _phase_t0=$(date +%s)
  log "── $1"
}
phase_end() {
  if [ -n "$_phase_name" ]; then
    printf '%s\t%s\n' "$_phase_name" "$(( $(date +%s) - _phase_t0 ))" >> "$PHASE_FILE"
    _phase_name=""
  fi
}
phase_table() {
  [ -s "$PHASE_FILE" ] || return 0
  local total=0 name secs
  printf '\n%-34s %8s\n' "phase" "seconds"
  printf '%-34s %8s\n' "----------------------------------" "--------"
  while IFS=$'\t' read -r name secs; do
    printf '%-34s %8s\n' "$name" "$secs"; total=$((total + secs))
  done < "$PHASE_FILE"
  printf '%-34s %8s\n' "total" "$total"
}

# Start a background process, its output in $LOGS/NAME.log, its PID in $PIDS/NAME.
start_bg() {
  local name=$1; shift
  mkdir -p "$LOGS" "$PIDS"
  setsid "$@" > "$LOGS/$name.log" 2>&1 < /dev/null &
  echo "$! $(basename "$1")" > "$PIDS/$name"
  echo "$name" >> "$PIDS/.order"
}

kc() { KUBECONFIG=$PKI/admin.kubeconfig "$KUBECTL" "$@"; }

wait_for() { # seconds description command...
  local secs=$1 what=$2; shift 2
  local i
  for ((i = 0; i < secs; i++)); do
    if "$@" > /dev/null 2>&1; then return 0; fi
    sleep 1
  done
  die "$what: not ready after ${secs}s"
}
