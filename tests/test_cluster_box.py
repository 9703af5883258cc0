"""The production topology on one machine: the demo campaign on separate Dask, Ray, S3 and PostgreSQL processes.

A :class:`~xrdscale.testing.cluster.ClusterBox` runs a Dask scheduler with two workers, a Ray
head with a second node declared with one GPU, a moto S3 server and a PostgreSQL server. The
demo beamtime is written to S3; ``xrdscale campaign run`` drives it from a separate process
with ``--cluster tcp://…,ray://…``, the workspace on S3 and the job store on PostgreSQL,
credentials only in the environment. Its maps must equal those of a local run of the same
spec. A second run, with a Dask worker and the GPU node SIGKILLed mid-run, must finish with
the same maps and run no stage twice.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from xrdscale.testing.cluster import ClusterBox

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.postgres, pytest.mark.timeout(5400)]

XRDSCALE = [sys.executable, "-m", "xrdscale.cli"]
#: a smaller training than the demo's, the rest of the demo spec as it is
TRAIN = {"n": 1500, "epochs": 3}
#: seconds an inference actor may take to start or answer (the fault run waits this long for
#: actors whose GPU node is gone before the stage is retried on what is left)
CALL_TIMEOUT = "20"
STAGES = ("integrate", "sinogram", "reconstruct", "analyse")


def _needs() -> str | None:
    for tool in ("initdb",):
        if shutil.which(tool) is None and not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
            return f"{tool} is not installed (PostgreSQL; .ci/run installs it)"
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return "moto[server] is not installed"
    return None


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    reason = _needs()
    if reason:
        pytest.skip(reason)
    b = ClusterBox(tmp_path_factory.mktemp("box")).up()
    try:
        yield b
    finally:
        b.down()
    assert not any(b.running().values())


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without credentials of other tests, plus ``extra``."""
    drop = ("AWS_", "RAY_AUTH", "XRDSCALE_S3_ENDPOINT_URL", "XRDSCALE_JOB_STORE_URL", "XRDSCALE_BOX")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, **(extra or {})}


def _run(args: list[str], env: dict[str, str], log: Path, timeout: float = 2400) -> subprocess.CompletedProcess:
    with open(log, "w") as out:
        proc = subprocess.run([*XRDSCALE, *args], env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                              cwd=log.parent)
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), "")


@pytest.fixture(scope="module")
def beamtime(box, tmp_path_factory):
    """The demo beamtime, written locally and copied to S3; specs for a local and a box run."""
    import s3fs

    root = tmp_path_factory.mktemp("bt")
    out = _run(["simulate", "beamtime", str(root / "bt")], _clean_env(), root / "simulate.log", timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    spec = yaml.safe_load((root / "bt" / "jobs" / "demo-18650.yaml").read_text())
    spec["pipeline"]["train"].update(TRAIN)
    local = {**spec, "workspace": str(root / "local-work")}
    (root / "bt" / "jobs" / "local.yaml").write_text(yaml.safe_dump(local))
    # the box's spec: every path on S3 (relative paths resolve against the spec's own folder there)
    fs = s3fs.S3FileSystem(key=box.service_env["AWS_ACCESS_KEY_ID"], secret=box.service_env["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": box.addresses["s3"]})
    (root / "bt" / "jobs" / "box.yaml").write_text(yaml.safe_dump(spec))
    fs.put(str(root / "bt"), f"{box.bucket}/bt", recursive=True)
    return {"root": root, "local": root / "bt" / "jobs" / "local.yaml", "box": f"s3://{box.bucket}/bt/jobs/box.yaml",
            "fs": fs}


def _box_env(box: ClusterBox) -> dict[str, str]:
    return _clean_env({**box.env, "DASK_XRDSCALE__RAY__CALL_TIMEOUT": CALL_TIMEOUT})


def _maps(url: str, env: dict[str, str]):
    """The store at ``url``, loaded with ``env`` (the box's S3 credentials) set in this process."""
    from unittest import mock

    from xrdscale.io import storage

    with mock.patch.dict(os.environ, env):
        return storage.open_store(url).load()


def _assert_same_maps(box: ClusterBox, a_url: str, b_url: str) -> None:
    a, b = _maps(a_url, box.env), _maps(b_url, box.env)
    assert sorted(a.data_vars) == sorted(b.data_vars)
    for name in a.data_vars:
        x, y = a[name].values, b[name].values
        # the same float32 operations in the same order on both topologies: equal to the bit
        np.testing.assert_array_equal(x, y, err_msg=f"{name} differs between {a_url} and {b_url}")


def _rows(box: ClusterBox, invocation: str | None = None) -> list[dict]:
    import sqlalchemy as sa

    engine = sa.create_engine(box.job_store_url)
    try:
        with engine.connect() as conn:
            q = "SELECT * FROM stage_runs" + (" WHERE invocation = :i" if invocation else "") + " ORDER BY id"
            return [dict(r._mapping) for r in conn.execute(sa.text(q), {"i": invocation})]
    finally:
        engine.dispose()


def _all_rows_text(box: ClusterBox) -> str:
    import sqlalchemy as sa

    engine = sa.create_engine(box.job_store_url)
    try:
        with engine.connect() as conn:
            return "\n".join(str(dict(r._mapping)) for table in ("invocations", "stage_runs", "xrdscale_meta")
                             for r in conn.execute(sa.text(f"SELECT * FROM {table}")))
    finally:
        engine.dispose()


def _grep_secrets(box: ClusterBox, texts: dict[str, str]) -> list[str]:
    return [f"{secret[:4]}… in {where}" for where, text in texts.items() for secret in box.secret_values
            if secret in text]


def _store_bytes(fs, prefix: str) -> dict[str, str]:
    return {f"s3://{p}": fs.cat_file(p).decode("latin-1") for p in fs.find(prefix)}


def _logs(root: Path) -> dict[str, str]:
    return {str(p): p.read_text(errors="replace") for p in root.rglob("*") if p.is_file()
            and p.suffix in (".log", ".out", ".err", ".txt", "")}


@pytest.fixture(scope="module")
def runs(box, beamtime):
    """The local run and the first box run of the demo campaign."""
    root = beamtime["root"]
    local = _run(["-v", "campaign", "run", str(beamtime["local"])], _clean_env(), root / "local.log")
    assert local.returncode == 0, local.stdout[-4000:]
    run1 = _run(["-v", "campaign", "run", beamtime["box"], "--cluster", box.cluster_option, "--workspace",
                 f"s3://{box.bucket}/run1"], _box_env(box), root / "run1.log")
    assert run1.returncode == 0, run1.stdout[-4000:]
    return {"local": root / "local-work", "run1": f"s3://{box.bucket}/run1", "log": run1.stdout}


def test_campaign_on_the_box_equals_the_local_run(box, beamtime, runs):
    datasets = [d["id"] for c in yaml.safe_load(Path(beamtime["local"]).read_text())["cycles"] for d in c["datasets"]]
    for did in datasets:
        for stage in ("reconstruct", "analyse"):
            _assert_same_maps(box, str(runs["local"] / "datasets" / did / f"{stage}.zarr"),
                              f"{runs['run1']}/datasets/{did}/{stage}.zarr")
    # the work ran where it should: stages on the box's Dask workers, actors on its Ray
    assert f"Ray started at {box.addresses['ray']}" in runs["log"]
    # the GPU node has no CUDA: the actors placed there fall back to the CPU, said once
    assert runs["log"].count("pqnet inference: CUDA is not usable here") >= 1
    rows = _rows(box)
    assert {(r["dataset"], r["stage"]) for r in rows if r["status"] == "done"} >= {(d, s) for d in datasets
                                                                                   for s in STAGES}


def test_credentials_appear_in_no_store_log_or_job_store_row(box, beamtime, runs):
    texts = {"job store": _all_rows_text(box), **_logs(beamtime["root"]), **_logs(box.root)}
    texts.update(_store_bytes(beamtime["fs"], f"{box.bucket}/run1"))
    runtime = Path(box._state.runtime)
    texts.update(_logs(runtime / "ray") if (runtime / "ray").is_dir() else {})
    assert len(texts) > 50
    assert _grep_secrets(box, texts) == []


def test_a_node_failure_mid_run_finishes_with_the_same_maps(box, beamtime, runs):
    """SIGKILL a Dask worker and the Ray GPU node while the analyses run; no finished stage runs again."""
    root = beamtime["root"]
    spec = yaml.safe_load(Path(beamtime["local"]).read_text())
    datasets = [d["id"] for c in spec["cycles"] for d in c["datasets"]]
    spec["model"] = f"{runs['run1']}/model/train"  # the model of run 1, so this run is only the datasets
    spec["workspace"] = f"s3://{box.bucket}/fault"
    with open(root / "bt" / "jobs" / "fault.yaml", "w") as f:
        yaml.safe_dump(spec, f)
    beamtime["fs"].put(str(root / "bt" / "jobs" / "fault.yaml"), f"{box.bucket}/bt/jobs/fault.yaml")
    log = root / "fault.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*XRDSCALE, "-v", "campaign", "run", f"s3://{box.bucket}/bt/jobs/fault.yaml",
                                 "--cluster", box.cluster_option, "--workspace", f"s3://{box.bucket}/fault"],
                                env=_box_env(box), stdout=out, stderr=subprocess.STDOUT, cwd=root)
    try:
        # kill once the first analyse runs: its actors sit on the GPU node
        deadline = time.monotonic() + 2400
        invocation = None
        while time.monotonic() < deadline and proc.poll() is None:
            rows = [r for r in _rows(box) if r["campaign"] == spec["campaign"]]
            mine = [r for r in rows if r["output_url"] and "/fault/" in r["output_url"]]
            if any(r["stage"] == "analyse" and r["status"] == "running" for r in mine):
                invocation = mine[0]["invocation"]
                break
            time.sleep(1.0)
        assert invocation is not None, "the fault run never reached an analyse stage:\n" + log.read_text()[-3000:]
        done_before = {(r["dataset"], r["stage"]) for r in _rows(box, invocation) if r["status"] == "done"}
        box.kill("dask-worker-1")
        box.kill("ray-node")
        killed_at = time.time()
        assert proc.wait(timeout=2400) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    for did in datasets:
        _assert_same_maps(box, f"{runs['run1']}/datasets/{did}/analyse.zarr",
                          f"s3://{box.bucket}/fault/datasets/{did}/analyse.zarr")
    rows = _rows(box, invocation)
    keys = [(r["dataset"], r["stage"]) for r in rows]
    assert len(keys) == len(set(keys)), "a stage was recorded twice in one run"
    assert all(r["status"] == "done" for r in rows), [(r["dataset"], r["stage"], r["status"]) for r in rows]
    # the stages finished before the failure ran once, and none of them after it
    for r in rows:
        if (r["dataset"], r["stage"]) in done_before:
            assert r["attempts"] == 1
            assert r["ended_at"].timestamp() < killed_at
    report = {"killed after": sorted(done_before), "retried": sorted((r["dataset"], r["stage"], r["attempts"])
                                                                     for r in rows if r["attempts"] > 1)}
    print(json.dumps(report))
    assert not box.running()["dask-worker-1"] and not box.running()["ray-node"]
    assert "attempt 1/" in text  # the failure was seen, and retried


# -- bad input, on the same box -------------------------------------------------------------------

def _complete_stores(fs, prefix: str) -> list[str]:
    return [p for p in fs.find(prefix) if p.endswith(".xrdscale-complete")] if fs.exists(prefix) else []


def _fails_cleanly(out: subprocess.CompletedProcess, fs, prefix: str) -> str:
    assert out.returncode != 0, out.stdout[-3000:]
    errors = [line for line in out.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stdout[-3000:]
    assert "Traceback" not in out.stdout
    assert _complete_stores(fs, prefix) == []
    return errors[0]


def test_a_ray_cluster_of_another_ray_version_is_said_plainly(box, beamtime, tmp_path):
    """The driver claims another Ray version (patched in its process); the cluster's answer is real."""
    argv = ["xrdscale", "campaign", "run", beamtime["box"], "--cluster", box.cluster_option, "--workspace",
            f"s3://{box.bucket}/mismatch"]
    code = ("import runpy, sys, ray; ray.__version__ = '2.0.0'; sys.argv = " + repr(argv)
            + "; runpy.run_module('xrdscale.cli', run_name='__main__')")
    with open(tmp_path / "mismatch.log", "w") as f:
        proc = subprocess.run([sys.executable, "-c", code], env=_box_env(box), stdout=f, stderr=subprocess.STDOUT,
                              timeout=600, cwd=tmp_path)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, (tmp_path / "mismatch.log").read_text(), "")
    import ray

    error = _fails_cleanly(out, beamtime["fs"], f"{box.bucket}/mismatch")
    assert f"runs Ray {ray.__version__} on Python" in error and "this driver Ray 2.0.0" in error


def test_an_unreachable_ray_client_address_fails_before_anything_starts(box, beamtime, tmp_path):
    from xrdscale.testing.cluster import _free_port

    port = _free_port()
    out = _run(["campaign", "run", beamtime["box"], "--cluster", f"{box.addresses['dask']},ray://127.0.0.1:{port}",
                "--workspace", f"s3://{box.bucket}/noray"], _box_env(box), tmp_path / "noray.log", timeout=300)
    error = _fails_cleanly(out, beamtime["fs"], f"{box.bucket}/noray")
    assert f"cannot reach the Ray cluster at ray://127.0.0.1:{port}" in error


def test_a_workspace_bucket_that_does_not_exist_fails_before_anything_starts(box, beamtime, tmp_path):
    out = _run(["campaign", "run", beamtime["box"], "--cluster", box.cluster_option, "--workspace",
                "s3://no-such-bucket/ws"], _box_env(box), tmp_path / "bucket.log", timeout=300)
    error = _fails_cleanly(out, beamtime["fs"], f"{box.bucket}/ws")
    assert "s3://no-such-bucket/ws is not writable" in error and "'no-such-bucket' exist" in error
    assert "Dask dashboard" not in out.stdout and "Ray started" not in out.stdout


def test_a_wrong_database_password_is_not_echoed(box, beamtime, tmp_path):
    wrong = "wrong-" + box.secret_values[-1][:8]
    url = box.job_store_url.replace(f":{box._secrets['pg_password']}@", f":{wrong}@")
    env = {**_box_env(box), "XRDSCALE_JOB_STORE_URL": url}
    out = _run(["campaign", "run", beamtime["box"], "--cluster", box.cluster_option, "--workspace",
                f"s3://{box.bucket}/pw"], env, tmp_path / "pw.log", timeout=300)
    error = _fails_cleanly(out, beamtime["fs"], f"{box.bucket}/pw")
    assert "password authentication failed" in error
    assert wrong not in out.stdout and box._secrets["pg_password"] not in out.stdout
    assert "Dask dashboard" not in out.stdout
