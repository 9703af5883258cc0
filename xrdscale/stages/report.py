"""The ``report`` stage: the campaign's HTML report over the ``maps`` of its datasets.

Bragg CDI series, Compton-imaging (``xcs``) and CT-roughness (``ct-roughness``) stores
add sections of their own (``cdi``, ``xcs``, ``roughness``).

:func:`xrdscale.analysis.report.write_report` makes the report; :func:`report` writes it
as a folder with the completion marker last, removed again on failure, whether it runs
from a campaign or from ``xrdscale report``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from pydantic import Field

from xrdscale.io import storage
from xrdscale.stages.base import StageConfig, guarded

logger = logging.getLogger(__name__)


class ReportConfig(StageConfig):
    """Settings of the ``report`` stage (``pipeline.report`` of a campaign)."""

    stage: ClassVar[str] = "report"

    rois: dict[str, dict[str, Any]] | None = Field(
        None, description="ROI spec of the report (xrdscale.analysis.roi); default: the report's own; {} for none")
    centre: tuple[float, float] | None = Field(None, description="jelly-roll centre (y, x) in mm for the unrolled "
                                                                 "views (default: found from the maps)")
    pitch: float | None = Field(None, ge=0, description="spiral pitch in mm per turn (default: estimated)")
    refresh: int | None = Field(None, ge=1, description="seconds between reloads of report.html in a browser "
                                                        "(campaign watch sets it; default: none)")


def report(entries: Sequence[Any], out_url: str, *, config: ReportConfig | None = None, title: str = "xrdscale report",
           model: Mapping[str, Any] | None = None, phases: Mapping[str, Any] | None = None,
           progress: bool = True, cdi: Sequence[str] = (), xcs: Sequence[str] = (), roughness: Sequence[str] = (),
           fits: Mapping[str, str] | None = None, **settings: Any) -> str:
    """Write the report folder ``out_url`` (``report.html``, figures, ROI table), marker last.

    Parameters
    ----------
    entries : sequence
        :class:`xrdscale.analysis.report.DatasetEntry` (or mappings) of every dataset.
    out_url : str
        Output folder.
    config : ReportConfig, optional
        ``rois``, ``centre``, ``pitch``; keyword ``settings`` of the same names override it.
    title : str
        Report title.
    model : mapping, optional
        Model information for the provenance section.
    phases : mapping, optional
        Phase objects for weight fractions of phases that are not built in.
    progress : bool
        Show progress.
    cdi : sequence of str
        Bragg CDI ``cdi-series`` stores, one report section each.
    xcs : sequence of str
        Compton-imaging ``xcs`` stores, one report section each.
    roughness : sequence of str
        ``ct-roughness`` stores (one per state), one report section together (Table 2).
    fits : mapping, optional
        Dataset id → its ``fit compare`` store (the full-profile fit against PQ-Net), one
        report section together.

    Returns
    -------
    str
        ``out_url``.
    """
    from xrdscale.analysis.report import write_report

    cfg = ReportConfig.build(config, **settings)

    def body() -> str:
        write_report(entries, out_url, title=title, model=model, rois=cfg.rois, centre=cfg.centre,
                     pitch=cfg.pitch or None, phases=phases, progress=progress, cdi=cdi,
                     xcs=xcs, roughness=roughness, fits=fits or {}, refresh=cfg.refresh)
        storage.mark_complete(out_url, {"stage": "report", "config": cfg.record()})
        return out_url

    return guarded(out_url, body)
