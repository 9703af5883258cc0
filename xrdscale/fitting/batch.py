"""Fitting a batch of patterns: start values, the LM of :mod:`xrdscale.fitting.lm`, NaN for empty pixels.

Start values: the non-linear parameters (lattice, size, peak position/width) from PQ-Net's
predictions where given, else the library's midpoints; then, at those, the linear ones (scales
and background) by weighted bounded linear least squares per pixel (scales ≥ 0: non-negative
least squares of the phase patterns and the Chebyshev polynomials). Optionally each phase's
lattice start is screened among quasi-random candidates of its box (:func:`screen_starts`).

The optimiser sees every crystallite size as ``u = 1/size_nm`` (:class:`InverseSize`); results
and standard errors are reported in nm.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy import optimize
from scipy.stats import qmc

from xrdscale.fitting.lm import LMResult, levenberg_marquardt, poisson_weights, weighted_chi2
from xrdscale.fitting.torch_model import PatternModel
from xrdscale.physics.counting import counting_gain

logger = logging.getLogger(__name__)


def linear_start(model: PatternModel, y: torch.Tensor, theta: torch.Tensor,
                 windows: list[torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
    """θ with its linear parameters solved by weighted bounded least squares at its non-linear ones.

    Parameters
    ----------
    model : PatternModel
        The pattern model.
    y : torch.Tensor (B, npt)
        Patterns (NaN points carry no weight).
    theta : torch.Tensor (B, P)
        Non-linear parameters (the linear entries are replaced).
    windows : list of torch.Tensor
        Peak windows of the fit (:meth:`PatternModel.fit_windows`).
    weights : torch.Tensor (B, npt), optional
        Least-squares weights; default :func:`xrdscale.fitting.lm.poisson_weights`.

    Returns
    -------
    torch.Tensor (B, P)
    """
    linear = [j for j, p in enumerate(model.params) if p.linear]
    lo = np.array([model.params[j].lower for j in linear])
    hi = np.array([model.params[j].upper for j in linear])
    design = np.empty((theta.shape[0], model.npt, len(linear)))
    with torch.no_grad():
        for s in range(0, theta.shape[0], 64):
            th = theta[s:s + 64].clone()
            win = [wd[s:s + 64] for wd in windows]
            for col, j in enumerate(linear):
                th[:, linear] = 0.0
                th[:, j] = 1.0
                design[s:s + 64, :, col] = model(th, win).cpu().numpy()
    sw = torch.sqrt(poisson_weights(y) if weights is None else weights).cpu().numpy()
    yv = np.nan_to_num(y.cpu().numpy())
    out = theta.clone()
    for b in range(theta.shape[0]):
        a = design[b] * sw[b, :, None]
        norm = np.linalg.norm(a, axis=0)
        norm = np.where(norm > 0, norm, 1.0)
        sol = optimize.lsq_linear(a / norm, yv[b] * sw[b], bounds=(lo * norm, hi * norm), method="bvls")
        out[b, linear] = torch.as_tensor(sol.x / norm, dtype=theta.dtype, device=theta.device)
    return out


def screen_starts(model: PatternModel, y: torch.Tensor, theta: torch.Tensor, windows: list[torch.Tensor],
                  weights: torch.Tensor | None, starts: int, seed: int = 0) -> torch.Tensor:
    """The start of every pixel, its lattice screened phase by phase among ``starts`` candidates.

    A lattice start more than about a peak width from the truth can lead Levenberg–Marquardt
    into a neighbouring minimum (a peak fitted onto its neighbour). For each crystalline phase
    with lattice parameters in turn, present (scale > 0) in some pixel, ``starts − 1``
    quasi-random (Halton, seeded) points of its lattice box are tried besides the current
    start, the linear parameters solved at each (:func:`linear_start`), and each pixel keeps
    the lowest χ². The cost is that of the linear solves, a small part of a fit.

    Parameters
    ----------
    model, y, theta, windows, weights
        As :func:`linear_start` (``theta``: the start; its linear entries are replaced).
    starts : int
        Candidates per phase, the given start included; 1: no screening.
    seed : int
        Seed of the quasi-random points.

    Returns
    -------
    torch.Tensor (B, P)
        The screened starts, their linear parameters solved.
    """
    best = linear_start(model, y, theta, windows, weights)
    if starts <= 1:
        return best
    w = poisson_weights(y) if weights is None else weights
    best_chi = weighted_chi2(model, y, best, windows, w)
    by_phase: dict[str, list[int]] = {}
    for j, p in enumerate(model.params):
        if p.key in ("a", "c") and p.upper > p.lower:
            by_phase.setdefault(p.phase, []).append(j)
    for k, (phase, cols) in enumerate(by_phase.items()):
        j_scale = model.index(phase, "scale")
        if j_scale is not None and not bool((best[:, j_scale] > 0).any()):
            continue
        lo = model.lower[cols]
        span = model.upper[cols] - lo
        points = qmc.Halton(d=len(cols), seed=seed + k).random(starts - 1)
        for u in torch.as_tensor(points, dtype=theta.dtype, device=theta.device):
            cand = best.clone()
            cand[:, cols] = lo + u * span
            cand = linear_start(model, y, cand, windows, weights)
            chi = weighted_chi2(model, y, cand, windows, w)
            better = chi < best_chi
            best[better] = cand[better]
            best_chi = torch.where(better, chi, best_chi)
    return best


class InverseSize:
    """The optimiser's parameters: the model's, with every ``size_nm`` replaced by ``u = 1/size_nm``.

    The Scherrer (Lorentzian) width is linear in ``u``, so χ² is far closer to quadratic in it than
    in the size (whose effect fades as 1/size²: a size of 900 nm or 1000 nm barely differ). The box
    ``[lo, hi]`` of a size becomes ``[1/hi, 1/lo]``; results and standard errors go back in nm
    (``σ_size = σ_u · size²``, the delta method).
    """

    def __init__(self, model: PatternModel) -> None:
        cols = [j for j, p in enumerate(model.params) if p.key == "size_nm" and p.lower > 0]
        self.cols = cols
        self.mask = torch.zeros(model.n_params, dtype=torch.bool, device=model.device)
        self.mask[cols] = True
        self.lower = torch.where(self.mask, 1.0 / model.upper, model.lower)
        self.upper = torch.where(self.mask, 1.0 / torch.where(self.mask, model.lower, 1.0), model.upper)

    def _flip(self, th: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, 1.0 / torch.where(self.mask, th, torch.ones_like(th)), th)

    def to_model(self, th: torch.Tensor) -> torch.Tensor:
        """The model's θ of the optimiser's (differentiable)."""
        return self._flip(th)

    def to_fit(self, th: torch.Tensor) -> torch.Tensor:
        """The optimiser's θ of the model's."""
        return self._flip(th)

    def back(self, params: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Parameters and standard errors of the optimiser's result in the model's units."""
        params, std = params.copy(), std.copy()
        size = 1.0 / params[:, self.cols]
        params[:, self.cols] = size
        std[:, self.cols] = std[:, self.cols] * size**2
        return params, std


def noise_weights(y: np.ndarray) -> np.ndarray:
    """Weights ``1/σ²`` with one σ per pattern, estimated from the pattern itself.

    For intensities whose noise is not Poisson in their own units — a reconstructed voxel's
    pattern is a filtered sum over many sinogram values, with negative values, a variance
    that does not follow the intensity, and an arbitrary unit — Poisson weights ``1/max(y, 1)``
    would put all the weight on the points near zero. ``σ`` is the robust (MAD) spread of
    the second difference ``y[i−1] − 2y[i] + y[i+1]``, divided by √6 (its variance for white
    noise of variance σ²); smooth peaks wider than a few points barely contribute to it. It is
    floored at 10⁻⁶ of the pattern's largest absolute value so a noise-free pattern stays
    finite. NaN points get weight 0.
    """
    y = np.atleast_2d(np.asarray(y, dtype=float))
    d2 = y[:, :-2] - 2 * y[:, 1:-1] + y[:, 2:]
    with np.errstate(all="ignore"):
        mad = np.nanmedian(np.abs(d2 - np.nanmedian(d2, axis=1, keepdims=True)), axis=1)
        sigma = 1.4826 * mad / np.sqrt(6.0)
        top = np.nanmax(np.abs(y), axis=1)
    sigma = np.maximum(np.nan_to_num(sigma), 1e-6 * np.nan_to_num(top))
    sigma = np.where(sigma > 0, sigma, 1.0)
    return np.where(np.isfinite(y), 1.0 / sigma[:, None] ** 2, 0.0)


def counting_weights(y: np.ndarray) -> np.ndarray:
    """Poisson weights ``1 / (g · max(y, g))`` of patterns in any unit, ``g`` their intensity per count.

    ``g`` is estimated from each pattern's own noise (:func:`xrdscale.physics.counting.counting_gain`):
    for patterns in a library's absolute units (values ≪ 1) they stay Poisson weights where
    ``1/max(y, 1)`` collapses to uniform ones at its one-count floor. The estimate is inflated
    by the patterns' own curvature (on counts it gives g ≈ 1.25, so χ²/dof ≈ 0.8), which
    changes the weights by one factor per pattern: the fitted values not at all, χ² by that
    factor. NaN points get weight 0.
    """
    y = np.atleast_2d(np.asarray(y, dtype=float))
    yv = np.nan_to_num(y)
    g = counting_gain(yv, yv)
    return np.where(np.isfinite(y), 1.0 / (g * np.maximum(yv, g)), 0.0)


def fit_batch(model: PatternModel, y: np.ndarray, start: np.ndarray | None = None, *, max_iterations: int = 100,
              tol: float = 1e-4, block: int = 64, weights: str = "poisson", starts: int = 8,
              seed: int = 0) -> LMResult:
    """Fit patterns ``(B, npt)`` on the model's q grid; empty pixels (all NaN or all zero) get NaN.

    Parameters
    ----------
    model : PatternModel
        The pattern model (its dtype and device are used).
    y : ndarray (B, npt)
        Patterns in counts (or proportional to counts).
    start : ndarray (B, P), optional
        Start values of the non-linear parameters (NaN: the library's midpoint); default midpoints.
        They are clamped into the box; the linear ones are solved (:func:`linear_start`).
    max_iterations, tol
        Of :func:`xrdscale.fitting.lm.levenberg_marquardt`.
    block : int
        Pixels per Jacobian evaluation.
    weights : {"poisson", "counts", "noise"}
        ``poisson``: ``1/max(y, 1)``, for patterns in counts (integrated frames);
        ``counts``: ``1/(g · max(y, g))`` with the intensity per count ``g`` estimated from each
        pattern (:func:`counting_weights`), for counts in an arbitrary unit (a library's);
        ``noise``: one weight per pattern from its own noise (:func:`noise_weights`), for
        reconstructed volumes.
    starts, seed : int
        Lattice start candidates per phase (:func:`screen_starts`; 1: the given start only) and
        the seed of their quasi-random points.

    Returns
    -------
    LMResult
        ``converged`` False and ``iterations`` 0 for empty pixels.
    """
    y = np.asarray(y, dtype=float)
    n, p = y.shape[0], model.n_params
    finite = np.isfinite(y)
    empty = ~finite.any(axis=1) | (np.nan_to_num(y) == 0).all(axis=1)
    result = LMResult(params=np.full((n, p), np.nan), std=np.full((n, p), np.nan), rwp=np.full(n, np.nan),
                      chi2=np.full(n, np.nan), converged=np.zeros(n, dtype=bool), iterations=np.zeros(n, dtype=int))
    keep = np.flatnonzero(~empty)
    if keep.size == 0:
        return result
    theta0 = np.tile(model.midpoint(), (keep.size, 1))
    if start is not None:
        given = np.asarray(start, dtype=float)[keep]
        theta0 = np.where(np.isfinite(given), given, theta0)
    t = torch.as_tensor(theta0, dtype=model.dtype, device=model.device)
    t = torch.clamp(t, model.lower, model.upper)
    yt = torch.as_tensor(y[keep], dtype=model.dtype, device=model.device)
    if weights == "noise":
        w: torch.Tensor | None = torch.as_tensor(noise_weights(y[keep]), dtype=model.dtype, device=model.device)
    elif weights == "counts":
        w = torch.as_tensor(counting_weights(y[keep]), dtype=model.dtype, device=model.device)
    elif weights == "poisson":
        w = None
    else:
        raise ValueError(f"weights={weights!r}: use 'poisson', 'counts' or 'noise'")
    windows = model.fit_windows(t)
    t = screen_starts(model, yt, t, windows, w, starts, seed)
    inv = InverseSize(model)
    res = levenberg_marquardt(lambda th, aux: model(inv.to_model(th), aux), yt, inv.to_fit(t), inv.lower, inv.upper,
                              aux=windows, weights=w, max_iterations=max_iterations, tol=tol, block=block)
    res.params, res.std = inv.back(res.params, res.std)
    for name in ("params", "std", "rwp", "chi2", "converged", "iterations"):
        getattr(result, name)[keep] = getattr(res, name)
    return result
