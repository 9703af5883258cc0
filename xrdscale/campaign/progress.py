"""Live terminal progress of a campaign run: one rich bar per dataset, plus the model and report."""

from __future__ import annotations

import logging
import threading
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from xrdscale.campaign.stages import CAMPAIGN

logger = logging.getLogger(__name__)

_STYLE = {"running": "yellow", "done": "green", "skipped": "cyan", "failed": "bold red"}


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
        self.progress = Progress(TextColumn("{task.fields[name]:<22}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stage]}"), TimeElapsedColumn(), console=self.console)
        self._tasks: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> CampaignProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def connected(self, client: Any, plan: Any) -> None:
        """Print the Dask dashboard link and create one bar per dataset of ``plan``."""
        link = getattr(client, "dashboard_link", None)
        if link:
            self.console.print(f"Dask dashboard: [link={link}]{link}[/link]")
        if plan.model_tasks:
            self._add(CAMPAIGN, "model (PQ-Net)", len(plan.model_tasks) + (plan.report_stage is not None))
        elif plan.report_stage is not None:
            self._add(CAMPAIGN, "campaign report", 1)
        for did, tasks in plan.dataset_tasks.items():
            self._add(did, did, len(tasks))

    def _add(self, key: str, name: str, total: int) -> None:
        self._tasks[key] = self.progress.add_task(name, total=total, name=name, stage="waiting")

    def event(self, dataset: str, stage: str, status: str) -> None:
        """Update the bar of ``dataset`` after ``stage`` changed to ``status``."""
        with self._lock:
            task = self._tasks.get(dataset)
            if task is None:
                return
            style = _STYLE.get(status, "")
            label = f"[{style}]{stage}: {status}[/]" if style else f"{stage}: {status}"
            self.progress.update(task, stage=label, advance=1 if status in ("done", "skipped") else 0)
