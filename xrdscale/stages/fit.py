"""Conventional full-profile fitting: the baseline PQ-Net is judged against.

A whole-pattern least-squares fit with the same pattern model as the simulator and the
training libraries (:mod:`xrdscale.physics.pattern`), parameterised by a phase library:
per phase a scale factor and, where the library gives ranges, lattice parameters and
crystallite size; plus a Chebyshev background. Scale factors and background enter
linearly and are solved exactly (bounded linear least squares, scales ≥ 0) for every
trial of the non-linear parameters (variable projection), which are refined with a
trust-region method inside the library's ranges. It is what a Rietveld refinement of
scale, cell and size does, minus the structural parameters, and it is slow — seconds per
pattern — which is the point of PQ-Net.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import optimize

from xrdscale.exceptions import InputError
from xrdscale.physics.pattern import simulate_patterns
from xrdscale.physics.phaselib import PhaseLibrary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    """Refined parameters of one pattern.

    Attributes
    ----------
    labels : dict
        ``{phase: {param: value}}`` in the units of the phase library (scale, a, c, size_nm).
    background : ndarray
        Chebyshev coefficients of the background.
    rwp : float
        Weighted profile R factor ``sqrt(Σ w (y − ŷ)² / Σ w y²)`` with Poisson weights.
    success : bool
        Whether the optimiser converged.
    """

    labels: dict[str, dict[str, float]]
    background: np.ndarray
    rwp: float
    success: bool


#: Floor of the Poisson weights, relative to the pattern's mean intensity.
WEIGHT_FLOOR = 1e-3


def poisson_weights(y: np.ndarray) -> np.ndarray:
    """Weights ``1/sqrt(y)`` of a pattern in absolute units (∝ Poisson weights ``1/sqrt(counts)``).

    The patterns of the contract are counts times an unknown constant, so the weights are
    proportional to Poisson weights whatever that constant; the floor (``WEIGHT_FLOOR`` of the
    mean intensity) is relative too, so a pattern ``k`` times stronger fits to ``k`` times the
    scale factors with the same lattice parameters and R factor.
    """
    y = np.asarray(y, dtype=float)
    mean = float(np.mean(np.abs(y))) if y.size else 0.0
    floor = WEIGHT_FLOOR * mean if mean > 0 else 1.0
    return 1.0 / np.sqrt(np.clip(y, floor, None))


def _nonlinear_keys(lib: PhaseLibrary) -> list[tuple[str, str, tuple[float, float]]]:
    keys = []
    for name, p in lib.spec.phases.items():
        for key in ("a", "c", "size_nm"):
            rng = getattr(p, key)
            if rng is not None and rng[1] > rng[0]:
                keys.append((name, key, (float(rng[0]), float(rng[1]))))
    return keys


def fit_pattern(lib: PhaseLibrary, q: np.ndarray, y: np.ndarray, *, order: int | None = None,
                max_nfev: int = 200) -> FitResult:
    """Fit one pattern with the phases of ``lib``.

    Parameters
    ----------
    lib : PhaseLibrary
        Phases, ranges, wavelength and instrument.
    q, y : ndarray
        The pattern on its q grid (any grid inside the library's q range).
    order : int, optional
        Chebyshev order of the background (default: the library's).
    max_nfev : int
        Budget of evaluations of the non-linear parameters.

    Returns
    -------
    FitResult
    """
    q = np.asarray(q, dtype=float)
    y = np.asarray(y, dtype=float)
    if q.shape != y.shape or q.ndim != 1:
        raise InputError(f"q and pattern must be 1D of equal length, got {q.shape} and {y.shape}")
    if not np.isfinite(y).all():
        raise InputError("pattern contains NaN or infinite values; mask or drop those points before fitting")
    order = lib.spec.background.chebyshev_order if order is None else order
    keys = _nonlinear_keys(lib)
    lo = np.array([r[0] for *_, r in keys])
    hi = np.array([r[1] for *_, r in keys])
    weight = poisson_weights(y)
    x = 2 * (q - q[0]) / (q[-1] - q[0]) - 1
    cheb = np.polynomial.chebyshev.chebvander(x, order)
    names = lib.phase_names
    instrument = lib.instrument_model()

    def design(theta: np.ndarray) -> np.ndarray:
        cols = []
        for name, phase in zip(names, lib.phases):
            params = {"scale": np.ones(1)}
            params.update({k: np.array([theta[i]]) for i, (n, k, _) in enumerate(keys) if n == name})
            cols.append(simulate_patterns(q, [phase], {name: params}, instrument)[0].astype(float))
        return np.column_stack(cols + [cheb])

    def linear(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = design(theta)
        lb = np.r_[np.zeros(len(names)), np.full(order + 1, -np.inf)]
        sol = optimize.lsq_linear(a * weight[:, None], y * weight, bounds=(lb, np.inf), method="bvls")
        return sol.x, a @ sol.x

    def residual(theta: np.ndarray) -> np.ndarray:
        return (y - linear(theta)[1]) * weight

    theta0 = 0.5 * (lo + hi)
    if keys:
        res = optimize.least_squares(residual, theta0, bounds=(lo, hi), x_scale=(hi - lo) / 4,
                                     diff_step=1e-3, max_nfev=max_nfev)
        theta, success = res.x, bool(res.success)
    else:
        theta, success = theta0, True
    coef, model = linear(theta)
    labels: dict[str, dict[str, float]] = {n: {"scale": float(coef[i])} for i, n in enumerate(names)}
    for i, (n, k, _) in enumerate(keys):
        labels[n][k] = float(theta[i])
    rwp = float(np.sqrt(np.sum((weight * (y - model)) ** 2) / np.sum((weight * y) ** 2)))
    return FitResult(labels=labels, background=coef[len(names):], rwp=rwp, success=success)


def fit_patterns(lib: PhaseLibrary, q: np.ndarray, patterns: np.ndarray, **kwargs) -> list[FitResult]:
    """Fit each row of ``patterns`` (N, npt) with :func:`fit_pattern`."""
    return [fit_pattern(lib, q, p, **kwargs) for p in np.atleast_2d(patterns)]
