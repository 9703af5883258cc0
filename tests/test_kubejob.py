"""Following the campaign Job: pod states as the API server reports them, and the errors they give.

The JSON below has the shape the Kubernetes API returns (``kubectl get … -o json``); the e2e
(``infra/e2e/run.sh``) runs :func:`follow_job` against a real API server with a Job whose image
does not exist.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from xrdscale.exceptions import ConfigError, StageFailed
from xrdscale.runtime.kubejob import ImageNotFoundError, follow_job, job_state


def job(name="xrdscale-campaign", **status):
    return {"metadata": {"name": name}, "status": status}


def pod(name, phase="Pending", waiting=None, image="registry.example/xrdscale:1.2", init=False, running=False):
    cstatus = {"name": "campaign", "image": image, "ready": running,
               "state": {"waiting": waiting} if waiting else ({"running": {}} if running else {})}
    key = "initContainerStatuses" if init else "containerStatuses"
    spec_key = "initContainers" if init else "containers"
    return {"metadata": {"name": name}, "spec": {spec_key: [{"name": "campaign", "image": image}]},
            "status": {"phase": phase, key: [cstatus]}}


NEVER_PULL = {"reason": "ErrImageNeverPull",
              "message": 'Container image "xrdscale:missing" is not present with pull policy of Never'}


def test_a_missing_image_is_named_with_its_reason_and_a_fix():
    s = job_state(job(active=1), [pod("xrdscale-campaign-abcde", waiting=NEVER_PULL, image="xrdscale:missing")])
    assert s.phase == "blocked" and s.cause == "image"
    assert "'xrdscale:missing'" in s.message and "ErrImageNeverPull" in s.message
    assert "xrdscale-campaign-abcde" in s.message and "imagePullPolicy is Never" in s.message
    back = job_state(job(active=1), [pod("p", waiting={"reason": "ImagePullBackOff", "message": "Back-off pulling"})])
    assert back.phase == "blocked" and "'registry.example/xrdscale:1.2'" in back.message
    assert "registry" in back.message and "kustomization" in back.message


def test_an_init_container_image_counts_too():
    s = job_state(job(active=1), [pod("p", waiting={"reason": "ErrImagePull"}, image="busybox:nope", init=True)])
    assert s.phase == "blocked" and "'busybox:nope'" in s.message


def test_pending_running_succeeded_and_failed_jobs():
    assert job_state(job(), []).phase == "running"
    pending = job_state(job(active=1), [pod("p", waiting={"reason": "ContainerCreating"})])
    assert pending.phase == "running" and pending.pods == {"p": "Pending (ContainerCreating)"}
    assert job_state(job(active=1), [pod("p", "Running", running=True)]).phase == "running"
    done = job_state(job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}]), [pod("p", "Succeeded")])
    assert done.phase == "succeeded"
    failed = job_state(job(failed=5, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                                  "message": "Job has reached the specified backoff limit"}]),
                       [pod("p", "Failed")])
    assert failed.phase == "failed" and "BackoffLimitExceeded" in failed.message and "kubectl logs" in failed.message


def test_a_container_that_cannot_be_created_blocks_with_its_reason():
    s = job_state(job(active=1), [pod("p", waiting={"reason": "CreateContainerConfigError",
                                                    "message": 'secret "xrdscale-s3" not found'})])
    assert s.phase == "blocked" and s.cause == "config" and 'secret "xrdscale-s3" not found' in s.message


def test_follow_job_reports_changes_and_ends_on_each_outcome():
    seen = []
    states = iter([(job(active=1), [pod("p", waiting={"reason": "ContainerCreating"})]),
                   (job(active=1), [pod("p", "Running", running=True)]),
                   (job(active=1), [pod("p", "Running", running=True)]),
                   (job(succeeded=1), [pod("p", "Succeeded")])])
    final = follow_job("xrdscale-campaign", poll=0, read=lambda: next(states), on_change=seen.append)
    assert final.phase == "succeeded" and [s.phase for s in seen] == ["running", "running", "succeeded"]
    with pytest.raises(ImageNotFoundError, match="xrdscale:missing"):
        follow_job("j", poll=0, read=lambda: (job(active=1), [pod("p", waiting=NEVER_PULL, image="xrdscale:missing")]))
    with pytest.raises(StageFailed, match="BackoffLimitExceeded"):
        follow_job("j", poll=0, read=lambda: (job(conditions=[{"type": "Failed", "status": "True",
                                                                "reason": "BackoffLimitExceeded"}]), []))
    with pytest.raises(StageFailed, match="did not complete within"):
        follow_job("j", poll=0.01, timeout=0.05, read=lambda: (job(active=1), [pod("p", "Running", running=True)]))


def test_follow_without_a_kubeconfig_exits_nonzero_with_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-kubeconfig"
    res = subprocess.run([sys.executable, "-m", "xrdscale.cli", "campaign", "follow", "--kubeconfig", str(missing),
                          "--timeout", "5"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert "Kubernetes configuration" in res.stderr and "Traceback" not in res.stderr


def test_read_job_errors_are_config_errors(monkeypatch, tmp_path):
    pytest.importorskip("kubernetes")
    from xrdscale.runtime import kubejob

    # a kubeconfig naming a server nothing listens on: a clear error, not a urllib3 traceback
    cfg = tmp_path / "kubeconfig"
    cfg.write_text("apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n"
                   "users: [{name: u, user: {}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n"
                   "current-context: x\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "")
    with pytest.raises(ConfigError, match="cannot be reached"):
        kubejob.read_job("xrdscale-campaign", "xrdscale", kubeconfig=str(cfg))
