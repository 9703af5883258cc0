"""The ``batched`` engine: one sparse operator per geometry, many channels per product.

Every q channel of an XRD-CT scan shares one geometry, so the projection matrix ``W``
(ASTRA's ``linear`` projector, taken with ``astra.projector.matrix``) is built once per
geometry and per worker process, and a whole chunk of channels is reconstructed with
sparse × dense products in torch (MKL on CPU, cuSPARSE on GPU):

- FBP: ``x = Wᵀ · ramp(p)``, the ramp filter batched over channels by one FFT;
- SIRT: ``x ← x + C Wᵀ R (p − W x)`` with ``R``/``C`` the inverse row/column sums, as
  ASTRA's SIRT does.

Memory bound. ``W`` has about ``2 N² A`` non-zeros (3.2 × 10⁸ at 637 px × 400 angles).
It is built in blocks of angles (ASTRA's matrix of one block at a time, converted to
float32 values and int32 indices at once, 8 bytes per non-zero), so the build never
holds more than one block in float64. The blocks of ``Wᵀ`` (and of ``W`` for SIRT) are
kept in memory when they fit in ``memory_budget`` bytes (default: a quarter of the Dask
worker's memory limit, or of the machine's available memory outside a worker), and
otherwise spilled to ``.npy`` files in a temporary folder and memory-mapped back one
block at a time, so a worker holds at most one block of the operator at once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import tempfile
import threading
import warnings
import weakref

import astra
import numpy as np
import psutil
import torch

from xrdscale.recon.filters import filter_sinograms
from xrdscale.recon.geometry import Geometry

logger = logging.getLogger(__name__)

#: target number of non-zeros per operator block (≈ 160 MB in float32 + int32)
BLOCK_NNZ = 20_000_000


def estimate_nnz(geometry: Geometry) -> int:
    """Approximate number of non-zeros of ``W`` for the ``linear`` projector (``2 N² A``)."""
    return 2 * geometry.n_det * geometry.n_det * geometry.n_angles


def operator_bytes(geometry: Geometry, *, sirt: bool = False) -> int:
    """Approximate bytes of the operator blocks (``Wᵀ``, plus ``W`` for SIRT)."""
    return estimate_nnz(geometry) * 8 * (2 if sirt else 1)


def default_budget() -> int:
    """Bytes the operator may take: a quarter of the worker's memory limit or of free memory."""
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
        if limit:
            return int(limit) // 4
    except (ImportError, ValueError, AttributeError):
        pass
    return int(psutil.virtual_memory().available) // 4


@dataclasses.dataclass
class _Block:
    """One block of angles: rows ``start:stop`` of ``W``; CSR tensors in memory or ``.npy`` paths."""

    start: int
    stop: int
    parts: dict[str, object]  # name -> torch sparse CSR tensor, or {part: path} when spilled

    def tensor(self, name: str, device: str) -> torch.Tensor:
        """The block as a torch sparse CSR tensor on ``device`` (``name``: ``bt`` or ``w``)."""
        part = self.parts[name]
        if isinstance(part, torch.Tensor):
            return part
        return _csr_tensor({k: np.load(path, mmap_mode="r") for k, path in part.items()}, device)


def _csr_tensor(arrays: dict[str, np.ndarray], device: str) -> torch.Tensor:
    indptr, indices, data = (torch.from_numpy(np.array(arrays[k])) for k in ("indptr", "indices", "data"))
    shape = tuple(int(s) for s in arrays["shape"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return torch.sparse_csr_tensor(indptr, indices, data, size=shape, device=device,
                                       check_invariants=False)


class Operator:
    """The projection operator of one geometry, in blocks of angles (see module docs)."""

    def __init__(self, geometry: Geometry, *, sirt: bool, spill: bool, device: str) -> None:
        self.geometry = geometry
        self.device = device
        self.spill_dir = None
        if spill:
            self.spill_dir = tempfile.mkdtemp(prefix="xrdscale-operator-")
            weakref.finalize(self, shutil.rmtree, self.spill_dir, True)
            logger.info("operator of ~%.2f GB exceeds the memory budget: spilling its blocks to %s",
                        operator_bytes(geometry, sirt=sirt) / 1e9, self.spill_dir)
        per_angle = max(1, estimate_nnz(geometry) // geometry.n_angles)
        step = max(1, BLOCK_NNZ // per_angle)
        n_pix = geometry.n_det * geometry.n_det
        self.blocks: list[_Block] = []
        self.row_sum = np.zeros(geometry.n_angles * geometry.n_det, dtype=np.float32)
        self.col_sum = np.zeros(n_pix, dtype=np.float32)
        self.nnz = 0
        for start in range(0, geometry.n_angles, step):
            stop = min(geometry.n_angles, start + step)
            w = _astra_matrix(geometry.subset(np.arange(start, stop)))
            self.nnz += w.nnz
            rows = slice(start * geometry.n_det, stop * geometry.n_det)
            self.row_sum[rows] = np.asarray(w.sum(axis=1)).ravel()
            self.col_sum += np.asarray(w.sum(axis=0)).ravel()
            mats = {"bt": w.T.tocsr()}
            if sirt:
                mats["w"] = w
            parts = {name: self._store(start, name, {
                "indptr": m.indptr.astype(np.int32), "indices": m.indices.astype(np.int32),
                "data": m.data.astype(np.float32), "shape": np.asarray(m.shape, dtype=np.int64)})
                for name, m in mats.items()}
            self.blocks.append(_Block(start, stop, parts))
            del w, mats
        self.sirt = sirt

    def _store(self, start: int, name: str, arrays: dict[str, np.ndarray]) -> object:
        if self.spill_dir is None:
            return _csr_tensor(arrays, self.device)
        paths = {}
        for k, v in arrays.items():
            paths[k] = os.path.join(self.spill_dir, f"{name}_{start}_{k}.npy")
            np.save(paths[k], v)
        return paths

    def back(self, rows: torch.Tensor) -> torch.Tensor:
        """``Wᵀ · rows``: ``(angle*det, channel)`` → ``(pixel, channel)``."""
        n_det = self.geometry.n_det
        out = torch.zeros((n_det * n_det, rows.shape[1]), dtype=rows.dtype, device=rows.device)
        for b in self.blocks:
            out += b.tensor("bt", self.device) @ rows[b.start * n_det:b.stop * n_det]
        return out

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``W · image``: ``(pixel, channel)`` → ``(angle*det, channel)``."""
        return torch.cat([b.tensor("w", self.device) @ image for b in self.blocks])


def _astra_matrix(geometry: Geometry):
    """ASTRA's ``linear`` projection matrix (scipy CSR) of ``geometry``; frees the ASTRA objects."""
    vol_geom = astra.create_vol_geom(geometry.n_det, geometry.n_det)
    proj_geom = astra.create_proj_geom("parallel", 1.0, geometry.n_det, geometry.angles_rad)
    projector = astra.create_projector("linear", proj_geom, vol_geom)
    matrix_id = astra.projector.matrix(projector)
    try:
        return astra.matrix.get(matrix_id)
    finally:
        astra.matrix.delete(matrix_id)
        astra.projector.delete(projector)


@functools.lru_cache(maxsize=2)
def _build_operator(geometry: Geometry, sirt: bool, spill: bool, device: str) -> Operator:
    return Operator(geometry, sirt=sirt, spill=spill, device=device)


#: serialises operator builds, so threads of one worker never build the same operator twice
_BUILD_LOCK = threading.Lock()


def cached_operator(geometry: Geometry, sirt: bool, spill: bool, device: str) -> Operator:
    """The :class:`Operator` of ``geometry``, built once per worker process (memoised)."""
    with _BUILD_LOCK:
        return _build_operator(geometry, sirt, spill, device)


class BatchedEngine:
    """Sparse-operator reconstruction of a whole chunk of channels at once."""

    name = "batched"

    def __init__(self, device: str = "cpu", memory_budget: int | None = None) -> None:
        self.device = device
        self.memory_budget = memory_budget

    @staticmethod
    def cuda_available() -> bool:
        """True if torch sees a CUDA GPU."""
        return bool(torch.cuda.is_available())

    def operator(self, geometry: Geometry, *, sirt: bool = False) -> Operator:
        """The (cached) operator of ``geometry`` for this engine's device and budget."""
        budget = self.memory_budget if self.memory_budget is not None else default_budget()
        spill = operator_bytes(geometry, sirt=sirt) > budget
        return cached_operator(geometry, sirt, spill, self.device)

    def fbp(self, geometry: Geometry, sino: np.ndarray, filter_name: str) -> np.ndarray:
        """FBP of every channel of ``sino`` ``(angle, translation, channel)`` → ``(y, x, channel)``."""
        op = self.operator(geometry)
        p = torch.as_tensor(np.ascontiguousarray(sino, dtype=np.float32), device=self.device)
        filtered = filter_sinograms(p, filter_name).reshape(-1, p.shape[2])
        return self._image(geometry, op.back(filtered))

    def sirt(self, geometry: Geometry, sino: np.ndarray, iterations: int) -> np.ndarray:
        """SIRT of every channel of ``sino``, ``iterations`` iterations from zero."""
        op = self.operator(geometry, sirt=True)
        p = torch.as_tensor(np.ascontiguousarray(sino, dtype=np.float32), device=self.device)
        p = p.reshape(-1, p.shape[2])
        inv_row = torch.as_tensor(_safe_inverse(op.row_sum), device=self.device)[:, None]
        inv_col = torch.as_tensor(_safe_inverse(op.col_sum), device=self.device)[:, None]
        x = torch.zeros((geometry.n_det ** 2, p.shape[1]), dtype=p.dtype, device=self.device)
        for _ in range(iterations):
            x += inv_col * op.back(inv_row * (p - op.forward(x)))
        return self._image(geometry, x)

    @staticmethod
    def _image(geometry: Geometry, flat: torch.Tensor) -> np.ndarray:
        n = geometry.n_det
        return flat.reshape(n, n, -1).flip(0).cpu().numpy()


def _safe_inverse(values: np.ndarray) -> np.ndarray:
    out = np.zeros_like(values, dtype=np.float32)
    np.divide(1.0, values, out=out, where=values > 1e-6)
    return out

