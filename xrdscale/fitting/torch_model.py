"""A torch port of :func:`xrdscale.physics.pattern.simulate_patterns` for the fitted parameters.

The pattern of a pixel is a function of one parameter vector θ: per phase of the library its
``scale`` and, where the library gives a range that is not a single value, ``a``, ``c`` and
``size_nm`` (for a ``peak`` phase: ``q`` and ``fwhm``); then the Chebyshev background
coefficients. Parameters the library fixes keep its value (a range of one value) or the
structure's (no range; no ``size_nm`` range: no size broadening), as the simulator does. The
instrumental profile and the wavelength are the library's.

Per phase the reflection groups (hkl, multiplicity·|F|² at the library's wavelength) are taken
once from :meth:`xrdscale.physics.crystal.Phase.peak_table`; peak positions, the LP factor,
cell volume, widths and the TCH pseudo-Voigt are recomputed in torch from each pixel's
lattice, so the model is differentiable and batched over pixels ``(batch, npt)``.

The numpy model evaluates each peak on a window of the grid (±:data:`WINDOW_FWHM` of the widest
peak of the call, :func:`window_half`); this one does the same, with the window's half-width
given (``half``) or, by default, computed as the numpy model does from the batch. The windows'
grid indices are constants of a forward pass (:meth:`PatternModel.windows`), so Jacobians by
forward-mode differentiation see a smooth function of θ.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from xrdscale.physics.crystal import AmorphousPeak, Phase
from xrdscale.physics.pattern import AMORPHOUS_AREA, WINDOW_FWHM, Instrument
from xrdscale.physics.phaselib import PhaseLibrary

logger = logging.getLogger(__name__)

_DEG = 180.0 / math.pi
_LN2 = math.log(2.0)


@dataclass(frozen=True)
class ParamDef:
    """One entry of the parameter vector θ.

    Attributes
    ----------
    phase : str
        Phase name, or ``""`` for a background coefficient.
    key : str
        ``scale``, ``a``, ``c``, ``size_nm``, ``q``, ``fwhm`` or ``bg<i>``.
    lower, upper : float
        Box bounds (scales: ``[0, inf)``; background: unbounded).
    linear : bool
        The pattern is linear in it (scales and background coefficients).
    """

    phase: str
    key: str
    lower: float
    upper: float
    linear: bool

    @property
    def name(self) -> str:
        """``phase.key`` (``background.bg<i>`` for the background)."""
        return f"{self.phase or 'background'}.{self.key}"


@dataclass
class _Crystal:
    index: int                     # phase index
    system: str
    hkl: torch.Tensor              # (K, 3)
    f2m: torch.Tensor              # (K,)
    slots: dict[str, int]          # fitted key -> column of θ
    fixed: dict[str, float]        # fixed lattice/size values
    scale_slot: int


@dataclass
class _Peak:
    index: int
    slots: dict[str, int]
    fixed: dict[str, float]
    scale_slot: int


def _pv(x: torch.Tensor, fwhm: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    z = (2.0 * x / fwhm) ** 2
    lorentz = 2.0 / (math.pi * fwhm) / (1.0 + z)
    gauss = 2.0 / fwhm * math.sqrt(_LN2 / math.pi) * torch.exp(-_LN2 * z)
    return eta * lorentz + (1.0 - eta) * gauss


def _tch(hg: torch.Tensor, hl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = (hg**5 + 2.69269 * hg**4 * hl + 2.42843 * hg**3 * hl**2 + 4.47163 * hg**2 * hl**3
         + 0.07842 * hg * hl**4 + hl**5) ** 0.2
    r = hl / h
    eta = 1.36603 * r - 0.47719 * r**2 + 0.11116 * r**3
    return h, torch.clamp(eta, 0.0, 1.0)


class PatternModel:
    """The library's pattern model as a batched, differentiable function of θ ``(batch, P)``.

    Parameters
    ----------
    lib : PhaseLibrary
        Phases, ranges, wavelength, instrument.
    q : ndarray, optional
        The q grid [1/Å] (default: the library's).
    order : int, optional
        Chebyshev order of the background (default: the library's).
    dtype : torch.dtype
        Floating type of the evaluation (float64 by default).
    device : str
        Torch device.

    Attributes
    ----------
    params : list of ParamDef
        The layout of θ.
    """

    def __init__(self, lib: PhaseLibrary, q: np.ndarray | None = None, *, order: int | None = None,
                 dtype: torch.dtype = torch.float64, device: str = "cpu") -> None:
        self.lib = lib
        self.q_np = np.array(lib.q if q is None else q, dtype=float)  # a writable copy
        self.dtype, self.device = dtype, torch.device(device)
        self.instrument: Instrument = lib.instrument_model()
        self.order = lib.spec.background.chebyshev_order if order is None else int(order)
        t = self._t
        self.q = t(self.q_np)
        lam = self.instrument.wavelength
        self.tth_q = t(_DEG * 2 * np.arcsin(self.q_np * lam / (4 * np.pi)))
        self.jac_q = t(_DEG * lam / (2 * np.pi) / np.cos(np.arcsin(self.q_np * lam / (4 * np.pi))))
        self.step = float(np.min(np.diff(self.q_np)))
        x = 2 * (self.q_np - self.q_np[0]) / (self.q_np[-1] - self.q_np[0]) - 1
        self.cheb = t(np.polynomial.chebyshev.chebvander(x, self.order))           # (npt, order+1)
        self.params: list[ParamDef] = []
        self.crystals: list[_Crystal] = []
        self.peaks: list[_Peak] = []
        q_max = float(self.q_np[-1]) * 1.05 + 0.05
        for i, (name, phase) in enumerate(zip(lib.phase_names, lib.phases)):
            spec = lib.spec.phases[name]
            scale_slot = self._add(name, "scale", 0.0, math.inf, True)
            slots: dict[str, int] = {}
            fixed: dict[str, float] = {}
            if isinstance(phase, AmorphousPeak):
                assert spec.peak is not None
                for key in ("q", "fwhm"):
                    lo, hi = (float(v) for v in getattr(spec.peak, key))
                    if hi > lo:
                        slots[key] = self._add(name, key, lo, hi, False)
                    else:
                        fixed[key] = lo
                self.peaks.append(_Peak(i, slots, fixed, scale_slot))
                continue
            assert isinstance(phase, Phase)
            keys = (*phase.lattice_keys, "size_nm")
            for key in keys:
                rng = getattr(spec, key, None)
                if rng is not None and rng[1] > rng[0]:
                    slots[key] = self._add(name, key, float(rng[0]), float(rng[1]), False)
                elif rng is not None:
                    fixed[key] = float(rng[0])
                elif key != "size_nm":
                    fixed[key] = float(phase.lattice[key])
            table = phase.peak_table(lam, q_max)
            self.crystals.append(_Crystal(i, phase.system, t(table.hkl.astype(float)), t(table.f2m),
                                          slots, fixed, scale_slot))
        self.bg_slots = [self._add("", f"bg{j}", -math.inf, math.inf, True) for j in range(self.order + 1)]
        self.lower = t(np.array([p.lower for p in self.params]))
        self.upper = t(np.array([p.upper for p in self.params]))

    # -- layout ------------------------------------------------------------------------------
    def _t(self, x: np.ndarray | float) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x, dtype=float), dtype=self.dtype, device=self.device)

    def _add(self, phase: str, key: str, lo: float, hi: float, linear: bool) -> int:
        self.params.append(ParamDef(phase, key, lo, hi, linear))
        return len(self.params) - 1

    @property
    def n_params(self) -> int:
        """P, the length of θ."""
        return len(self.params)

    @property
    def npt(self) -> int:
        """Points of the q grid."""
        return int(self.q_np.size)

    def index(self, phase: str, key: str) -> int | None:
        """Column of θ of ``phase.key`` (None: not fitted)."""
        for j, p in enumerate(self.params):
            if p.phase == phase and p.key == key:
                return j
        return None

    def midpoint(self) -> np.ndarray:
        """θ at the middle of every range (scales 0.5 of their library range's top, background 0)."""
        out = np.zeros(self.n_params)
        for j, p in enumerate(self.params):
            if p.key == "scale":
                lo, hi = self.lib.spec.phases[p.phase].scale
                out[j] = 0.5 * (lo + hi)
            elif not p.linear:
                out[j] = 0.5 * (p.lower + p.upper)
        return out

    def pack(self, params: dict[str, dict[str, np.ndarray]], background: np.ndarray | None = None,
             n: int | None = None) -> np.ndarray:
        """θ ``(n, P)`` from ``{phase: {key: (n,)}}`` and background ``(n, order+1)`` (missing: midpoints/0)."""
        if n is None:
            if params:
                n = len(next(iter(next(iter(params.values())).values())))
            else:
                n = 1 if background is None else len(np.atleast_2d(background))
        theta = np.tile(self.midpoint(), (n, 1))
        for j, p in enumerate(self.params):
            if p.phase and p.key in params.get(p.phase, {}):
                theta[:, j] = params[p.phase][p.key]
        if background is not None:
            bg = np.atleast_2d(np.asarray(background, dtype=float))
            k = min(bg.shape[1], len(self.bg_slots))
            theta[:, self.bg_slots[:k]] = bg[:, :k]
        return theta

    def unpack(self, theta: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        """``{phase: {key: (n,)}}`` of the fitted phase parameters of θ ``(n, P)``."""
        theta = np.atleast_2d(theta)
        out: dict[str, dict[str, np.ndarray]] = {}
        for j, p in enumerate(self.params):
            if p.phase:
                out.setdefault(p.phase, {})[p.key] = theta[:, j]
        return out

    # -- evaluation --------------------------------------------------------------------------
    def _peaks(self, theta: torch.Tensor, c: _Crystal) -> tuple[torch.Tensor, ...]:
        """(tth_k, area, fwhm, eta) ``(B, K)`` of one crystalline phase."""
        n = theta.shape[0]
        lam = self.instrument.wavelength

        def value(key: str) -> torch.Tensor | None:
            if key in c.slots:
                return theta[:, c.slots[key]]
            if key in c.fixed:
                return torch.full((n,), c.fixed[key], dtype=theta.dtype, device=theta.device)
            return None

        a = value("a")
        assert a is not None
        cc = value("c")
        h, k, ell = c.hkl[:, 0], c.hkl[:, 1], c.hkl[:, 2]
        a2 = a[:, None] ** 2
        if c.system == "cubic":
            inv_d2 = (h * h + k * k + ell * ell) / a2
            vol = a**3
        else:
            c2 = (a if cc is None else cc)[:, None] ** 2
            if c.system == "tetragonal":
                inv_d2 = (h * h + k * k) / a2 + ell * ell / c2
                vol = a * a * (a if cc is None else cc)
            else:
                inv_d2 = 4.0 / 3.0 * (h * h + h * k + k * k) / a2 + ell * ell / c2
                vol = math.sqrt(3.0) / 2.0 * a * a * (a if cc is None else cc)
        qk = 2.0 * math.pi * torch.sqrt(inv_d2)                                        # (B, K)
        sin_t = torch.clamp(qk * lam / (4 * math.pi), 0.0, 1.0)
        theta_k = torch.asin(sin_t)
        cos_t = torch.cos(theta_k)
        lp = (1 + torch.cos(2 * theta_k) ** 2) / (sin_t**2 * cos_t)
        scale = theta[:, c.scale_slot]
        area = scale[:, None] * c.f2m[None, :] / vol[:, None] ** 2 * lp
        ins = self.instrument
        tan = sin_t / cos_t
        hg = torch.sqrt(torch.clamp(ins.U * tan**2 + ins.V * tan + ins.W, min=1e-12))
        hl = ins.X / cos_t
        size = value("size_nm")
        if size is not None:
            hl = hl + _DEG * 0.9 * lam / (size[:, None] * 10.0 * cos_t)
        fwhm, eta = _tch(hg, hl)
        return _DEG * 2 * theta_k, qk, area, fwhm, eta

    def window_half(self, theta: torch.Tensor) -> list[int]:
        """Half-widths [grid points] of the numpy model's peak windows for the batch θ, one per crystalline phase.

        As :func:`xrdscale.physics.pattern.simulate_patterns`: ``ceil(WINDOW_FWHM · max FWHM_q / step) + 1``,
        the maximum over the phase's peaks in the batch.
        """
        lam = self.instrument.wavelength
        out = []
        with torch.no_grad():
            for c in self.crystals:
                tth_k, _, _, fwhm, _ = self._peaks(theta, c)
                if tth_k.numel() == 0:
                    out.append(1)
                    continue
                jac_k = _DEG * lam / (2 * math.pi * torch.cos(torch.deg2rad(tth_k / 2)))
                fwhm_q = float((fwhm / jac_k).max())
                out.append(int(math.ceil(WINDOW_FWHM * fwhm_q / self.step)) + 1)
        return out

    def max_half(self) -> list[int]:
        """Window half-widths that cover every θ inside the box (the widest peaks: the smallest sizes)."""
        probe = self._t(self.midpoint())[None, :].clone()
        for j, p in enumerate(self.params):
            if p.key == "size_nm":
                probe[0, j] = p.lower
            if p.key == "scale":
                probe[0, j] = 1.0
        return self.window_half(probe)

    def fit_windows(self, theta: torch.Tensor) -> list[torch.Tensor]:
        """Peak windows to hold fixed through a fit that starts at θ.

        Centred on θ's peaks, as wide as the widest peaks in the box (:meth:`max_half`) plus the
        farthest any peak can move inside the box: the model is then smooth in θ (no window edge
        crosses a grid point) and every peak keeps at least the numpy model's window on each side.
        """
        halves = self.max_half()
        lo_probe = self._t(self.midpoint())[None, :].repeat(2, 1)
        for j, p in enumerate(self.params):
            if p.key in ("a", "c"):
                lo_probe[0, j], lo_probe[1, j] = p.lower, p.upper
        out = []
        for c, h in zip(self.crystals, halves):
            _, qk, _, _, _ = self._peaks(lo_probe, c)
            move = float((qk[1] - qk[0]).abs().max()) if qk.numel() else 0.0
            out.append(h + int(math.ceil(move / self.step)) + 1)
        return self.windows(theta, out)

    def windows(self, theta: torch.Tensor, half: list[int] | None = None) -> list[torch.Tensor]:
        """Grid indices ``(B, K, W)`` of each crystalline phase's peak windows (constants of a pass).

        Parameters
        ----------
        theta : torch.Tensor (B, P)
            Parameters.
        half : list of int, optional
            Half-width per crystalline phase (default: :meth:`window_half` of θ, the numpy model's).
        """
        halves = self.window_half(theta) if half is None else [int(h) for h in half]
        npt = self.npt
        out = []
        with torch.no_grad():
            for c, h in zip(self.crystals, halves):
                width = min(2 * h + 1, npt)
                offsets = torch.arange(width, device=self.device)
                _, qk, _, _, _ = self._peaks(theta.detach(), c)
                centre = torch.searchsorted(self.q, qk.contiguous())
                start = torch.clamp(centre - h, 0, npt - width)
                out.append(start[:, :, None] + offsets)
        return out

    def __call__(self, theta: torch.Tensor, windows: list[torch.Tensor] | None = None,
                 half: list[int] | None = None) -> torch.Tensor:
        """Patterns ``(B, npt)`` of θ ``(B, P)``.

        Parameters
        ----------
        theta : torch.Tensor (B, P)
            Parameters in the layout :attr:`params`.
        windows : list of torch.Tensor, optional
            Peak windows from :meth:`windows` (computed here when not given).
        half : list of int, optional
            Half-widths of the windows when they are computed here (default: the numpy model's).
        """
        if windows is None:
            windows = self.windows(theta, half)
        n = theta.shape[0]
        out = (theta[:, self.bg_slots] @ self.cheb.T).to(theta.dtype)
        for c, idx in zip(self.crystals, windows):
            if c.hkl.shape[0] == 0:
                continue
            tth_k, _, area, fwhm, eta = self._peaks(theta, c)
            x = self.tth_q[idx] - tth_k[:, :, None]                                     # (B, K, W)
            vals = _pv(x, fwhm[:, :, None], eta[:, :, None]) * area[:, :, None] * self.jac_q[idx]
            out = out.scatter_add(1, idx.reshape(n, -1), vals.reshape(n, -1))
        for p in self.peaks:
            def value(key: str, p: _Peak = p) -> torch.Tensor:
                if key in p.slots:
                    return theta[:, p.slots[key]]
                return torch.full((n,), p.fixed[key], dtype=theta.dtype, device=theta.device)

            centre, fwhm = value("q"), value("fwhm")
            prof = _pv(self.q[None, :] - centre[:, None], fwhm[:, None], torch.full_like(fwhm[:, None], 0.5))
            out = out + AMORPHOUS_AREA * theta[:, p.scale_slot, None] * prof
        return out

    def components(self, theta: torch.Tensor, half: list[int] | None = None) -> torch.Tensor:
        """The design of the linear parameters at θ's non-linear ones: ``(B, npt, L)``.

        Columns: each phase's pattern at scale 1, then the Chebyshev polynomials, in the order of
        the linear entries of :attr:`params`.
        """
        linear = [j for j, p in enumerate(self.params) if p.linear]
        cols = []
        with torch.no_grad():
            windows = self.windows(theta, half)
            for j in linear:
                th = theta.clone()
                th[:, linear] = 0.0
                th[:, j] = 1.0
                cols.append(self(th, windows))
        return torch.stack(cols, dim=-1)
