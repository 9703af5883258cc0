"""Progress of long computations: a bar for people, a line every few seconds for logs.

:func:`compute` runs a Dask collection (on a distributed client, the current default
client, or the local threaded scheduler) and shows its progress while it runs:

- in a terminal, a rich bar with the count, the rate and the time left, refreshed ten
  times a second;
- otherwise (output to a log file or a pipe), at most one log line every
  :data:`LOG_INTERVAL` seconds from the logger ``xrdscale.runtime.progress``, and a last
  one when it ends, e.g. ``integrate: 1234/5000 frames (24.7 %), 41.2 frames/s, ETA 1 min 31 s``.

What moves the progress is either the finished tasks of the graph or, with ``total=``,
units of work that the tasks report themselves with :func:`report` (one integrated frame,
for instance), so the progress moves frame by frame rather than chunk by chunk.

:func:`report` is cheap enough to call per frame: in a distributed worker it adds to a
per-process count that is sent to the scheduler at most every :data:`FLUSH_INTERVAL`
seconds (as a worker event on the topic :data:`TOPIC`, which the client subscribes to while
it computes); in a local thread it adds to the counts of the computes tracked in this
process; when nothing is tracked it returns at once.

Examples
--------
>>> import dask
>>> @dask.delayed
... def work(n):
...     for _ in range(n):
...         report(1)
...     return n
>>> compute(dask.delayed(sum)([work(3), work(4)]), label="work", total=7, unit="items")  # doctest: +SKIP
7
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

#: worker-event topic of the counts reported by tasks
TOPIC = "xrdscale-progress"
#: seconds between two sends of a worker's reported counts
FLUSH_INTERVAL = 0.25
#: seconds between two progress lines in a log
LOG_INTERVAL = 5.0
#: seconds between two redraws of a terminal bar
BAR_REFRESH = 0.1
#: seconds of history behind the rate and the time left
RATE_WINDOW = 30.0


# -- formatting --------------------------------------------------------------------------

def format_duration(seconds: float) -> str:
    """``"27 s"``, ``"1 min 31 s"``, ``"2 h 5 min"``.

    Examples
    --------
    >>> format_duration(91.4)
    '1 min 31 s'
    >>> format_duration(7500)
    '2 h 5 min'
    """
    if not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {(s % 3600) // 60} min"


def format_rate(rate: float, unit: str) -> str:
    """``"41.2 frames/s"``, or per minute below one per second.

    Examples
    --------
    >>> format_rate(0.05, "tasks")
    '3.0 tasks/min'
    """
    if rate >= 1.0 or rate == 0.0:
        return f"{rate:.1f} {unit}/s"
    return f"{rate * 60:.1f} {unit}/min"


# -- what is counted ---------------------------------------------------------------------

class Tracker:
    """The count of one computation: ``done`` of ``total`` ``unit``, and its rate.

    Parameters
    ----------
    label : str
        What is computed (the start of every line).
    total : int, optional
        Units in all; unknown until set when None.
    unit : str
        What is counted (``frames``, ``tasks``).
    names : set of str, optional
        Key names of the graph's tasks; routes worker reports when several computations of
        one client are tracked at once.
    """

    def __init__(self, label: str, total: int | None = None, unit: str = "tasks",
                 names: frozenset[str] = frozenset()) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.names = names
        self.done = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, n: int) -> None:
        """Count ``n`` more units."""
        with self._lock:
            self.done += n

    def set(self, done: int, total: int | None = None) -> None:
        """Set the count (and the total, when given)."""
        with self._lock:
            self.done = done
            if total is not None:
                self.total = total

    def finish(self) -> None:
        """The computation succeeded: every unit is done (reports still in flight included)."""
        with self._lock:
            if self.total is not None:
                self.done = self.total
            else:
                self.total = self.done

    def snapshot(self) -> tuple[int, int | None, float, float | None]:
        """``(done, total, elapsed seconds, rate per second or None while unknown)``."""
        now = time.monotonic()
        with self._lock:
            done, total = self.done, self.total
            if total is not None:
                done = min(done, total)
            if done > 0 and (not self._samples or self._samples[-1][1] != done):
                self._samples.append((now, done))
            while len(self._samples) > 2 and now - self._samples[1][0] > RATE_WINDOW:
                self._samples.popleft()
            rate = None
            if self._samples:
                t0, d0 = self._samples[0]
                if now - t0 >= 0.5 and done > d0:
                    rate = (done - d0) / (now - t0)
                elif now - t0 >= RATE_WINDOW:
                    rate = 0.0
        return done, total, now - self.started, rate

    def line(self, final: bool | None = None) -> str:
        """One progress line; ``final`` True after success, False after a failure."""
        done, total, elapsed, rate = self.snapshot()
        unit = self.unit
        if final is not None:
            avg = done / elapsed if elapsed > 0 else 0.0
            count = f"{done}/{total} {unit}" if total else f"{done} {unit}"
            if final:
                return f"{self.label}: {count} in {format_duration(elapsed)}, {format_rate(avg, unit)}"
            return f"{self.label}: stopped at {count} after {format_duration(elapsed)}"
        if total:
            text = f"{self.label}: {done}/{total} {unit} ({100.0 * done / total:.1f} %)"
        else:
            text = f"{self.label}: {done} {unit}"
        if rate is None:
            return text + (", starting" if done == 0 else "")
        text += f", {format_rate(rate, unit)}"
        if total and rate > 0:
            text += f", ETA {format_duration((total - done) / rate)}"
        return text


# -- task side: report() -------------------------------------------------------------------

_lock = threading.Lock()
_local: list[Tracker] = []  # trackers (with a total) of computes on this process's local scheduler
_pending: dict[int, tuple[Any, dict[str, int]]] = {}  # id(worker) -> (worker, {key name: units})
_last_flush = 0.0
_flusher: threading.Thread | None = None


def _reset_after_fork() -> None:
    global _lock, _flusher, _last_flush
    _lock = threading.Lock()
    _local.clear()
    _pending.clear()
    _flusher = None
    _last_flush = 0.0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _task_worker() -> Any:
    """The distributed worker running the current task, or None outside distributed tasks."""
    module = sys.modules.get("distributed.worker")
    if module is None:
        return None
    try:
        return module.get_worker()
    except ValueError:
        return None


def _key_name(key: Any) -> str:
    return str(key[0] if isinstance(key, tuple) and key else key)


def report(n: int = 1) -> None:
    """Count ``n`` units of work done by the current task (e.g. one integrated frame).

    Call it from inside a task, as often as once per unit: it batches. A compute started
    with :func:`compute` and ``total=`` shows these counts; when none is tracking, this is
    a near no-op.

    Parameters
    ----------
    n : int
        Units of work just finished.
    """
    worker = _task_worker()
    if worker is None:
        if _local:
            with _lock:
                for tracker in _local:
                    tracker.add(n)
        return
    name = _key_name(getattr(sys.modules["distributed.worker"].thread_state, "key", ""))
    global _last_flush
    now = time.monotonic()
    with _lock:
        counts = _pending.setdefault(id(worker), (worker, {}))[1]
        counts[name] = counts.get(name, 0) + n
        due = now - _last_flush >= FLUSH_INTERVAL
        if due:
            _last_flush = now
            batch = _take()
        else:
            _start_flusher()
    if due:
        _send(batch)


def _take() -> list[tuple[Any, dict[str, int]]]:
    """The pending counts, removed (call with ``_lock`` held)."""
    batch = list(_pending.values())
    _pending.clear()
    return batch


def _send(batch: list[tuple[Any, dict[str, int]]]) -> None:
    for worker, counts in batch:
        try:
            worker.log_event(TOPIC, {"counts": counts})
        except Exception as exc:  # a closing worker: its progress no longer matters
            logger.debug("progress report not sent: %s", exc)


def _start_flusher() -> None:
    """Start the thread that sends counts left pending at the end of a task (``_lock`` held)."""
    global _flusher
    if _flusher is None or not _flusher.is_alive():
        _flusher = threading.Thread(target=_flush_loop, name="xrdscale-progress-flush", daemon=True)
        _flusher.start()


def _flush_loop() -> None:
    global _last_flush, _flusher
    idle = 0
    while True:
        time.sleep(FLUSH_INTERVAL)
        with _lock:
            batch = _take()
            if batch:
                _last_flush = time.monotonic()
                idle = 0
            else:
                idle += 1
                if idle * FLUSH_INTERVAL >= 10.0:  # nothing reported for a while: stop
                    _flusher = None
                    return
        _send(batch)


def flush() -> None:
    """Send the counts this process has not sent yet (normally a background thread does)."""
    with _lock:
        batch = _take()
    _send(batch)


# -- driver side: routing worker events to trackers --------------------------------------

class _Router:
    """Receives one client's progress events and adds them to that client's trackers."""

    _routers: dict[str, _Router] = {}
    _routers_lock = threading.Lock()

    def __init__(self, client: Any) -> None:
        self.client = client
        self.trackers: list[Tracker] = []
        self.lock = threading.Lock()

    @classmethod
    def attach(cls, client: Any, tracker: Tracker) -> None:
        with cls._routers_lock:
            router = cls._routers.get(client.id)
            if router is None:
                router = cls._routers[client.id] = cls(client)
                client.subscribe_topic(TOPIC, router.handle)
            with router.lock:
                router.trackers.append(tracker)

    @classmethod
    def detach(cls, client: Any, tracker: Tracker) -> None:
        with cls._routers_lock:
            router = cls._routers.get(client.id)
            if router is None:
                return
            with router.lock:
                if tracker in router.trackers:
                    router.trackers.remove(tracker)
                empty = not router.trackers
            if empty:
                del cls._routers[client.id]
                try:
                    client.unsubscribe_topic(TOPIC)
                except (ValueError, KeyError) as exc:
                    logger.debug("unsubscribe %s: %s", TOPIC, exc)

    def handle(self, event: Any) -> None:
        """Handler of the ``TOPIC`` events: ``(timestamp, {"counts": {key name: units}})``."""
        msg = event[1] if isinstance(event, (tuple, list)) and len(event) == 2 else event
        counts = msg.get("counts", {}) if isinstance(msg, dict) else {}
        with self.lock:
            trackers = list(self.trackers)
        if not trackers:
            return
        for name, n in counts.items():
            targets = [t for t in trackers if name in t.names] if len(trackers) > 1 else trackers
            for tracker in targets or trackers[-1:]:
                tracker.add(int(n))


def _task_feed(futures: list, client: Any, tracker: Tracker) -> threading.Event:
    """Feed ``tracker`` with the finished and total tasks behind ``futures``, from the scheduler.

    A ``feed`` of the scheduler (as :func:`distributed.progress` uses) whose function ends
    it as soon as the tasks are finished, so that nothing of it is left on the scheduler
    when the computation returns. Returns an event set once the feed has ended.
    """
    from distributed.core import connect
    from distributed.diagnostics.progress import Progress
    from distributed.protocol.pickle import dumps

    keys = {f.key for f in futures}
    ended = threading.Event()

    async def setup(scheduler: Any) -> Any:
        p = Progress(keys, scheduler, complete=True)
        await p.setup()
        return p

    def function(scheduler: Any, p: Any) -> dict:
        if p.status is not None:  # finished or erred: end the scheduler's feed loop now
            raise OSError("finished")
        return {"all": len(p.all_keys), "remaining": len(p.keys)}

    async def listen() -> None:
        try:
            comm = await connect(client.scheduler.address, **client.connection_args)
            await comm.write({"op": "feed", "setup": dumps(setup), "function": dumps(function),
                              "interval": FLUSH_INTERVAL})
            try:
                while isinstance(msg := await comm.read(), dict):  # the handler's reply (None) ends it
                    tracker.set(msg["all"] - msg["remaining"], msg["all"])
            except (OSError, EOFError):
                pass  # the scheduler ended the feed
            finally:
                comm.abort()
        except Exception as exc:  # progress is best effort; the computation goes on
            logger.debug("no task progress from the scheduler: %s", exc)
        finally:
            ended.set()

    client.loop.add_callback(listen)
    return ended


# -- displays ------------------------------------------------------------------------------

class _Display:
    """Shows a tracker while a computation runs (a thread polls it)."""

    tick = 0.5

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"xrdscale-progress-{tracker.label}", daemon=True)

    def __enter__(self) -> _Display:
        self.start()
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.stop(exc_type is None)

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.poll()
            except Exception as exc:  # a display problem must not stop the computation
                logger.debug("progress display: %s", exc)

    def start(self) -> None:
        """Called before the computation starts."""

    def poll(self) -> None:
        """Called every ``tick`` seconds while it runs."""

    def stop(self, ok: bool) -> None:
        """Called when it has ended (``ok``: it succeeded)."""


class _LogDisplay(_Display):
    """A progress line at most every ``interval`` seconds, and one at the end."""

    def __init__(self, tracker: Tracker, interval: float) -> None:
        super().__init__(tracker)
        self.interval = interval
        self.tick = min(0.5, interval / 2)
        self._last_line = time.monotonic()
        self._last_done = -1

    def poll(self) -> None:
        done = self.tracker.snapshot()[0]  # every tick: the samples behind the rate
        now = time.monotonic()
        if now - self._last_line < self.interval:
            return
        if done == self._last_done and now - self._last_line < 12 * self.interval:
            return  # nothing new to say (but say it still runs once a minute or so)
        self._last_line, self._last_done = now, done
        logger.info("%s", self.tracker.line())

    def stop(self, ok: bool) -> None:
        logger.info("%s", self.tracker.line(final=ok))


class _BarDisplay(_Display):
    """A rich progress bar (count, rate, time left, elapsed)."""

    tick = BAR_REFRESH

    def __init__(self, tracker: Tracker, console: Any) -> None:
        super().__init__(tracker)
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        unit = tracker.unit

        class RateColumn(ProgressColumn):
            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                return Text("" if speed is None else format_rate(speed, unit), style="progress.data.speed")

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn(unit), RateColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 TimeElapsedColumn(), console=console, refresh_per_second=1 / BAR_REFRESH)
        self.task = self.progress.add_task(tracker.label, total=tracker.total, start=True)

    def start(self) -> None:
        self.progress.start()

    def poll(self) -> None:
        done, total, _, _ = self.tracker.snapshot()
        self.progress.update(self.task, completed=done, total=total)

    def stop(self, ok: bool) -> None:
        self.poll()
        self.progress.stop()
        if not ok:
            logger.info("%s", self.tracker.line(final=False))


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _display(tracker: Tracker, log_interval: float | None) -> _Display:
    console = _console()
    if console.is_terminal:
        return _BarDisplay(tracker, console)
    return _LogDisplay(tracker, LOG_INTERVAL if log_interval is None else log_interval)


# -- compute -------------------------------------------------------------------------------

def default_client() -> Any:
    """The current default distributed client, or None."""
    if "distributed" not in sys.modules:
        return None  # nothing in this process can have made one
    try:
        from distributed import default_client as _default

        return _default()
    except (ImportError, ValueError):
        return None


def _names(collection: Any) -> frozenset[str]:
    """Key names of the tasks of ``collection`` (layer names of a high-level graph)."""
    items = collection if isinstance(collection, (list, tuple)) else [collection]
    names: set[str] = set()
    for item in items:
        graph = getattr(item, "__dask_graph__", lambda: None)()
        if graph is None:
            continue
        layers = getattr(graph, "layers", None)
        names.update(layers.keys() if layers is not None else (_key_name(k) for k in graph))
    return frozenset(names)


class _LocalTasks:
    """Counts the finished tasks of the local scheduler (a dask callback)."""

    def __init__(self, tracker: Tracker) -> None:
        from dask.callbacks import Callback

        def start_state(dsk: Any, state: dict) -> None:
            done = len(state["finished"])
            tracker.set(done, done + sum(len(state[k]) for k in ("ready", "waiting", "running")))

        def posttask(key: Any, result: Any, dsk: Any, state: dict, worker_id: Any) -> None:
            tracker.set(len(state["finished"]))

        self.callback = Callback(start_state=start_state, posttask=posttask)

    def __enter__(self) -> None:
        self.callback.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.callback.__exit__(*exc)


class _LocalReports:
    """Adds the :func:`report` calls of this process's threads to a tracker."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def __enter__(self) -> None:
        with _lock:
            _local.append(self.tracker)

    def __exit__(self, *exc: Any) -> None:
        with _lock:
            if self.tracker in _local:
                _local.remove(self.tracker)


def _local_compute(collection: Any) -> Any:
    import dask

    return dask.compute(collection)[0]


def _distributed_compute(collection: Any, client: Any, on_futures: Callable[[list], Any] | None = None) -> Any:
    many = isinstance(collection, (list, tuple))
    futures = client.compute(list(collection) if many else [collection])
    feed = on_futures(futures) if on_futures is not None else None
    try:
        results = client.gather(futures)
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        if feed is not None and not feed.wait(4 * FLUSH_INTERVAL + 1.0):
            logger.debug("the scheduler's progress feed did not end")
    return type(collection)(results) if many else results[0]


def compute(collection: Any, *, client: Any = None, label: str, total: int | None = None, unit: str = "tasks",
            progress: bool = True, log_interval: float | None = None) -> Any:
    """Compute a Dask collection and show its progress while it runs.

    Parameters
    ----------
    collection : dask collection, or a list/tuple of them
        What to compute (e.g. the delayed result of ``Dataset.to_zarr(compute=False)``).
    client : distributed.Client, optional
        Where to compute; default: the current default client, else the local threaded
        scheduler (or whatever dask's ``scheduler`` config names).
    label : str
        What is computed, the start of every progress line (``integrate``).
    total : int, optional
        Units the tasks report with :func:`report` in all; without it, the progress counts
        the finished tasks of the graph.
    unit : str
        What is counted (``frames``; ``tasks`` without ``total``).
    progress : bool
        Show progress: a bar in a terminal, else a log line at most every
        ``log_interval`` seconds and one at the end.
    log_interval : float, optional
        Seconds between log lines (default :data:`LOG_INTERVAL`).

    Returns
    -------
    object
        The computed result (a list/tuple of results for a list/tuple).
    """
    client = client if client is not None else default_client()
    if not progress:
        return _local_compute(collection) if client is None else _distributed_compute(collection, client)
    tracker = Tracker(label, total, unit if total is not None else "tasks", names=_names(collection))
    with _display(tracker, log_interval):
        if client is None:
            with _LocalReports(tracker) if total is not None else _LocalTasks(tracker):
                result = _local_compute(collection)
        elif total is not None:
            _Router.attach(client, tracker)
            try:
                result = _distributed_compute(collection, client)
            finally:
                _Router.detach(client, tracker)
        else:
            result = _distributed_compute(collection, client, lambda futures: _task_feed(futures, client, tracker))
        tracker.finish()
    return result


def track_local(label: str, *, total: int | None = None, unit: str = "tasks",
                log_interval: float | None = None) -> Any:
    """A context manager that shows the progress of the local-scheduler computes inside it.

    For code that calls ``dask.compute`` (or writes a store) itself on the local scheduler;
    :func:`compute` is the way for new code.

    Examples
    --------
    >>> with track_local("library", unit="tasks"):             # doctest: +SKIP
    ...     make_library("phases.yaml", "lib.zarr", n=4000)
    """
    import contextlib

    @contextlib.contextmanager
    def tracking() -> Iterator[Tracker]:
        tracker = Tracker(label, total, unit if total is not None else "tasks")
        with _display(tracker, log_interval):
            with _LocalReports(tracker) if total is not None else _LocalTasks(tracker):
                yield tracker
            tracker.finish()

    return tracking()
