"""Live operando series: each scan file is analysed as it lands, and the report grows (``xrdscale operando watch``).

Scan files (NeXus files of timed point/line scans, e.g. one per N scans or per hour) land
in a folder or under an S3 prefix matching a glob. The files are found, and judged complete,
truncated or never completed, by :class:`~xrdscale.campaign.watch.FileWatcher`: the rules
of ``xrdscale campaign watch`` (``complete: stable`` or ``marker``, ``timeout``, a warning
every ``warn_every`` s while nothing matches). The pattern's ``{id}`` (else the file's stem)
names each file.

Each complete file is analysed once, by :func:`xrdscale.stages.operando.run_series`, into
``OUT/files/<id>/operando.zarr`` (complete-marked only when done), and the report
``OUT/report/report.html`` of every store so far (:func:`write_operando_report`, in time
order; the page reloads itself every ``refresh`` s) is rewritten after each file, so the
plot grows as scans land. The echem log (CSV, or ``FILE.nxs::/group``; by default each scan
file's own ``/entry/echem``) grows alongside: it is read again at every poll while files
wait. A file whose scans the log does not yet cover waits, and is retried when the log
grows; after ``timeout`` s of waiting a warning says so (once), and it waits on.

A restart recomputes nothing: files with a complete store are skipped, and the report is
rewritten only when its stores (listed in ``OUT/report/series.json``) are not those on
disk. Ctrl-C leaves the store being written unmarked; the next watch redoes that file.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xrdscale.campaign.watch import FileWatcher, Landing
from xrdscale.exceptions import InputError, XrdscaleError
from xrdscale.io import storage

logger = logging.getLogger(__name__)

__all__ = ["LiveResult", "OperandoSettings", "store_url", "watch_operando"]

#: The report's record of the stores it shows.
SERIES = "series.json"


@dataclass(frozen=True)
class OperandoSettings:
    """What :func:`~xrdscale.stages.operando.run_series` needs for each file, and the report's truth."""

    model: str
    poni: str
    mask: str | None = None
    npt: int = 500
    margin: float = 0.05
    ensemble: int | None = None
    truth: str | None = None
    actors: int = 1


@dataclass
class LiveResult:
    """What a live watch did (ids are the files' ids)."""

    analysed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # complete before this watch
    latency: dict[str, float] = field(default_factory=dict)  # landing → report [s]
    waiting: dict[str, str] = field(default_factory=dict)  # for the echem log, when the watch stopped
    failed: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # url → why (truncated, never completed, bad name)
    report: str | None = None


def store_url(out: str, did: str) -> str:
    """The ``operando`` store of file ``did`` under ``out``."""
    return storage.join(out, "files", did, "operando.zarr")


def _complete_ids(out: str) -> list[str]:
    folder = storage.join(out, "files")
    if not storage.exists(folder):
        return []
    fs, path = storage.filesystem(folder)
    with storage.io_errors(folder, "list the stores of"):
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return [n for n in names if storage.is_complete(store_url(out, n))]


@dataclass
class _Waiting:
    landing: Landing
    since: float
    told: str = ""


class _Live:
    """One watch: the file watcher, the files waiting for the log, the actors (started at the first file)."""

    def __init__(self, config: Any, echem: str | None, out: str, settings: OperandoSettings,
                 readable: Callable[[str], str | None] | None, clock: Callable[[], float]) -> None:
        done = _complete_ids(out)
        self.watcher = FileWatcher(config, done=done, readable=readable, clock=clock)
        self.config, self.echem, self.out, self.settings, self.clock = config, echem, out, settings, clock
        self.pending: dict[str, _Waiting] = {}
        self.landed: dict[str, float] = {}  # id → wall time its file landed
        self.pool: Any = None
        self.result = LiveResult()

    def echem_of(self, url: str) -> str:
        return self.echem or f"{url}::/entry/echem"

    def _wait(self, did: str, entry: _Waiting, why: str) -> None:
        waited = self.clock() - entry.since
        if waited >= self.config.timeout and not entry.told.startswith("late"):
            entry.told = "late"
            logger.warning("operando watch: %s has waited %.0f s for the echem log %s to cover its scans (%s); check "
                           "that the potentiostat's log is written there and shares t = 0 (start_time) with the scan "
                           "files; it is retried whenever the log grows", did, waited,
                           storage.redact(self.echem_of(entry.landing.url)), why)
        elif not entry.told:
            entry.told = "told"
            logger.info("operando watch: %s waits for the echem log to cover its scans (%s); it is retried at each "
                        "poll", did, why)
        self.result.waiting[did] = why

    def step(self) -> list[str]:
        """Poll once and analyse every complete file the log covers; the ids analysed now."""
        from xrdscale.io.echem import read_echem
        from xrdscale.pqnet.serve import ServerPool
        from xrdscale.stages.operando import raw_times, run_series

        for did in self.watcher.poll():
            landing = next(f for f in self.watcher.files.values() if f.dataset == did)
            self.landed[did] = landing.landed_at
            if did in self.watcher.done:
                self.result.skipped.append(did)
            else:
                self.pending[did] = _Waiting(landing, since=self.clock())
        new: list[str] = []
        logs: dict[str, Any] = {}
        s = self.settings
        for did, entry in sorted(self.pending.items()):
            url = entry.landing.url
            what = f"scan file {storage.redact(url)}"
            try:
                times, start = raw_times(url)
            except (XrdscaleError, OSError) as exc:
                self._fail(did, str(exc))
                continue
            source = self.echem_of(url)
            try:
                if source not in logs:  # read again at every poll: the log grows
                    logs[source] = read_echem(source)
                log = logs[source]
                log.shifted_to(start).check_covers(times, what)
            except InputError as exc:  # not yet covered, or a row half-written: wait for the log to grow
                self._wait(did, entry, str(exc).split("; give the log")[0])
                continue
            if self.pool is None:
                self.pool = ServerPool(s.model, actors=s.actors, members=s.ensemble)
            try:
                run_series(url, source, storage.join(self.out, "files", did), model=s.model, poni=s.poni,
                           mask=s.mask, npt=s.npt, margin=s.margin, pool=self.pool, reuse=True, progress=False)
            except XrdscaleError as exc:
                self._fail(did, str(exc))
                continue
            del self.pending[did]
            self.result.waiting.pop(did, None)
            self.result.analysed.append(did)
            new.append(did)
        self.result.refused = self.watcher.refused()
        return new

    def _fail(self, did: str, why: str) -> None:
        logger.warning("operando watch: %s is not analysed: %s", did, why)
        self.result.failed[did] = why
        self.pending.pop(did, None)

    def report(self, refresh: int) -> str | None:
        """Rewrite the report of every complete store unless it already shows exactly those."""
        from xrdscale.analysis.operando_report import write_operando_report

        ids = _complete_ids(self.out)
        folder = storage.join(self.out, "report")
        record = storage.join(folder, SERIES)
        html = storage.join(folder, "report.html")
        if not ids:
            return None
        if storage.exists(record) and storage.exists(html) and \
                json.loads(storage.read_bytes(record)).get("files") == ids:
            return html
        url = write_operando_report([store_url(self.out, d) for d in ids], folder, truth_url=self.settings.truth,
                                    title="xrdscale operando report (live)", refresh=refresh)
        storage.write_bytes(record, json.dumps({"files": ids}).encode())  # last: the report shows these
        return url

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def watch_operando(config: Any, out: str, settings: OperandoSettings, *, echem: str | None = None,
                   poll: float = 5.0, max_files: int | None = None, stop: Callable[[], bool] | None = None,
                   on_file: Callable[[str, float, str], None] | None = None,
                   readable: Callable[[str], str | None] | None = None,
                   clock: Callable[[], float] = time.monotonic) -> LiveResult:
    """Analyse each scan file matching ``config.pattern`` as it lands; rewrite the report after each one.

    Parameters
    ----------
    config : WatchConfig
        The watch: ``pattern`` (absolute path or URL; ``{id}`` names a file, else its stem),
        ``complete``, ``stable_seconds``, ``marker``, ``timeout``, ``warn_every``, ``refresh``.
    out : str
        Output folder: ``files/<id>/{patterns,operando}.zarr`` and ``report/``.
    settings : OperandoSettings
        Model, geometry, integration and ensemble settings, and the truth of a simulated series.
    echem : str, optional
        The growing echem log (CSV or ``FILE.nxs::/group``); default: each file's ``/entry/echem``.
    poll : float
        Seconds between listings.
    max_files : int, optional
        Stop once this many files were analysed or found done (tests and the live demo).
    stop : callable, optional
        Checked after each poll; True stops the watch.
    on_file : callable, optional
        ``on_file(id, latency_seconds, report_url)`` once a file is in the report.
    readable : callable, optional
        The readability check of a landed file (see :class:`~xrdscale.campaign.watch.FileWatcher`).
    clock : callable
        Monotonic seconds of the watcher's rules.

    Returns
    -------
    LiveResult

    Raises
    ------
    KeyboardInterrupt
        Ctrl-C: the store being written is left unmarked, and a later watch redoes its file.
    """
    storage.check_writable(out, "the output folder")
    live = _Live(config, echem, out, settings, readable, clock)
    result = live.result
    try:
        first = True
        while True:
            new = live.step()
            if new or first:
                result.report = live.report(config.refresh) or result.report
                for did in new:
                    result.latency[did] = max(0.0, time.time() - live.landed[did])
                    logger.info("operando watch: %s in the report %.1f s after its file landed", did,
                                result.latency[did])
                    if on_file is not None and result.report:
                        on_file(did, result.latency[did], result.report)
                first = False
            if max_files is not None and len(result.analysed) + len(result.skipped) >= max_files:
                break
            if stop is not None and stop():
                break
            time.sleep(poll)
    finally:
        live.close()
    return result
