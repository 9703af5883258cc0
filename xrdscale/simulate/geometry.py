"""Pencil-beam ray matrices and the pyFAI detector model of the simulated scan.

Ray sums are computed with a sparse matrix of our own (Joseph's method: per row or
column crossed, linear interpolation between the two nearest voxels), independent of
ASTRA so that reconstruction tests compare two separate implementations.

Conventions (the standard Radon transform, shared with :mod:`xrdscale.recon`): an image of
``n × n`` voxels has coordinates ``x_j = j - (n-1)/2`` (columns) and ``y_i = i - (n-1)/2``
(rows, y ascending) in voxel units, the rotation axis at the image centre. At rotation
angle ``θ`` the ray at translation ``t`` (voxel units, measured from the rotation axis) is
the line ``x cos θ + y sin θ = t``. (ASTRA's rows run from +y downwards, so this is ASTRA's
parallel-beam geometry applied to the image flipped upside down.) Ray sums are line integrals
in voxel-length units, so a filtered back projection on a unit-voxel grid returns the
per-voxel values.

The detector model turns a 1D pattern ``P(q)`` into a 2D frame exactly as pyFAI's
``AzimuthalIntegrator`` defines the corrections: pixel value =
``I0 · <P>_pixel · solid angle · polarisation``, where ``<P>_pixel`` is the mean of ``P``
over the pixel's q extent (from its corners), solid angle is
``solidAngleArray()`` (relative, as ``correctSolidAngle=True`` divides it out) and the
polarisation is ``polarization(factor=…)``. Integrating such a frame with
``integrate1d(..., correctSolidAngle=True, polarization_factor=…,
normalization_factor=I0)`` returns ``P``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from xrdscale.exceptions import ConfigError

logger = logging.getLogger(__name__)

#: Value written into masked detector pixels (the Pilatus convention for gaps).
MASKED_VALUE = -1
_BLOCK_FLOATS = 8_000_000  # bound on floats held per frame batch


def ray_matrix(n: int, angle_deg: float, t: np.ndarray) -> sp.csr_matrix:
    """Sparse ray-sum matrix of one rotation angle (Joseph's method).

    Parameters
    ----------
    n : int
        The image is ``n × n`` voxels, flattened row-major (``i * n + j``).
    angle_deg : float
        Rotation angle in degrees.
    t : ndarray (n_rays,)
        Ray positions in voxel units from the rotation axis (the image centre).

    Returns
    -------
    scipy.sparse.csr_matrix (n_rays, n*n)
        ``A @ image.ravel()`` gives the line integrals in voxel-length units.

    Examples
    --------
    >>> A = ray_matrix(4, 0.0, np.array([-1.5, 0.5]))
    >>> img = np.arange(16.0).reshape(4, 4)
    >>> A @ img.ravel()   # at 0° a ray sums one column
    array([24., 32.])
    """
    t = np.asarray(t, dtype=float)
    theta = np.deg2rad(angle_deg)
    cos, sin = np.cos(theta), np.sin(theta)
    centre = (n - 1) / 2.0
    steps = np.arange(n, dtype=float) - centre          # coordinate of the crossed rows/columns
    if abs(cos) >= abs(sin):
        # Mostly along y: cross every row i, interpolate along x = (t - y sin) / cos.
        pos = (t[:, None] - steps[None, :] * sin) / cos + centre
        weight = 1.0 / abs(cos)
        crossed_is_row = True
    else:
        # Mostly along x: cross every column j, interpolate along y = (t - x cos) / sin.
        pos = (t[:, None] - steps[None, :] * cos) / sin + centre
        weight = 1.0 / abs(sin)
        crossed_is_row = False
    lo = np.floor(pos).astype(np.int64)
    frac = pos - lo
    rays = np.broadcast_to(np.arange(t.size)[:, None], pos.shape)
    crossed = np.broadcast_to(np.arange(n)[None, :], pos.shape)
    rows, cols, vals = [], [], []
    for k, w in ((lo, 1.0 - frac), (lo + 1, frac)):
        ok = (k >= 0) & (k < n) & (w > 0)
        rows.append(rays[ok])
        cols.append(crossed[ok] * n + k[ok] if crossed_is_row else k[ok] * n + crossed[ok])
        vals.append(w[ok] * weight)
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(t.size, n * n))


@dataclass
class DetectorModel:
    """A pyFAI geometry with everything a frame needs precomputed once.

    Build it with :meth:`from_integrator`. ``q_lo``/``q_hi`` are each pixel's q extent
    [1/Å], ``gain`` the product of solid angle and polarisation, ``mask`` True where a
    pixel is masked (gaps, bad pixels, beam stop).
    """

    integrator: Any = field(repr=False)  # a pyFAI AzimuthalIntegrator
    mask: np.ndarray = field(repr=False)
    polarization_factor: float
    q_lo: np.ndarray = field(repr=False)
    q_hi: np.ndarray = field(repr=False)
    gain: np.ndarray = field(repr=False)
    _cache: tuple | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_integrator(cls, ai, mask: np.ndarray | None = None, *, polarization_factor: float = 0.99) -> DetectorModel:
        """Precompute per-pixel q extent, solid angle and polarisation of ``ai``.

        Parameters
        ----------
        ai : pyFAI.integrator.azimuthal.AzimuthalIntegrator
            Geometry and detector (``ai.detector.max_shape`` is the frame shape).
        mask : ndarray of bool, optional
            True for masked pixels; defaults to the detector's own mask (module gaps).
        polarization_factor : float
            Horizontal polarisation factor as pyFAI defines it (-1..1).
        """
        shape = tuple(ai.detector.max_shape)
        if mask is None:
            mask = ai.detector.mask if ai.detector.mask is not None else np.zeros(shape, dtype=bool)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise ConfigError(f"mask shape {mask.shape} does not match the detector shape {shape}")
        corners = ai.array_from_unit(shape=shape, typ="corner", unit="q_A^-1", scale=True)
        q_c = np.asarray(corners[..., 0], dtype=float)
        q_lo, q_hi = q_c.min(axis=-1), q_c.max(axis=-1)
        gain = ai.solidAngleArray(shape) * ai.polarization(shape, factor=polarization_factor)
        return cls(ai, mask, float(polarization_factor), q_lo.ravel(), q_hi.ravel(),
                   np.asarray(gain, dtype=np.float64).ravel())

    @property
    def shape(self) -> tuple[int, int]:
        """Frame shape (ny, nx)."""
        return tuple(self.integrator.detector.max_shape)

    @property
    def batch(self) -> int:
        """Frames per batch that keep a batch's float arrays under ~64 MB."""
        return max(1, _BLOCK_FLOATS // self.mask.size)

    def q_range(self) -> tuple[float, float]:
        """Smallest and largest q [1/Å] any unmasked pixel sees."""
        keep = ~self.mask.ravel()
        return float(self.q_lo[keep].min()), float(self.q_hi[keep].max())

    def expected(self, q: np.ndarray, patterns: np.ndarray, i0: np.ndarray) -> np.ndarray:
        """Noise-free frames (float64, masked pixels 0) of ``patterns`` on the grid ``q``.

        Parameters
        ----------
        q : ndarray (npt,)
            Ascending q grid [1/Å] that covers :meth:`q_range`.
        patterns : ndarray (n, npt)
            1D patterns (zero outside the grid).
        i0 : ndarray (n,)
            Incident intensity of each frame.

        Returns
        -------
        ndarray (n, ny, nx)
        """
        q = np.asarray(q, dtype=float)
        patterns = np.atleast_2d(np.asarray(patterns, dtype=float))
        # Mean over [q_lo, q_hi] from the cumulative (trapezoid) integral of each pattern.
        cum = np.concatenate([np.zeros((patterns.shape[0], 1)),
                              np.cumsum(0.5 * (patterns[:, 1:] + patterns[:, :-1]) * np.diff(q), axis=1)], axis=1)
        keep, op = self._operator(q)
        out = np.zeros((patterns.shape[0], self.mask.size))
        out[:, keep] = (op @ cum.T).T * np.asarray(i0, dtype=float).reshape(-1, 1)
        return out.reshape(-1, *self.shape)

    def _operator(self, q: np.ndarray) -> tuple[np.ndarray, sp.csr_matrix]:
        """Unmasked pixels and the sparse map cumulative pattern → pixel value (cached per q grid).

        Row p holds ``gain_p / (q_hi - q_lo)`` times the linear-interpolation weights of
        ``C(q_hi) - C(q_lo)``: four non-zeros per pixel.
        """
        key = (q.size, float(q[0]), float(q[-1]))
        if self._cache is None or self._cache[0] != key:
            keep = np.flatnonzero(~self.mask.ravel())
            lo, hi = self.q_lo[keep], self.q_hi[keep]
            factor = self.gain[keep] / np.maximum(hi - lo, 1e-12)
            (ilo, wlo), (ihi, whi) = _interp_weights(q, lo), _interp_weights(q, hi)
            rows = np.tile(np.arange(keep.size), 4)
            cols = np.concatenate([ihi, ihi + 1, ilo, ilo + 1])
            vals = np.concatenate([(1 - whi) * factor, whi * factor, -(1 - wlo) * factor, -wlo * factor])
            op = sp.csr_matrix((vals, (rows, cols)), shape=(keep.size, q.size))
            self._cache = (key, (keep, op))
        return self._cache[1]

    def frames(self, q: np.ndarray, patterns: np.ndarray, i0: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Poisson-counted int32 frames; masked pixels hold :data:`MASKED_VALUE`.

        Parameters are those of :meth:`expected`; ``rng`` draws the counts.
        """
        patterns = np.atleast_2d(patterns)
        n = patterns.shape[0]
        out = np.empty((n, *self.shape), dtype=np.int32)
        block = self.batch
        for s in range(0, n, block):
            lam = self.expected(q, patterns[s:s + block], np.asarray(i0)[s:s + block])
            counts = rng.poisson(np.clip(lam, 0, None)).astype(np.int32)
            counts[:, self.mask] = MASKED_VALUE
            out[s:s + block] = counts
        return out


def _interp_weights(grid: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index and weight of linear interpolation of ``x`` on ``grid`` (clamped at the ends)."""
    idx = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, grid.size - 2)
    w = np.clip((x - grid[idx]) / (grid[idx + 1] - grid[idx]), 0.0, 1.0)
    return idx, w
