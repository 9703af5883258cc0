"""Phase retrieval of one Bragg CDI pattern: ER, HIO and RAAR with shrink-wrap, random starts as one batch.

The far field and its sign conventions are those of :mod:`xrdscale.cdi.fourier`. The
measured amplitude is ``A = √D``; the constraints are the two projections

- modulus, ``P_M``: ``F ← A · F / |F|`` on the measured voxels, ``F`` kept where the
  detector mask says a voxel is not measured (gaps, bad pixels); a measured zero is a
  constraint (``A = 0`` sets ``F`` to 0);
- support, ``P_S``: ``ρ ← ρ`` inside the support ``S``, 0 outside; with ``positivity`` the
  real part inside ``S`` is also clipped to ≥ 0 (``P_C`` below is this combined projection).

With ``y = P_M ρ_n`` the iterations are

- ER (error reduction): ``ρ_{n+1} = P_C y``;
- HIO (hybrid input-output, Fienup): ``ρ_{n+1} = y`` where ``y`` satisfies the support
  (and positivity) constraints, ``ρ_n − β y`` where it violates them;
- RAAR (relaxed averaged alternating reflections, Luke):
  ``ρ_{n+1} = [β/2 (R_C R_M + I) + (1 − β) P_M] ρ_n = β (P_C(2y − ρ_n) + ρ_n) + (1 − 2β) y``,
  with reflections ``R = 2P − I``; without positivity it is ``y`` inside ``S`` and
  ``β ρ_n + (1 − 2β) y`` outside.

The last ``final_er`` iterations are ER. After :data:`TWIN_BREAK_AT` iterations a random
start is cut to one quadrant (below the centre along axes 0 and 1): a centro-symmetric
support (a hexagonal prism, a box) otherwise lets a start stagnate in a superposition of the
object and its twin. Every ``shrinkwrap_every`` iterations the support
is updated (shrink-wrap): ``S = G_σ * |ρ| > support_threshold · max(G_σ * |ρ|)``, ``G_σ`` a
Gaussian whose ``σ`` goes linearly from ``sigma_start`` to ``sigma_end`` over the iterations.
The first support is the user's, or the autocorrelation of the object (the inverse
transform of the intensity) thresholded and scaled about the centre by ``support_size``
(the autocorrelation is twice as wide as the object), or, starting from ``init``, the
shrink-wrap of ``|init|``.

Several random starts of a pattern run as one batched tensor ``(starts, Z, Y, X)`` on the
device (CUDA when it works, see :func:`xrdscale.runtime.devices.resolve_device`). Start
``k`` is seeded from ``(config.seed, k)`` alone, so it gives the same result whatever batch
it runs in (bit for bit on the CPU; on CUDA to float32 rounding, as cuFFT may choose other
kernels for another batch size): :func:`retrieve` runs any subset of starts (a Dask task may run a few),
:func:`select` picks the best (or averages the best few) of all of them, and
:func:`phase_retrieval` is both in one call.

Internally the iterate is kept ``ifftshift``-ed (origin at index 0), so each transform is a
plain ``fftn``; every step is either pointwise or shift invariant, so this changes nothing
but speed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from xrdscale.cdi import fourier, post
from xrdscale.exceptions import InputError
from xrdscale.runtime.devices import resolve_device
from xrdscale.stages.cdi import CdiConfig

logger = logging.getLogger(__name__)

DIMS = fourier.DIMS
#: χ² of every start is recorded every this many iterations (its ``history``)
HISTORY_EVERY = 10
#: the first support keeps the autocorrelation above this fraction of its maximum (before scaling)
AUTOCORRELATION_THRESHOLD = 0.02
#: standard deviation (rad) of the per-voxel random phase added to ``init`` for starts other than 0
INIT_PHASE_JITTER = 0.5
#: after this many iterations the iterate is cut to one quadrant (twin breaking); None: never
TWIN_BREAK_AT: int | None = 2


@dataclass
class StartResult:
    """The result of one random start.

    Attributes
    ----------
    obj : numpy.ndarray
        complex64 (Z, Y, X), the support-projected object after the last iteration.
    support : numpy.ndarray
        bool (Z, Y, X), the last shrink-wrap support.
    chi2 : float
        Eq. 1 of ``obj`` (:func:`xrdscale.cdi.fourier.chi2`).
    index : int
        The start's index (its random seed is ``(config.seed, index)``).
    history : numpy.ndarray
        χ² of the iterate every :data:`HISTORY_EVERY` iterations.
    device : str
        Where it ran.
    seconds : float
        Its share of the wall time of its batch.
    intensity, mask : numpy.ndarray or None
        The pattern it was phased against (one array shared by all starts of a batch), so
        that :func:`select` can compute χ² of an average.
    """

    obj: np.ndarray
    support: np.ndarray
    chi2: float
    index: int
    history: np.ndarray
    device: str = "cpu"
    seconds: float = 0.0
    intensity: np.ndarray | None = field(default=None, repr=False, compare=False)
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass
class PhasingResult:
    """The reconstruction of one pattern.

    Attributes
    ----------
    obj : numpy.ndarray
        complex64 (Z, Y, X): the best start, or the average of the ``average`` best (after
        twin resolution, sub-voxel registration and global-phase and phase-ramp alignment to
        the best); rolled by whole voxels so that its amplitude's centre of mass is at the
        array centre.
    support : numpy.ndarray
        bool (Z, Y, X), the best start's support (rolled with ``obj``).
    chi2 : float
        Eq. 1 of ``obj``.
    chi2_starts : numpy.ndarray
        χ² of every start, in start order.
    best_start : int
        Index of the best start.
    history : numpy.ndarray
        χ² of the best start every :data:`HISTORY_EVERY` iterations.
    spread : float or None
        RMS phase spread (rad) of the averaged starts about their average, amplitude
        weighted, inside the support; None when ``average`` is 1.
    device : str
        Where the starts ran.
    seconds : float
        Wall time of the starts, all batches together.
    """

    obj: np.ndarray
    support: np.ndarray
    chi2: float
    chi2_starts: np.ndarray
    best_start: int
    history: np.ndarray
    spread: float | None
    device: str
    seconds: float
    starts: list[int] = field(default_factory=list)


# --- validation -------------------------------------------------------------------------------------------


def _intensity(intensity: Any) -> np.ndarray:
    arr = np.asarray(intensity)
    if arr.ndim != 3:
        raise InputError(f"the diffraction intensity must be a 3D array (Z, Y, X); got shape {arr.shape} "
                         f"({arr.ndim}D): pass one pattern (a rocking scan stacked into a cube)")
    if np.iscomplexobj(arr) or not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"the diffraction intensity must be real numbers; got dtype {arr.dtype}")
    if min(arr.shape) < 4:
        raise InputError(f"the diffraction intensity {arr.shape} is too small to phase; every side needs ≥ 4 voxels")
    arr = arr.astype(np.float32, copy=False)
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:
        raise InputError(f"the diffraction intensity has {bad} NaN or infinite voxel(s); mask them instead "
                         f"(mask=True there) and set them to 0")
    negative = int(np.count_nonzero(arr < 0))
    if negative:
        raise InputError(f"the diffraction intensity has {negative} negative voxel(s) (minimum {arr.min():g}); "
                         f"subtract the background with a floor at 0, or mask those voxels")
    if not np.any(arr > 0):
        raise InputError("the diffraction intensity is zero everywhere; there is nothing to phase")
    return arr


def _mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.shape != shape:
        raise InputError(f"the detector mask has shape {m.shape} but the intensity has shape {shape}; "
                         f"pass a boolean mask of the intensity's shape (True = not measured)")
    m = m.astype(bool)
    if m.all():
        raise InputError("the detector mask masks every voxel; True marks voxels that are NOT measured")
    return m if m.any() else None


def _user_support(support: Any, shape: tuple[int, ...]) -> np.ndarray:
    s = np.asarray(support)
    if s.shape != shape:
        raise InputError(f"the support has shape {s.shape} but the intensity has shape {shape}; "
                         f"pass a boolean support of the intensity's shape (or none: it is found from the data)")
    s = s.astype(bool)
    if not s.any():
        raise InputError("the support is empty; pass a support with the object's voxels True")
    return s


def _init(init: Any, shape: tuple[int, ...]) -> np.ndarray:
    x = np.asarray(init)
    if x.shape != shape:
        raise InputError(f"the initial object has shape {x.shape} but the intensity has shape {shape}; "
                         f"pass a complex object of the intensity's shape")
    x = x.astype(np.complex64)
    if not np.all(np.isfinite(x)):
        raise InputError("the initial object has NaN or infinite values")
    if not np.any(x != 0):
        raise InputError("the initial object is zero everywhere")
    return x


def _indices(start_indices: Sequence[int] | None, cfg: CdiConfig) -> list[int]:
    if start_indices is None:
        return list(range(cfg.starts))
    idx = [int(i) for i in start_indices]
    if not idx:
        raise InputError("start_indices is empty; pass at least one start index (or none: all starts)")
    if any(i < 0 for i in idx):
        raise InputError(f"start_indices {idx} has a negative index; start indices are ≥ 0")
    if len(set(idx)) != len(idx):
        raise InputError(f"start_indices {idx} repeats an index; each start runs once")
    return idx


# --- supports and starts (numpy, centred arrays) ----------------------------------------------------------


def smooth(amplitude: np.ndarray, sigma: float) -> np.ndarray:
    """``amplitude`` convolved (circularly) with a unit-sum Gaussian of ``sigma`` voxels."""
    a = np.asarray(amplitude, dtype=np.float64)
    kernel = np.ones(a.shape[:-1] + (a.shape[-1] // 2 + 1,))
    for axis, n in enumerate(a.shape):
        f = np.fft.rfftfreq(n) if axis == a.ndim - 1 else np.fft.fftfreq(n)
        view = [1] * a.ndim
        view[axis] = f.size
        kernel = kernel * np.exp(-2 * (np.pi * sigma * f) ** 2).reshape(view)
    return np.fft.irfftn(np.fft.rfftn(a) * kernel, s=a.shape, axes=tuple(range(a.ndim)))


def shrinkwrap(amplitude: np.ndarray, sigma: float, threshold: float) -> np.ndarray:
    """The shrink-wrap support of an amplitude: ``G_σ * |ρ| > threshold · max(G_σ * |ρ|)``."""
    s = smooth(np.abs(amplitude), sigma)
    return np.asarray(s > threshold * s.max())


def autocorrelation_support(intensity: np.ndarray, size: float,
                            threshold: float = AUTOCORRELATION_THRESHOLD) -> np.ndarray:
    """The first support: the autocorrelation's extent (``> threshold · max``) scaled about the centre by ``size``.

    The autocorrelation ``|backward(I)|`` of an object of support ``S`` is supported on the
    difference set ``S − S`` (``2S`` for a centro-symmetric convex ``S``), centred at the
    array centre; ``size = 0.5`` therefore gives about the object's extent.
    """
    ac = np.abs(fourier.backward_np(np.asarray(intensity, dtype=np.float64)))
    region = ac > threshold * ac.max()
    centre = np.array([n // 2 for n in region.shape], dtype=float)
    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in region.shape], indexing="ij")
    index = []
    for axis, g in enumerate(grids):
        src = np.rint(centre[axis] + (g - centre[axis]) / size).astype(np.int64)
        index.append(src)
    inside = np.ones(region.shape, dtype=bool)
    for axis, src in enumerate(index):
        inside &= (src >= 0) & (src < region.shape[axis])
        np.clip(src, 0, region.shape[axis] - 1, out=src)
    support = region[tuple(index)] & inside
    if not support.any():
        support[tuple(int(c) for c in centre)] = True
    return np.asarray(support)


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, index]))


def random_start(amplitude: np.ndarray, support: np.ndarray, seed: int, index: int) -> np.ndarray:
    """Start ``index``: the measured amplitude with random phases, transformed back and cut to the support."""
    phase = _rng(seed, index).uniform(-np.pi, np.pi, size=amplitude.shape)
    x = fourier.backward_np((amplitude * np.exp(1j * phase)).astype(np.complex64))
    return (x * support).astype(np.complex64)


def init_start(init: np.ndarray, seed: int, index: int) -> np.ndarray:
    """Start ``index`` from ``init``: exactly ``init`` for start 0, else ``init`` with random phase jitter."""
    if index == 0:
        return init.astype(np.complex64)
    jitter = _rng(seed, index).normal(0.0, INIT_PHASE_JITTER, size=init.shape)
    return (init * np.exp(1j * jitter)).astype(np.complex64)


# --- projections and updates (torch, batched) -------------------------------------------------------------


def modulus(f: torch.Tensor) -> torch.Tensor:
    """``|f|`` of a complex tensor (the Euclidean norm of its real and imaginary parts: faster than ``abs``)."""
    return torch.linalg.vector_norm(torch.view_as_real(f), dim=-1)


def project_modulus(f: torch.Tensor, amplitude: torch.Tensor, measured: torch.Tensor | None,
                    mod: torch.Tensor | None = None, *, inplace: bool = False) -> torch.Tensor:
    """``P_M`` in Fourier space: ``A · F / |F|`` on measured voxels, ``F`` unchanged on the others.

    Parameters
    ----------
    f : torch.Tensor
        The model's far field(s), (..., Z, Y, X) complex.
    amplitude : torch.Tensor
        The measured amplitude ``√D`` (0 where no photon was counted: ``F`` is set to 0 there).
    measured : torch.Tensor or None
        Boolean, True where the voxel is measured; None: all are.
    mod : torch.Tensor, optional
        ``|f|`` when already known (overwritten when ``inplace``).
    inplace : bool
        Overwrite ``f`` (and ``mod``) instead of allocating new tensors.

    Notes
    -----
    A voxel where the model is exactly 0 stays 0 (its phase is undefined) until the next
    iteration moves it.
    """
    if mod is None:
        mod = modulus(f)
    elif not inplace:
        mod = mod.clone()
    ratio = mod.clamp_min_(torch.finfo(mod.dtype).tiny).reciprocal_().mul_(amplitude)
    if measured is not None:
        ratio = ratio.masked_fill_(~measured, 1.0)
    return f.mul_(ratio) if inplace else f * ratio


def project_support(x: torch.Tensor, support: torch.Tensor, positivity: bool = False) -> torch.Tensor:
    """``P_C``: zero outside the support; with ``positivity`` the real part inside is clipped to ≥ 0."""
    if positivity:
        x = torch.complex(x.real.clamp_min(0), x.imag)
    return x * support


def update(x: torch.Tensor, y: torch.Tensor, support: torch.Tensor, algorithm: str, beta: float,
           positivity: bool = False) -> torch.Tensor:
    """One ER, HIO or RAAR update of the iterate ``x`` from its modulus projection ``y`` (see the module doc)."""
    if algorithm == "er":
        return project_support(y, support, positivity)
    if algorithm == "hio":
        out = torch.where(support, y, torch.sub(x, y, alpha=beta))
        if positivity:
            violated = support & (y.real < 0)
            out = torch.where(violated, torch.complex(x.real - beta * y.real, y.imag), out)
        return out
    if algorithm == "raar":
        if not positivity:  # the same formula, simplified: y inside S, β x + (1 − 2β) y outside
            return torch.where(support, y, torch.add(x * beta, y, alpha=1 - 2 * beta))
        return beta * (project_support(2 * y - x, support, positivity) + x) + (1 - 2 * beta) * y
    raise InputError(f"unknown phase-retrieval algorithm {algorithm!r}; expected hio, raar or er")


def linear_weights(support: torch.Tensor, algorithm: str, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Real weights ``(a, b)`` with ``update(x, y) = a · y + b · x`` for ER, HIO and RAAR without positivity.

    ER: ``a = S``, ``b = 0``; HIO: ``a = 1`` in ``S`` and ``−β`` outside, ``b = 1 − S``; RAAR:
    ``a = 1`` in ``S`` and ``1 − 2β`` outside, ``b = β (1 − S)``. The iterations use this form
    (two passes over the arrays instead of four).
    """
    inside = support.to(torch.float32)
    outside = 1 - inside
    if algorithm == "er":
        return inside, torch.zeros((), dtype=torch.float32, device=support.device)
    if algorithm == "hio":
        return inside - beta * outside, outside
    if algorithm == "raar":
        return inside + (1 - 2 * beta) * outside, beta * outside
    raise InputError(f"unknown phase-retrieval algorithm {algorithm!r}; expected hio, raar or er")


def _gaussian_kernel(shape: tuple[int, ...], sigma: float, device: str) -> torch.Tensor:
    kernel = torch.ones((), dtype=torch.float32, device=device)
    for axis, n in enumerate(shape):
        last = axis == len(shape) - 1
        f = torch.fft.rfftfreq(n, device=device) if last else torch.fft.fftfreq(n, device=device)
        view = [1] * len(shape)
        view[axis] = f.numel()
        kernel = kernel * torch.exp(-2 * (math.pi * sigma * f) ** 2).reshape(view)
    return kernel


def _shrinkwrap(x: torch.Tensor, support: torch.Tensor, sigma: float, threshold: float) -> torch.Tensor:
    amp = (x * support).abs()
    shape = tuple(amp.shape[-3:])
    smoothed = torch.fft.irfftn(torch.fft.rfftn(amp, dim=DIMS) * _gaussian_kernel(shape, sigma, str(amp.device)),
                                s=shape, dim=DIMS)
    peak = smoothed.amax(dim=DIMS, keepdim=True)
    return smoothed > threshold * peak


def _chi2_of(mod: torch.Tensor, amplitude: torch.Tensor, measured: torch.Tensor | None) -> torch.Tensor:
    err = (amplitude - mod) ** 2
    power = mod ** 2
    if measured is not None:
        err = err * measured
        power = power * measured
    return err.sum(dim=DIMS, dtype=torch.float64) / power.sum(dim=DIMS, dtype=torch.float64).clamp_min(1e-300)


def _schedule(cfg: CdiConfig) -> list[str]:
    main = cfg.iterations - cfg.final_er
    return [cfg.algorithm] * main + ["er"] * cfg.final_er


def _quadrant(shape: tuple[int, ...], device: str) -> torch.Tensor:
    """The ifftshift-ed indicator of the quadrant below the centre along axes 0 and 1 (all of axis 2)."""
    keep = np.zeros(shape, dtype=bool)
    keep[: shape[0] // 2 + 1, : shape[1] // 2 + 1, :] = True
    return torch.from_numpy(np.ascontiguousarray(np.fft.ifftshift(keep))).to(device)


def _interleaved(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A real weight broadcast to ``torch.view_as_real(like)``'s shape, contiguous."""
    return w.unsqueeze(-1).expand(*like.shape, 2).contiguous()


def _iterate(x: torch.Tensor, amplitude: torch.Tensor, measured: torch.Tensor | None, support: torch.Tensor,
             cfg: CdiConfig, shrink: bool, twin_break: bool = True) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Run every iteration on the (ifftshift-ed) batch; return the object, the supports and the χ² history."""
    schedule = _schedule(cfg)
    n = len(schedule)
    history: list[torch.Tensor] = []
    tiny = torch.finfo(amplitude.dtype).tiny
    unmeasured = None if measured is None else ~measured
    weights: tuple[torch.Tensor, torch.Tensor] | None = None
    current = ""
    for it, algorithm in enumerate(schedule):
        f = torch.fft.fftn(x, dim=DIMS, norm="ortho")
        parts = torch.view_as_real(f)
        power = torch.addcmul(parts[..., 0] * parts[..., 0], parts[..., 1], parts[..., 1])  # |F|²
        if it % HISTORY_EVERY == 0:
            history.append(_chi2_of(power.sqrt(), amplitude, measured))
        ratio = power.clamp_min_(tiny).rsqrt_().mul_(amplitude)  # A / |F|: the modulus projection
        if unmeasured is not None:
            ratio.masked_fill_(unmeasured, 1.0)
        y = torch.fft.ifftn(f.mul_(ratio), dim=DIMS, norm="ortho")
        del f, parts, power, ratio
        if cfg.positivity:
            x = update(x, y, support, algorithm, cfg.beta, positivity=True)
        else:
            if weights is None or algorithm != current:
                weights, current = linear_weights(support, algorithm, cfg.beta), algorithm
                # on the real view (re, im interleaved): contiguous weights make both passes plain real loops
                weights = (_interleaved(weights[0], x), _interleaved(weights[1], x))
            a, b = weights
            out = torch.view_as_real(y).mul_(a)
            if algorithm != "er":
                out.addcmul_(torch.view_as_real(x), b)
            x = y
        del y
        if TWIN_BREAK_AT is not None and it + 1 == TWIN_BREAK_AT and it + 1 < n and twin_break:
            x = x * _quadrant(tuple(x.shape[-3:]), str(x.device))
        if shrink and (it + 1) % cfg.shrinkwrap_every == 0 and it + 1 < n:
            frac = it / max(n - 1, 1)
            sigma = cfg.sigma_start + (cfg.sigma_end - cfg.sigma_start) * frac
            support = _shrinkwrap(x, support, sigma, cfg.support_threshold)
            weights = None
    x = x * support
    hist = torch.stack(history, dim=-1).cpu().numpy() if history else np.zeros((x.shape[0], 0))
    return x, support, hist


# --- the public API -----------------------------------------------------------------------------------------


def retrieve(intensity: np.ndarray, *, mask: np.ndarray | None = None, config: CdiConfig | None = None,
             init: np.ndarray | None = None, support: np.ndarray | None = None,
             start_indices: Sequence[int] | None = None, **settings: Any) -> list[StartResult]:
    """Run random starts of phase retrieval of one pattern as one batch on the device.

    Parameters
    ----------
    intensity : numpy.ndarray
        Measured intensity (Z, Y, X), ≥ 0, Bragg peak at the array centre (see
        :mod:`xrdscale.cdi.fourier`).
    mask : numpy.ndarray of bool, optional
        True where a voxel is *not* measured (detector gaps, bad or hot pixels): those voxels
        are not constrained (the model keeps its value there) and left out of χ².
    config : CdiConfig, optional
        The settings (algorithm, iterations, final_er, beta, support_*, sigma_*,
        shrinkwrap_every, positivity, seed, device); ``settings`` override single fields.
    init : numpy.ndarray, optional
        A complex starting object of the data's shape (e.g. the CNN's prediction): start 0
        uses it exactly, the other starts with a random phase jitter of
        :data:`INIT_PHASE_JITTER` rad (per voxel).
    support : numpy.ndarray of bool, optional
        The first support (default: from the autocorrelation, or from ``|init|``).
    start_indices : sequence of int, optional
        The starts to run (default ``range(config.starts)``); start ``k`` is seeded from
        ``(config.seed, k)`` and gives the same result in any batch.
    **settings
        Fields of :class:`~xrdscale.stages.cdi.CdiConfig`.

    Returns
    -------
    list of StartResult
        One per start, in the order of ``start_indices``.

    Raises
    ------
    InputError
        The intensity is not 3D, has NaN/infinite or negative values or is all zero; the
        mask, support or init has another shape than the intensity; bad start indices.
    ConfigError
        An invalid setting.
    """
    cfg = CdiConfig.build(config, **settings)
    data = _intensity(intensity)
    shape = data.shape
    masked = _mask(mask, shape)
    start = _init(init, shape) if init is not None else None
    indices = _indices(start_indices, cfg)
    amplitude = np.sqrt(data if masked is None else np.where(masked, 0, data))  # masked values never matter
    if support is not None:
        first = _user_support(support, shape)
    elif start is not None:
        first = shrinkwrap(np.abs(start), cfg.sigma_start, cfg.support_threshold)
    else:
        first = autocorrelation_support(amplitude ** 2, cfg.support_size)
    device = resolve_device(cfg.device, what="CDI phase retrieval")
    t0 = time.perf_counter()
    if start is not None:
        x0 = np.stack([init_start(start, cfg.seed, k) for k in indices])
    else:
        x0 = np.stack([random_start(amplitude, first, cfg.seed, k) for k in indices])
    unshift = np.fft.ifftshift
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(unshift(x0, axes=DIMS))).to(device)
        amp = torch.from_numpy(np.ascontiguousarray(unshift(amplitude))).to(device)
        meas = None if masked is None else torch.from_numpy(np.ascontiguousarray(unshift(~masked))).to(device)
        sup = torch.from_numpy(np.ascontiguousarray(unshift(first))).to(device).expand(len(indices), *shape)
        x, sup, history = _iterate(x, amp, meas, sup.contiguous(), cfg, shrink=True, twin_break=start is None)
        chi = _chi2_of(modulus(torch.fft.fftn(x, dim=DIMS, norm="ortho")), amp, meas).cpu().numpy()
        objs = np.fft.fftshift(x.cpu().numpy(), axes=DIMS).astype(np.complex64)
        sups = np.fft.fftshift(sup.cpu().numpy(), axes=DIMS)
    seconds = time.perf_counter() - t0
    logger.debug("CDI starts %s: %d iterations on %s in %.1f s, χ² %s", indices, cfg.iterations, device, seconds,
                 np.array2string(chi, precision=4))
    share = seconds / len(indices)
    return [StartResult(obj=objs[i], support=sups[i].astype(bool), chi2=float(chi[i]), index=k,
                        history=history[i].astype(np.float64), device=device, seconds=share, intensity=data,
                        mask=masked)
            for i, k in enumerate(indices)]


def select(results: Sequence[StartResult], *, config: CdiConfig | None = None, intensity: np.ndarray | None = None,
           mask: np.ndarray | None = None, **settings: Any) -> PhasingResult:
    """The best start by χ², or the average of the ``config.average`` best.

    Averaged starts are first aligned to the best: twin resolved
    (:func:`xrdscale.cdi.post.resolve_twin`), sub-voxel registered
    (:func:`~xrdscale.cdi.post.register`) and their global phase relative to the best
    removed: the ambiguities that leave the far-field modulus unchanged (a phase ramp is not
    one, so it is left alone). ``spread`` is the RMS of the phase differences to the average,
    weighted by amplitude, inside the best start's support. The result is rolled by whole
    voxels so that its amplitude's centre of mass is at the array centre (χ² is unchanged).

    Parameters
    ----------
    results : sequence of StartResult
        All starts of one pattern (from one or several :func:`retrieve` calls).
    config : CdiConfig, optional
        Only ``average`` (and ``starts``/``iterations`` for the log line) are used.
    intensity, mask : numpy.ndarray, optional
        The pattern and its mask, for χ² of an average (``average`` > 1); default: the ones
        the results carry.
    **settings
        Fields of :class:`~xrdscale.stages.cdi.CdiConfig`.

    Returns
    -------
    PhasingResult

    Raises
    ------
    InputError
        No results, repeated start indices, more starts to average than results, or an
        average without the intensity.
    """
    cfg = CdiConfig.build(config, **settings)
    if not results:
        raise InputError("select: no start results; run retrieve() first")
    ordered = sorted(results, key=lambda r: r.index)
    idx = [r.index for r in ordered]
    if len(set(idx)) != len(idx):
        raise InputError(f"select: the results repeat start indices ({idx}); pass each start once")
    chis = np.array([r.chi2 for r in ordered], dtype=np.float64)
    order = np.argsort(chis, kind="stable")
    best = ordered[int(order[0])]
    k = cfg.average
    if k > len(ordered):
        raise InputError(f"select: cannot average the {k} best starts of {len(ordered)} result(s); "
                         f"set average ≤ {len(ordered)}")
    obj, spread = best.obj, None
    chi = best.chi2
    if k > 1:
        if intensity is None:
            intensity, mask = best.intensity, best.mask
        if intensity is None:
            raise InputError("select: averaging starts needs the intensity (intensity=...) for the average's χ²")
        aligned = [best.obj.astype(np.complex128)]
        for j in order[1:k]:
            other = ordered[int(j)].obj
            o, _ = post.resolve_twin(other, best.obj)
            o, _ = post.register(o, best.obj)
            o = post.zero_mean_phase(o, best.support, reference=best.obj)
            aligned.append(o.astype(np.complex128))
        stack = np.stack(aligned)
        mean = stack.mean(axis=0)
        z = (stack * np.conj(mean))[:, best.support]
        weight = np.abs(z)
        spread = float(np.sqrt(np.sum(weight * np.angle(z) ** 2) / max(float(weight.sum()), 1e-300)))
        obj = mean.astype(np.complex64)
        chi = float(fourier.chi2(_intensity(intensity), obj, _mask(mask, obj.shape)))
    roll = post.centring_roll(obj, best.support)
    obj = np.roll(obj, roll, axis=(0, 1, 2))
    sup = np.roll(best.support, roll, axis=(0, 1, 2))
    seconds = float(sum(r.seconds for r in ordered))
    device = best.device
    logger.info("CDI phase retrieval: %d start(s) × %d iterations on %s in %.1f s; best χ² %.4g (start %d)%s",
                len(ordered), cfg.iterations, device, seconds, chi, best.index,
                f", average of {k} (phase spread {spread:.3f} rad)" if spread is not None else "")
    return PhasingResult(obj=obj.astype(np.complex64), support=sup.astype(bool), chi2=float(chi), chi2_starts=chis,
                         best_start=best.index, history=best.history, spread=spread, device=device,
                         seconds=seconds, starts=idx)


def phase_retrieval(intensity: np.ndarray, *, mask: np.ndarray | None = None, config: CdiConfig | None = None,
                    init: np.ndarray | None = None, support: np.ndarray | None = None,
                    **settings: Any) -> PhasingResult:
    """Phase retrieval of one pattern: :func:`retrieve` of all starts as one batch, then :func:`select`.

    Parameters and errors are those of :func:`retrieve` and :func:`select`.

    Examples
    --------
    >>> import numpy as np
    >>> from xrdscale.cdi.fourier import forward_np
    >>> obj = np.zeros((16, 16, 16), np.complex64); obj[6:10, 5:11, 6:11] = np.exp(0.3j)
    >>> res = phase_retrieval(np.abs(forward_np(obj)) ** 2, iterations=200, final_er=50, starts=2, device="cpu")
    >>> res.chi2 < 1e-2, res.obj.shape, len(res.chi2_starts)
    (True, (16, 16, 16), 2)
    """
    cfg = CdiConfig.build(config, **settings)
    results = retrieve(intensity, mask=mask, config=cfg, init=init, support=support)
    return select(results, config=cfg, intensity=intensity, mask=mask)
