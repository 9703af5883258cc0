"""Live operando series (``xrdscale operando watch``): files that land grow the report; restarts, bad files."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import threading
import time

import numpy as np
import pandas as pd
import pytest

from _builders import train_licx4
from xrdscale.campaign.spec import WatchConfig
from xrdscale.io import storage
from xrdscale.io.echem import read_echem, write_csv
from xrdscale.simulate.cycling import Protocol
from xrdscale.simulate.operando import log_until
from xrdscale.stages.operando import raw_times
from xrdscale.stages.operando_live import OperandoSettings, store_url, watch_operando

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """One simulated 1C cycle, a scan every 5 min, in three files of ~10 scans."""
    from xrdscale.simulate.operando import simulate_operando

    return simulate_operando(str(tmp_path_factory.mktemp("series")), protocol=Protocol(cycles=1),
                             scan_interval_s=300.0, files=3, seed=3)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return train_licx4(tmp_path_factory.mktemp("licx4"))


def _settings(series, model="no-model-needed"):
    return OperandoSettings(model=model, poni=series["poni"], mask=series["mask"], truth=series["truth"])


def _config(drop, **kw):
    return WatchConfig(pattern=str(drop / "operando-{id}.nxs"), **{"stable_seconds": 0.3, **kw})


def _land(src, drop):
    """As a detector writer closes a file: written under a temporary name, then renamed."""
    target = drop / os.path.basename(src)
    shutil.copyfile(src, str(target) + ".part")
    os.replace(str(target) + ".part", target)


def _grow_log(series, url, upto_file):
    """The echem log as the potentiostat has written it by the last scan of raw file ``upto_file``."""
    last = raw_times(series["raw_files"][upto_file])[0][-1]
    write_csv(str(url), log_until(read_echem(series["echem"]), float(last)))


def _rows(out):
    path = os.path.join(out, "report", "fractions.csv")
    return len(pd.read_csv(path)) if os.path.exists(path) else 0


def _warnings(caplog, text):
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def _stop_after(seconds):
    end = time.monotonic() + seconds
    return lambda: time.monotonic() > end


def test_a_file_landing_during_the_watch_grows_the_report_and_a_restart_recomputes_nothing(
        ray_local, series, model, tmp_path, caplog, xrdscale_cli):
    drop, out = tmp_path / "drop", str(tmp_path / "out")
    drop.mkdir()
    log = drop / "cell.csv"
    _grow_log(series, log, 0)
    _land(series["raw_files"][0], drop)
    done: dict = {}

    def go():
        try:
            done["result"] = watch_operando(_config(drop, refresh=7), out, _settings(series, model), echem=str(log),
                                            poll=0.2, max_files=2)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            done["error"] = exc

    caplog.set_level(logging.INFO, logger="xrdscale.stages.operando_live")
    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    n1 = len(raw_times(series["raw_files"][0])[0])
    deadline = time.monotonic() + 300
    while _rows(out) < n1:                          # the first file is in the report
        assert time.monotonic() < deadline and thread.is_alive(), done
        time.sleep(0.2)
    assert _rows(out) == n1
    _land(series["raw_files"][1], drop)             # lands after the watch started; the log does not cover it yet
    while not any("waits for the echem log" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline and thread.is_alive(), done
        time.sleep(0.1)
    assert not storage.exists(store_url(out, "002")) and _rows(out) == n1
    _grow_log(series, log, 1)                       # the log grows: the file is retried and analysed
    thread.join(300)
    assert not thread.is_alive() and "error" not in done, done
    result = done["result"]
    assert result.analysed == ["001", "002"] and not result.failed and not result.waiting
    assert set(result.latency) == {"001", "002"} and max(result.latency.values()) < 120
    print("landing → report latency (s):", {k: round(v, 1) for k, v in result.latency.items()})
    for did in ("001", "002"):
        assert storage.is_complete(store_url(out, did))
    n2 = len(raw_times(series["raw_files"][1])[0])
    table = pd.read_csv(os.path.join(out, "report", "fractions.csv"))
    assert len(table) == n1 + n2 and (np.diff(table["time_s"]) > 0).all()  # grew, in time order
    html = storage.read_bytes(os.path.join(out, "report", "report.html")).decode()
    assert "http-equiv='refresh' content='7'" in html and "Weight fractions against time" in html

    # a restart (the command a user reruns) recomputes nothing: not a store, not the report
    stamps = {p: os.stat(p).st_mtime_ns for p in (os.path.join(out, "report", "report.html"),
                                                  *(os.path.join(store_url(out, d), storage.MARKER)
                                                    for d in ("001", "002")))}
    code, stdout, err = xrdscale_cli("operando", "watch", str(drop / "operando-{id}.nxs"), out, "--model", model,
                                     "--poni", series["poni"], "--echem", str(log), "--max-files", "2", "--poll",
                                     "0.1", "--stable-seconds", "0")
    assert code == 0, err
    assert stdout.count("analysed before (skipped)") == 2 and "after its file landed" not in stdout
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps


def test_a_pattern_that_matches_nothing_warns(series, tmp_path, caplog):
    drop = tmp_path / "empty"
    drop.mkdir()
    with caplog.at_level(logging.WARNING):
        result = watch_operando(_config(drop, warn_every=0.2), str(tmp_path / "out"), _settings(series), poll=0.05,
                                stop=_stop_after(0.7))
    warned = _warnings(caplog, "no file matches")
    assert len(warned) >= 2 and "operando-{id}.nxs" in warned[0].getMessage()
    assert not result.analysed and result.report is None


def test_a_truncated_file_is_reported_once_and_not_analysed(series, tmp_path, caplog):
    drop, out = tmp_path / "drop", str(tmp_path / "out")
    drop.mkdir()
    full = pathlib.Path(series["raw_files"][2]).read_bytes()
    (drop / "operando-003.nxs").write_bytes(full[: len(full) // 2])
    with caplog.at_level(logging.WARNING):
        result = watch_operando(_config(drop, stable_seconds=0.1), out, _settings(series), echem=series["echem"],
                                poll=0.05, stop=_stop_after(1.0))
    assert len(_warnings(caplog, "truncated or unreadable")) == 1
    (url, why), = result.refused.items()
    assert url.endswith("operando-003.nxs") and why.startswith("truncated")
    assert not result.analysed and not result.failed and not storage.exists(store_url(out, "003"))
    assert result.report is None


def test_a_file_that_never_completes_is_reported_after_the_timeout(series, tmp_path, caplog):
    drop = tmp_path / "drop"
    drop.mkdir()
    _land(series["raw_files"][0], drop)              # no sidecar marker ever comes
    with caplog.at_level(logging.WARNING):
        result = watch_operando(_config(drop, complete="marker", timeout=0.3), str(tmp_path / "out"),
                                _settings(series), echem=series["echem"], poll=0.05, stop=_stop_after(0.8))
    assert len(_warnings(caplog, "never completed within 0 s")) == 1
    assert not result.analysed and list(result.refused.values())[0].startswith("never completed")
