"""The Bragg CDI stages: phase retrieval of one 3D diffraction pattern, and a charge-state series.

:class:`CdiConfig` is the one config of both (``xrdscale cdi reconstruct`` and
``xrdscale cdi series``, ``pipeline.cdi`` of a campaign): what is read from the data
(detector ROI, binning, crop), how the object is retrieved (algorithm, iterations, random
starts, shrink-wrap support) and the geometry that turns phase into displacement and strain.
"""

from __future__ import annotations

import logging
from typing import Annotated, ClassVar

from pydantic import Field, model_validator

from xrdscale.config import one_of
from xrdscale.stages.base import StageConfig, runtime_field

logger = logging.getLogger(__name__)

ALGORITHMS = ("hio", "raar", "er")
INITS = ("random", "cnn")

Algorithm = Annotated[str, one_of(ALGORITHMS, "phase-retrieval algorithm")]
Init = Annotated[str, one_of(INITS, "initial guess")]


class CdiConfig(StageConfig):
    """Settings of Bragg CDI phase retrieval (``xrdscale cdi reconstruct`` / ``series``).

    The defaults reach the documented accuracy on simulated crystals at ≥ 1e6 photons
    without tuning: a user should not have to choose iterations or a support.
    """

    stage: ClassVar[str] = "cdi"

    # --- data in --------------------------------------------------------------------------
    roi: tuple[int, int, int, int] | None = Field(
        None, description="detector region of interest (row0, row1, col0, col1) in pixels; default: the whole frame")
    binning: tuple[int, int, int] = Field((1, 1, 1), description="bin (rocking, rows, cols) by these integer factors")
    crop: int | None = Field(None, ge=8, description="crop a cube of this side around the intensity maximum "
                                                     "(default: the whole array, padded to even sides)")
    orthogonalize: bool = Field(False, description="grid the detector frame onto an orthogonal lab frame "
                                                   "(xrayutilities) before phasing")

    # --- phase retrieval ------------------------------------------------------------------
    algorithm: Algorithm = Field("hio", description="iterative algorithm of the main cycles")
    iterations: int = Field(600, ge=1, description="iterations per start, final ER included")
    final_er: int = Field(60, ge=0, description="error-reduction iterations that end every start")
    beta: float = Field(0.9, gt=0, lt=1, description="feedback parameter of HIO and RAAR")
    starts: int = Field(8, ge=1, description="random starts per pattern (run as one batch on the device)")
    average: int = Field(1, ge=1, description="average this many best starts (after twin and phase alignment)")
    init: Init = Field("random", description="start from random phases, or from the CNN's prediction")
    cnn_model: str | None = Field(None, description="CDI CNN registry entry (from `xrdscale cdi train-cnn`) "
                                                    "for init: cnn")
    cnn_epochs: int = Field(200, ge=0, description="per-pattern refinement epochs of the CNN (Fourier-modulus loss)")
    support_size: float = Field(0.5, gt=0, le=1, description="initial support: this fraction of the array's "
                                                            "autocorrelation extent")
    support_threshold: float = Field(0.1, gt=0, lt=1, description="shrink-wrap threshold, a fraction of the "
                                                                  "smoothed amplitude's maximum")
    sigma_start: float = Field(2.0, gt=0, description="shrink-wrap Gaussian sigma at the start (voxels)")
    sigma_end: float = Field(1.0, gt=0, description="shrink-wrap Gaussian sigma at the end (voxels)")
    shrinkwrap_every: int = Field(20, ge=1, description="update the support every this many iterations")
    positivity: bool = Field(False, description="project the amplitude's real part onto ≥ 0 inside the support")
    seed: int = Field(0, description="seed of the random starts")

    # --- geometry (voxel size, displacement, strain) --------------------------------------
    energy_kev: float = Field(13.5, gt=0, description="X-ray energy in keV")
    two_theta_deg: float = Field(28.8, gt=0, lt=180, description="scattering angle 2θ of the reflection")
    distance_m: float = Field(2.8, gt=0, description="sample-detector distance in m")
    pixel_um: float = Field(55.0, gt=0, description="detector pixel size in µm")
    rocking_step_deg: float = Field(0.005, gt=0, description="rocking-curve step in degrees")

    # --- resources ------------------------------------------------------------------------
    device: str = runtime_field("auto", "torch device: auto (CUDA when it works), cpu, cuda, cuda:N")
    starts_per_task: int | None = runtime_field(
        None, "random starts per Dask task (default: all starts of a pattern in one batched task)", ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> CdiConfig:
        problems = []
        if self.final_er > self.iterations:
            problems.append(f"final_er ({self.final_er}) exceeds iterations ({self.iterations})")
        if self.average > self.starts:
            problems.append(f"average ({self.average}) exceeds starts ({self.starts})")
        if self.sigma_end > self.sigma_start:
            problems.append(f"sigma_end ({self.sigma_end}) exceeds sigma_start ({self.sigma_start})")
        if self.roi is not None and not (0 <= self.roi[0] < self.roi[1] and 0 <= self.roi[2] < self.roi[3]):
            problems.append(f"roi {self.roi} is not (row0 < row1, col0 < col1) with non-negative bounds")
        if any(b < 1 for b in self.binning):
            problems.append(f"binning {self.binning} has a factor below 1")
        if problems:
            raise ValueError("; ".join(problems))
        return self
