"""Which PQ-Net outputs a library's data can determine: Cramér–Rao bounds of its own noise model.

A training library (:mod:`xrdscale.pqnet.library`) draws every pattern from a phase
library: each phase's ``scale`` (0 with probability ``absent``), its ranged ``a``, ``c`` and
``size_nm``, a peak phase's position ``q`` and width ``fwhm``, a Chebyshev background and
the total counts ``C`` of the Poisson noise (log-uniform in ``noise.counts``). The
noise-free pattern ``μ`` (absolute units, background included) is scaled to ``C`` counts
(``f = C / Σμ``), drawn and scaled back, so the counts of bin ``i`` are Poisson with mean
``λ_i = f μ_i``.

The Fisher information of those counts about all generating parameters θ of the pattern is

    F = J_λᵀ diag(1/λ) J_λ = f · Jᵀ diag(1/μ) J,     J = ∂μ/∂θ (absolute units),

with ``f`` held at its value for the pattern: ``C`` is unknown to an estimator, but the
scaled-back pattern has mean ``μ`` and variance ``μ/f`` whatever ``C`` is, so ``C`` enters
only the variance and the information about θ from the mean is ``F`` (the variance carries
O(1) information against O(C) in ``F``). ``J`` is analytic for the scales and the background
coefficients (these are free nuisance parameters in absolute units, as an unknown smooth
background is to a real estimator) and a central finite difference of
:func:`~xrdscale.physics.pattern.simulate_patterns` for ``a``, ``c``, ``size_nm`` and a peak's
``q`` and ``fwhm`` (nuisance parameters too). The parameters of an absent phase
(``scale`` 0) other than its scale do not change the pattern: they are left out of ``F``,
and those patterns are left out of that phase's lattice/size outputs, as
:func:`xrdscale.pqnet.train.evaluate` leaves them out of the network's metrics.

The Cramér–Rao variance of output ``k`` is ``(F⁻¹)_kk``; an unbiased estimator can do no
better. Over ``N`` held-out patterns, per output,

- ``r2_bound = 1 − mean(v) / var(target)`` and
- ``mae_bound = mean(sqrt(2/π) · sqrt(v))`` (the MAE of an unbiased Gaussian estimator),

with ``v = min(CRB, var(target))``: where the data say less than the prior range, predicting
the middle of the range does better than any unbiased estimator, so the per-pattern variance
is capped there (the fraction capped is ``crb_capped``; the uncapped value, strict for
unbiased estimators and possibly negative, is kept as ``r2_crb``). For weakly determined outputs the
bound is therefore an estimate, not a strict limit: a biased estimator (a network trained
on the prior) can beat the CRB a little.

The held-out patterns are the library's own: every block of a library is drawn from
``numpy.random.default_rng([seed, block])``, so the generating parameters (the nuisance
ones included, which the store does not hold) are replayed exactly; the stored labels
must match and the stored patterns must be Poisson draws around the replayed ``μ``
(``replay_chi2`` ≈ 1). Where the replay cannot be done (a store without its seed, or
made by another version of the pattern model) the bound is computed on fresh patterns
drawn from the same phase library, with a warning.

:func:`bounds_table` gives the table of a registry entry (achieved and best R² and MAE,
accepted, weakly determined) for reports and the command line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from xrdscale.physics.crystal import AmorphousPeak
from xrdscale.physics.pattern import simulate_patterns
from xrdscale.physics.phaselib import PhaseLibrary

logger = logging.getLogger(__name__)

#: R² an output must reach where its bound allows it.
TARGET_R2 = 0.98
#: Where the bound is below TARGET_R2, an output is accepted within this much of its bound.
BOUND_SLACK = 0.05
#: Outputs whose best achievable R² is below this are weakly determined by the data.
WEAK_R2 = 0.9
#: Eigenvalues of the (Jacobi-normalised) Fisher matrix below RCOND × the largest count as singular.
RCOND = 1e-10
#: Patterns per Jacobian evaluation (bounds memory: CHUNK × npt × parameters floats).
CHUNK = 64
#: Relative central-difference steps; a peak's q and fwhm use FD_PEAK × its fwhm.
FD_STEPS = {"a": 1e-4, "c": 1e-4, "size_nm": 1e-3}
FD_PEAK = 1e-3
#: Columns of :func:`bounds_table`.
TABLE_COLUMNS = ("output", "r2", "r2_bound", "mae", "mae_bound", "accepted", "weakly_determined")


@dataclass(frozen=True)
class Parameter:
    """One generating parameter of a pattern: ``(phase, name)``, or ``(None, "bg<j>")`` for the background."""

    phase: str | None
    name: str

    @property
    def key(self) -> str:
        """``PHASE.NAME`` or ``background.c<j>``."""
        return f"{self.phase}.{self.name}" if self.phase is not None else f"background.{self.name}"


@dataclass
class Generated:
    """Generating parameters of N patterns of a phase library (see :func:`draw`).

    ``params`` holds per phase ``scale``, its ranged ``a``/``c``/``size_nm`` and, for a peak
    phase, ``q`` and ``fwhm``; ``amplitude`` and ``weights`` define the background as the
    library does (``c₀ = amplitude · max(clean)``, ``c_j = 0.5 c₀ w_j/Σ|w|``); ``counts`` is
    the total of the Poisson draw (None: noise-free).
    """

    params: dict[str, dict[str, np.ndarray]]
    amplitude: np.ndarray
    weights: np.ndarray
    counts: np.ndarray | None

    @property
    def n(self) -> int:
        """Number of patterns."""
        return len(self.amplitude)

    def take(self, idx: np.ndarray) -> Generated:
        """The patterns ``idx``."""
        return Generated({p: {k: v[idx] for k, v in d.items()} for p, d in self.params.items()},
                         self.amplitude[idx], self.weights[idx], None if self.counts is None else self.counts[idx])

    @staticmethod
    def concat(parts: Sequence[Generated]) -> Generated:
        """Patterns of several sets, in order."""
        first = parts[0]
        params = {p: {k: np.concatenate([g.params[p][k] for g in parts]) for k in d} for p, d in first.params.items()}
        counts = None if first.counts is None else np.concatenate([g.counts for g in parts])
        return Generated(params, np.concatenate([g.amplitude for g in parts]),
                         np.concatenate([g.weights for g in parts]), counts)


def draw(lib: PhaseLibrary, n: int, rng: np.random.Generator) -> Generated:
    """Draw the generating parameters of ``n`` patterns exactly as the library does.

    The draws are those of :meth:`PhaseLibrary.sample` followed by those of
    :meth:`PhaseLibrary.simulate` (with noise), in the same order, so for the generator of a
    library block this replays the block (the Poisson draw aside).
    """
    params = lib.sample(n, rng)
    for name, p in lib.spec.phases.items():
        if p.peak is not None:  # PhaseLibrary.simulate: q then fwhm of each peak phase, in file order
            params[name] = {**params[name], "q": rng.uniform(p.peak.q[0], p.peak.q[1], n),
                            "fwhm": rng.uniform(p.peak.fwhm[0], p.peak.fwhm[1], n)}
    bg = lib.spec.background
    amplitude = rng.uniform(bg.amplitude[0], bg.amplitude[1], n)
    weights = np.zeros((n, bg.chebyshev_order))
    if bg.chebyshev_order > 0:
        w = rng.uniform(-1, 1, (n, bg.chebyshev_order))
        weights = w / np.maximum(np.abs(w).sum(axis=1, keepdims=True), 1e-12)
    counts = None
    if lib.spec.noise.counts is not None:
        lo, hi = np.log(lib.spec.noise.counts)
        counts = np.exp(rng.uniform(lo, hi, n))
    return Generated(params, amplitude, weights, counts)


def replay(lib: PhaseLibrary, indices: np.ndarray, *, seed: int, block: int, n_library: int) -> Generated:
    """The generating parameters of library samples ``indices`` (block ``b`` uses ``default_rng([seed, b])``)."""
    indices = np.asarray(indices, dtype=int)
    parts = []
    order = []
    for b in np.unique(indices // block):
        size = min(block, n_library - int(b) * block)
        gen = draw(lib, size, np.random.default_rng([seed, int(b)]))
        local = indices[indices // block == b] - int(b) * block
        parts.append(gen.take(local))
        order.append(np.flatnonzero(indices // block == b))
    merged = Generated.concat(parts)
    inverse = np.empty(len(indices), dtype=int)
    inverse[np.concatenate(order)] = np.arange(len(indices))
    return merged.take(inverse)


def parameters(lib: PhaseLibrary) -> list[Parameter]:
    """The free generating parameters of a library's patterns, in the order of the Fisher matrix."""
    out = []
    for name, p in lib.spec.phases.items():
        if p.scale[1] > p.scale[0] or p.absent > 0:
            out.append(Parameter(name, "scale"))
        for key in ("a", "c", "size_nm"):
            rng_ = getattr(p, key)
            if rng_ is not None and rng_[1] > rng_[0]:
                out.append(Parameter(name, key))
        if p.peak is not None:
            out += [Parameter(name, k) for k, r in (("q", p.peak.q), ("fwhm", p.peak.fwhm)) if r[1] > r[0]]
    bg = lib.spec.background
    if bg.amplitude[1] > 0:
        out += [Parameter(None, f"c{j}") for j in range(bg.chebyshev_order + 1)]
    return out


def _basis(lib: PhaseLibrary) -> np.ndarray:
    """Chebyshev basis of the background, ``(order + 1, npt)``."""
    q = lib.q
    x = 2 * (q - q[0]) / (q[-1] - q[0]) - 1
    return np.polynomial.chebyshev.chebvander(x, lib.spec.background.chebyshev_order).T


def _phase_params(gen: Generated, name: str, idx: np.ndarray | slice, scale: float | None = 1.0) -> dict:
    d = {k: v[idx] for k, v in gen.params[name].items()}
    if scale is not None:
        d["scale"] = np.full(len(d["scale"]), scale)
    return d


def _simulate_one(lib: PhaseLibrary, name: str, params: dict[str, np.ndarray]) -> np.ndarray:
    phase = lib.phase(name)
    return simulate_patterns(lib.q, [phase], {name: params}, lib.instrument_model()).astype(np.float64)


def _fd_step(lib: PhaseLibrary, name: str, key: str, d: dict[str, np.ndarray]) -> np.ndarray:
    if isinstance(lib.phase(name), AmorphousPeak):
        return FD_PEAK * d["fwhm"]
    return FD_STEPS[key] * np.abs(d[key])


def jacobian(lib: PhaseLibrary, gen: Generated, params: Sequence[Parameter]) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
    """Expected pattern, its Jacobian and which parameters act, for the patterns of ``gen``.

    Returns
    -------
    mu : ndarray (N, npt)
        The noise-free pattern with background, absolute units.
    jac : ndarray (N, npt, P)
        ``∂μ/∂θ_p`` in absolute units per unit of each parameter.
    active : ndarray (N, P) bool
        False for the lattice, size and peak parameters of an absent phase (scale 0).
    """
    n, npt = gen.n, lib.q.size
    col = {(p.phase, p.name): j for j, p in enumerate(params)}
    jac = np.zeros((n, npt, len(params)))
    active = np.ones((n, len(params)), dtype=bool)
    clean = np.zeros((n, npt))
    for name in lib.phase_names:
        scale = gen.params[name]["scale"]
        g = _simulate_one(lib, name, _phase_params(gen, name, slice(None)))  # the phase at scale 1
        clean += scale[:, None] * g
        if (name, "scale") in col:
            jac[:, :, col[name, "scale"]] = g
        present = np.flatnonzero(scale > 0)
        for key in [k for (p, k) in col if p == name and k != "scale"]:
            j = col[name, key]
            active[:, j] = scale > 0
            if present.size == 0:
                continue
            d = _phase_params(gen, name, present)
            h = _fd_step(lib, name, key, d)
            hi, lo = dict(d), dict(d)
            hi[key], lo[key] = d[key] + h, d[key] - h
            diff = (_simulate_one(lib, name, hi) - _simulate_one(lib, name, lo)) / (2 * h[:, None])
            jac[present, :, j] = scale[present, None] * diff
    basis = _basis(lib)
    peak = clean.max(axis=1)
    level = gen.amplitude * np.where(peak > 0, peak, 1.0)
    coef = np.zeros((n, basis.shape[0]))
    coef[:, 0] = level
    coef[:, 1:] = 0.5 * level[:, None] * gen.weights
    mu = clean + coef @ basis
    for j, p in enumerate(params):
        if p.phase is None:
            jac[:, :, j] = basis[int(p.name[1:])]
    return mu, jac, active


def fisher(mu: np.ndarray, jac: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Fisher information ``f · Jᵀ diag(1/μ) J`` (``f = counts / Σμ``) of each pattern, ``(N, P, P)``.

    Bins where ``μ`` vanishes (no phase and no background there) carry no counts and are skipped.
    """
    total = mu.sum(axis=1)
    f = np.asarray(counts, dtype=float) / np.where(total > 0, total, 1.0)
    ok = mu > 1e-12 * np.maximum(mu.max(axis=1, keepdims=True), 1e-300)
    w = np.where(ok, 1.0 / np.where(ok, mu, 1.0), 0.0)
    return f[:, None, None] * (np.swapaxes(jac, 1, 2) * w[:, None, :]) @ jac


def crb(info: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cramér–Rao variances ``diag(F⁻¹)`` over the active parameters of each pattern.

    ``F`` is Jacobi-normalised, and eigenvalues below :data:`RCOND` × the largest are raised
    to that floor (a ridge that leaves unidentifiable combinations with a huge variance).

    Returns
    -------
    var : ndarray (N, P)
        NaN for inactive parameters.
    singular : ndarray (N,) bool
        Patterns whose Fisher matrix was singular (to :data:`RCOND`).
    """
    n, p, _ = info.shape
    diag = np.einsum("nii->ni", info)
    d = np.where(active & (diag > 0), np.sqrt(np.where(diag > 0, diag, 1.0)), 1.0)
    norm = info / (d[:, :, None] * d[:, None, :])
    both = active[:, :, None] & active[:, None, :]
    norm = np.where(both, norm, 0.0)
    norm[:, np.arange(p), np.arange(p)] = np.where(active, norm[:, np.arange(p), np.arange(p)], 1.0)
    lam, vec = np.linalg.eigh(norm)
    floor = RCOND * np.maximum(lam.max(axis=1, keepdims=True), 1e-300)
    singular = (lam <= floor).any(axis=1)
    lam = np.maximum(lam, floor)
    inv_diag = np.einsum("nij,nj->ni", vec ** 2, 1.0 / lam)
    var = np.where(active, inv_diag / d ** 2, np.nan)
    return var, singular


@dataclass
class Bounds:
    """Cramér–Rao variances of the outputs over a set of patterns (see the module docstring).

    Attributes
    ----------
    outputs : list of (phase, param)
        The outputs (labels) bounded.
    target : ndarray (N, L)
        Their true values.
    variance : ndarray (N, L)
        CRB variance per pattern, NaN where the output is excluded (absent phase).
    singular : int
        Patterns whose Fisher matrix was singular.
    seconds : float
        Time of the computation.
    source : str
        ``replayed`` (the library's own held-out patterns), ``resimulated`` or ``drawn``.
    replay_chi2 : float or None
        Mean χ² per bin of the stored patterns against the replayed expectation (≈ 1).
    """

    outputs: list[tuple[str, str]]
    target: np.ndarray
    variance: np.ndarray
    singular: int
    seconds: float
    source: str
    replay_chi2: float | None = None

    @property
    def n(self) -> int:
        """Number of patterns."""
        return int(self.target.shape[0])

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per output ``PHASE.PARAM``: ``r2_bound``, ``mae_bound``, ``r2_crb``, ``n_bound``, ``crb_capped``.

        ``r2_crb`` is the uncapped ``1 − mean(CRB)/var(target)`` (strict for unbiased
        estimators, possibly negative); ``crb_capped`` the fraction of patterns whose CRB
        exceeded ``var(target)``; ``n_bound`` the patterns the output was bounded on.
        """
        out: dict[str, dict[str, Any]] = {}
        for j, (phase, param) in enumerate(self.outputs):
            ok = np.isfinite(self.variance[:, j])
            t, v = self.target[ok, j], self.variance[ok, j]
            var_t = float(t.var()) if t.size else 0.0
            if t.size == 0 or var_t <= 0:
                out[f"{phase}.{param}"] = {"r2_bound": None, "mae_bound": None, "r2_crb": None,
                                           "n_bound": int(t.size), "crb_capped": None}
                continue
            capped = np.minimum(v, var_t)
            out[f"{phase}.{param}"] = {
                "r2_bound": float(1.0 - capped.mean() / var_t),
                "mae_bound": float(np.mean(math.sqrt(2 / math.pi) * np.sqrt(capped))),
                "r2_crb": float(1.0 - v.mean() / var_t),
                "n_bound": int(t.size), "crb_capped": float((v > var_t).mean())}
        return out

    def info(self) -> dict[str, Any]:
        """What the bound was computed on (for the registry's ``metrics["bounds"]``)."""
        return {"n": self.n, "singular": self.singular, "seconds": round(self.seconds, 3), "source": self.source,
                "replay_chi2": self.replay_chi2, "target_r2": TARGET_R2, "slack": BOUND_SLACK, "weak_r2": WEAK_R2}


def compute_bounds(lib: PhaseLibrary, gen: Generated, outputs: Sequence[tuple[str, str]] | None = None, *,
                   chunk: int = CHUNK, source: str = "drawn") -> Bounds:
    """Cramér–Rao bounds of ``outputs`` (default: every label) for the patterns of ``gen``.

    Parameters
    ----------
    lib : PhaseLibrary
        The phase library the patterns come from (its pattern and noise model).
    gen : Generated
        Their generating parameters (:func:`draw` or :func:`replay`).
    outputs : sequence of (phase, param), optional
        Labels to bound; :meth:`PhaseLibrary.label_names` by default.
    chunk : int
        Patterns per Jacobian evaluation.
    source : str
        Recorded in :attr:`Bounds.source`.
    """
    t0 = time.perf_counter()
    outputs = list(outputs) if outputs is not None else lib.label_names()
    params = parameters(lib)
    col = {(p.phase, p.name): j for j, p in enumerate(params)}
    target = np.stack([np.asarray(gen.params[p][k], dtype=float) for p, k in outputs], axis=1)
    variance = np.full(target.shape, np.nan)
    singular = 0
    for s in range(0, gen.n, chunk):
        part = gen.take(np.arange(s, min(s + chunk, gen.n)))
        if gen.counts is None:  # noise-free library: every parameter is exactly determined
            var = np.zeros((part.n, len(params)))
        else:
            mu, jac, active = jacobian(lib, part, params)
            var, sing = crb(fisher(mu, jac, part.counts), active)  # type: ignore[arg-type]
            singular += int(sing.sum())
        for j, (p, k) in enumerate(outputs):
            if (p, k) in col:
                variance[s:s + part.n, j] = var[:, col[p, k]]
            else:  # fixed in the library (a zero-width range): known exactly
                variance[s:s + part.n, j] = 0.0
    for j, (p, k) in enumerate(outputs):
        if k != "scale":
            variance[gen.params[p]["scale"] <= 0, j] = np.nan
    seconds = time.perf_counter() - t0
    logger.info("Cramér–Rao bounds of %d outputs on %d patterns in %.1f s (%d singular Fisher matrices)",
                len(outputs), gen.n, seconds, singular)
    return Bounds(outputs, target, variance, singular, seconds, source)


def library_bounds(lib: PhaseLibrary | str, n: int = 256, *, seed: int = 0,
                   outputs: Sequence[tuple[str, str]] | None = None) -> Bounds:
    """Bounds on ``n`` fresh patterns drawn from a phase library (no training library needed).

    Examples
    --------
    >>> b = library_bounds("xrdscale/data/phases/nca.yaml", 64)  # doctest: +SKIP
    >>> b.summary()["NCA.scale"]["r2_bound"]  # doctest: +SKIP
    0.99...
    """
    if isinstance(lib, str):
        lib = PhaseLibrary.load(lib)
    return compute_bounds(lib, draw(lib, n, np.random.default_rng([seed, 0xB0])), outputs, source="drawn")


def held_out_bounds(ds, indices: np.ndarray, outputs: Sequence[tuple[str, str]] | None = None) -> Bounds:
    """Bounds on samples ``indices`` of a library store (``open_library``'s dataset).

    The samples' generating parameters are replayed from the store's seed and block size
    and checked against its labels and patterns; where that fails the bound is computed on
    as many fresh patterns of the same phase library instead (a WARNING says why).
    """
    from xrdscale.pqnet.library import label_var

    indices = np.asarray(indices, dtype=int)
    lib = _store_library(ds)
    outputs = list(outputs) if outputs is not None else lib.label_names()
    try:
        seed, block = int(ds.attrs["seed"]), int(ds.attrs["block"])
        gen = replay(lib, indices, seed=seed, block=block, n_library=int(ds.sizes["sample"]))
        for phase, param in lib.label_names():
            stored = np.asarray(ds[label_var(phase, param)].values[indices], dtype=float)
            if not np.array_equal(stored, gen.params[phase][param]):
                raise ValueError(f"label {phase}.{param} of the replayed samples differs from the store's")
    except (KeyError, ValueError, TypeError) as exc:
        logger.warning("cannot replay the held-out patterns of the library (%s); the bounds are computed on %d "
                       "fresh patterns of its phase library", exc, len(indices))
        gen = draw(lib, len(indices), np.random.default_rng([int(ds.attrs.get("seed", 0)), 0xB0]))
        return compute_bounds(lib, gen, outputs, source="resimulated")
    bounds = compute_bounds(lib, gen, outputs, source="replayed")
    if gen.counts is not None:
        bounds.replay_chi2 = _replay_chi2(lib, gen, np.asarray(ds["patterns"].values[indices], dtype=float))
        if not 0.7 < bounds.replay_chi2 < 1.4:
            logger.warning("the stored held-out patterns do not look like Poisson draws around the replayed "
                           "expectation (χ² per bin %.2f, expected ≈ 1): the library may have been simulated by "
                           "another version of the pattern model", bounds.replay_chi2)
    return bounds


def _replay_chi2(lib: PhaseLibrary, gen: Generated, stored: np.ndarray, chunk: int = CHUNK) -> float:
    """Mean Pearson χ² per bin of stored patterns against the replayed expected counts.

    Expected counts ``λ = C μ/Σμ``; observed ``C y/Σy`` (unit-agnostic, off by a relative
    ``1/√C`` that adds ~1/npt to the χ²). Bins with ``λ ≤ 5`` are left out.
    """
    chi, bins = 0.0, 0
    if gen.counts is None:
        return float("nan")
    for s in range(0, gen.n, chunk):
        part = gen.take(np.arange(s, min(s + chunk, gen.n)))
        mu, _, _ = jacobian(lib, part, [])
        y = stored[s:s + part.n]
        c = np.asarray(part.counts, dtype=float)[:, None]
        lam = c * mu / np.maximum(mu.sum(axis=1, keepdims=True), 1e-300)
        obs = c * y / np.maximum(y.sum(axis=1, keepdims=True), 1e-300)
        ok = lam > 5
        chi += float((((obs - lam) ** 2) / np.where(ok, lam, 1.0))[ok].sum())
        bins += int(ok.sum())
    return chi / max(bins, 1)


def _store_library(ds) -> PhaseLibrary:
    """The phase library a library store was simulated from (relative paths: next to the original YAML)."""
    base = None
    try:
        phases = json.loads(ds.attrs.get("config", "{}")).get("phases")
        if phases and "://" not in str(phases):
            base = os.path.dirname(os.path.abspath(str(phases)))
        elif phases:
            base = str(phases).rstrip("/").rsplit("/", 1)[0]
    except (ValueError, AttributeError):
        base = None
    return PhaseLibrary.from_text(ds.attrs["phases_yaml"], base_dir=base, source="the library's phase library")


def judge(r2: float | None, r2_bound: float | None) -> tuple[bool, bool | None]:
    """``(accepted, weakly_determined)`` of an output from its achieved R² and its bound.

    Accepted: R² ≥ :data:`TARGET_R2` where the bound allows it (``r2_bound ≥ TARGET_R2``),
    else R² ≥ ``r2_bound − BOUND_SLACK``; without a bound, R² ≥ TARGET_R2. Weakly determined:
    ``r2_bound < WEAK_R2`` (None without a bound).

    Examples
    --------
    >>> judge(0.61, 0.65)
    (True, True)
    >>> judge(0.97, 0.999)
    (False, False)
    """
    ok = r2 is not None and math.isfinite(r2)
    if r2_bound is None or not math.isfinite(r2_bound):
        return bool(ok and r2 >= TARGET_R2), None  # type: ignore[operator]
    need = TARGET_R2 if r2_bound >= TARGET_R2 else r2_bound - BOUND_SLACK
    return bool(ok and r2 >= need), bool(r2_bound < WEAK_R2)  # type: ignore[operator]


def merge(metrics: dict[str, Any], bounds: Bounds | None) -> dict[str, Any]:
    """Add ``r2_bound``, ``mae_bound``, ``accepted``, ``weakly_determined`` to every output of ``metrics``.

    ``metrics`` is :func:`xrdscale.pqnet.train.evaluate`'s; ``metrics["bounds"]`` records
    what the bound was computed on (None when it was not).
    """
    summary = bounds.summary() if bounds is not None else {}
    for key, rec in metrics["outputs"].items():
        extra = summary.get(key, {"r2_bound": None, "mae_bound": None})
        rec.update(extra)
        rec["accepted"], rec["weakly_determined"] = judge(rec.get("r2"), extra["r2_bound"])
    metrics["bounds"] = bounds.info() if bounds is not None else None
    return metrics


def weakly_determined(entry: Any) -> list[str]:
    """The outputs (``PHASE.param``) of a model whose Cramér–Rao R² bound is below :data:`WEAK_R2`.

    Empty for entries trained without bounds. The analyse stage writes them into the maps
    store's attrs (``weakly_determined`` of the store and of each variable).
    """
    table = bounds_table(entry)
    return [str(o) for o, weak in zip(table["output"], table["weakly_determined"]) if weak is True]


def bounds_table(entry: Any) -> pd.DataFrame:
    """Achieved and best achievable held-out accuracy of a trained model, one row per output.

    Parameters
    ----------
    entry : ModelEntry or mapping
        A registry entry (:func:`xrdscale.pqnet.registry.open_entry`), its ``metrics`` or a
        ``model.json`` document.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`TABLE_COLUMNS`: ``output`` (``PHASE.PARAM``), the network's ``r2`` and
        ``mae`` on the held-out split, the Cramér–Rao ``r2_bound`` and ``mae_bound`` (NaN for
        an entry trained without bounds), ``accepted`` (R² ≥ 0.98 where the bound allows it,
        else within 0.05 of the bound) and ``weakly_determined`` (bound below 0.9).
        Entries written before the bounds existed get ``accepted`` from R² ≥ 0.98 alone and
        ``weakly_determined`` None.
    """
    metrics: Mapping[str, Any] = getattr(entry, "metrics", entry)
    if "metrics" in metrics and "outputs" not in metrics:
        metrics = metrics["metrics"]
    rows = []
    for key, rec in (metrics.get("outputs") or {}).items():
        r2_bound = rec.get("r2_bound")
        accepted, weak = judge(rec.get("r2"), r2_bound)
        rows.append({"output": key, "r2": rec.get("r2"), "r2_bound": r2_bound, "mae": rec.get("mae"),
                     "mae_bound": rec.get("mae_bound"), "accepted": rec.get("accepted", accepted),
                     "weakly_determined": rec.get("weakly_determined", weak)})
    df = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    for c in ("r2", "r2_bound", "mae", "mae_bound"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df


def format_table(table: pd.DataFrame) -> str:
    """:func:`bounds_table` as aligned text (for the command line)."""
    head = ["output", "R²", "bound", "MAE", "bound", "accepted", "weakly determined"]

    def num(v: float, digits: int) -> str:
        return "–" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"

    def flag(v: Any) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else ("yes" if v else "no")

    rows = [[r.output, num(r.r2, 4), num(r.r2_bound, 4), num(r.mae, 5), num(r.mae_bound, 5), flag(r.accepted),
             flag(r.weakly_determined)] for r in table.itertuples()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in [head, *rows]]
    return "\n".join(lines)

