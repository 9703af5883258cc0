"""The ``analyse`` stage: PQ-Net maps with weight fractions, from a volume or patterns store.

One lazy composition, written once: :func:`xrdscale.pqnet.predict.predict_maps` (the
deep ensemble on Ray actors, mean and standard deviation per pixel, and in the same tasks
the quality maps ``rwp``, ``chi2`` and the ``ood`` bit mask of :mod:`xrdscale.pqnet.quality`)
and :func:`xrdscale.analysis.fractions.with_weight_fractions` (Hill & Howard), computed chunk
by chunk while the actors run. No scratch store.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

from pydantic import Field

from xrdscale.config import one_of
from xrdscale.io import storage
from xrdscale.stages.base import StageConfig, guarded, runtime_field, write_output

logger = logging.getLogger(__name__)

#: inference engines of the actors
INFERENCE_ENGINES: tuple[str, ...] = ("onnx", "torch")


EngineName = Annotated[str, one_of(INFERENCE_ENGINES, "inference engine")]
Device = Annotated[str, one_of(("auto", "cpu", "cuda"), "device")]


class AnalyseConfig(StageConfig):
    """Settings of the ``analyse`` stage (``pipeline.analyse`` of a campaign)."""

    stage: ClassVar[str] = "analyse"

    ensemble: int | None = Field(None, ge=1, description="members of the model's deep ensemble used for the "
                                                         "mean and std (the first N; default: all)")
    actors: int = runtime_field(1, "Ray actors serving the ensemble (each holds every member)", ge=1)
    batch: int = runtime_field(256, "patterns per actor call (bounds the actor's memory: ONNX Runtime "
                                    "keeps the activations of its largest batch)", ge=1)
    engine: EngineName = runtime_field("onnx", "inference engine of the actors")
    device: Device = runtime_field("auto", "actor device (auto: a GPU per "
                                                                              "actor when Ray has GPUs)")
    threads: int = runtime_field(1, "CPU threads per actor", ge=1)
    quality: bool = Field(True, description="residual (rwp, chi2) and out-of-distribution (ood) maps of the "
                                            "pattern implied by each pixel's prediction")
    ood_residual_factor: float = Field(2.0, gt=0, description="ood bit 1: rwp above this times sqrt(R_exp² + "
                                                               "R_model² + R_art²) (R_model: held-out library "
                                                               "misfit; R_art: the pixel's negative intensities)")
    ood_spread_factor: float = Field(1.5, gt=0, description="ood bit 2: ensemble spread score above this times "
                                                             "its held-out 99th percentile")
    ood_edge: float = Field(0.01, ge=0, lt=0.5, description="ood bit 4: fraction of a lattice/size range's "
                                                            "width that counts as its edge")

    def quality_settings(self) -> Any:
        """The :class:`~xrdscale.pqnet.quality.QualitySettings` of these settings, or False without quality maps."""
        from xrdscale.pqnet.quality import QualitySettings

        if not self.quality:
            return False
        return QualitySettings(residual_factor=self.ood_residual_factor, spread_factor=self.ood_spread_factor,
                               edge=self.ood_edge)


def analyse(model_url: str, in_url: str, out_url: str, *, phases: Mapping[str, Any] | None = None,
            library: Any = None,
            config: AnalyseConfig | None = None, pool: Any = None, client: Any = None, progress: bool = True,
            **settings: Any) -> str:
    """PQ-Net maps with weight fractions of a ``volume`` or ``patterns`` store, as one ``maps`` store.

    Parameters
    ----------
    model_url : str
        PQ-Net model registry entry.
    in_url : str
        A ``volume`` (y, x, q) or ``patterns`` (frame, q) store.
    out_url : str
        Destination ``maps`` store.
    phases : mapping, optional
        Phase name → phase object, for weight fractions of phases that are not built in (and
        for the quality maps, structures the model's phase library cannot build from its text).
    library : PhaseLibrary, optional
        The model's phase library loaded from its own folder, so that the quality maps can
        render patterns when its YAML names files by relative paths (a CIF, a calibrant pattern).
    config : AnalyseConfig, optional
        ``ensemble``, ``actors``, ``batch``, ``engine``, ``device``, ``threads``, ``quality``
        and the ``ood_*`` thresholds; keyword ``settings`` of the same names override it.
    pool : ServerPool, optional
        Running actors of this model (left running); default: started and stopped here.
    client : distributed.Client, optional
        Dask client.
    progress : bool
        Show progress.

    Returns
    -------
    str
        ``out_url``.
    """
    from xrdscale.analysis.fractions import with_weight_fractions
    from xrdscale.pqnet.predict import predict_maps
    from xrdscale.pqnet.registry import open_entry
    from xrdscale.pqnet.serve import serving

    cfg = AnalyseConfig.build(config, **settings)

    def body() -> str:
        entry = open_entry(model_url)
        ds = storage.open_store(in_url)
        with serving(model_url, pool, actors=cfg.actors, engine=cfg.engine, device=cfg.device,
                     threads=cfg.threads, members=cfg.ensemble) as actors:
            maps = predict_maps(ds, entry, actors, batch=cfg.batch, what=storage.redact(in_url),
                                quality=cfg.quality_settings(), phases=phases, library=library)
            maps = with_weight_fractions(maps, phases)
            maps.attrs.update(model=storage.redact(model_url), source=storage.redact(in_url))
            record = {**cfg.record(), "ensemble": int(actors.members), "ensemble_requested": cfg.ensemble,
                      "model": storage.redact(model_url), "model_id": entry.id, "input": storage.redact(in_url),
                      "device": actors.device}
            return write_output(maps, out_url, kind="maps", config=record, client=client, progress=progress,
                                label="analyse", marker={"model_id": entry.id})

    return guarded(out_url, body)
