"""Fault tests of the campaign runner against an uninterrupted run of the same tiny campaign.

- a Ray actor SIGKILLed while the real ``analyse`` stage (PQ-Net on Ray) is inferring;
- the S3 server stopped mid-write and restarted (a disk-backed server, npm ``s3rver``).

(The Dask-worker and driver SIGKILL tests are in test_campaign_runner.py.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
import xarray as xr

import campaign_doubles as doubles
from xrdscale.io import storage
from xrdscale.campaign.runner import Plan, Runner, open_job_store
from xrdscale.campaign.spec import load_spec
from xrdscale.campaign.stages import Stage, default_stages
from xrdscale.runtime.cluster import RayHandle

Q = np.linspace(1.2, 2.8, 64)
NPIX = 40


def _volume_double(call):
    """A ``volume`` store of smooth random patterns on the model's q grid (stands in for reconstruct)."""
    rng = np.random.default_rng(int(call.dataset.id[1:]))
    data = rng.uniform(0.5, 5.0, (NPIX, NPIX, Q.size)).astype(np.float32)
    ds = xr.Dataset({"intensity": (("y", "x", "q"), data)},
                    coords={"y": np.arange(NPIX) * 0.03, "x": np.arange(NPIX) * 0.03, "q": Q})
    storage.write_store(ds.chunk({"y": 20, "x": 20, "q": -1}), call.out, stage="volume")


def _ray_stages():
    real = {s.name: s for s in default_stages()}
    return [Stage("reconstruct", _volume_double, lambda s: {}, external=lambda s, d: {"raw": d.raw}),
            real["denoise"], real["analyse"]]


def _actor_pids() -> list[int]:
    """Inference actors of the Ray instance this test process started (never anyone else's)."""
    import psutil

    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "ray::EnsembleServer" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


@pytest.mark.slow
def test_sigkill_ray_actor_mid_inference(tmp_path, dask_client):
    pytest.importorskip("ray")
    from _builders import write_random_entry

    from xrdscale.pqnet.model import ModelSpec

    spec_m = ModelSpec(phases=("NCA", "Al"), routes=(("NCA", "scale"), ("NCA", "a"), ("NCA", "c"), ("Al", "scale")),
                       npt=Q.size, target_mean=(0.5, 2.84, 14.3, 0.2), target_std=(0.2, 0.02, 0.1, 0.1),
                       pattern_channels=4, phase_channels=3, hidden=8)
    model = str(tmp_path / "model")
    write_random_entry(model, spec_m, Q, n=3)
    extra = {"model": model, "phases": None, "pipeline": {"analyse": {"actors": 1, "batch": 2}}}
    ref_spec = load_spec(doubles.make_campaign(tmp_path / "ref", 1, extra=extra))
    run_spec = load_spec(doubles.make_campaign(tmp_path / "run", 1, extra=extra))
    handle = RayHandle(None, num_cpus=2)
    try:
        store = open_job_store(ref_spec)
        ref = Runner(Plan(ref_spec, _ray_stages()), store, ray=handle).run()
        store.close()
        assert ref.ok, ref.failed

        store = open_job_store(run_spec)
        runner = Runner(Plan(run_spec, _ray_stages()), store, ray=handle, retry_delay=0.1)
        out = {}
        # actors of the reference run may still be exiting: only an actor this run started is a target
        before = set(_actor_pids())
        t = threading.Thread(target=lambda: out.setdefault("r", runner.run()))
        t.start()
        t0 = time.time()
        killed = []
        while t.is_alive() and time.time() - t0 < 120 and not killed:
            pids = [p for p in _actor_pids() if p not in before]
            running = any(r.stage == "analyse" and r.status == "running" for r in store.runs(run_spec.campaign))
            if pids and running:
                time.sleep(0.3)
                try:
                    os.kill(pids[0], signal.SIGKILL)
                except ProcessLookupError:  # it exited on its own in the meantime: look again
                    before.add(pids[0])
                    continue
                still = any(r.stage == "analyse" and r.status == "running" for r in store.runs(run_spec.campaign))
                killed.append((pids[0], still))
            time.sleep(0.05)
        t.join(300)
        store.close()
    finally:
        handle.close()
    assert killed, "no inference actor was seen while the analyse stage ran"
    assert killed[0][1], "the analyse stage had finished when the actor was killed"
    result = out["r"]
    assert result.ok, result.failed
    got = storage.open_store(result.maps["d0"])
    want = storage.open_store(ref.maps["d0"])
    for var in ("scale", "scale_std", "a", "c", "weight_fraction"):
        np.testing.assert_allclose(got[var].values, want[var].values, rtol=1e-5, atol=1e-6, equal_nan=True)


# --- S3 server stopped mid-write -----------------------------------------------------------------

def _s3rver_bin() -> str:
    if shutil.which("npm") is None:
        pytest.skip("npm is not available to install s3rver")
    cache = os.path.join(os.path.expanduser("~"), ".cache", "xrdscale-test", "s3rver")
    exe = os.path.join(cache, "node_modules", ".bin", "s3rver")
    if not os.path.exists(exe):
        os.makedirs(cache, exist_ok=True)
        res = subprocess.run(["npm", "install", "--prefix", cache, "--no-audit", "--no-fund", "s3rver@3.7.1"],
                             capture_output=True, text=True, timeout=300)
        if res.returncode != 0 or not os.path.exists(exe):
            pytest.skip(f"could not install s3rver with npm: {res.stderr[-300:]}")
    return exe


class _S3rver:
    """A disk-backed S3 server process that can be killed and started again on the same data."""

    def __init__(self, exe: str, directory: str) -> None:
        self.exe, self.directory = exe, directory
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "-d", self.directory, "-a", "127.0.0.1", "-p", str(self.port),
                                      "--silent", "--configure-bucket", "campaign"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     # s3rver 3 pages listings with a cipher that OpenSSL 3 keeps in its legacy provider
                                     env=dict(os.environ, NODE_OPTIONS="--openssl-legacy-provider"))
        t0 = time.time()
        while time.time() - t0 < 30:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("s3rver did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.mark.slow
@pytest.mark.s3
def test_s3_server_stopped_mid_write_and_restarted(tmp_path, dask_client, monkeypatch):
    exe = _s3rver_bin()
    server = _S3rver(exe, str(tmp_path / "s3data"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "S3RVER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "S3RVER")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("XRDSCALE_S3_ENDPOINT_URL", f"http://127.0.0.1:{server.port}")
    monkeypatch.setenv("XRDSCALE_TEST_STAGE_DELAY", "0.1")
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    ref_spec = load_spec(doubles.make_campaign(tmp_path / "ref", 2))
    store = open_job_store(ref_spec)
    ref = Runner(Plan(ref_spec, doubles.stages()), store).run()
    store.close()
    assert ref.ok

    db = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    spec = load_spec(doubles.make_campaign(tmp_path / "s3", 2, workspace="s3://campaign/ws",
                                           extra={"job_store": db, "runner": {"concurrency": 2, "retries": 0}}))
    server.start()
    try:
        store = open_job_store(spec)
        first = Runner(Plan(spec, doubles.stages()), store, retry_delay=0.1)
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", first.run()))
        t.start()
        t0 = time.time()
        while time.time() - t0 < 120:
            rows = store.runs(spec.campaign)
            if sum(r.status == "done" for r in rows) >= 3 and any(r.status == "running" and r.stage != "library"
                                                                  for r in rows):
                break
            time.sleep(0.05)
        time.sleep(0.2)
        server.kill()  # mid-write: chunks of a running stage are partly on disk
        t.join(300)
        r1 = out["r"]
        assert not r1.ok
        server.start()  # same port, same data directory
        done_before = {(r.dataset, r.stage) for r in store.runs(spec.campaign, invocation=r1.invocation)
                       if r.status == "done"}
        # nothing partial is marked complete: every complete store opens and holds finite data
        for did, stage in done_before:
            url = next(t.out for t in Plan(spec, doubles.stages()).all_tasks()
                       if (t.dataset_id, t.stage.name) == (did, stage))
            ds = storage.open_store(url)
            assert all(np.isfinite(v.values).all() for v in ds.data_vars.values())
        r2 = Runner(Plan(spec, doubles.stages()), store, retry_delay=0.1).run()
        rows = store.runs(spec.campaign, invocation=r2.invocation)
        store.close()
        assert r2.ok, r2.failed
        assert not ({(r.dataset, r.stage) for r in rows if r.status == "done"} & done_before)
        for did in ("d0", "d1"):
            np.testing.assert_array_equal(storage.open_store(r2.maps[did])["scale"].values,
                                          storage.open_store(ref.maps[did])["scale"].values)
    finally:
        server.kill()
