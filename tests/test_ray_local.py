"""Local means local: xrdscale's own Ray instance starts whatever Ray cluster runs (or ran) on the machine."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from xrdscale.runtime.ray import recorded_cluster

pytestmark = pytest.mark.slow

#: A fresh process asks xrdscale for its local Ray and runs a task on it.
PROBE = """
import logging
logging.basicConfig(level=logging.INFO)
from xrdscale.runtime import ray as xray
ray = xray.ensure(num_cpus=1)
@ray.remote
def f():
    return 42
print("gcs", ray.get_runtime_context().gcs_address, "result", ray.get(f.remote()))
ray.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(state: str | None = None) -> str:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "result 42" in proc.stdout, proc.stdout
    if state is not None:   # the other cluster is named in one line, and not followed
        lines = [ln for ln in proc.stderr.splitlines() if "a Ray cluster recorded at" in ln]
        assert len(lines) == 1 and state in lines[0], proc.stderr[-3000:]
    return proc.stdout.split()[1]


def test_local_ray_starts_its_own_instance_beside_a_running_and_a_dead_cluster(tmp_path):
    ray_bin = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    port = _free_port()
    head = subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1", "--disable-usage-stats",
                             "--include-dashboard=false", "--block"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:   # the head is up when its GCS port accepts connections and Ray has recorded it
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                if (recorded_cluster() or "").endswith(f":{port}"):
                    break
            except OSError:
                pass
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        gcs = _probe(state=f":{port} runs")
        assert not gcs.endswith(f":{port}")        # a private instance, not the running cluster
    finally:
        os.killpg(head.pid, signal.SIGKILL)        # the cluster dies; Ray's record of it stays behind
        head.wait(timeout=30)
    assert not _probe(state=f":{port} is not running").endswith(f":{port}")
