#!/usr/bin/env bash
# Tear down what up.sh started: every container, then every process by its recorded PID (process
# group, newest first), then the network changes in $XRDSCALE_E2E_RUN/undo (newest first), the
# iptables chains of kubelet and kube-proxy, and the mounts under the run folder. Safe to run more
# than once, and on a half-started cluster. Keeps $XRDSCALE_E2E_RUN/logs unless told --purge.
set -uo pipefail
# shellcheck source=infra/e2e/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export DOCKER_HOST=unix://$E2E_RUN/docker.sock
purge=0; [ "${1:-}" = "--purge" ] && purge=1

[ -d "$E2E_RUN" ] || exit 0

alive() { # pid name: the process is still the one we started
  [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' < "/proc/$1/cmdline" | grep -q -- "$2"
}

stop() { # name
  local f=$PIDS/$1 pid cmd i
  [ -f "$f" ] || return 0
  read -r pid cmd < "$f"
  if alive "$pid" "$cmd"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 40); do alive "$pid" "$cmd" || break; sleep 0.5; done
    if alive "$pid" "$cmd"; then
      log "down: $1 ($pid) did not stop on TERM; KILL"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
      sleep 1
    fi
  fi
  rm -f "$f"
}

# Let the kubelet remove the pods (their CNI teardown frees veths and addresses), briefly.
if [ -f "$PIDS/kubelet" ] && [ -f "$PKI/admin.kubeconfig" ] && kc get --raw /readyz > /dev/null 2>&1; then
  kc -n "$NAMESPACE" delete jobs,deployments --all --grace-period=3 --wait=false > /dev/null 2>&1 || true
  kc -n "$NAMESPACE" delete pods --all --grace-period=3 --timeout=60s > /dev/null 2>&1 || true
fi
# Stop the node so nothing restarts the containers, then remove them while dockerd runs.
for name in dns-sync dnsmasq kube-proxy kubelet; do stop "$name"; done
if [ -S "$E2E_RUN/docker.sock" ] && "$DOCKER" info > /dev/null 2>&1; then
  ids=$("$DOCKER" ps -aq)
  # shellcheck disable=SC2086
  [ -z "$ids" ] || "$DOCKER" rm -f $ids > /dev/null 2>&1
fi
# the rest, newest first (controller-manager, scheduler, apiserver, dockerd, etcd, …)
if [ -f "$PIDS/.order" ]; then
  tac "$PIDS/.order" | while read -r name; do stop "$name"; done
  rm -f "$PIDS/.order"
fi

umount_under() { # prefix: unmount everything mounted below it, deepest first
  awk -v p="$1" 'index($5, p) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
  done
}

kube_iptables_cleanup() { # rules and chains named KUBE-* (kubelet's and kube-proxy's), all tables
  local ipt t
  for ipt in iptables ip6tables; do
    command -v "$ipt" > /dev/null || continue
    for t in filter nat mangle; do
      "$ipt-save" -t "$t" 2>/dev/null | grep -E '^-A [A-Z]+ .*-j KUBE-' | grep -v '^-A KUBE-' \
        | sed 's/^-A //' | while read -r rule; do
          # shellcheck disable=SC2086
          eval "$ipt -t $t -D $rule" 2>/dev/null
        done
      "$ipt-save" -t "$t" 2>/dev/null | sed -n 's/^:\(KUBE-[^ ]*\) .*/\1/p' | while read -r chain; do
        "$ipt" -t "$t" -F "$chain" 2>/dev/null
      done
      "$ipt-save" -t "$t" 2>/dev/null | sed -n 's/^:\(KUBE-[^ ]*\) .*/\1/p' | while read -r chain; do
        "$ipt" -t "$t" -X "$chain" 2>/dev/null
      done
    done
  done
}

# veths of pods the kubelet did not tear down (their host ends are on cni0)
if ip link show cni0 > /dev/null 2>&1; then
  ip -o link show master cni0 | awk -F': ' '{print $2}' | cut -d@ -f1 | while read -r veth; do
    ip link del "$veth" 2>/dev/null
  done
fi
if [ -f "$E2E_RUN/undo" ]; then
  tac "$E2E_RUN/undo" | while read -r cmd; do
    case $cmd in
      kube-proxy-cleanup) [ -x "$BIN/kube-proxy" ] && "$BIN/kube-proxy" --cleanup > /dev/null 2>&1; kube_iptables_cleanup ;;
      umount-kubelet*) umount_under "${cmd#umount-kubelet }" ;;
      *) eval "$cmd" 2>/dev/null || log "down: could not undo: $cmd" ;;
    esac
  done
  rm -f "$E2E_RUN/undo"
fi
umount_under "$E2E_RUN/"
umount_under "$E2E_CACHE/docker/"

if [ $purge -eq 1 ]; then
  rm -rf "$E2E_RUN"
else
  find "$E2E_RUN" -mindepth 1 -maxdepth 1 ! -name logs ! -name phases.tsv -exec rm -rf {} + 2>/dev/null
fi
log "down: cluster stopped and removed"
exit 0
