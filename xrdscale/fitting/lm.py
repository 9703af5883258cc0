"""A vectorised Levenberg–Marquardt over a batch of pixels, in torch.

Every pixel is its own weighted least-squares problem ``min_θ Σ w (y − f(θ))²`` with Poisson
weights ``w = 1/max(y, 1)`` (intensities in counts; for intensities proportional to counts the
weights are off by the constant, which χ²/dof then carries and the standard errors, scaled by
χ²/dof, do not see). All pixels step together: one batched Jacobian (forward mode,
:func:`torch.func.jacfwd`), one batched solve of ``(JᵀWJ + λ·diag JᵀWJ) δ = JᵀW r`` (Marquardt's
scaling, so parameters of any units are treated alike; solved Jacobi-scaled, in ``sqrt(diag)·δ``)
with a damping λ per pixel: an accepted step divides it by 3, a rejected one multiplies it by 4.

Bounds: each step is clamped into the box (projected LM): θ ← clip(θ + δ, lower, upper); the step
is accepted only when it lowers χ². A pixel converges when the relative change of χ² of a step
is below ``tol`` (an accepted step, or a rejected one that would change χ² by less than that:
the minimum is reached to the noise of the arithmetic), or when the step moves every determined
parameter by at most ``step_tol`` of its standard error (an accepted step); a pixel still moving after
``max_iterations`` is returned as it is with ``converged = False`` — never replaced by
anything else.

Standard errors: ``sqrt(diag (JᵀWJ)⁻¹ · χ²/dof)`` at the result, ``dof = n_points − n_free``.
A parameter the data do not determine (zero column of J, e.g. the lattice of a phase with
scale 0; for a bounded parameter: one whose whole box changes χ² by less than
:data:`UNDETERMINED` of what the most sensitive one's does, :func:`_determined`) gets NaN and does
not count as free. The test is in units of the boxes, not of ``diag JᵀWJ`` itself: a size in nm
has a diagonal ~10⁻¹⁵ of a scale's, and a test on the raw diagonal left it all but frozen.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: A bounded parameter whose box changes χ² by less than this fraction of the most any does is "not determined"
#: (:func:`_determined`); also the floor, relative to the largest diagonal, of an undetermined one's damping.
UNDETERMINED = 1e-10
#: torch's forward-mode AD keeps its dual levels per process, not per thread: Jacobians of threads
#: of one process (Dask's threaded scheduler) take turns.
_FORWARD_AD = threading.Lock()
#: Bounds of the damping.
LAMBDA_MIN, LAMBDA_MAX = 1e-12, 1e12


@dataclass
class LMResult:
    """Per-pixel results of :func:`levenberg_marquardt` (numpy, batch first).

    Attributes
    ----------
    params, std : ndarray (B, P)
        Parameters and their standard errors (NaN: not determined by the data).
    rwp : ndarray (B,)
        ``sqrt(Σ w (y − ŷ)² / Σ w y²)``.
    chi2 : ndarray (B,)
        χ²/dof.
    converged : ndarray (B,) bool
    iterations : ndarray (B,) int
        Steps tried (Jacobians evaluated).
    """

    params: np.ndarray
    std: np.ndarray
    rwp: np.ndarray
    chi2: np.ndarray
    converged: np.ndarray
    iterations: np.ndarray


def poisson_weights(y: torch.Tensor) -> torch.Tensor:
    """``1/max(y, 1)``; zero where ``y`` is not finite."""
    w = 1.0 / torch.clamp(y, min=1.0)
    return torch.where(torch.isfinite(y), w, torch.zeros_like(w))


def weighted_chi2(model: Callable[..., torch.Tensor], y: torch.Tensor, theta: torch.Tensor,
                  aux: list[torch.Tensor], weights: torch.Tensor, *, block: int = 64) -> torch.Tensor:
    """``Σ w (y − model(θ, aux))²`` of every row, ``block`` rows at a time (no gradients).

    ``aux`` are the model's per-row constants, aligned with the rows of ``y`` and ``θ``; NaN
    points of ``y`` count as 0 (their weight should be 0).
    """
    out = []
    yv = torch.nan_to_num(y)
    with torch.no_grad():
        for s in range(0, theta.shape[0], block):
            r = yv[s:s + block] - model(theta[s:s + block], [c[s:s + block] for c in aux])
            out.append((weights[s:s + block] * r * r).sum(dim=1))
    return torch.cat(out) if out else theta.new_zeros(0)


def batched_jacobian(f: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor) -> torch.Tensor:
    """``J[b, i, p] = ∂f(θ)[b, i] / ∂θ[b, p]`` of a function whose pixels are independent, ``(B, npt, P)``.

    One forward-mode pass per parameter, for all pixels at once: the derivative of
    ``f(θ + 1·δ)`` by the shared ``δ`` (P,) is the per-pixel Jacobian because pixel ``b``
    depends on ``θ[b]`` only.
    """
    def shifted(delta: torch.Tensor) -> torch.Tensor:
        return f(theta + delta[None, :])

    zero = torch.zeros(theta.shape[1], dtype=theta.dtype, device=theta.device)
    with _FORWARD_AD, warnings.catch_warnings():
        # torch.func scripts a helper with torch.jit on its first use, which warns that torch.jit is deprecated
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
        return torch.func.jacfwd(shifted)(zero)


def levenberg_marquardt(model: Callable[..., torch.Tensor], y: torch.Tensor, theta0: torch.Tensor,
                        lower: torch.Tensor, upper: torch.Tensor, *,
                        aux: list[torch.Tensor] | None = None,
                        weights: torch.Tensor | None = None, max_iterations: int = 100, tol: float = 1e-6,
                        lam0: float = 1e-3, block: int = 64, step_tol: float = 0.01) -> LMResult:
    """Fit every row of ``y`` with ``model`` from ``theta0`` inside ``[lower, upper]``.

    Parameters
    ----------
    model : callable
        ``model(θ (n, P), aux) -> (n, npt)``, for any subset of the pixels; ``aux`` is the same subset
        of the rows of each tensor of ``aux`` (constants of the model, e.g. its peak windows).
    y : torch.Tensor (B, npt)
        Observed patterns (NaN points carry no weight).
    theta0 : torch.Tensor (B, P)
        Start values (clamped into the box).
    lower, upper : torch.Tensor (P,)
        Box bounds (±inf: unbounded).
    aux : list of torch.Tensor, optional
        Per-pixel constants of the model, batch first.
    weights : torch.Tensor (B, npt), optional
        Default :func:`poisson_weights`.
    max_iterations : int
        Most steps per pixel.
    tol : float
        Relative change of χ² that counts as converged.
    lam0 : float
        Initial damping.
    block : int
        Pixels per Jacobian evaluation (bounds memory).
    step_tol : float
        A pixel also converges when its step moves every determined parameter by at most this
        fraction of its standard error (at the step's start); 0: χ² alone decides.

    Returns
    -------
    LMResult
    """
    b = y.shape[0]
    w = poisson_weights(y) if weights is None else weights
    yv = torch.where(torch.isfinite(y), y, torch.zeros_like(y))
    theta = torch.clamp(theta0, lower, upper)
    span = upper - lower

    consts = list(aux or [])

    def chi2_of(th: torch.Tensor, yy: torch.Tensor, ww: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return weighted_chi2(model, yy, th, [c[rows] for c in consts], ww, block=block)

    def jac_of(th: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        js, fs = [], []
        for s in range(0, th.shape[0], block):
            t = th[s:s + block]
            sub = [c[rows[s:s + block]] for c in consts]

            def f(x: torch.Tensor, sub: list[torch.Tensor] = sub) -> torch.Tensor:
                return model(x, sub)

            js.append(batched_jacobian(f, t))
            with torch.no_grad():
                fs.append(model(t, sub))
        return torch.cat(js), torch.cat(fs)

    every = torch.arange(b, device=y.device)
    n_points = (w > 0).sum(dim=1)
    chi2 = chi2_of(theta, yv, w, every)
    lam = torch.full((b,), lam0, dtype=y.dtype, device=y.device)
    converged = torch.zeros(b, dtype=torch.bool, device=y.device)
    iterations = torch.zeros(b, dtype=torch.long, device=y.device)
    active = torch.isfinite(chi2)
    for _ in range(max_iterations):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        th, yy, ww = theta[idx], yv[idx], w[idx]
        jac, fit = jac_of(th, idx)
        r = yy - fit
        jw = jac * ww[:, :, None]
        a = jw.transpose(1, 2) @ jac                                   # (n, P, P)
        g = (jw * r[:, :, None]).sum(dim=1)                              # (n, P)
        d = torch.diagonal(a, dim1=1, dim2=2)
        determined = _determined(d, span)
        floor = UNDETERMINED * d.amax(dim=1, keepdim=True).clamp(min=1e-300)
        dd = torch.where(determined, d, torch.maximum(d, floor))
        step = _damped_solve(a, g, dd, determined, lam[idx])
        new = torch.clamp(th + step, lower, upper)
        if step_tol > 0:
            sig = _sigma(a, determined, chi2[idx], n_points[idx])
            small = torch.where(determined, (new - th).abs() <= step_tol * sig, torch.ones_like(determined)).all(dim=1)
        else:
            small = torch.zeros_like(determined[:, 0])
        c_old = chi2[idx]
        c_new = chi2_of(new, yy, ww, idx)
        iterations[idx] += 1
        better = torch.isfinite(c_new) & (c_new < c_old)
        rel = (c_old - c_new).abs() / c_old.clamp(min=1e-300)
        done = (rel < tol) | (small & better)
        theta[idx] = torch.where(better[:, None], new, th)
        chi2[idx] = torch.where(better, c_new, c_old)
        lam[idx] = torch.where(better, lam[idx] / 3.0, lam[idx] * 4.0).clamp(LAMBDA_MIN, LAMBDA_MAX)
        stuck = ~better & (lam[idx] >= LAMBDA_MAX)
        converged[idx] = done
        active[idx] = ~(done | stuck)
    std, chi2_red, rwp = _errors(theta, yv, w, lambda th: jac_of(th, every), span)
    return LMResult(params=theta.cpu().numpy(), std=std.cpu().numpy(), rwp=rwp.cpu().numpy(),
                    chi2=chi2_red.cpu().numpy(), converged=converged.cpu().numpy(),
                    iterations=iterations.cpu().numpy())


def _determined(d: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Which parameters the data determine, from ``d = diag JᵀWJ`` (n, P) and the boxes' widths ``span`` (P,).

    A parameter with a finite box is determined when moving it across its box would change χ² by
    more than :data:`UNDETERMINED` of the most any such parameter would (``d·span²``: independent
    of the parameters' units, unlike ``d`` itself, which for a size in nm is ~10⁻¹⁵ of a scale's);
    one with an unbounded box (the linear ones) when its column is not zero.
    """
    finite = torch.isfinite(span)
    if not bool(finite.any()):
        return d > 0
    reach = torch.where(finite, d * torch.where(finite, span, torch.zeros_like(span)) ** 2, torch.zeros_like(d))
    top = reach.amax(dim=1, keepdim=True).clamp(min=1e-300)
    return (d > 0) & torch.where(finite, reach > UNDETERMINED * top, torch.ones_like(finite))


def _sigma(a: torch.Tensor, determined: torch.Tensor, chi2: torch.Tensor, n_points: torch.Tensor) -> torch.Tensor:
    """Standard errors ``sqrt(diag A⁻¹ · χ²/dof)`` of ``A = JᵀWJ`` (n, P, P); inf where not determined."""
    p = a.shape[1]
    d = torch.diagonal(a, dim1=1, dim2=2)
    sc = torch.where(determined, d.sqrt(), torch.ones_like(d))
    an = a / (sc[:, :, None] * sc[:, None, :])
    mask = determined[:, :, None] & determined[:, None, :]
    eye = torch.eye(p, dtype=a.dtype, device=a.device).expand_as(an)
    an = torch.where(mask, an, eye)
    inv, info = torch.linalg.inv_ex(an)
    bad = info != 0
    if bool(bad.any()):
        inv[bad] = torch.linalg.pinv(an[bad], hermitian=True, rtol=1e-12)
    dof = (n_points - determined.sum(dim=1)).clamp(min=1).to(a.dtype)
    var = torch.diagonal(inv, dim1=1, dim2=2) / sc**2 * (chi2 / dof)[:, None]
    return torch.where(determined, var.clamp(min=0).sqrt(), torch.full_like(var, math.inf))


def _damped_solve(a: torch.Tensor, g: torch.Tensor, dd: torch.Tensor, determined: torch.Tensor,
                  lam: torch.Tensor) -> torch.Tensor:
    """δ of ``(A + λ·diag(dd)) δ = g`` for each pixel (pseudo-inverse where singular).

    ``dd`` is diag A floored; an undetermined column (diag A below the floor) also gets the floor
    undamped, so the system stays regular and such a parameter barely moves.
    """
    m = a + torch.diag_embed(lam[:, None] * dd + torch.where(determined, torch.zeros_like(dd), dd))
    # Jacobi scaling: solve for s·δ with s = sqrt(diag m), so that columns of any units are alike
    s = torch.sqrt(torch.diagonal(m, dim1=1, dim2=2)).clamp(min=1e-300)
    ms = m / (s[:, :, None] * s[:, None, :])
    gs = g / s
    sol, info = torch.linalg.solve_ex(ms, gs[:, :, None])
    bad = info != 0
    if bool(bad.any()):
        sol[bad] = torch.linalg.pinv(ms[bad]) @ gs[bad][:, :, None]
    return sol[:, :, 0] / s


def _errors(theta: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
            jac_of: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], span: torch.Tensor,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard errors, χ²/dof and Rwp at θ."""
    b, p = theta.shape
    if b == 0:
        z = theta.new_zeros(0)
        return theta.new_zeros((0, p)), z, z
    jac, fit = jac_of(theta)
    r = y - fit
    chi2 = (w * r * r).sum(dim=1)
    jw = jac * w[:, :, None]
    a = jw.transpose(1, 2) @ jac
    d = torch.diagonal(a, dim1=1, dim2=2)
    determined = _determined(d, span)
    s = torch.where(determined, d.sqrt(), torch.ones_like(d))
    an = a / (s[:, :, None] * s[:, None, :])
    mask = determined[:, :, None] & determined[:, None, :]
    eye = torch.eye(p, dtype=a.dtype, device=a.device).expand_as(an)
    an = torch.where(mask, an, eye)
    cov = torch.linalg.pinv(an, hermitian=True, rtol=1e-12) / (s[:, :, None] * s[:, None, :])
    n_points = (w > 0).sum(dim=1)
    dof = (n_points - determined.sum(dim=1)).clamp(min=1).to(theta.dtype)
    chi2_red = chi2 / dof
    var = torch.diagonal(cov, dim1=1, dim2=2) * chi2_red[:, None]
    std = torch.where(determined, var.clamp(min=0).sqrt(), torch.full_like(var, float("nan")))
    rwp = torch.sqrt(chi2 / (w * y * y).sum(dim=1).clamp(min=1e-300))
    return std, chi2_red, rwp
