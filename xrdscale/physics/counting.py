"""Counting statistics of patterns in any unit: the intensity per count, from a pattern's own noise.

Patterns of the data contract are counts times a constant nobody recorded (monitor
normalisation, reconstruction, the library's absolute units). Poisson weights then need that
constant, the gain ``g`` (intensity per count): the variance of a point is ``g · max(y, g)``.
"""

from __future__ import annotations

import numpy as np


def counting_gain(y: np.ndarray, resid: np.ndarray) -> np.ndarray:
    """Intensity per count ``g`` of each pattern ``(n, 1)``: ``var(Δ² r) ≈ 6 g max(y, g)``, robustly.

    Parameters
    ----------
    y : ndarray (n, npt)
        Patterns.
    resid : ndarray (n, npt)
        Their residuals against a model (or the patterns themselves: the median of the scaled
        second differences is robust to the few points on peaks).

    Returns
    -------
    ndarray (n, 1)
        ``g`` (≥ 1e-30).
    """
    d2 = resid[:, :-2] - 2 * resid[:, 1:-1] + resid[:, 2:]
    mid = y[:, 1:-1]
    floor = np.maximum(0.01 * np.abs(y).mean(axis=1, keepdims=True), 1e-30)
    for _ in range(2):
        z = np.abs(d2) / np.sqrt(6 * np.maximum(mid, floor))
        gain = (np.median(z, axis=1, keepdims=True) / 0.6745) ** 2
        floor = np.maximum(gain, 1e-30)
    return np.maximum(gain, 1e-30)
