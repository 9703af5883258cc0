"""Live progress of a campaign run: one rich bar per dataset, plus the model and report.

In a terminal: an overall bar (stages done of all, with the time left once a few stages
have finished), and one bar per dataset (and one for the model) with its current stage and
elapsed time. Without a terminal (a log file or a pipe): one log line per finished or failed
stage with the overall count and the time left, from the logger ``xrdscale.campaign.progress``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from xrdscale.campaign.stages import CAMPAIGN
from xrdscale.runtime.progress import format_duration

logger = logging.getLogger(__name__)

_STYLE = {"running": "yellow", "done": "green", "skipped": "cyan", "failed": "bold red"}
_ALL = "__all__"


class CampaignProgress:
    """Rich progress bars fed by the runner's ``on_event(dataset, stage, status)`` calls.

    Parameters
    ----------
    console : rich.console.Console, optional
        Where to draw (default: stderr).

    Examples
    --------
    >>> with CampaignProgress() as progress:                    # doctest: +SKIP
    ...     run_campaign(spec, on_event=progress.event, on_connect=progress.connected)
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.progress = Progress(TextColumn("{task.fields[name]:<22}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stage]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, disable=not self.live)
        self._tasks: dict[str, Any] = {}
        self._totals: dict[str, int] = {}
        self._done: dict[str, int] = {}
        self._names: dict[str, str] = {}
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._ran = 0  # stages that ran (not skipped): what the time left is estimated from

    def __enter__(self) -> CampaignProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def connected(self, client: Any, plan: Any) -> None:
        """Create one bar per dataset of ``plan`` (the Dask dashboard link is logged by ``connect``)."""
        total = 0
        if plan.model_tasks:
            total += self._add(CAMPAIGN, "model (PQ-Net)", len(plan.model_tasks) + (plan.report_stage is not None))
        elif plan.report_stage is not None:
            total += self._add(CAMPAIGN, "campaign report", 1)
        for did, tasks in plan.dataset_tasks.items():
            total += self._add(did, did, len(tasks))
        for sid, tasks in plan.series_tasks.items():
            kind = "Bragg CDI" if tasks[0].stage.name == "cdi" else "Compton imaging"
            total += self._add(sid, f"{sid} ({kind})", len(tasks))
        self._tasks[_ALL] = self.progress.add_task("all", total=total, name="campaign", stage="")
        self._totals[_ALL], self._done[_ALL] = total, 0

    def _add(self, key: str, name: str, total: int) -> int:
        self._tasks[key] = self.progress.add_task(name, total=total, name=name, stage="waiting")
        self._totals[key], self._done[key], self._names[key] = total, 0, name
        return total

    def eta(self) -> float | None:
        """Seconds left for the whole campaign, from the time per stage that ran so far (a rough guide:
        stages differ in cost, and skipped ones take none)."""
        done, total = self._done.get(_ALL, 0), self._totals.get(_ALL, 0)
        if self._ran == 0 or done >= total:
            return None
        return (time.monotonic() - self._started) / self._ran * (total - done)

    def event(self, dataset: str, stage: str, status: str) -> None:
        """Update the bar of ``dataset`` after ``stage`` changed to ``status``."""
        with self._lock:
            task = self._tasks.get(dataset)
            if task is None:
                return
            finished = status in ("done", "skipped")
            if finished:
                self._done[dataset] += 1
                self._done[_ALL] += 1
                self._ran += status == "done"
            style = _STYLE.get(status, "")
            label = f"[{style}]{stage}: {status}[/]" if style else f"{stage}: {status}"
            self.progress.update(task, stage=label, advance=1 if finished else 0)
            if finished and _ALL in self._tasks:
                self.progress.update(self._tasks[_ALL], advance=1)
            if not self.live and status in ("done", "failed"):  # (the runner logs each skip itself)
                eta = self.eta()
                left = f", ETA {format_duration(eta)}" if eta is not None else ""
                logger.info("%s: %s %s (%d/%d stages; campaign %d/%d%s)", self._names[dataset], stage, status,
                            self._done[dataset], self._totals[dataset], self._done.get(_ALL, 0),
                            self._totals.get(_ALL, 0), left)
