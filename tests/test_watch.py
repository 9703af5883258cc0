"""Live mode: the watcher's completeness rules and bad input, and a watched campaign on the stage doubles."""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np
import pytest
import yaml

import campaign_doubles as doubles
from _builders import make_raw
from xrdscale.campaign.runner import Plan, open_job_store
from xrdscale.campaign.spec import WatchConfig, load_spec
from xrdscale.campaign.watch import Watcher, parse_name, template_fields, watch_campaign
from xrdscale.exceptions import ConfigError
from xrdscale.io import storage


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _watcher(folder, **cfg) -> tuple[Watcher, Clock]:
    clock = Clock()
    config = WatchConfig(pattern=str(folder / "c{cycle}-{voltage}V.nxs"), **cfg)
    return Watcher(config, clock=clock), clock


def _raw(path, n=4):
    make_raw(path, np.linspace(0, 180, n, endpoint=False), np.zeros(n), shape=(32, 32))


def _warnings(caplog, text):
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_pattern_fields_are_read_from_file_names():
    assert template_fields("raw/{id}_{state}.nxs") == ["id", "state"]
    assert parse_name("raw/c{cycle}-{voltage}V.nxs", "s3://b/raw/c2-3p85V.nxs") == {"cycle": "2", "voltage": "3p85"}
    assert parse_name("raw/c{cycle}-{voltage}V.nxs", "/x/c2-high.nxs") is None
    with pytest.raises(ValueError, match="unknown field"):
        template_fields("raw/{sample}.nxs")


def test_a_spec_with_an_unknown_watch_field_is_refused(tmp_path):
    (tmp_path / "det.poni").write_text("poni_version: 2\nDetector: Pilatus1M\nDistance: 0.3\n")
    (tmp_path / "lib.yaml").write_text("x\n")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "version": 1, "campaign": "w", "workspace": "work", "geometry": {"poni": "det.poni"}, "phases": "lib.yaml",
        "watch": {"pattern": "raw/{sample}.nxs"}}))
    with pytest.raises(ConfigError, match=r"watch.pattern.*unknown field"):
        load_spec(str(tmp_path / "spec.yaml"))


def test_a_file_is_complete_once_unchanged_for_stable_seconds(tmp_path):
    w, clock = _watcher(tmp_path, stable_seconds=10)
    _raw(tmp_path / "c1-3.85V.nxs")
    assert w.poll() == []
    clock.t = 5
    assert w.poll() == []
    with open(tmp_path / "c1-3.85V.nxs", "ab") as f:   # still being written
        f.write(b"\0" * 16)
    clock.t = 12
    assert w.poll() == []                               # changed at t=12: stable since then
    clock.t = 23
    (ds, cycle), = w.poll()
    assert (ds.id, ds.voltage, ds.state, cycle) == ("c1-3.85V", 3.85, "operando", 1)
    assert w.poll() == []                               # picked up once


def test_a_marker_completes_a_file(tmp_path):
    w, clock = _watcher(tmp_path, complete="marker", marker=".done")
    _raw(tmp_path / "c2-4p20V.nxs")
    clock.t = 1000
    assert w.poll() == []
    (tmp_path / "c2-4p20V.nxs.done").write_text("")
    (ds, cycle), = w.poll()
    assert (ds.id, ds.voltage, cycle) == ("c2-4p20V", 4.2, 2)


def test_a_file_that_never_completes_is_reported_after_the_timeout_and_never_analysed(tmp_path, caplog):
    w, clock = _watcher(tmp_path, complete="marker", timeout=60)
    _raw(tmp_path / "c1-3.70V.nxs")
    with caplog.at_level(logging.WARNING):
        for t in (0, 30, 61, 90, 3000):
            clock.t = t
            assert w.poll() == []
    assert len(_warnings(caplog, "never completed within 60 s")) == 1
    assert "c1-3.70V.nxs" in next(iter(w.refused()))


def test_a_truncated_file_is_reported_and_picked_up_once_rewritten(tmp_path, caplog):
    path = tmp_path / "c1-2.65V.nxs"
    _raw(path)
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])
    w, clock = _watcher(tmp_path, stable_seconds=1)
    with caplog.at_level(logging.WARNING):
        for t in (0, 2, 4):
            clock.t = t
            assert w.poll() == []
    assert len(_warnings(caplog, "truncated or unreadable")) == 1
    path.write_bytes(full)
    os.utime(path, (time.time() + 5, time.time() + 5))
    clock.t = 5
    assert w.poll() == []
    clock.t = 7
    (ds, _), = w.poll()
    assert ds.id == "c1-2.65V"


def test_a_name_the_pattern_cannot_parse_is_reported_once(tmp_path, caplog):
    w, clock = _watcher(tmp_path, stable_seconds=0)
    _raw(tmp_path / "c1-highV.nxs")   # fits the glob c*-*V.nxs, not {voltage}
    with caplog.at_level(logging.WARNING):
        for t in (0, 1, 2):
            clock.t = t
            assert w.poll() == []
    assert len(_warnings(caplog, "does not fit the watch pattern")) == 1


def test_a_pattern_that_matches_nothing_warns_every_few_minutes(tmp_path, caplog):
    w, clock = _watcher(tmp_path, warn_every=300)
    with caplog.at_level(logging.WARNING):
        for t in (0, 100, 301, 400, 602):
            clock.t = t
            w.poll()
    warned = _warnings(caplog, "no file matches")
    assert len(warned) == 2 and "301 s since the watch started" in warned[0].getMessage()


def _live_spec(tmp_path) -> str:
    path = doubles.make_campaign(tmp_path, n_datasets=1, extra={
        "watch": {"pattern": "drop/{id}_{voltage}V.npy", "stable_seconds": 0.3, "refresh": 5}})
    os.makedirs(tmp_path / "drop")
    return path


def _watch_in_thread(spec, **kw):
    out: dict = {}

    def go():
        try:
            out["result"] = watch_campaign(spec, stages=doubles.stages(), readable=lambda url: None, poll=0.1,
                                           retry_delay=0.0, **kw)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            out["error"] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


def test_a_dataset_written_after_the_watch_started_gets_its_maps_and_report(tmp_path, dask_client):
    spec = load_spec(_live_spec(tmp_path))
    thread, out = _watch_in_thread(spec, max_datasets=1)
    model = Plan(spec, doubles.stages()).model_tasks[-1].out
    deadline = time.monotonic() + 600  # the machine may be loaded
    while not storage.is_complete(model):     # the model is trained before any dataset lands
        assert time.monotonic() < deadline and thread.is_alive(), out
        time.sleep(0.1)
    raw = np.random.default_rng(3).random((doubles.N_FRAMES, doubles.NPT))
    np.save(tmp_path / "drop" / "late.part.npy", raw)
    os.replace(tmp_path / "drop" / "late.part.npy", tmp_path / "drop" / "late_3.9V.npy")
    thread.join(600)
    assert not thread.is_alive() and "error" not in out, out
    result = out["result"]
    assert result.datasets == ["late"] and result.latency["late"] < 120
    maps = storage.open_store(os.path.join(spec.workspace, "datasets", "late", "analyse.zarr"))["scale"].values
    np.testing.assert_allclose(maps, doubles.reference(raw), rtol=1e-12)
    report = storage.open_store(result.report)
    assert list(report["dataset"].values) == ["analyse:d0", "analyse:late"]

    # a restart recomputes nothing: every stage of the second watch is skipped
    store = open_job_store(spec)
    before = set(store.invocation_ids(spec.campaign))
    store.close()
    thread, out = _watch_in_thread(spec, max_datasets=1)
    thread.join(600)
    assert "error" not in out, out
    store = open_job_store(spec)
    new = [i for i in store.invocation_ids(spec.campaign) if i not in before]
    statuses = {r.status for i in new for r in store.runs(spec.campaign, invocation=i)}
    store.close()
    assert statuses == {"skipped"}
