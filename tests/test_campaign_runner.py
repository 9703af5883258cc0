"""The runner on a stage table of doubles doing real Dask work: outputs, skipping, retries, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import campaign_doubles as doubles
from xrdscale.io import storage
from xrdscale.campaign.runner import Plan, Runner, open_job_store, run_campaign
from xrdscale.campaign.spec import load_spec
from xrdscale.campaign.stages import CAMPAIGN
from xrdscale.campaign.store import JobStore
from xrdscale.exceptions import InputError

HERE = os.path.dirname(__file__)


def _run(spec, stages=None, retry_delay=0.0):
    store = open_job_store(spec)
    try:
        return Runner(Plan(spec, stages or doubles.stages()), store, retry_delay=retry_delay).run(), store
    finally:
        store.close()


def _check_maps(spec, result):
    for ds in spec.datasets():
        got = storage.open_store(result.maps[ds.id])["scale"].values
        np.testing.assert_allclose(got, doubles.reference(np.load(ds.raw)), rtol=1e-12)


def _counts(store, spec, invocation):
    out: dict[str, int] = {}
    for r in store.runs(spec.campaign, invocation=invocation):
        out[r.status] = out.get(r.status, 0) + 1
    return out


def test_run_then_rerun_skips_everything(tmp_path, dask_client):
    spec = load_spec(doubles.make_campaign(tmp_path))
    result, _ = _run(spec)
    assert result.ok, result.failed
    _check_maps(spec, result)
    report = storage.open_store(result.report)
    assert list(report["dataset"].values) == [f"analyse:d{i}" for i in range(3)]
    assert storage.exists(os.path.join(spec.workspace, "jobs.sqlite"))
    store = open_job_store(spec)
    first, = store.invocation_ids(spec.campaign)
    # 2 model stages + 3 datasets x 4 stages + report; the disabled absorption is not in the graph
    assert _counts(store, spec, first) == {"done": 15}

    result2, _ = _run(spec)
    second = store.invocation_ids(spec.campaign)[-1]
    assert result2.ok and _counts(store, spec, second) == {"skipped": 15}
    store.close()


def test_config_change_recomputes_only_downstream(tmp_path, dask_client):
    spec = load_spec(doubles.make_campaign(tmp_path, 2))
    _run(spec)
    result, _ = _run(spec, doubles.stages(gain=3.0))
    store = open_job_store(spec)
    rows = store.runs(spec.campaign, invocation=result.invocation)
    status = {(r.dataset, r.stage): r.status for r in rows}
    store.close()
    assert status[(CAMPAIGN, "train")] == "skipped" and status[(CAMPAIGN, "library")] == "skipped"
    for did in ("d0", "d1"):
        assert {status[(did, s)] for s in ("integrate", "sinogram", "reconstruct", "analyse")} == {"done"}
        got = storage.open_store(result.maps[did])["scale"].values
        np.testing.assert_allclose(got, doubles.reference(np.load(spec.datasets()[int(did[1])].raw), 3.0))


def test_failure_is_retried_then_reported_per_dataset(tmp_path, dask_client, monkeypatch):
    spec = load_spec(doubles.make_campaign(tmp_path))
    monkeypatch.setenv("XRDSCALE_TEST_FAIL", "d1")
    result, _ = _run(spec)
    assert set(result.failed) == {"d1"} and "injected failure for d1" in result.failed["d1"]
    assert set(result.maps) == {"d0", "d2"}
    store = open_job_store(spec)
    rows = {(r.dataset, r.stage): r for r in store.runs(spec.campaign, invocation=result.invocation)}
    assert rows[("d1", "integrate")].status == "failed"
    assert rows[("d1", "integrate")].attempts == 1 + spec.runner.retries
    assert "injected failure" in rows[("d1", "integrate")].error
    assert ("d1", "sinogram") not in rows
    assert not storage.is_complete(rows[("d1", "integrate")].output_url)
    # the report covers the datasets that finished
    assert list(storage.open_store(result.report)["dataset"].values) == ["analyse:d0", "analyse:d2"]
    # fixed: a rerun computes only d1 and the report
    monkeypatch.delenv("XRDSCALE_TEST_FAIL")
    result2, _ = _run(spec)
    rows2 = store.runs(spec.campaign, invocation=result2.invocation)
    store.close()
    assert result2.ok
    assert sorted((r.dataset, r.stage) for r in rows2 if r.status == "done") == sorted(
        [("d1", s) for s in ("integrate", "sinogram", "reconstruct", "analyse")] + [(CAMPAIGN, "report")])
    _check_maps(spec, result2)


def test_missing_raw_files_listed_before_anything_runs(tmp_path):
    spec_path = doubles.make_campaign(tmp_path)
    os.remove(tmp_path / "raw" / "d0.npy")
    os.remove(tmp_path / "raw" / "d2.npy")
    spec = load_spec(spec_path)
    with pytest.raises(InputError) as err:
        run_campaign(spec, stages=doubles.stages())
    assert "dataset d0: raw" in str(err.value) and "dataset d2: raw" in str(err.value)
    assert "d1" not in str(err.value)
    assert not os.path.exists(spec.workspace)


def test_incomplete_output_is_recomputed(tmp_path, dask_client):
    spec = load_spec(doubles.make_campaign(tmp_path, 1))
    result, _ = _run(spec)
    url = os.path.join(spec.workspace, "datasets", "d0", "sinogram.zarr")
    os.remove(os.path.join(url, storage.MARKER))  # as if the stage died before its marker
    result2, _ = _run(spec)
    store = open_job_store(spec)
    status = {(r.dataset, r.stage): r.status for r in store.runs(spec.campaign, invocation=result2.invocation)}
    store.close()
    assert status[("d0", "integrate")] == "skipped"
    assert status[("d0", "sinogram")] == "done"
    # the upstream hash chain did not change, so downstream output is reused
    assert status[("d0", "reconstruct")] == "skipped"


def _wait_for(predicate, timeout=120.0, what="condition"):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_sigkill_dask_worker_mid_stage(tmp_path, monkeypatch):
    """A worker killed while a stage computes: the outputs equal the uninterrupted reference."""
    monkeypatch.setenv("XRDSCALE_TEST_STAGE_DELAY", "0.15")
    spec = load_spec(doubles.make_campaign(tmp_path, 2, extra={"cluster": {"kind": "local", "workers": 2,
                                                                            "dashboard": False}}))
    clients = []
    outcome = {}
    t = threading.Thread(target=lambda: outcome.setdefault("r", run_campaign(
        spec, stages=doubles.stages(), retry_delay=0.1, on_connect=lambda c, p: clients.append(c))))
    t.start()
    _wait_for(lambda: clients and os.path.exists(os.path.join(spec.workspace, "jobs.sqlite")), what="cluster")
    store = JobStore("sqlite:///" + os.path.join(spec.workspace, "jobs.sqlite"))
    _wait_for(lambda: any(r.status == "running" and r.stage == "integrate" for r in store.runs(spec.campaign)),
              what="a running stage")
    time.sleep(0.3)
    pids = clients[0].run(os.getpid)
    victim = sorted(pids.values())[0]
    os.kill(victim, signal.SIGKILL)
    t.join(300)
    store.close()
    result = outcome["r"]
    assert result.ok, result.failed
    _check_maps(spec, result)


@pytest.mark.slow
def test_sigkill_driver_and_resume(tmp_path):
    """The driver process killed mid-campaign; a rerun recomputes no finished stage."""
    spec_path = doubles.make_campaign(tmp_path, 3, extra={"runner": {"concurrency": 1, "retries": 0}})
    spec = load_spec(spec_path)
    env = dict(os.environ, XRDSCALE_TEST_STAGE_DELAY="0.05", PYTHONPATH=HERE + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "campaign_doubles.py"), spec_path], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = os.path.join(spec.workspace, "jobs.sqlite")
    try:
        _wait_for(lambda: os.path.exists(db), what="the job store")
        store = JobStore("sqlite:///" + db)
        _wait_for(lambda: sum(r.status == "done" for r in store.runs(spec.campaign)) >= 7, what="7 finished stages")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the cluster it started
        proc.wait(30)
    first = store.invocation_ids(spec.campaign)[0]
    done_before = {(r.dataset, r.stage) for r in store.runs(spec.campaign, invocation=first) if r.status == "done"}
    assert 7 <= len(done_before) < 15
    result = run_campaign(spec, stages=doubles.stages(), retry_delay=0.1)
    assert result.ok, result.failed
    rows = store.runs(spec.campaign, invocation=result.invocation)
    store.close()
    recomputed = {(r.dataset, r.stage) for r in rows if r.status == "done"}
    assert not (recomputed & done_before), "finished stages were recomputed"
    assert {(r.dataset, r.stage) for r in rows if r.status == "skipped"} >= done_before
    assert len(rows) == 15
    _check_maps(spec, result)


def test_a_failed_check_keeps_the_datasets_maps_in_the_report(tmp_path, dask_client):
    """The fit (a check stage) failing on d1 fails d1, but its finished maps still reach the report."""
    from xrdscale.campaign.stages import Stage

    def _check(call):
        if call.dataset.id == "d1":
            raise RuntimeError("injected check failure")
        storage.write_store(storage.open_store(call.inputs["analyse"]), call.out, stage="maps")

    stages = [*doubles.stages()[:-1], Stage("fit", _check, lambda s: {}, needs=("analyse",), check=True),
              doubles.stages()[-1]]
    spec = load_spec(doubles.make_campaign(tmp_path, extra={"runner": {"retries": 0}}))
    result, _ = _run(spec, stages)
    assert set(result.failed) == {"d1"} and "injected check failure" in result.failed["d1"]
    assert set(result.maps) == {"d0", "d1", "d2"}
    _check_maps(spec, result)
    assert list(storage.open_store(result.report)["dataset"].values) == [f"analyse:d{i}" for i in range(3)]
