#!/usr/bin/env bash
# Service DNS for the e2e cluster: every 2 s, write "<ClusterIP> <svc>.<ns>.svc.cluster.local"
# (and the endpoint IPs of headless services) into a hosts file and HUP dnsmasq when it changed.
# Usage: dns-sync.sh KUBECONFIG HOSTS_FILE DNSMASQ_PIDFILE
set -u
export KUBECONFIG=$1
hosts=$2 pidfile=$3
kubectl=$(command -v kubectl)
while true; do
  if "$kubectl" get svc,endpoints -A -o json 2>/dev/null | jq -r '
      [.items[] | select(.kind == "Service")] as $svcs
      | ($svcs[] | select(.spec.clusterIP != "None" and .spec.clusterIP != null)
         | "\(.spec.clusterIP) \(.metadata.name).\(.metadata.namespace).svc.cluster.local"),
        (.items[] | select(.kind == "Endpoints") | . as $ep
         | select(any($svcs[]; .metadata.name == $ep.metadata.name and .metadata.namespace == $ep.metadata.namespace and .spec.clusterIP == "None"))
         | .subsets[]?.addresses[]?
         | "\(.ip) \($ep.metadata.name).\($ep.metadata.namespace).svc.cluster.local")
    ' > "$hosts.new" 2>/dev/null; then
    if ! cmp -s "$hosts.new" "$hosts"; then
      mv "$hosts.new" "$hosts"
      kill -HUP "$(cut -d" " -f1 "$pidfile")" 2>/dev/null
    fi
  fi
  sleep 2
done
