"""The ``astra`` engine: ASTRA's own FBP / SIRT, one channel at a time.

One volume geometry, projection geometry and projector are built per geometry and per
worker process (cached), and one ASTRA algorithm object per chunk is re-run on each
channel (``astra.data2d.store`` swaps the data in). CPU algorithms (``FBP``, ``SIRT``
with the ``linear`` projector) run everywhere; the CUDA algorithms are only touched after
``astra.use_cuda()`` says a GPU is usable (ASTRA's CUDA calls abort the process instead
of raising on machines without one).

Off-centre translation grids (``Geometry.offset`` ≠ 0) use a ``parallel_vec`` geometry
whose detector centre is moved by ``offset`` bins (:func:`projection_geometry`).
``SIRT``, ``BP``, ``FBP_CUDA`` and the ``linear`` projector accept it, but ASTRA's CPU
``FBP`` only takes ``parallel`` geometries; there the engine ramp-filters the sinograms
itself (:func:`xrdscale.recon.filters.filter_sinograms`, ASTRA's padding and Ram-Lak
kernel) and back-projects them with ASTRA's ``BP`` on the shifted geometry, which is the
same filtered back projection, exact for any offset.
"""

from __future__ import annotations

import functools
import logging

import astra
import numpy as np
import torch

from xrdscale.recon.filters import filter_sinograms
from xrdscale.recon.geometry import Geometry

logger = logging.getLogger(__name__)


def volume_geometry(geometry: Geometry) -> dict:
    """ASTRA volume geometry: ``n_det × n_det`` unit pixels centred on the rotation axis."""
    return astra.create_vol_geom(geometry.n_det, geometry.n_det)


def projection_geometry(geometry: Geometry) -> dict:
    """ASTRA projection geometry of ``geometry``, unit detector spacing (one step = one pixel).

    A centred grid gives ASTRA's ``parallel`` geometry. An offset grid gives the
    equivalent ``parallel_vec`` one with the detector centre moved by ``offset`` bins:
    for angle θ the ray direction is ``(sin θ, −cos θ)``, the detector axis
    ``u = (cos θ, sin θ)`` and its centre ``d = offset · u``, so bin ``i`` sees the ray
    ``x cos θ + y sin θ = i − (n_det − 1)/2 + offset`` (ASTRA's ``parallel`` geometry is
    the same with ``d = 0``).
    """
    theta = geometry.angles_rad
    if geometry.offset == 0.0:
        return astra.create_proj_geom("parallel", 1.0, geometry.n_det, theta)
    c, s = np.cos(theta), np.sin(theta)
    vectors = np.stack([s, -c, geometry.offset * c, geometry.offset * s, c, s], axis=1)
    return astra.create_proj_geom("parallel_vec", geometry.n_det, vectors)


@functools.lru_cache(maxsize=8)
def astra_geometry(geometry: Geometry) -> tuple[dict, dict, int]:
    """ASTRA ``(vol_geom, proj_geom, projector_id)`` of ``geometry``, built once per process.

    The projector is ASTRA's ``linear`` (Joseph) CPU projector with unit detector spacing:
    one translation step is one pixel; the detector is shifted by ``geometry.offset``
    bins (see :func:`projection_geometry`). The cache key is the whole geometry, offset
    included.
    """
    vol_geom = volume_geometry(geometry)
    proj_geom = projection_geometry(geometry)
    projector = astra.create_projector("linear", proj_geom, vol_geom)
    logger.debug("built ASTRA projector for %d angles × %d bins (offset %.4g)", geometry.n_angles,
                 geometry.n_det, geometry.offset)
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
        """FBP of every channel of ``sino`` ``(angle, translation, channel)`` → ``(y, x, channel)``.

        ASTRA's ``FBP`` (``FBP_CUDA`` on a GPU); on the CPU with an off-centre grid, which
        ASTRA's CPU ``FBP`` refuses, the ramp filter of :mod:`xrdscale.recon.filters`
        followed by ASTRA's ``BP`` on the shifted geometry.
        """
        if geometry.offset != 0.0 and self.device != "cuda":
            filtered = filter_sinograms(torch.from_numpy(np.ascontiguousarray(sino, dtype=np.float32)), filter_name)
            return self._run(geometry, filtered.numpy(), "BP", {}, iterations=1)
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
