"""The ``library`` and ``train`` stages: a simulated training library and a PQ-Net deep ensemble.

A campaign without a ``model`` simulates a library from its phase library
(:func:`xrdscale.pqnet.library.make_library`) and trains an ensemble on it
(:func:`xrdscale.pqnet.train.train_ensemble`); ``pipeline.train`` (:class:`TrainConfig`)
sets both: ``n`` and ``seed`` make the library, the rest the training.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, ClassVar

from pydantic import Field

from xrdscale.config import one_of
from xrdscale.stages.base import StageConfig, runtime_field

logger = logging.getLogger(__name__)

#: the fields of :class:`TrainConfig` that make the library (the rest trains)
LIBRARY_FIELDS: frozenset[str] = frozenset({"n", "seed"})


Device = Annotated[str, one_of(("auto", "cpu", "cuda"), "device")]


class TrainConfig(StageConfig):
    """Settings of the ``library`` and ``train`` stages (``pipeline.train`` of a campaign)."""

    stage: ClassVar[str] = "train"
    #: 2: patterns in absolute units (K = 1); libraries of version 1 (K = 1e-2) are not reused
    version: ClassVar[int] = 2

    n: int = Field(200_000, ge=10, description="patterns in the simulated training library")
    ensemble: int = Field(10, ge=1, description="members of the deep ensemble (they differ by seed)")
    epochs: int = Field(35, ge=1, description="maximum epochs per member (early stopping)")
    batch: int = Field(32, ge=1, description="training batch size")
    lr: float = Field(5e-4, gt=0, description="Adam learning rate")
    patience: int = Field(5, ge=1, description="epochs without a better validation loss before stopping")
    seed: int = Field(0, description="seed of the library and of the first member (member i: seed + i)")
    outputs: list[str] | None = Field(None, description="outputs to predict (e.g. [scale, NCA.a, NCA.c]); "
                                                        "default: every label of the phase library")
    device: Device = runtime_field("auto", "training device")
    parallel: bool = runtime_field(True, "train the members as parallel Ray tasks (else one after another)")
    bounds: int = runtime_field(256, "held-out patterns to compute each output's Cramér–Rao bound on (best "
                                "achievable R² and MAE, stored with the model's metrics); 0 skips them", ge=0)

    def library(self) -> dict[str, Any]:
        """The settings that make the library."""
        return {"version": self.version, **{k: v for k, v in self.model_dump(mode="json").items()
                                            if k in LIBRARY_FIELDS}}

    def training(self) -> dict[str, Any]:
        """The settings that change the trained model (the library aside)."""
        return {k: v for k, v in self.hashed().items() if k != "n"}


def make_library(phases_url: str, out_url: str, config: TrainConfig, **kwargs: Any) -> str:
    """Simulate the training library of ``config`` (see :func:`xrdscale.pqnet.library.make_library`)."""
    from xrdscale.pqnet.library import make_library as _make

    return _make(phases_url, out_url, n=config.n, seed=config.seed, **kwargs)


def train(library_url: str, model_url: str, config: TrainConfig) -> str:
    """Train the ensemble of ``config`` on a library (see :func:`xrdscale.pqnet.train.train_ensemble`)."""
    from xrdscale.pqnet.train import train_ensemble

    return train_ensemble(library_url, model_url, ensemble=config.ensemble, epochs=config.epochs,
                          batch=config.batch, lr=config.lr, patience=config.patience, outputs=config.outputs,
                          device=config.device, parallel=config.parallel, seed=config.seed,
                          bounds=config.bounds)
