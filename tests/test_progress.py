"""Progress without a terminal: throttled log lines that end at the total, counted per frame.

Every compute here runs with output captured (no TTY), so progress comes as log lines of
``xrdscale.runtime.progress`` at most every ``log_interval`` seconds, plus one at the end.
"""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import time

import dask
import numpy as np
import pytest

from xrdscale.runtime import progress as progress_mod
from xrdscale.runtime.progress import Tracker, compute, format_duration, format_rate, report

INTERVAL = 0.3
LINE = re.compile(r"^(?P<label>\w+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+)")


def _slow_block(n: int, pause: float = 0.01) -> int:
    """A task of ``n`` units that reports each one (the shape of the integrate task)."""
    from xrdscale.runtime.progress import report as report_unit

    for _ in range(n):
        time.sleep(pause)
        report_unit(1)
    return n


def _graph(blocks: int, per_block: int, pause: float = 0.01):
    return dask.delayed(sum)([dask.delayed(_slow_block, pure=False)(per_block, pause) for _ in range(blocks)])


def _lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "xrdscale.runtime.progress"]


def _check_throttled_lines(records, *, label: str, total: int, unit: str, interval: float) -> list[int]:
    """The lines are throttled, count up, and the last one says the whole total is done."""
    messages = [r.getMessage() for r in records]
    assert messages, "no progress line"
    assert messages[-1].startswith(f"{label}: {total}/{total} {unit} in "), messages
    counts = []
    for m in messages[:-1]:
        match = LINE.match(m)
        assert match and match["label"] == label and int(match["total"]) == total and match["unit"] == unit, m
        counts.append(int(match["done"]))
    assert counts == sorted(counts) and all(c <= total for c in counts)
    times = [r.created for r in records[:-1]]
    assert all(b - a >= 0.9 * interval for a, b in zip(times, times[1:])), "more than one line per interval"
    return counts


def test_formatting():
    assert format_duration(27.2) == "27 s"
    assert format_duration(91) == "1 min 31 s"
    assert format_duration(7500) == "2 h 5 min"
    assert format_duration(float("inf")) == "?"
    assert format_rate(41.24, "frames") == "41.2 frames/s"
    assert format_rate(0.05, "tasks") == "3.0 tasks/min"


def test_a_line_has_the_count_the_percentage_the_rate_and_the_eta(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: clock[0])
    t = Tracker("integrate", total=5000, unit="frames")
    assert t.line() == "integrate: 0/5000 frames (0.0 %), starting"
    t.set(1000)
    t.snapshot()
    clock[0] += 10.0
    t.set(1234)
    assert t.line() == "integrate: 1234/5000 frames (24.7 %), 23.4 frames/s, ETA 2 min 41 s"
    t.finish()
    assert t.line(final=True) == "integrate: 5000/5000 frames in 10 s, 500.0 frames/s"


def test_local_scheduler_reports_give_throttled_lines_that_end_at_the_total(caplog):
    with caplog.at_level(logging.INFO, logger="xrdscale.runtime.progress"):
        assert compute(_graph(4, 40), label="work", total=160, unit="frames", log_interval=INTERVAL) == 160
    counts = _check_throttled_lines(_lines(caplog), label="work", total=160, unit="frames", interval=INTERVAL)
    assert len(counts) >= 2
    # per unit, not per task: the counts in between are not whole tasks of 40
    assert any(c % 40 for c in counts), counts


def test_local_scheduler_without_total_counts_tasks(caplog):
    with caplog.at_level(logging.INFO, logger="xrdscale.runtime.progress"):
        compute(_graph(6, 30), label="tasks", log_interval=INTERVAL)
    records = _lines(caplog)
    n_tasks = int(re.match(r"tasks: (\d+)/(\d+) tasks in", records[-1].getMessage())[2])
    assert n_tasks >= 7  # six blocks and their sum
    _check_throttled_lines(records, label="tasks", total=n_tasks, unit="tasks", interval=INTERVAL)


def test_no_progress_no_lines(caplog):
    with caplog.at_level(logging.INFO, logger="xrdscale.runtime.progress"):
        assert compute(_graph(2, 3, 0.0), label="quiet", total=6, progress=False) == 6
    assert not _lines(caplog)


def test_report_without_tracking_is_a_near_no_op():
    t0 = time.perf_counter()
    for _ in range(100_000):
        report(1)
    assert time.perf_counter() - t0 < 2.0  # ~0.3 µs a call when idle; generous for loaded CI machines
    assert not progress_mod._local and not progress_mod._pending


def test_a_failed_compute_says_where_it_stopped(caplog):
    def boom(n):
        _slow_block(n)
        raise ValueError("bad frame")

    graph = dask.delayed(sum)([dask.delayed(boom)(5)])
    with caplog.at_level(logging.INFO, logger="xrdscale.runtime.progress"), pytest.raises(ValueError):
        compute(graph, label="work", total=50, unit="frames", log_interval=INTERVAL)
    assert re.match(r"work: stopped at \d+/50 frames after", _lines(caplog)[-1].getMessage())


def test_integrate_reports_once_per_frame(tmp_path, monkeypatch):
    from _builders import make_raw
    from xrdscale.stages.integrate import integrate

    make_raw(tmp_path / "raw.nxs", np.repeat([0.0, 60.0, 120.0], 4), np.tile([-0.3, -0.1, 0.1, 0.3], 3),
             poni_path=tmp_path / "det.poni")
    seen: list[tuple[str, int]] = []
    add = Tracker.add
    monkeypatch.setattr(Tracker, "add", lambda self, n: (seen.append((self.label, n)), add(self, n)))
    integrate(str(tmp_path / "raw.nxs"), str(tmp_path / "p.zarr"), poni=str(tmp_path / "det.poni"), npt=32,
              q_range=(1.0, 3.0), method="mean", frames_per_chunk=5, progress=True)
    assert seen == [("integrate", 1)] * 12  # 12 frames in chunks of 5, 5, 2: one report per frame


def test_distributed_in_process_cluster(caplog):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        with caplog.at_level(logging.INFO, logger="xrdscale.runtime.progress"):
            assert compute(_graph(4, 40), client=client, label="work", total=160, unit="frames",
                           log_interval=INTERVAL) == 160
        counts = _check_throttled_lines(_lines(caplog), label="work", total=160, unit="frames", interval=INTERVAL)
        assert any(c % 40 for c in counts), counts  # worker reports arrive per few frames, not per task
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="xrdscale.runtime.progress"):
            compute(_graph(4, 30), label="tasks", log_interval=INTERVAL)  # the default client
        assert re.match(r"tasks: (\d+)/\1 tasks in", _lines(caplog)[-1].getMessage())
        assert not progress_mod._Router._routers  # unsubscribed after the compute


def test_distributed_worker_processes(caplog):
    from distributed import Client, LocalCluster

    def block(n):  # defined here so that it travels to the worker processes by value
        import time as time_

        from xrdscale.runtime.progress import report as report_unit

        for _ in range(n):
            time_.sleep(0.01)
            report_unit(1)
        return n

    graph = dask.delayed(sum)([dask.delayed(block, pure=False)(40) for _ in range(4)])
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        with caplog.at_level(logging.INFO, logger="xrdscale.runtime.progress"):
            assert compute(graph, client=client, label="work", total=160, unit="frames",
                           log_interval=INTERVAL) == 160
    counts = _check_throttled_lines(_lines(caplog), label="work", total=160, unit="frames", interval=INTERVAL)
    assert counts and max(counts) > 0  # counts arrived from the worker process while it ran


def test_cli_integrate_into_a_pipe_prints_progress_lines_and_no_engine_chatter(tmp_path):
    """What ``xrdscale integrate … 2> log`` writes: xrdscale's lines, not distributed's."""
    from _builders import make_raw

    make_raw(tmp_path / "raw.nxs", np.repeat([0.0, 60.0, 120.0], 4), np.tile([-0.3, -0.1, 0.1, 0.3], 3),
             poni_path=tmp_path / "det.poni")
    res = subprocess.run([sys.executable, "-m", "xrdscale.cli", "integrate", str(tmp_path / "raw.nxs"),
                          str(tmp_path / "p.zarr"), "--poni", str(tmp_path / "det.poni"), "--npt", "32",
                          "--q-range", "1.0", "3.0", "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    # (a busy port 8787 makes distributed warn; that is a real warning, not chatter)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not re.search(
        r"Port 8787 is already in use|Perhaps you already have a cluster|Hosting the HTTP server|warnings.warn", ln)]
    assert any(re.search(r"INFO integrate: 12/12 frames in ", ln) for ln in lines), res.stderr
    assert any("wrote patterns store" in ln for ln in lines), res.stderr
    chatter = [ln for ln in lines if re.search(r"distributed|Nanny|Scheduler|Worker|jupyter-server-proxy|"
                                               r"stale lock|still alive|Completed", ln)]
    assert chatter == [], res.stderr


def test_campaign_progress_without_a_terminal_logs_each_finished_stage(caplog):
    from types import SimpleNamespace

    from rich.console import Console

    from xrdscale.campaign.progress import CampaignProgress

    plan = SimpleNamespace(model_tasks=[], report_stage=None, dataset_tasks={"c1": [1, 2], "c2": [1, 2]},
                           series_tasks={})
    with caplog.at_level(logging.INFO, logger="xrdscale.campaign.progress"):
        with CampaignProgress(Console(file=io.StringIO(), force_terminal=False)) as bars:
            bars.connected(None, plan)
            bars.event("c1", "integrate", "running")
            bars.event("c1", "integrate", "skipped")
            bars.event("c2", "integrate", "done")
            bars.event("c2", "sinogram", "failed")
    messages = [r.getMessage() for r in caplog.records if r.name == "xrdscale.campaign.progress"]
    assert messages[0].startswith("c2: integrate done (1/2 stages; campaign 2/4, ETA ")
    assert messages[1] == "c2: sinogram failed (1/2 stages; campaign 2/4, ETA " + messages[1].split("ETA ")[1]
    assert len(messages) == 2


@pytest.fixture
def logging_state():
    """Restore what the command line's root callback changes in this process."""
    import dask

    from xrdscale.cli import CHATTY_LOGGERS

    names = ["", "xrdscale", *CHATTY_LOGGERS]
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers), logging.getLogger(n).propagate)
             for n in names}
    config = dask.config.get("logging", default=None), dask.config.get("xrdscale.ray.logging-level", default=None)
    yield
    for n, (level, handlers, propagate) in saved.items():
        lg = logging.getLogger(n)
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate = propagate
    dask.config.set({"logging": config[0], "xrdscale.ray.logging-level": config[1]})


@pytest.mark.parametrize(("verbose", "engines", "own"), [(0, logging.ERROR, logging.INFO),
                                                         (1, logging.INFO, logging.INFO),
                                                         (2, logging.DEBUG, logging.DEBUG)])
def test_the_engines_are_quiet_unless_verbose(logging_state, verbose, engines, own):
    import dask

    from xrdscale.cli import _root
    from xrdscale.runtime.cluster import worker_log_level
    from xrdscale.runtime.ray import logging_level

    _root(version=False, verbose=verbose)
    assert logging.getLogger("xrdscale").getEffectiveLevel() == own
    for name in ("distributed", "distributed.client", "ray", "silx.opencl.common"):
        assert logging.getLogger(name).getEffectiveLevel() == engines, name
    assert worker_log_level() == engines  # what local worker processes get
    assert logging_level() == engines  # what ray.init gets
    assert dask.config.get("logging")["distributed"] == logging.getLevelName(engines).lower()
