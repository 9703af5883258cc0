"""Live mode: a campaign whose datasets join it as their raw files land (``xrdscale campaign watch``).

The spec's ``watch:`` section (:class:`~xrdscale.campaign.spec.WatchConfig`) names a pattern
such as ``raw/c{cycle}-{voltage}V.nxs``, in a local folder or under an S3 prefix. Every
``poll`` seconds the :class:`Watcher` lists the files that match its glob and reads each new
name's fields. A file becomes a dataset of the campaign once it is *complete*:

- ``complete: stable`` (default): size and modification time unchanged for
  ``stable_seconds``, and the file opens as HDF5 with a readable last frame. A truncated
  file that stays unchanged is reported once as truncated and not analysed. It is looked at
  again if it changes.
- ``complete: marker``: a sidecar ``<file><marker>`` exists. The writer creates it last.

A file not complete ``timeout`` seconds after it was first seen is reported once, and never
analysed. A name the pattern cannot parse is reported once. A pattern that matches nothing
is warned about every ``warn_every`` seconds.

:func:`watch_campaign` connects the cluster once and trains the model once (before the first
dataset lands, when the spec has none). After each poll that found new datasets, it runs the
campaign's plan over every dataset so far: finished stages are skipped by their hashes, as in
``campaign run``, and the report is rewritten with the new sections. Each new dataset's
latency is logged: from its file's last modification to its maps in the report.

Examples
--------
>>> template_fields("raw/c{cycle}-{voltage}V.nxs")
['cycle', 'voltage']
>>> parse_name("raw/c{cycle}-{voltage}V.nxs", "/data/raw/c2-3.85V.nxs")
{'cycle': '2', 'voltage': '3.85'}
"""

from __future__ import annotations

import logging
import posixpath
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xrdscale.exceptions import ConfigError, XrdscaleError
from xrdscale.io import storage

logger = logging.getLogger(__name__)

__all__ = ["FIELDS", "FileWatcher", "Landing", "WatchResult", "Watcher", "parse_name", "template_fields",
           "watch_campaign"]

#: fields a pattern may name, and what each matches in a file name
FIELDS = {"id": r"[A-Za-z0-9][A-Za-z0-9._-]*?", "cycle": r"\d+", "voltage": r"\d+(?:[.p]\d+)?",
          "state": r"[A-Za-z][A-Za-z_-]*?"}
_FIELD = re.compile(r"\{([^{}]*)\}")


def template_fields(pattern: str) -> list[str]:
    """The fields ``pattern`` names, in order.

    Raises
    ------
    ValueError
        A field is not one of :data:`FIELDS`, or is named twice.
    """
    names = _FIELD.findall(pattern)
    unknown = [n for n in names if n not in FIELDS]
    if unknown:
        raise ValueError(f"watch pattern {pattern!r}: unknown field(s) {unknown}; a pattern may name "
                         f"{', '.join('{' + f + '}' for f in FIELDS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"watch pattern {pattern!r} names a field twice")
    return names


def glob_of(pattern: str) -> str:
    """The glob of ``pattern``: each field becomes ``*``."""
    return _FIELD.sub("*", pattern)


def _regex(pattern: str) -> re.Pattern[str]:
    base = posixpath.basename(pattern.replace("\\", "/"))
    out, pos = [], 0
    for m in _FIELD.finditer(base):
        out.append(_glob_part(base[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>{FIELDS[m.group(1)]})")
        pos = m.end()
    out.append(_glob_part(base[pos:]))
    return re.compile("^" + "".join(out) + "$")


def _glob_part(text: str) -> str:
    return "".join(".*?" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in text)


def parse_name(pattern: str, url: str) -> dict[str, str] | None:
    """The fields of ``pattern`` read from the file name of ``url``; None if the name does not fit."""
    m = _regex(pattern).match(posixpath.basename(url.replace("\\", "/")))
    return None if m is None else m.groupdict()


def _voltage(text: str) -> float:
    return float(text.replace("p", "."))


@dataclass
class Landing:
    """What the watcher knows of one file that matches the glob."""

    url: str
    first_seen: float
    size: int = -1
    mtime: float = 0.0
    stable_since: float = 0.0
    reported: str = ""  # the last problem reported for the file (each is reported once)
    dataset: Any = None  # the Dataset once complete
    landed_at: float = 0.0  # wall time the file was last modified (its landing)


@dataclass
class WatchResult:
    """What a watch did: datasets picked up, their latencies, and the files it refused."""

    datasets: list[str] = field(default_factory=list)
    latency: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    report: str | None = None


class FileWatcher:
    """Finds the files of a ``watch:`` section and says when each one is complete.

    The discovery and completeness rules of the module docstring, for any kind of landing
    file: :meth:`poll` returns what :meth:`accept` makes of each file that became complete
    (by default its id: the pattern's ``{id}``, else the file's stem). :class:`Watcher` makes
    campaign datasets of them; ``xrdscale operando watch`` (:mod:`xrdscale.stages.operando_live`)
    takes the ids.

    Parameters
    ----------
    config : WatchConfig
        The resolved ``watch:`` section (its pattern an absolute path or a URL).
    done : iterable of str
        Ids processed by an earlier watch: their files are complete as soon as they are
        seen, so a restarted watch recomputes nothing.
    clock : callable
        Monotonic seconds (tests pass a fake one).
    readable : callable, optional
        ``readable(url)`` → None, or why the file cannot be read (default: it opens as a raw
        dataset and its last frame decodes).
    """

    def __init__(self, config: Any, *, done: Any = (), clock: Callable[[], float] = time.monotonic,
                 readable: Callable[[str], str | None] | None = None) -> None:
        self.config = config
        self.clock = clock
        self.done = set(done)
        self.readable = readable or _readable
        self.files: dict[str, Landing] = {}
        self._started = clock()
        self._last_warning = clock()
        self._fs, _ = storage.filesystem(config.pattern)
        self._protocol = "" if not storage.is_remote(config.pattern) else config.pattern.split("://", 1)[0] + "://"

    def _list(self) -> dict[str, dict[str, Any]]:
        _, path = storage.filesystem(glob_of(self.config.pattern))
        with storage.io_errors(self.config.pattern, "list the watched files"):
            found = self._fs.glob(path, detail=True)
        return {self._protocol + p if self._protocol and "://" not in p else p: info
                for p, info in found.items() if info.get("type", "file") != "directory"
                and not p.endswith(self.config.marker)}

    def poll(self) -> list[Any]:
        """List the files once; what :meth:`accept` made of each file that became complete since the last poll."""
        now = self.clock()
        listing = self._list()
        if not listing:
            if now - self._last_warning >= self.config.warn_every:
                self._last_warning = now
                logger.warning("watch: no file matches %s yet (%.0f s since the watch started); check the pattern "
                               "and that files land there", storage.redact(self.config.pattern), now - self._started)
            return []
        new = []
        for url, info in sorted(listing.items()):
            landing = self.files.get(url)
            if landing is None:
                landing = self.files[url] = Landing(url, first_seen=now, stable_since=now)
            if landing.dataset is not None:
                continue
            size, mtime = int(info.get("size") or 0), _mtime(info)
            if (size, mtime) != (landing.size, landing.mtime):
                landing.size, landing.mtime, landing.stable_since = size, mtime, now
                if landing.reported.startswith("truncated"):
                    landing.reported = ""  # it changed: look at it again
            item = self._check(landing, now)
            if item is not None:
                landing.dataset = item
                landing.landed_at = mtime or time.time()
                new.append(item)
        return new

    def _report(self, landing: Landing, problem: str) -> None:
        if landing.reported != problem:
            landing.reported = problem
            logger.warning("watch: %s: %s", storage.redact(landing.url), problem)

    def refused(self) -> dict[str, str]:
        """Files reported and not analysed (url → why)."""
        return {u: f.reported for u, f in self.files.items() if f.dataset is None and f.reported}

    @staticmethod
    def ident(url: str, fields: dict[str, str]) -> str:
        """The id of a file: the pattern's ``{id}``, else the file name without its extension."""
        return fields.get("id") or posixpath.splitext(posixpath.basename(url.replace("\\", "/")))[0]

    def accept(self, landing: Landing, fields: dict[str, str], did: str) -> Any:
        """What :meth:`poll` returns for a complete, readable file (None: report it and skip it)."""
        return did

    def _check(self, landing: Landing, now: float) -> Any:
        cfg = self.config
        fields = parse_name(cfg.pattern, landing.url)
        if fields is None:
            self._report(landing, f"the file name does not fit the watch pattern {posixpath.basename(cfg.pattern)!r} "
                                  "(cycle: digits, voltage: 3.85 or 3p85, id and state: a plain name); rename it "
                                  "or fix watch.pattern; it is not analysed")
            return None
        if landing.reported.startswith("never completed"):
            return None
        did = self.ident(landing.url, fields)
        if did in self.done:
            complete, why = True, ""  # processed before this watch started: complete then
        elif cfg.complete == "marker":
            complete = storage.exists(landing.url + cfg.marker)
            why = f"no marker {posixpath.basename(landing.url) + cfg.marker}"
        else:
            complete = now - landing.stable_since >= cfg.stable_seconds
            why = f"still changing (size {landing.size} bytes)"
        if not complete:
            if now - landing.first_seen >= cfg.timeout:
                self._report(landing, f"never completed within {cfg.timeout:.0f} s ({why}); it is not analysed")
            return None
        problem = self.readable(landing.url)
        if problem is not None:
            self._report(landing, f"truncated or unreadable ({problem}); it is not analysed until it changes")
            return None
        return self.accept(landing, fields, did)


class Watcher(FileWatcher):
    """Finds the raw files of a campaign's ``watch:`` section and says when each one is a complete dataset.

    :meth:`poll` returns ``(dataset, cycle)`` of each new complete file.

    Parameters
    ----------
    config : WatchConfig
        The resolved ``watch:`` section (its pattern an absolute path or a URL).
    known : iterable of str
        Dataset ids already in the campaign. A landing file with one of these ids is refused.
    done, clock, readable
        As for :class:`FileWatcher` (``done``: dataset ids processed by an earlier watch; a
        restarted watch recomputes nothing, not even the report).
    """

    def __init__(self, config: Any, *, known: Any = (), done: Any = (), clock: Callable[[], float] = time.monotonic,
                 readable: Callable[[str], str | None] | None = None) -> None:
        super().__init__(config, done=done, clock=clock, readable=readable)
        self.known = set(known)

    def accept(self, landing: Landing, fields: dict[str, str], did: str) -> tuple[Any, int] | None:
        """The file's ``(Dataset, cycle)``, its voltage and state from the name or the NeXus sample."""
        from xrdscale.campaign.spec import Dataset

        cfg = self.config
        meta = _nexus_metadata(landing.url) if not {"voltage", "state"} <= set(fields) else {}
        voltage = fields.get("voltage") or meta.get("voltage")
        if voltage is None:
            self._report(landing, "no voltage: the watch pattern has no {voltage} and the file no "
                                  "entry/sample/voltage; it is not analysed")
            return None
        if did in self.known:
            self._report(landing, f"dataset id {did!r} is already in the campaign; rename the file")
            return None
        try:
            dataset = Dataset(id=did, state=fields.get("state") or meta.get("state") or cfg.state,
                              voltage=_voltage(str(voltage)), raw=landing.url)
        except (ValueError, TypeError) as exc:
            self._report(landing, f"cannot make a dataset of it: {exc}")
            return None
        self.known.add(did)
        return dataset, int(fields.get("cycle") or cfg.cycle)


def _mtime(info: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return 0.0


def _readable(url: str) -> str | None:
    """None if ``url`` opens as a raw dataset and its last frame reads; else what went wrong."""
    from xrdscale.io.frames import open_raw, read_frames

    try:
        source = open_raw(url).source
        if source.n_frames == 0:
            return "it has no frames"
        for _ in read_frames(source, source.n_frames - 1, source.n_frames):
            pass
    except XrdscaleError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError/KeyError/ValueError for broken files
        return f"{type(exc).__name__}: {exc}"
    return None


def _nexus_metadata(url: str) -> dict[str, Any]:
    """``voltage`` and ``state`` from ``entry/sample`` of a NeXus file, where present."""
    import h5py

    from xrdscale.io.frames import _open_h5

    out: dict[str, Any] = {}
    try:
        with _open_h5(url) as h5:
            for entry in h5.values():
                sample = entry.get("sample") if isinstance(entry, h5py.Group) else None
                if sample is None:
                    continue
                for key in ("voltage", "state"):
                    if key in sample:
                        value = sample[key][()]
                        out[key] = value.decode() if isinstance(value, bytes) else value
                break
    except Exception:  # noqa: BLE001 - metadata is optional; unreadable files were refused before
        return {}
    return out


def _with_datasets(spec: Any, found: list[tuple[Any, int]]) -> Any:
    """``spec`` with the datasets of ``found`` (dataset, cycle) appended to their cycles."""
    from xrdscale.campaign.spec import Cycle

    cycles = {c.cycle: list(c.datasets) for c in spec.cycles}
    for ds, cycle in found:
        cycles.setdefault(cycle, []).append(ds)
    return spec.model_copy(update={"cycles": [Cycle(cycle=c, datasets=d) for c, d in sorted(cycles.items())]})


def watch_campaign(spec: Any, *, poll: float = 10.0, max_datasets: int | None = None, stages: Any = None,
                   readable: Callable[[str], str | None] | None = None,
                   stop: Callable[[], bool] | None = None, on_event: Any = None,
                   on_connect: Callable[[Any, Any], None] | None = None,
                   on_dataset: Callable[[str, float | None, str | None], None] | None = None,
                   retry_delay: float = 2.0) -> WatchResult:
    """Run ``spec`` live: process each dataset as its raw file lands, until stopped.

    Parameters
    ----------
    spec : CampaignSpec
        A resolved spec with a ``watch:`` section (its own ``cycles`` are processed first).
    poll : float
        Seconds between listings.
    max_datasets : int, optional
        Stop once this many datasets were picked up and processed (the live demo uses it).
    stop : callable, optional
        Checked after each poll; True stops the watch.
    on_event, on_connect : callable, optional
        As for :func:`~xrdscale.campaign.runner.run_campaign`.
    on_dataset : callable, optional
        ``on_dataset(dataset_id, latency_seconds, report_url)`` once a new dataset was processed;
        the latency is None when it failed.
    retry_delay : float
        Seconds before the first retry of a failed stage.
    stages : sequence of Stage, optional
        The stage table (default: xrdscale's stages).
    readable : callable, optional
        The readability check of a landed file (see :class:`Watcher`).

    Returns
    -------
    WatchResult

    Raises
    ------
    ConfigError
        The spec has no ``watch:`` section.
    KeyboardInterrupt
        Ctrl-C. Stores of stages that were running are not marked complete; a later watch
        resumes them.
    """
    from xrdscale.campaign.runner import Plan, Runner, check_inputs, open_job_store, probe_job_store
    from xrdscale.runtime.cluster import connect

    if spec.watch is None:
        raise ConfigError("campaign watch needs a `watch:` section in the spec (watch.pattern, e.g. "
                          "raw/c{cycle}-{voltage}V.nxs); use `campaign run` for a spec that lists its datasets")
    # the report reloads itself in a browser while the watch runs
    report_cfg = spec.pipeline.report.model_copy(update={"refresh": spec.watch.refresh})
    spec = spec.model_copy(update={"pipeline": spec.pipeline.model_copy(update={"report": report_cfg})})
    check_inputs(spec)
    storage.check_writable(spec.workspace, "the workspace")
    result = WatchResult()
    probe_job_store(spec)  # a wrong password fails before the cluster starts
    store = None
    try:
        with connect(spec.cluster) as (client, ray_handle):
            store = open_job_store(spec)
            done = {r.dataset for r in store.runs(spec.campaign) if r.status in ("done", "skipped")}
            watcher = Watcher(spec.watch, known=[d.id for d in spec.datasets()], done=done, readable=readable)
            if on_connect is not None:
                on_connect(client, Plan(spec, stages))
            first = True
            while True:
                found = watcher.poll()
                if found or first:
                    spec = _with_datasets(spec, found)
                    run = Runner(Plan(spec, stages), store, ray=ray_handle, on_event=on_event,
                                 retry_delay=retry_delay).run()
                    result.failed.update(run.failed)
                    result.report = run.report or result.report
                    for ds, _ in found:
                        result.datasets.append(ds.id)
                        latency = None
                        if ds.id in run.maps and run.report:
                            landing = next(f for f in watcher.files.values()
                                           if f.dataset and f.dataset[0].id == ds.id)
                            latency = max(0.0, time.time() - landing.landed_at)
                            result.latency[ds.id] = latency
                            logger.info("%s: maps in the report %.0f s after its file landed", ds.id, latency)
                        if on_dataset is not None:
                            on_dataset(ds.id, latency, run.report)
                    first = False
                result.refused = watcher.refused()
                if max_datasets is not None and len(result.datasets) >= max_datasets:
                    break
                if stop is not None and stop():
                    break
                time.sleep(poll)
    finally:
        if store is not None:
            store.close()
    return result
