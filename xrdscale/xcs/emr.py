"""Electron momentum ratio (EMR), Compton peak position and Compton profiles J(p_z) of spectra.

EMR = counts(|p_z| < 1) / counts(1 < |p_z| < 5), p_z in atomic units from each bin's energy
by Eq. 5 of the XCS paper. A bin that straddles a window edge counts with the fraction of
its p_z span inside the window (counts are taken as uniform in p_z within a bin), so the
ratio does not jump as a window edge crosses a bin. Poisson uncertainty: a bin of n counts
has variance n (or the variance given, after the plane separation of
:mod:`xrdscale.xcs.separation`), the two windows share no bin, and
σ_EMR = EMR · sqrt(var_L / L² + var_H / H²).

Everything here is vectorised over pixels: a spectrum cube ``(..., bin)`` is reduced with
one matrix product per quantity.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from xrdscale.exceptions import InputError
from xrdscale.xcs import physics

logger = logging.getLogger(__name__)

#: the valence window |p_z| < 1 a.u. and the core window 1 < |p_z| < 5 a.u. of the paper
LOW_WINDOW = (0.0, 1.0)
HIGH_WINDOW = (1.0, 5.0)


def bin_edges(energy: np.ndarray) -> np.ndarray:
    """Bin edges (keV) of bin centres ``energy``: midpoints, the end bins extended symmetrically."""
    e = np.asarray(energy, dtype=float)
    if e.ndim != 1 or e.size < 2 or not np.all(np.diff(e) > 0):
        raise InputError("the energy axis must be one strictly increasing value per bin (keV), at least two bins")
    mid = 0.5 * (e[1:] + e[:-1])
    return np.concatenate([[2 * e[0] - mid[0]], mid, [2 * e[-1] - mid[-1]]])


@dataclass(frozen=True)
class Windows:
    """Per-bin weights of the two p_z windows on one energy axis.

    Attributes
    ----------
    low, high : ndarray
        ``(bin,)`` fraction of each bin inside |p_z| < 1 and inside 1 < |p_z| < 5.
    pz_edges : ndarray
        ``(bin + 1,)`` p_z (a.u.) of the bin edges.
    incident_kev, angle_deg : float
        E1 and θ the weights were computed for.
    """

    low: np.ndarray
    high: np.ndarray
    pz_edges: np.ndarray
    incident_kev: float
    angle_deg: float

    @property
    def support(self) -> tuple[int, int]:
        """``(i0, i1)``: the bins ``i0:i1`` that either window touches."""
        used = np.flatnonzero((self.low > 0) | (self.high > 0))
        return (int(used[0]), int(used[-1]) + 1) if used.size else (0, 0)

    @property
    def pz(self) -> np.ndarray:
        """p_z (a.u.) of the bin centres (midpoints of the edges)."""
        return 0.5 * (self.pz_edges[1:] + self.pz_edges[:-1])


def _overlap(lo: np.ndarray, hi: np.ndarray, a: float, b: float) -> np.ndarray:
    return np.clip(np.minimum(hi, b) - np.maximum(lo, a), 0.0, None)


def windows(energy: np.ndarray, *, incident_kev: float = 115.0, angle_deg: float = 90.0,
            low: tuple[float, float] = LOW_WINDOW, high: tuple[float, float] = HIGH_WINDOW) -> Windows:
    """The EMR window weights of the bins ``energy`` (keV centres) for E1 and θ.

    Raises
    ------
    InputError
        The bins do not cover the Compton window |p_z| < ``high[1]`` (the message gives the
        energies the window needs and the energies the cube has).
    """
    edges = bin_edges(energy)
    pz_edges = physics.pz_au(incident_kev, edges, angle_deg)
    reach = float(high[1])
    if not (pz_edges[0] <= -reach and pz_edges[-1] >= reach):
        need = physics.pz_window_kev(incident_kev, angle_deg, -reach, reach)
        raise InputError(
            f"the spectrum's bins ({edges[0]:.2f}–{edges[-1]:.2f} keV) do not cover the Compton window "
            f"|p_z| < {reach:g} a.u. at E1 = {incident_kev:g} keV, θ = {angle_deg:g}°: it needs "
            f"{need[0]:.2f}–{need[1]:.2f} keV. Check --incident-kev and --angle, or the cube's energy axis")
    lo, hi = pz_edges[:-1], pz_edges[1:]
    width = hi - lo
    w_low = (_overlap(lo, hi, -low[1], -low[0]) + _overlap(lo, hi, low[0], low[1])) / width
    w_high = (_overlap(lo, hi, -high[1], -high[0]) + _overlap(lo, hi, high[0], high[1])) / width
    return Windows(low=w_low, high=w_high, pz_edges=pz_edges, incident_kev=float(incident_kev),
                   angle_deg=float(angle_deg))


@dataclass(frozen=True)
class WindowSums:
    """Window sums of spectra and their variances (arrays of the spectra's leading shape)."""

    low: np.ndarray
    high: np.ndarray
    var_low: np.ndarray
    var_high: np.ndarray

    def ratio(self) -> tuple[np.ndarray, np.ndarray]:
        """``(emr, emr_std)``; NaN where the high window has no counts."""
        return emr_ratio(self.low, self.high, self.var_low, self.var_high)


def window_sums(counts: np.ndarray, win: Windows, variance: np.ndarray | None = None) -> WindowSums:
    """Sum ``counts`` ``(..., bin)`` over both windows; the variance defaults to Poisson (the counts).

    Only the bins the windows touch are read (about a tenth of a 0–120 keV spectrum), in
    one matrix product of the spectra with the two weight vectors.
    """
    if np.shape(counts)[-1] != win.low.size:
        raise InputError(f"spectra have {np.shape(counts)[-1]} bins but the energy axis has {win.low.size}")
    i0, i1 = win.support
    weights = np.stack([win.low[i0:i1], win.high[i0:i1]], axis=1)
    c = np.asarray(np.asarray(counts)[..., i0:i1], dtype=np.float64)
    sums = c @ weights
    v = c if variance is None else np.asarray(np.asarray(variance)[..., i0:i1], dtype=np.float64)
    var = v @ weights ** 2
    return WindowSums(low=sums[..., 0], high=sums[..., 1], var_low=var[..., 0], var_high=var[..., 1])


def emr_ratio(low: np.ndarray, high: np.ndarray, var_low: np.ndarray,
              var_high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """EMR = L / H with σ = EMR · sqrt(var_L/L² + var_H/H²); NaN where H ≤ 0 or L ≤ 0."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    ok = (high > 0) & (low > 0)
    safe_h = np.where(ok, high, 1.0)
    safe_l = np.where(ok, low, 1.0)
    ratio = np.where(ok, low / safe_h, np.nan)
    rel = np.sqrt(np.clip(var_low, 0, None) / safe_l ** 2 + np.clip(var_high, 0, None) / safe_h ** 2)
    return ratio, np.where(ok, ratio * rel, np.nan)


def emr(counts: np.ndarray, energy: np.ndarray, *, incident_kev: float = 115.0, angle_deg: float = 90.0,
        variance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(emr, emr_std)`` of spectra ``(..., bin)`` on bin centres ``energy`` (keV).

    Examples
    --------
    >>> e = np.linspace(80, 110, 3000)
    >>> spectrum = np.exp(-0.5 * (physics.pz_au(115.0, e, 90.0) / 1.5) ** 2) * 1e4
    >>> ratio, std = emr(spectrum, e)
    >>> bool(0.5 < ratio < 1.0)
    True
    """
    return window_sums(counts, windows(energy, incident_kev=incident_kev, angle_deg=angle_deg), variance).ratio()


def peak_position(counts: np.ndarray, energy: np.ndarray, *, incident_kev: float = 115.0, angle_deg: float = 90.0,
                  half_width_kev: float = 1.5, passes: int = 30, tol_kev: float = 1e-4) -> np.ndarray:
    """The Compton peak energy (keV) of spectra ``(..., bin)``: a centroid re-centred until it settles.

    It starts at Eq. 4's Compton energy and takes the count-weighted mean energy of the bins
    within ``half_width_kev`` of the current estimate. The Compton profile is nearly
    symmetric in energy over ±1.5 keV, so the settled centroid (at most ``passes``
    re-centrings, until it moves less than ``tol_kev``) is its maximum to a few eV; NaN
    where a spectrum has no counts there.
    """
    c = np.asarray(counts, dtype=np.float64)
    e = np.asarray(energy, dtype=np.float64)
    start = physics.compton_energy(incident_kev, angle_deg)
    near = np.abs(e - start) <= 4 * half_width_kev  # the centroid never wanders further: work on those bins only
    c, e = c[..., near], e[near]
    centre = np.full(c.shape[:-1], start, dtype=np.float64)
    for _ in range(passes):
        inside = np.abs(e - centre[..., None]) <= half_width_kev
        w = np.where(inside, np.clip(c, 0, None), 0.0)
        total = w.sum(axis=-1)
        new = np.where(total > 0, (w * e).sum(axis=-1) / np.where(total > 0, total, 1.0), np.nan)
        moved = np.nanmax(np.abs(new - centre)) if np.isfinite(new).any() else 0.0
        centre = new
        if moved < tol_kev:
            break
    return centre


def implied_angle(peak_kev: np.ndarray, incident_kev: float) -> np.ndarray:
    """The scattering angle (degrees) Eq. 4 gives for measured Compton peaks; NaN where impossible."""
    peak = np.asarray(peak_kev, dtype=np.float64)
    out = np.full(peak.shape, np.nan)
    lowest = physics.compton_energy(incident_kev, 180.0)
    ok = np.isfinite(peak) & (peak < incident_kev) & (peak > lowest)
    if ok.any():
        out[ok] = physics.scattering_angle_deg(incident_kev, peak[ok])
    return out


def profile(counts: np.ndarray, win: Windows, pz_grid: np.ndarray) -> np.ndarray:
    """The Compton profile J(p_z) of spectra ``(..., bin)``: counts per a.u. of p_z on ``pz_grid``.

    Each bin's counts are divided by its p_z width (the Jacobian dp_z/dE₂ of Eq. 5) and
    interpolated at ``pz_grid`` (NaN outside the bins' p_z range).
    """
    c = np.asarray(counts, dtype=np.float64)
    density = c / np.diff(win.pz_edges)
    pz = win.pz
    flat = density.reshape(-1, density.shape[-1])
    out = np.stack([np.interp(pz_grid, pz, row, left=np.nan, right=np.nan) for row in flat])
    return out.reshape(*c.shape[:-1], len(pz_grid))
