"""Ellipse phantoms with analytic parallel-beam projections (tests, benchmarks, examples).

An ellipse ``(x0, y0, a, b, phi_deg, rho)`` (lengths in pixels from the rotation axis)
has the exact line integral (Kak & Slaney, eq. 3.46)
``p(θ, t) = 2 ρ a b √(α² − (t − s)²) / α²`` with ``α² = a² cos²(θ−φ) + b² sin²(θ−φ)``
and ``s = x0 cos θ + y0 sin θ``, on the ray ``x cos θ + y sin θ = t`` — the convention of
:mod:`xrdscale.recon.geometry`. The sinograms are therefore independent of any
projector xrdscale or ASTRA uses, which is what fidelity tests compare against.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from xrdscale.recon.geometry import Geometry

logger = logging.getLogger(__name__)

Ellipse = tuple[float, float, float, float, float, float]


def default_ellipses(n: int) -> list[Ellipse]:
    """A few overlapping ellipses filling about 80 % of an ``n``-pixel field of view."""
    r = 0.4 * n
    return [
        (0.0, 0.0, r, 0.85 * r, 0.0, 1.0),
        (0.3 * r, 0.1 * r, 0.35 * r, 0.2 * r, 30.0, 0.8),
        (-0.35 * r, -0.2 * r, 0.2 * r, 0.3 * r, -20.0, -0.5),
        (0.0, 0.5 * r, 0.12 * r, 0.12 * r, 0.0, 1.5),
    ]


def ellipse_image(n: int, ellipses: Sequence[Ellipse]) -> np.ndarray:
    """The phantom sampled at the pixel centres, ``(y, x)`` with ``y`` ascending."""
    c = np.arange(n) - (n - 1) / 2.0
    y, x = np.meshgrid(c, c, indexing="ij")
    img = np.zeros((n, n), dtype=np.float64)
    for x0, y0, a, b, phi, rho in ellipses:
        cp, sp = np.cos(np.deg2rad(phi)), np.sin(np.deg2rad(phi))
        u = (x - x0) * cp + (y - y0) * sp
        v = -(x - x0) * sp + (y - y0) * cp
        img += rho * ((u / a) ** 2 + (v / b) ** 2 <= 1.0)
    return img


def ellipse_sinogram(geometry: Geometry, ellipses: Sequence[Ellipse]) -> np.ndarray:
    """Exact ray sums ``(angle, translation)`` of the ellipses, in pixel-length units."""
    theta = geometry.angles_rad[:, None]
    t = (np.arange(geometry.n_det) - (geometry.n_det - 1) / 2.0)[None, :]
    sino = np.zeros((geometry.n_angles, geometry.n_det), dtype=np.float64)
    for x0, y0, a, b, phi, rho in ellipses:
        alpha2 = (a * np.cos(theta - np.deg2rad(phi))) ** 2 + (b * np.sin(theta - np.deg2rad(phi))) ** 2
        s = x0 * np.cos(theta) + y0 * np.sin(theta)
        inside = np.clip(alpha2 - (t - s) ** 2, 0.0, None)
        sino += 2.0 * rho * a * b * np.sqrt(inside) / alpha2
    return sino
