#!/usr/bin/env bash
# The Kubernetes end-to-end test of xrdscale, on a throwaway single-node cluster on this machine:
#   prepare   Debian packages; Kubernetes v1.20.2 built from Debian's source package; a
#             debootstrapped base image; the image's wheels (all cached in $XRDSCALE_E2E_CACHE,
#             default /var/cache/xrdscale-e2e, so a second run skips them)
#   cluster   etcd, dockerd, the images (pause; xrdscale from the Dockerfile, CPU variant),
#             apiserver, controller-manager, scheduler, kubelet, kube-proxy, CNI bridge, service DNS
#   deploy    the Dask operator (CRDs from the dask-kubernetes wheel, run from the xrdscale image),
#             infra/ through infra/e2e/overlay (plain Ray instead of KubeRay), a test Secret
#   campaign  the demo campaign as the batch/v1 Job, Dask workers as DaskCluster pods
#   check     the Job completed, the maps stores are complete, the DaskCluster had its workers,
#             the test credentials are in no log or store, pods cannot reach outside addresses;
#             a Job whose image does not exist ends `xrdscale campaign follow` with an error naming it
#   teardown  every process by PID, every container, the network changes (also on failure)
# Prints the pods, the Job and a table of the phases' times. Exit status 0 when it passed or was
# skipped ("e2e: SKIPPED: <reason>", when this machine cannot host it), 1 when it failed.
# Environment: XRDSCALE_E2E_CACHE (cache folder), XRDSCALE_E2E_KEEP=1 (leave the cluster up),
# XRDSCALE_E2E_TIMEOUT (seconds for the campaign Job, default 2700).
set -euo pipefail
# shellcheck source=infra/e2e/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
JOB=xrdscale-campaign
JOB_TIMEOUT=${XRDSCALE_E2E_TIMEOUT:-2700}
WORKSPACE=$E2E_RUN/workspace    # the pods' /workspace (hostPath in overlay/*.yaml)
T0=$(date +%s)

skip() { echo "e2e: SKIPPED: $*"; exit 0; }

# ---------------------------------------------------------------- can this machine host it?
host_checks() {
  [ "$(uname -s)" = Linux ] || skip "not Linux"
  [ "$(id -u)" -eq 0 ] || skip "needs root (it starts dockerd and a kubelet and changes iptables)"
  command -v apt-get > /dev/null || skip "no apt-get (needs Debian's docker.io, etcd-server and kubernetes source)"
  [ -n "$KUBECTL" ] || skip "no kubectl on PATH (needs kubectl >= 1.21 for kustomize)"
  grep -qw overlay /proc/filesystems || skip "the kernel has no overlay filesystem"
  [ -d /sys/fs/cgroup/memory ] && [ -d /sys/fs/cgroup/cpu ] || skip "no cgroup v1 cpu/memory controllers (kubelet v1.20 with cgroupfs needs them)"
  if ip link add xrde2e-probe type bridge 2> /dev/null; then ip link del xrde2e-probe
  else skip "cannot create a bridge interface"; fi
  local port
  for port in 6443 2379 2380 10250 10249 10256; do
    if (exec 3<> "/dev/tcp/127.0.0.1/$port") 2> /dev/null; then skip "port $port is in use (another cluster?)"; fi
  done
  ip link show cni0 > /dev/null 2>&1 && skip "an interface cni0 exists already"
  mkdir -p "$E2E_CACHE"
  local free_kb; free_kb=$(df -Pk "$E2E_CACHE" | awk 'NR==2 {print $4}')
  [ "$free_kb" -gt $((12 * 1024 * 1024)) ] || skip "less than 12 GB free under $E2E_CACHE"
  if ! apt-cache show docker.io > /dev/null 2>&1; then
    apt-get update -qq > /dev/null 2>&1 || skip "apt-get update failed (no package mirror)"
    apt-cache show docker.io > /dev/null 2>&1 || skip "docker.io is not installable from the configured apt sources"
  fi
  apt-cache showsrc kubernetes > /dev/null 2>&1 || true   # (fetched from a private source list later)
  command -v python3 > /dev/null || skip "no python3 on the host"
}

# ---------------------------------------------------------------- reporting and teardown
collect_logs() { # every container's log into $LOGS/pods, the events into $LOGS/events.log
  local pod c
  mkdir -p "$LOGS/pods"
  for pod in $(kc -n $NAMESPACE get pods -o jsonpath='{.items[*].metadata.name}' 2>/dev/null); do
    for c in $(kc -n $NAMESPACE get pod "$pod" -o jsonpath='{.spec.initContainers[*].name} {.spec.containers[*].name}' 2>/dev/null); do
      kc -n $NAMESPACE logs "$pod" -c "$c" > "$LOGS/pods/$pod.$c.log" 2>&1 || true
    done
  done
  kc -n $NAMESPACE get events --sort-by=.lastTimestamp > "$LOGS/events.log" 2>&1 || true
}

report() {
  [ -f "$PKI/admin.kubeconfig" ] || return 0
  kc get --raw /readyz > /dev/null 2>&1 || return 0
  echo; echo "==== pods, Job, Dask resources"
  kc -n $NAMESPACE get pods -o wide 2>&1 || true
  kc -n $NAMESPACE get jobs,deployments,daskclusters,daskworkergroups 2>&1 || true
  echo; echo "==== Job $JOB"
  kc -n $NAMESPACE describe job $JOB 2>&1 | sed -n '/^Pods Statuses/,$p' || true
  collect_logs
  local driver
  driver=$(kc -n $NAMESPACE get pods -l job-name=$JOB -o jsonpath='{.items[-1:].metadata.name}' 2>/dev/null || true)
  if [ -n "$driver" ]; then
    echo; echo "==== campaign driver log (last 40 lines of $driver)"
    tail -40 "$LOGS/pods/$driver.campaign.log" 2>/dev/null || true
  fi
}

result=FAILED
on_exit() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  [ $rc -eq 0 ] && result=PASSED
  phase_end
  report
  if [ "${XRDSCALE_E2E_KEEP:-0}" = 1 ]; then
    log "XRDSCALE_E2E_KEEP=1: the cluster stays up (KUBECONFIG=$PKI/admin.kubeconfig); tear it down with $E2E_DIR/down.sh"
  else
    phase teardown
    "$E2E_DIR/down.sh"
    phase_end
  fi
  phase_table
  echo
  echo "e2e: $result in $(( $(date +%s) - T0 )) s (logs: $LOGS)"
  [ $rc -eq 0 ] && exit 0
  exit 1
}

# ---------------------------------------------------------------- deploy and run
deploy() {
  local wheel crds
  # shellcheck source=infra/e2e/prepare.sh
  source "$E2E_DIR/prepare.sh"
  wheel=$(ls "$WHEELS"/dask_kubernetes-*.whl)
  crds=$E2E_RUN/crds; mkdir -p "$crds"
  python3 - "$wheel" "$crds" <<'EOF'
import sys, zipfile
wheel, out = sys.argv[1:]
prefix = "dask_kubernetes/operator/deployment/helm/dask-kubernetes-operator/crds/"
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and n.endswith(".yaml")]
    for n in names:
        open(f"{out}/{n[len(prefix):]}", "wb").write(z.read(n))
print(f"{len(names)} CRDs from {wheel.rsplit('/', 1)[-1]}")
EOF
  kc apply --server-side -f "$crds" > /dev/null
  kc wait --for=condition=Established crd --all --timeout=60s > /dev/null

  "$E2E_DIR/render.sh" "$E2E_RUN/deploy"
  kc create namespace $NAMESPACE --save-config > /dev/null
  # Test credentials, by environment only (envFrom); the values never reach a log of this script.
  AWS_SECRET=$(openssl rand -hex 20); RAY_TOKEN=$(openssl rand -hex 32)
  kc -n $NAMESPACE create secret generic xrdscale-s3 --from-env-file=/dev/stdin > /dev/null <<EOF
AWS_ACCESS_KEY_ID=xrdscale-e2e
AWS_SECRET_ACCESS_KEY=$AWS_SECRET
AWS_DEFAULT_REGION=us-east-1
RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$RAY_TOKEN
EOF
  mkdir -p "$WORKSPACE"; chmod 0777 "$WORKSPACE"
  kc apply -f "$E2E_RUN/deploy/manifests.yaml" -l 'xrdscale-e2e/step!=campaign' > "$LOGS/apply.log"
}

wait_rollouts() {
  kc -n $NAMESPACE rollout status deployment/dask-operator --timeout=300s
  kc -n $NAMESPACE rollout status deployment/xrdscale-ray-head --timeout=300s
  kc -n $NAMESPACE rollout status deployment/xrdscale-ray-worker --timeout=300s
}

ready_workers() {
  kc -n $NAMESPACE get pods -l dask.org/cluster-name=xrdscale,dask.org/component=worker \
    -o jsonpath='{range .items[*]}{.status.containerStatuses[0].ready}{"\n"}{end}' 2>/dev/null | grep -c true || true
}

wait_daskcluster() {
  # The operator's DaskCluster phase is not waited for: on this v1.20 server it can stay "Pending"
  # (dask-kubernetes sets "Running" from the scheduler Service's status handler, which can fire
  # before the create handler writes "Pending"; a v1.20 ClusterIP Service's status never changes
  # again). KubeCluster.from_name does not need it. What is waited for: the default worker group
  # at its replicas, and that many worker pods and the scheduler pod ready.
  local want i phase n group sched
  want=$(kc -n $NAMESPACE get daskcluster xrdscale -o jsonpath='{.spec.worker.replicas}')
  for ((i = 0; i < 300; i++)); do
    phase=$(kc -n $NAMESPACE get daskcluster xrdscale -o jsonpath='{.status.phase}' 2>/dev/null || true)
    group=$(kc -n $NAMESPACE get daskworkergroup xrdscale-default -o jsonpath='{.spec.worker.replicas}' 2>/dev/null || true)
    sched=$(kc -n $NAMESPACE get pods -l dask.org/cluster-name=xrdscale,dask.org/component=scheduler \
      -o jsonpath='{.items[*].status.containerStatuses[0].ready}' 2>/dev/null || true)
    n=$(ready_workers)
    if [ "$group" = "$want" ] && [ "$sched" = true ] && [ "$n" -ge "$want" ]; then
      log "DaskCluster xrdscale: phase ${phase:-none}, worker group xrdscale-default $group replicas, $n/$want workers ready, scheduler ready"
      echo "$n" > "$E2E_RUN/workers.max"; return 0
    fi
    sleep 2
  done
  die "DaskCluster xrdscale: phase '${phase:-}', worker group '${group:-}', $n/$want workers ready, scheduler ready '${sched:-}' after 600 s"
}

run_campaign() {
  kc apply -f "$E2E_RUN/deploy/manifests.yaml" -l 'xrdscale-e2e/step=campaign' >> "$LOGS/apply.log"
  local t0 now ok failed n max last=0
  t0=$(date +%s); max=$(cat "$E2E_RUN/workers.max")
  while true; do
    ok=$(kc -n $NAMESPACE get job $JOB -o jsonpath='{.status.succeeded}' 2>/dev/null || true)
    failed=$(kc -n $NAMESPACE get job $JOB -o jsonpath='{.status.conditions[?(@.type=="Failed")].status}' 2>/dev/null || true)
    n=$(ready_workers); [ "$n" -gt "$max" ] && max=$n
    echo "$max" > "$E2E_RUN/workers.max"
    [ "${ok:-0}" -ge 1 ] && break
    [ "$failed" = True ] && die "Job $JOB failed"
    now=$(date +%s)
    [ $((now - t0)) -lt "$JOB_TIMEOUT" ] || die "Job $JOB did not complete in $JOB_TIMEOUT s"
    if [ $((now - last)) -ge 60 ]; then
      last=$now
      log "campaign: $((now - t0)) s, $n Dask workers ready; $(kc -n $NAMESPACE get pods -l job-name=$JOB --no-headers 2>/dev/null | awk '{print $1" "$3}' | tr '\n' ' ')"
    fi
    sleep 5
  done
  log "Job $JOB completed in $(( $(date +%s) - t0 )) s"
  # the driver pod's own phases, from the pod's status
  local pod; pod=$(kc -n $NAMESPACE get pods -l job-name=$JOB -o jsonpath='{.items[-1:].metadata.name}')
  kc -n $NAMESPACE get pod "$pod" -o json | python3 "$E2E_DIR/podtimes.py" >&2
}

check_results() {
  local max want
  want=$(kc -n $NAMESPACE get daskcluster xrdscale -o jsonpath='{.spec.worker.replicas}')
  max=$(cat "$E2E_RUN/workers.max")
  log "DaskCluster xrdscale scaled to $max ready workers (spec: $want)"
  [ "$max" -ge "$want" ] || die "the DaskCluster never had its $want workers"
  # the workers as the Dask scheduler itself counts them
  local sched
  sched=$(kc -n $NAMESPACE get pods -l dask.org/cluster-name=xrdscale,dask.org/component=scheduler -o jsonpath='{.items[0].metadata.name}')
  kc -n $NAMESPACE exec "$sched" -- python -c "
from distributed import Client
with Client('tcp://127.0.0.1:8786', timeout=20) as c:
    print('scheduler sees', len(c.scheduler_info()['workers']), 'workers')" >&2
  # the maps: every dataset's analyse store complete, read on the host with xrdscale.io.storage
  # (with the project's venv, as the host reads them; else in a Dask worker pod, from its /workspace)
  if [ -x "$REPO/.venv/bin/python" ] && "$REPO/.venv/bin/python" -c 'import xrdscale' 2> /dev/null; then
    log "maps: checked on the host with $REPO/.venv/bin/python"
    "$REPO/.venv/bin/python" "$E2E_DIR/check_maps.py" "$E2E_DIR/overlay/campaign.yaml" "$WORKSPACE"
  else
    local worker
    worker=$(kc -n $NAMESPACE get pods -l dask.org/cluster-name=xrdscale,dask.org/component=worker -o jsonpath='{.items[0].metadata.name}')
    log "maps: checked in pod $worker with the image's xrdscale (no project venv here)"
    kc -n $NAMESPACE exec -i "$worker" -- sh -c 'cat > /tmp/check_maps.py' < "$E2E_DIR/check_maps.py"
    kc -n $NAMESPACE exec -i "$worker" -- sh -c 'cat > /tmp/campaign.yaml' < "$E2E_DIR/overlay/campaign.yaml"
    kc -n $NAMESPACE exec "$worker" -- python /tmp/check_maps.py /tmp/campaign.yaml /workspace
  fi
  # the test credentials in no log (this cluster's and every container's) and no store
  collect_logs
  local leaks
  leaks=$(grep -rlF -e "$RAY_TOKEN" -e "$AWS_SECRET" "$LOGS" "$WORKSPACE" 2>/dev/null || true)
  [ -z "$leaks" ] || die "the test credentials appear in: $leaks"
  log "the test credentials appear in no log ($(find "$LOGS" -type f | wc -l) files, $(find "$LOGS/pods" -type f | wc -l) of containers) and no store ($(find "$WORKSPACE" -type f | wc -l) files)"
  # pods have no way out: no route to an address outside this machine
  if kc -n $NAMESPACE exec "$sched" -- python -c "
import socket
socket.create_connection(('1.1.1.1', 443), 3)" > /dev/null 2>&1; then
    die "a pod reached 1.1.1.1:443"
  fi
  log "a pod cannot reach 1.1.1.1:443 (no route out)"
}

check_missing_image() {
  # Bad input: a Job whose image does not exist. `xrdscale campaign follow` must end it with an
  # error naming the image (the pod waits in ErrImageNeverPull forever; the Job never fails itself).
  local xrd=$REPO/.venv/bin/xrdscale bad=xrdscale-missing-image image=xrdscale:missing-e2e out rc
  if [ ! -x "$xrd" ] || ! "$REPO/.venv/bin/python" -c 'import kubernetes' 2> /dev/null; then
    log "missing image: not checked (no project venv with the kubernetes client at $REPO/.venv)"; return 0
  fi
  kc -n $NAMESPACE apply -f - > /dev/null <<EOF
apiVersion: batch/v1
kind: Job
metadata: {name: $bad}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
        - {name: campaign, image: "$image", imagePullPolicy: Never, command: [xrdscale, --version]}
EOF
  set +e
  out=$("$xrd" campaign follow $bad -n $NAMESPACE --kubeconfig "$PKI/admin.kubeconfig" --timeout 180 --poll 2 2>&1)
  rc=$?
  set -e
  kc -n $NAMESPACE delete job $bad --wait=false > /dev/null 2>&1 || true
  printf '%s\n' "$out" | tail -3 >&2
  [ $rc -eq 1 ] || die "campaign follow of a Job with a missing image exited $rc (expected 1)"
  grep -qF "'$image'" <<< "$out" || die "campaign follow's error does not name the image $image"
  if grep -q Traceback <<< "$out"; then die "campaign follow printed a traceback"; fi
  log "a Job with a missing image: campaign follow exits 1 naming $image"
}

main() {
  host_checks
  # one cluster per machine (fixed ports, cni0, $E2E_RUN): a second run waits for none
  exec 9> "/tmp/xrdscale-e2e.lock"
  flock -n 9 || skip "another e2e run is in progress (it holds /tmp/xrdscale-e2e.lock)"
  if [ -d "$PIDS" ]; then log "a previous run left $E2E_RUN: tearing it down first"; "$E2E_DIR/down.sh" --purge; fi
  rm -rf "$E2E_RUN"; mkdir -p "$E2E_RUN" "$LOGS"; : > "$PHASE_FILE"
  trap on_exit EXIT
  trap 'exit 130' INT TERM
  log "cache: $E2E_CACHE   run: $E2E_RUN"
  phase "prepare: packages";        "$E2E_DIR/prepare.sh" packages
  phase "prepare: kubernetes build"; "$E2E_DIR/prepare.sh" k8s
  phase "prepare: base image";      "$E2E_DIR/prepare.sh" base
  phase "prepare: wheels";          "$E2E_DIR/prepare.sh" wheels
  phase "cluster: pki, etcd, dockerd"; "$E2E_DIR/up.sh" pki etcd docker
  phase "cluster: images";          "$E2E_DIR/up.sh" images
  phase "cluster: control plane";   "$E2E_DIR/up.sh" control-plane
  phase "cluster: node, network, dns"; "$E2E_DIR/up.sh" node dns
  phase "deploy: CRDs, secret, manifests"; deploy
  phase "deploy: operator, ray ready"; wait_rollouts
  phase "deploy: DaskCluster workers"; wait_daskcluster
  phase "campaign Job";             run_campaign
  phase "check";                    check_results
  phase "check: missing image";     check_missing_image
  phase_end
}

main "$@"
