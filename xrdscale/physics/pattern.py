"""The pattern model every simulator, training library and fit of xrdscale shares.

``q = 4π sin θ / λ``. A reflection's integrated intensity is
``I_hkl = scale · m|F|² · LP(θ) / V²`` with ``LP = (1 + cos² 2θ) / (sin² θ cos θ)``,
|F|² in electrons² and V in Å³: the absolute units of shared/DESIGN.md ("Pattern model"),
with no further constant (K = :data:`xrdscale.physics.constants.INTENSITY_UNIT` = 1), so a
tool written to that contract computes the same intensity for the same scale (at scale 1,
W = 4·10⁻⁴ deg² and a 1000-point grid over q 1.16–3.82 1/Å the strongest peak of Cu reaches
~3·10⁶, of NCA ~5·10⁵ and of graphite ~1.4·10⁵). Each peak
is a Thompson–Cox–Hastings pseudo-Voigt of unit area in 2θ [deg]: Gaussian FWHM
``H_G² = U tan²θ + V tanθ + W`` and Lorentzian FWHM ``H_L = X / cosθ + (180/π) · 0.9 λ / (L cosθ)``
(Scherrer, L the crystallite size).
Profiles are mapped onto the q grid with the Jacobian ``d2θ/dq`` so integrated
intensities are preserved. A Chebyshev background over the q range and Poisson counting
noise complete the model: a pattern is scaled to a given total number of counts, drawn and
scaled back, so the noise level is set by the counts alone and the pattern (and its
``scale`` labels) stays in absolute units. Everything is vectorised over N patterns.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize

from xrdscale.exceptions import InputError
from xrdscale.physics.crystal import AmorphousPeak, Phase, cell_volume

logger = logging.getLogger(__name__)

#: Integrated intensity over q [absolute units · 1/Å] of a non-crystalline peak of scale 1. The
#: contract fixes only the crystalline intensity; this is xrdscale's choice: at scale 1 the
#: separator peak holds ~6 % of the intensity graphite has at scale 1 in q 1.16–3.82 1/Å.
AMORPHOUS_AREA = 200.0
_DEG = 180.0 / np.pi
_MAX_FLOATS = 4_000_000  # evaluation block size (floats) that bounds memory per call
#: Half-width of the window a peak is evaluated on, in FWHM.
WINDOW_FWHM = 20.0


@dataclass(frozen=True)
class Instrument:
    """Instrumental profile: wavelength [Å] and Caglioti parameters (U, V, W in deg², X in deg)."""

    wavelength: float
    U: float = 0.0
    V: float = 0.0
    W: float = 4.0e-4
    X: float = 0.0

    def widths(self, two_theta_deg: np.ndarray,
               size_nm: np.ndarray | float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Gaussian and Lorentzian FWHM [deg 2θ] at the given 2θ and crystallite size."""
        theta = np.deg2rad(np.asarray(two_theta_deg, dtype=float) / 2.0)
        tan, cos = np.tan(theta), np.cos(theta)
        hg2 = self.U * tan**2 + self.V * tan + self.W
        hg = np.sqrt(np.clip(hg2, 1e-12, None))
        hl = self.X / cos
        if size_nm is not None:
            hl = hl + _DEG * 0.9 * self.wavelength / (np.asarray(size_nm, dtype=float) * 10.0 * cos)
        return hg, hl

    @classmethod
    def fit_calibrant(cls, q: np.ndarray, intensity: np.ndarray, wavelength: float,
                      calibrant: str = "CeO2", *, fit_x: bool = True) -> Instrument:
        """Fit U, V, W (and X) to the peaks of an integrated calibrant pattern.

        Each calibrant reflection inside the q range (d-spacings from pyFAI's calibrant
        library) is fitted with a pseudo-Voigt on a linear background; the Gaussian and
        Lorentzian widths are split with the TCH relation, then ``H_G²`` is fitted
        linearly in (tan²θ, tanθ, 1) and ``H_L cosθ`` gives X.

        Parameters
        ----------
        q, intensity : ndarray
            The integrated 1D pattern of a calibration frame (q in 1/Å).
        wavelength : float
            Wavelength [Å].
        calibrant : str
            Name in pyFAI's calibrant library.
        fit_x : bool
            Also fit the Lorentzian X (else X = 0).

        Raises
        ------
        InputError
            Fewer than three calibrant peaks could be fitted.
        """
        from pyFAI.calibrant import CALIBRANT_FACTORY

        if calibrant not in CALIBRANT_FACTORY.all:
            raise InputError(f"unknown calibrant {calibrant!r}; pyFAI knows {', '.join(sorted(CALIBRANT_FACTORY.all))}")
        d = np.asarray(CALIBRANT_FACTORY(calibrant).dspacing, dtype=float)
        q = np.asarray(q, dtype=float)
        y = np.asarray(intensity, dtype=float)
        tth = _DEG * 2 * np.arcsin(np.clip(q * wavelength / (4 * np.pi), -1, 1))
        q_peaks = 2 * np.pi / d
        q_peaks = q_peaks[(q_peaks > q[0]) & (q_peaks < q[-1])]
        tth_peaks = _DEG * 2 * np.arcsin(q_peaks * wavelength / (4 * np.pi))
        # A window of half the distance to the neighbours (at most 0.15°) around each peak.
        rows = []
        for i, t0 in enumerate(tth_peaks):
            gaps = np.abs(np.delete(tth_peaks, i) - t0)
            half = min(0.15, 0.45 * gaps.min()) if len(gaps) else 0.15
            sel = np.abs(tth - t0) < half
            if sel.sum() < 8:
                continue
            fit = _fit_peak(tth[sel], y[sel], t0)
            if fit is not None:
                rows.append((fit[0], *fit[1:]))
        if len(rows) < 3:
            raise InputError(f"only {len(rows)} {calibrant} peaks could be fitted in q {q[0]:.2f}–{q[-1]:.2f} 1/Å; "
                             "need at least 3: check the calibration frame, the wavelength and the q range")
        center, fwhm, eta = (np.array(c) for c in zip(*rows))
        hg, hl = _split_tch(fwhm, eta)
        theta = np.deg2rad(center / 2)
        tan = np.tan(theta)
        design = np.stack([tan**2, tan, np.ones_like(tan)], axis=1)
        (u, v, w), *_ = np.linalg.lstsq(design, hg**2, rcond=None)
        x = float(np.median(hl * np.cos(theta))) if fit_x else 0.0
        logger.info("fitted %s instrument from %d peaks: U=%.3g V=%.3g W=%.3g X=%.3g", calibrant, len(rows), u, v, w, x)
        return cls(wavelength=wavelength, U=float(u), V=float(v), W=float(w), X=x)


def tch(hg: np.ndarray, hl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thompson–Cox–Hastings total FWHM and Lorentzian fraction η from H_G and H_L."""
    h = (hg**5 + 2.69269 * hg**4 * hl + 2.42843 * hg**3 * hl**2 + 4.47163 * hg**2 * hl**3
         + 0.07842 * hg * hl**4 + hl**5) ** 0.2
    r = hl / h
    eta = 1.36603 * r - 0.47719 * r**2 + 0.11116 * r**3
    return h, np.clip(eta, 0.0, 1.0)


def pseudo_voigt(x: np.ndarray, fwhm: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Unit-area pseudo-Voigt of the offset ``x`` (same units as ``fwhm``)."""
    z = (2.0 * x / fwhm) ** 2
    lorentz = 2.0 / (np.pi * fwhm) / (1.0 + z)
    gauss = 2.0 / fwhm * np.sqrt(np.log(2.0) / np.pi) * np.exp(-np.log(2.0) * z)
    return eta * lorentz + (1.0 - eta) * gauss


def _split_tch(fwhm: np.ndarray, eta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Invert the TCH relation: (H, η) → (H_G, H_L)."""
    hg, hl = np.empty_like(fwhm), np.empty_like(fwhm)
    for i, (h, e) in enumerate(zip(fwhm, eta)):
        def resid(r: float, h: float = h, e: float = e) -> float:
            return float(tch(np.array(h * (1 - r)), np.array(h * r))[1] - e)
        if e <= 1e-4:
            r = 0.0
        elif e >= 0.999:
            r = 1.0
        else:
            r = optimize.brentq(resid, 0.0, 1.0)
        hh, _ = tch(np.array(1 - r), np.array(r))
        hg[i], hl[i] = h * (1 - r) / hh, h * r / hh
    return hg, hl


def _fit_peak(x: np.ndarray, y: np.ndarray, x0: float) -> tuple[float, float, float] | None:
    def model(x, area, c, h, eta, b0, b1):
        return area * pseudo_voigt(x - c, h, eta) + b0 + b1 * (x - x0)

    span = x[-1] - x[0]
    b0 = float(min(y[0], y[-1]))
    area0 = max(float(np.trapezoid(y - b0, x)), 1e-12)
    h0 = max(span / 6, 1e-4)
    try:
        p, _ = optimize.curve_fit(model, x, y, p0=[area0, x0, h0, 0.3, b0, 0.0],
                                  bounds=([0, x0 - span / 4, 1e-5, 0, -np.inf, -np.inf],
                                          [np.inf, x0 + span / 4, span, 1, np.inf, np.inf]), maxfev=4000)
    except (RuntimeError, ValueError):
        return None
    return float(p[1]), float(p[2]), float(p[3])


def _check_params(phase: Phase | AmorphousPeak, p: Mapping[str, np.ndarray], n: int) -> None:
    allowed = {"scale", "size_nm", "q", "fwhm", *phase.lattice_keys}
    unknown = set(p) - allowed
    if unknown:
        raise InputError(f"phase {phase.name!r} has no parameter(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    for k, v in p.items():
        if np.shape(v) not in ((n,), ()):
            raise InputError(f"parameter {phase.name}.{k} has shape {np.shape(v)}, expected ({n},)")


def simulate_patterns(q: np.ndarray, phases: Sequence[Phase | AmorphousPeak],
                      params: Mapping[str, Mapping[str, np.ndarray]], instrument: Instrument, *,
                      background: np.ndarray | None = None, counts: np.ndarray | None = None,
                      rng: np.random.Generator | None = None) -> np.ndarray:
    """Simulate N powder patterns on the q grid in absolute units.

    Parameters
    ----------
    q : ndarray (npt,)
        Ascending q grid [1/Å].
    phases : sequence of Phase or AmorphousPeak
        The components.
    params : mapping
        ``{phase name: {"scale": (N,), "a": (N,), "c": (N,), "size_nm": (N,)}}``; a missing
        lattice key keeps the structure's value, a missing ``size_nm`` means no size
        broadening; for an AmorphousPeak ``{"scale", "q", "fwhm"}``. A phase absent from
        ``params`` contributes nothing.
    instrument : Instrument
        Wavelength and instrumental profile.
    background : ndarray (N, k), optional
        Chebyshev coefficients (absolute units) over the q range mapped to [-1, 1].
    counts : ndarray (N,), optional
        Total counts per pattern for Poisson noise (the noise-free pattern is scaled to
        this total, drawn, and scaled back); ``None`` gives noise-free patterns.
    rng : numpy.random.Generator, optional
        Random generator for the noise.

    Returns
    -------
    ndarray (N, npt) float32

    Examples
    --------
    >>> from xrdscale.physics.crystal import builtin_phase
    >>> q = np.linspace(1.2, 3.8, 800)
    >>> al = builtin_phase("Al")
    >>> p = simulate_patterns(q, [al], {"Al": {"scale": np.array([1.0, 2.0])}}, Instrument(0.130509))
    >>> bool(np.allclose(p[1], 2 * p[0], rtol=1e-5))
    True
    """
    q = np.asarray(q, dtype=float)
    if q.ndim != 1 or q.size < 2 or not np.isfinite(q).all() or np.any(np.diff(q) <= 0):
        raise InputError(f"q grid must be 1D, finite and strictly increasing with at least 2 points; "
                         f"{_describe_grid(q)}")
    n = _count(params, background, counts)
    lam = instrument.wavelength
    sin_q = q * lam / (4 * np.pi)
    if sin_q.max() >= 1:
        raise InputError(f"q up to {q.max():.2f} 1/Å is beyond the reach of wavelength {lam} Å")
    tth_q = _DEG * 2 * np.arcsin(sin_q)                       # (npt,)
    jac = jac_at(tth_q, lam)                                   # d2θ/dq [deg·Å]
    out = np.zeros((n, q.size), dtype=np.float64)
    for phase in phases:
        p = params.get(phase.name)
        if p is None:
            continue
        _check_params(phase, p, n)
        if isinstance(phase, AmorphousPeak):
            _add_amorphous(out, q, phase, p, n)
        else:
            _add_crystalline(out, q, tth_q, jac, phase, p, n, instrument)
    return add_background_and_noise(out, q, background, counts, rng)


def add_background_and_noise(patterns: np.ndarray, q: np.ndarray, background: np.ndarray | None,
                             counts: np.ndarray | None, rng: np.random.Generator | None) -> np.ndarray:
    """Add a Chebyshev background and Poisson noise to noise-free patterns.

    Parameters
    ----------
    patterns : ndarray (N, npt)
        Noise-free patterns in absolute units.
    q : ndarray (npt,)
        The q grid; the background's Chebyshev variable maps its range to [-1, 1].
    background : ndarray (N, k) or None
        Chebyshev coefficients (absolute units).
    counts : ndarray (N,) or None
        Total counts per pattern: each pattern is scaled to this total, drawn from a
        Poisson distribution and scaled back, so its units stay absolute.
    rng : numpy.random.Generator or None
        Random generator for the noise.

    Returns
    -------
    ndarray (N, npt) float32
    """
    out = np.asarray(patterns, dtype=np.float64)
    if background is not None:
        bg = np.atleast_2d(np.asarray(background, dtype=float))
        x = 2 * (q - q[0]) / (q[-1] - q[0]) - 1
        out = out + bg @ np.polynomial.chebyshev.chebvander(x, bg.shape[1] - 1).T
    if counts is not None:
        rng = rng or np.random.default_rng()
        total = out.sum(axis=1, keepdims=True)
        ok = total > 0
        factor = np.where(ok, np.asarray(counts, dtype=float).reshape(-1, 1) / np.where(ok, total, 1.0), 1.0)
        noisy = rng.poisson(np.clip(out * factor, 0, None)) / factor
        out = np.where(ok, noisy, out)
    return out.astype(np.float32)


def _describe_grid(q: np.ndarray) -> str:
    """What a bad q grid is, for the error message."""
    if q.ndim != 1:
        return f"got an array of shape {q.shape}"
    if q.size < 2:
        return f"got {q.size} point(s)"
    if not np.isfinite(q).all():
        first = int(np.flatnonzero(~np.isfinite(q))[0])
        return f"got {int((~np.isfinite(q)).sum())} NaN/infinite value(s), the first at index {first}"
    bad = int(np.flatnonzero(np.diff(q) <= 0)[0])
    return (f"got {q.size} points from {q[0]:.6g} to {q[-1]:.6g} 1/Å that stop increasing at index {bad + 1} "
            f"(q[{bad}] = {q[bad]:.6g}, q[{bad + 1}] = {q[bad + 1]:.6g})")


def _count(params: Mapping[str, Mapping[str, np.ndarray]], background: np.ndarray | None,
           counts: np.ndarray | None) -> int:
    for p in params.values():
        for v in p.values():
            if np.ndim(v) == 1:
                return len(v)
    for arr in (background, counts):
        if arr is not None:
            return len(arr)
    return 1


def _add_crystalline(out: np.ndarray, q: np.ndarray, tth_q: np.ndarray, jac: np.ndarray, phase: Phase,
                     p: Mapping[str, np.ndarray], n: int, instrument: Instrument) -> None:
    lam = instrument.wavelength
    table = phase.peak_table(lam, float(q[-1]) * 1.05 + 0.05)
    if len(table.hkl) == 0:
        return
    nominal = phase.lattice
    lat = {k: np.broadcast_to(np.asarray(p.get(k, nominal[k]), dtype=float), (n,)) for k in phase.lattice_keys}
    qk = table.q(lat["a"], lat.get("c"))                                        # (n, K)
    vol = cell_volume(phase.system, lat["a"], lat.get("c"))
    scale = np.broadcast_to(np.asarray(p.get("scale", 1.0), dtype=float), (n,))
    theta = np.arcsin(np.clip(qk * lam / (4 * np.pi), 0, 1))                     # (n, K)
    lp = (1 + np.cos(2 * theta) ** 2) / (np.sin(theta) ** 2 * np.cos(theta))
    area = scale[:, None] * table.f2m[None, :] / vol[:, None] ** 2 * lp   # I_hkl of DESIGN.md: no extra constant
    size = p.get("size_nm")
    if size is not None:
        size = np.broadcast_to(np.asarray(size, dtype=float), (n,))[:, None]
    hg, hl = instrument.widths(_DEG * 2 * theta, size)
    fwhm, eta = tch(hg, hl)
    tth_k = _DEG * 2 * theta
    # Each peak is evaluated on a window of the grid around it (±WINDOW_FWHM widths; the
    # Lorentzian tail outside holds < 2 % of a pure Lorentzian's area), in blocks of patterns to bound memory.
    step = float(np.min(np.diff(q)))
    fwhm_q = fwhm / jac_at(tth_k, lam)
    half = int(np.ceil(WINDOW_FWHM * float(fwhm_q.max()) / step)) + 1
    width = min(2 * half + 1, q.size)
    offsets = np.arange(width)
    block = max(1, _MAX_FLOATS // (qk.shape[1] * width))
    npt = q.size
    for s in range(0, n, block):
        sl = slice(s, s + block)
        nb = qk[sl].shape[0]
        start = np.clip(np.searchsorted(q, qk[sl]) - half, 0, npt - width)          # (nb, K)
        idx = start[:, :, None] + offsets                                            # (nb, K, W)
        x = (tth_q[idx] - tth_k[sl, :, None]).astype(np.float32)
        prof = pseudo_voigt(x, fwhm[sl, :, None].astype(np.float32), eta[sl, :, None].astype(np.float32))
        vals = prof * (area[sl, :, None] * jac[idx]).astype(np.float32)
        flat = (idx + (np.arange(nb) * npt)[:, None, None]).ravel()
        out[sl] += np.bincount(flat, weights=vals.ravel(), minlength=nb * npt).reshape(nb, npt)


def jac_at(two_theta_deg: np.ndarray, wavelength: float) -> np.ndarray:
    """The Jacobian d2θ/dq [deg·Å] at the given 2θ [deg]."""
    return _DEG * wavelength / (2 * np.pi * np.cos(np.deg2rad(two_theta_deg / 2)))


def _add_amorphous(out: np.ndarray, q: np.ndarray, phase: AmorphousPeak, p: Mapping[str, np.ndarray], n: int) -> None:
    scale = np.broadcast_to(np.asarray(p.get("scale", 1.0), dtype=float), (n,))
    center = np.broadcast_to(np.asarray(p.get("q", phase.q), dtype=float), (n,))
    fwhm = np.broadcast_to(np.asarray(p.get("fwhm", phase.fwhm), dtype=float), (n,))
    prof = pseudo_voigt(q[None, :] - center[:, None], fwhm[:, None], np.full((n, 1), 0.5))
    out += AMORPHOUS_AREA * scale[:, None] * prof
