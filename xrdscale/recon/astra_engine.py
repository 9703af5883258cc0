"""The ``astra`` engine: ASTRA's own FBP / SIRT, one channel at a time.

One volume geometry, projection geometry and projector are built per geometry and per
worker process (cached), and one ASTRA algorithm object per chunk is re-run on each
channel (``astra.data2d.store`` swaps the data in). CPU algorithms (``FBP``, ``SIRT``
with the ``linear`` projector) run everywhere; the CUDA algorithms are only touched after
``astra.use_cuda()`` says a GPU is usable (ASTRA's CUDA calls abort the process instead
of raising on machines without one).
"""

from __future__ import annotations

import functools
import logging

import astra
import numpy as np

from xrdscale.recon.geometry import Geometry

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def astra_geometry(geometry: Geometry) -> tuple[dict, dict, int]:
    """ASTRA ``(vol_geom, proj_geom, projector_id)`` of ``geometry``, built once per process.

    The projector is ASTRA's ``linear`` (Joseph) CPU projector with unit detector spacing:
    one translation step is one pixel.
    """
    vol_geom = astra.create_vol_geom(geometry.n_det, geometry.n_det)
    proj_geom = astra.create_proj_geom("parallel", 1.0, geometry.n_det, geometry.angles_rad)
    projector = astra.create_projector("linear", proj_geom, vol_geom)
    logger.debug("built ASTRA projector for %d angles × %d bins", geometry.n_angles, geometry.n_det)
    return vol_geom, proj_geom, projector


class AstraEngine:
    """ASTRA per-channel reconstruction (``FBP``/``SIRT``, or ``FBP_CUDA``/``SIRT_CUDA``)."""

    name = "astra"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    @staticmethod
    def cuda_available() -> bool:
        """True if ASTRA was built with CUDA and sees a GPU."""
        return bool(astra.use_cuda())

    def fbp(self, geometry: Geometry, sino: np.ndarray, filter_name: str) -> np.ndarray:
        """FBP of every channel of ``sino`` ``(angle, translation, channel)`` → ``(y, x, channel)``."""
        return self._run(geometry, sino, "FBP", {"FilterType": filter_name}, iterations=1)

    def sirt(self, geometry: Geometry, sino: np.ndarray, iterations: int) -> np.ndarray:
        """SIRT of every channel, ``iterations`` iterations from a zero start."""
        return self._run(geometry, sino, "SIRT", {}, iterations=iterations)

    def _run(self, geometry: Geometry, sino: np.ndarray, algorithm: str, options: dict,
             iterations: int) -> np.ndarray:
        vol_geom, proj_geom, projector = astra_geometry(geometry)
        n = geometry.n_det
        out = np.empty((n, n, sino.shape[2]), dtype=np.float32)
        sino_id = astra.data2d.create("-sino", proj_geom, 0.0)
        vol_id = astra.data2d.create("-vol", vol_geom, 0.0)
        cfg = astra.astra_dict(algorithm + ("_CUDA" if self.device == "cuda" else ""))
        cfg["ProjectionDataId"] = sino_id
        cfg["ReconstructionDataId"] = vol_id
        if self.device != "cuda":
            cfg["ProjectorId"] = projector
        cfg.update(options)
        alg_id = astra.algorithm.create(cfg)
        try:
            for c in range(sino.shape[2]):
                astra.data2d.store(sino_id, np.ascontiguousarray(sino[:, :, c], dtype=np.float32))
                if iterations > 1 or algorithm != "FBP":
                    astra.data2d.store(vol_id, 0.0)
                astra.algorithm.run(alg_id, iterations)
                out[:, :, c] = astra.data2d.get_shared(vol_id)[::-1]
        finally:
            astra.algorithm.delete(alg_id)
            astra.data2d.delete([sino_id, vol_id])
        return out
