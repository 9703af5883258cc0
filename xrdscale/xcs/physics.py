"""Compton scattering kinematics, electron momentum p_z and Compton profiles of compounds.

Energies are in keV, angles in degrees, electron momenta p_z in atomic units (a.u.).

- Eq. 4 of the XCS paper (Huang et al. 2025, J. Phys. Energy 7 025009): λ' − λ = h/mc (1 − cos θ),
  i.e. the Compton energy of a photon scattered by an electron at rest
  ``E2 = E1 / (1 + (E1 / mc²)(1 − cos θ))`` (:func:`compton_energy`); 115 keV at 90° gives 93.87 keV.
- Eq. 5: the projection p_z of the electron's momentum on the scattering vector,
  ``p_z / (mc) = (E2 − E1 + (E1 E2 / mc²)(1 − cos θ)) / sqrt(E1² + E2² − 2 E1 E2 cos θ)``
  (:func:`pz_au`, times ``mc = 137.036`` a.u.). It is 0 at the Compton energy, negative below it and
  positive above it, and increases monotonically with E2; :func:`energy_at_pz` inverts it exactly (a
  quadratic in E2, polished by one Newton step) and :func:`dpz_de` is its analytic derivative.
- Compton profiles: xraylib's atomic Hartree–Fock profiles J_Z(p_z) (tabulated for 0 ≤ p_z ≤ 100 a.u.,
  symmetric in p_z, 0 beyond) summed over a compound's atoms (:func:`compound_profile`); the
  integral over p_z is the number of electrons per formula unit.
- :func:`compton_spectrum`: the impulse-approximation energy spectrum
  ``dN/dE2 ∝ (E2 / E1) · J(p_z(E2)) · dp_z/dE2`` per formula unit (see there).

>>> round(float(compton_energy(115.0, 90.0)), 2)
93.87
>>> abs(float(pz_au(115.0, compton_energy(115.0, 90.0), 90.0))) < 1e-12
True
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import xraylib

from xrdscale.exceptions import InputError

logger = logging.getLogger(__name__)

#: Electron rest energy mc² [keV] (CODATA 2018).
MC2_KEV = 510.99895
#: Electron momentum mc in atomic units (= 1/α, CODATA 2018).
MC_AU = 137.035999
#: Largest |p_z| [a.u.] of xraylib's tabulated Compton profiles; J is taken as 0 beyond.
PZ_MAX_AU = 100.0


def _cos(angle_deg: Any) -> np.ndarray:
    return np.cos(np.deg2rad(np.asarray(angle_deg, dtype=float)))


def compton_energy(e1_kev: Any, angle_deg: Any) -> np.ndarray:
    """Energy of a photon Compton-scattered by a free electron at rest (Eq. 4).

    Parameters
    ----------
    e1_kev : float or array_like
        Incident energy [keV].
    angle_deg : float or array_like
        Scattering angle θ [degrees]; broadcasts with ``e1_kev``.

    Returns
    -------
    numpy.ndarray
        ``E2 = E1 / (1 + (E1 / mc²)(1 − cos θ))`` [keV] (a 0-d array for scalar input).

    Examples
    --------
    >>> round(float(compton_energy(115.0, 90.0)), 3)
    93.874
    """
    e1 = np.asarray(e1_kev, dtype=float)
    return e1 / (1.0 + (e1 / MC2_KEV) * (1.0 - _cos(angle_deg)))


def pz_au(e1_kev: Any, e2_kev: Any, angle_deg: Any) -> np.ndarray:
    """Electron momentum p_z [a.u.] of a photon scattered from ``e1_kev`` to ``e2_kev`` (Eq. 5).

    Parameters
    ----------
    e1_kev, e2_kev : float or array_like
        Incident and scattered energies [keV]; broadcast together with ``angle_deg``.
    angle_deg : float or array_like
        Scattering angle θ [degrees].

    Returns
    -------
    numpy.ndarray
        ``p_z = mc · (E2 − E1 + (E1 E2 / mc²)(1 − cos θ)) / sqrt(E1² + E2² − 2 E1 E2 cos θ)`` in a.u.;
        0 at :func:`compton_energy`, negative below it.
    """
    e1 = np.asarray(e1_kev, dtype=float)
    e2 = np.asarray(e2_kev, dtype=float)
    c = _cos(angle_deg)
    num = e2 - e1 + (e1 * e2 / MC2_KEV) * (1.0 - c)
    den = np.sqrt(e1 * e1 + e2 * e2 - 2.0 * e1 * e2 * c)
    return MC_AU * num / den


def dpz_de(e1_kev: Any, e2_kev: Any, angle_deg: Any) -> np.ndarray:
    """Derivative dp_z/dE2 of :func:`pz_au` [a.u. per keV] (analytic; positive).

    Parameters
    ----------
    e1_kev, e2_kev : float or array_like
        Incident and scattered energies [keV].
    angle_deg : float or array_like
        Scattering angle θ [degrees].

    Returns
    -------
    numpy.ndarray
        ``mc · (a / D − N (E2 − E1 cos θ) / D³)`` with ``a = 1 + (E1 / mc²)(1 − cos θ)``,
        ``N = a E2 − E1`` and ``D = sqrt(E1² + E2² − 2 E1 E2 cos θ)``.
    """
    e1 = np.asarray(e1_kev, dtype=float)
    e2 = np.asarray(e2_kev, dtype=float)
    c = _cos(angle_deg)
    a = 1.0 + (e1 / MC2_KEV) * (1.0 - c)
    num = a * e2 - e1
    den = np.sqrt(e1 * e1 + e2 * e2 - 2.0 * e1 * e2 * c)
    return MC_AU * (a / den - num * (e2 - e1 * c) / den**3)


def energy_at_pz(e1_kev: Any, pz: Any, angle_deg: Any) -> np.ndarray:
    """Scattered energy E2 [keV] at which :func:`pz_au` equals ``pz`` (the inverse of Eq. 5 in E2).

    With ``q = p_z / mc`` and ``a = 1 + (E1 / mc²)(1 − cos θ)``, Eq. 5 squared is the quadratic
    ``(a² − q²) E2² − 2 E1 (a − q² cos θ) E2 + E1² (1 − q²) = 0``; the root on the branch of the sign
    of ``q`` is ``E2 = E1 (a − q² cos θ + q sqrt(a² − 2 a cos θ + 1 − q² sin² θ)) / (a² − q²)``, then
    polished by one Newton step on Eq. 5 itself (round trip to ~1e-13 relative).

    Parameters
    ----------
    e1_kev : float or array_like
        Incident energy [keV].
    pz : float or array_like
        Electron momentum [a.u.]; broadcasts with the other arguments.
    angle_deg : float or array_like
        Scattering angle θ [degrees].

    Returns
    -------
    numpy.ndarray
        E2 [keV]; NaN where no energy has this p_z (|p_z| of the order of mc and above).
    """
    e1 = np.asarray(e1_kev, dtype=float)
    q = np.asarray(pz, dtype=float) / MC_AU
    c = _cos(angle_deg)
    s2 = 1.0 - c * c
    a = 1.0 + (e1 / MC2_KEV) * (1.0 - c)
    with np.errstate(invalid="ignore", divide="ignore"):
        root = np.sqrt(a * a - 2.0 * a * c + 1.0 - q * q * s2)
        e2 = e1 * (a - q * q * c + q * root) / (a * a - q * q)
        e2 = np.where(e2 > 0, e2, np.nan)
        e2 = e2 - (pz_au(e1, e2, angle_deg) - q * MC_AU) / dpz_de(e1, e2, angle_deg)
    return e2


def pz_window_kev(e1_kev: float, angle_deg: float, pz_lo: float, pz_hi: float) -> tuple[float, float]:
    """The scattered-energy interval [keV] of the p_z interval ``[pz_lo, pz_hi]`` (a.u.).

    Parameters
    ----------
    e1_kev : float
        Incident energy [keV].
    angle_deg : float
        Scattering angle θ [degrees].
    pz_lo, pz_hi : float
        The p_z interval [a.u.].

    Returns
    -------
    tuple of float
        ``(E_lo, E_hi)``; E2 increases with p_z, so ``E_lo < E_hi`` for ``pz_lo < pz_hi``.

    Examples
    --------
    >>> lo, hi = pz_window_kev(115.0, 90.0, -1.0, 1.0)
    >>> round(lo, 2), round(hi, 2)
    (92.99, 94.76)
    """
    lo = float(energy_at_pz(e1_kev, pz_lo, angle_deg))
    hi = float(energy_at_pz(e1_kev, pz_hi, angle_deg))
    return lo, hi


def scattering_angle_deg(e1_kev: Any, e2_kev: Any) -> np.ndarray:
    """Scattering angle [degrees] at which Eq. 4 puts the Compton energy at ``e2_kev`` (inverse of Eq. 4).

    Parameters
    ----------
    e1_kev : float or array_like
        Incident energy [keV].
    e2_kev : float or array_like
        Measured Compton peak energy [keV].

    Returns
    -------
    numpy.ndarray
        θ in degrees, ``cos θ = 1 − mc² (1/E2 − 1/E1)``.

    Raises
    ------
    InputError
        Some ``e2_kev`` is not a possible Compton energy of ``e1_kev``: not below E1, or below the
        180° (back-scattering) limit ``E1 / (1 + 2 E1 / mc²)``.
    """
    e1 = np.asarray(e1_kev, dtype=float)
    e2 = np.asarray(e2_kev, dtype=float)
    e1b, e2b = np.broadcast_arrays(e1, e2)
    lowest = e1b / (1.0 + 2.0 * e1b / MC2_KEV)
    bad = ~((e2b < e1b) & (e2b >= lowest) & (e2b > 0))
    if np.any(bad):
        i = np.flatnonzero(bad)[0]
        raise InputError(
            f"{float(e2b.flat[i]):g} keV is not a Compton energy of {float(e1b.flat[i]):g} keV photons: it must be "
            f"below the incident energy and at least the 180° limit {float(lowest.flat[i]):.4g} keV "
            f"({int(bad.sum())} value(s) out of range); check the peak energies and the incident energy"
        )
    cos = 1.0 - MC2_KEV * (1.0 / e2 - 1.0 / e1)
    return np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0)))


# --------------------------------------------------------------------------------------------
# compositions


def _atomic_number(key: Any) -> int:
    if isinstance(key, str):
        try:
            z = int(xraylib.SymbolToAtomicNumber(key.strip()))
        except ValueError:
            z = 0
        if z <= 0:
            raise InputError(f"unknown element symbol {key!r} in a composition; use symbols like 'Li' or numbers Z")
        return z
    try:
        z = int(key)
    except (TypeError, ValueError):
        raise InputError(f"composition keys must be element symbols or atomic numbers, got {key!r}") from None
    if z != key or not 1 <= z <= 100:
        raise InputError(f"atomic number {key!r} in a composition is not an integer between 1 and 100")
    return z


def composition(formula_or_mapping: str | Mapping[Any, float]) -> dict[int, float]:
    """Atoms per formula unit ``{Z: n}`` of a chemical formula or a mapping.

    Parameters
    ----------
    formula_or_mapping : str or mapping
        A chemical formula parsed by xraylib (decimals and parentheses allowed, e.g.
        ``"Li0.6Ni0.6Mn0.2Co0.2O2"``, ``"(C2H4O)15LiC2F6NO4S2"``), or a mapping of element symbol
        or atomic number to atoms per formula unit (repeated elements add up; zero counts dropped).

    Returns
    -------
    dict
        ``{Z: atoms}``, Z ascending.

    Raises
    ------
    InputError
        The formula cannot be parsed, an element is unknown, a count is negative or not finite, or
        there are no atoms at all.

    Examples
    --------
    >>> composition("Li0.6Ni0.6Mn0.2Co0.2O2")
    {3: 0.6, 8: 2.0, 25: 0.2, 27: 0.2, 28: 0.6}
    >>> composition({"Li": 1})
    {3: 1.0}
    """
    out: dict[int, float] = {}
    if isinstance(formula_or_mapping, str):
        try:
            parsed = xraylib.CompoundParser(formula_or_mapping)
        except ValueError as exc:
            raise InputError(f"cannot parse the chemical formula {formula_or_mapping!r}: {exc}; "
                             "write it like 'Li0.6Ni0.6Mn0.2Co0.2O2' or give a mapping of element to count") from None
        for z, n in zip(parsed["Elements"], parsed["nAtoms"], strict=True):
            out[int(z)] = out.get(int(z), 0.0) + float(n)
    elif isinstance(formula_or_mapping, Mapping):
        for key, n in formula_or_mapping.items():
            z = _atomic_number(key)
            try:
                value = float(n)
            except (TypeError, ValueError):
                raise InputError(f"the count of element {key!r} must be a number, got {n!r}") from None
            if not np.isfinite(value) or value < 0:
                raise InputError(f"the count of element {key!r} must be finite and >= 0, got {n!r}")
            out[z] = out.get(z, 0.0) + value
    else:
        raise InputError(f"a composition is a chemical formula string or a mapping element -> count, "
                         f"got {type(formula_or_mapping).__name__}")
    out = {z: n for z, n in sorted(out.items()) if n > 0}
    if not out:
        raise InputError(f"the composition {formula_or_mapping!r} has no atoms; give at least one element")
    return out


def nmc622(x: float = 1.0) -> dict[int, float]:
    """Composition of the cathode Li_x Ni0.6 Mn0.2 Co0.2 O2 (NMC622) at lithiation ``x``.

    Parameters
    ----------
    x : float
        Li per formula unit, ``0 <= x`` (1 = fully lithiated); ``x = 0`` gives the delithiated host.

    Returns
    -------
    dict
        ``{Z: atoms}``.

    Examples
    --------
    >>> electrons(nmc622(1.0))
    46.2
    """
    x = float(x)
    if not np.isfinite(x) or x < 0:
        raise InputError(f"the Li content x of Li_x NMC622 must be finite and >= 0, got {x!r}")
    return composition({"Li": x, "Ni": 0.6, "Mn": 0.2, "Co": 0.2, "O": 2.0})


def spe_peo_litfsi(eo_per_li: float = 15) -> dict[int, float]:
    """Composition of the solid polymer electrolyte (C2H4O)_n : LiTFSI (LiC2F6NO4S2), ``n = eo_per_li``.

    Parameters
    ----------
    eo_per_li : float
        Ethylene-oxide units per Li (the paper's PEO15:LiTFSI has 15).

    Returns
    -------
    dict
        ``{Z: atoms}`` per LiTFSI formula unit with its ``n`` EO units.

    Examples
    --------
    >>> electrons(spe_peo_litfsi(15))
    500.0
    """
    n = float(eo_per_li)
    if not np.isfinite(n) or n < 0:
        raise InputError(f"eo_per_li must be finite and >= 0, got {eo_per_li!r}")
    return composition({"C": 2 * n + 2, "H": 4 * n, "O": n + 4, "Li": 1, "F": 6, "N": 1, "S": 2})


def li_metal() -> dict[int, float]:
    """Composition of the Li-metal anode, ``{3: 1}``."""
    return {3: 1.0}


def electrons(comp: Mapping[int, float]) -> float:
    """Electrons per formula unit ``Σ n_Z Z`` of a composition ``{Z: n}`` (or anything :func:`composition` takes).

    Examples
    --------
    >>> electrons({3: 1.0, 8: 2.0})
    19.0
    """
    c = composition(comp)
    return float(sum(z * n for z, n in c.items()))


# --------------------------------------------------------------------------------------------
# Compton profiles and spectra


def _profile_at(z: int, pz: np.ndarray) -> np.ndarray:
    """xraylib's J_Z at every (non-negative) ``pz``: one scalar call per value (~0.4 µs each)."""
    return np.array([xraylib.ComptonProfile(z, float(p)) if p <= PZ_MAX_AU else 0.0 for p in pz], dtype=np.float64)


def atomic_profile(z: int, pz: Any) -> np.ndarray:
    """xraylib's Compton profile J_Z(|p_z|) [electrons per a.u.] of element ``z`` (0 beyond 100 a.u.).

    Parameters
    ----------
    z : int
        Atomic number.
    pz : float or array_like
        Electron momenta [a.u.], any sign (the profile is symmetric).

    Returns
    -------
    numpy.ndarray
        J of the shape of ``pz``; exact xraylib values at every point (computed once per unique |p_z|).
    """
    p = np.abs(np.asarray(pz, dtype=np.float64))
    if not np.all(np.isfinite(p)):
        raise InputError("p_z values must be finite to evaluate a Compton profile")
    uniq, inverse = np.unique(p, return_inverse=True)
    values = _profile_at(int(z), uniq)
    return values[inverse].reshape(p.shape)


def compound_profile(comp: Mapping[int, float] | str, pz: Any) -> np.ndarray:
    """Compton profile J(p_z) of a compound per formula unit, ``Σ_Z n_Z J_Z(|p_z|)``.

    Parameters
    ----------
    comp : mapping or str
        Composition ``{Z: n}`` (or anything :func:`composition` takes).
    pz : float or array_like
        Electron momenta [a.u.].

    Returns
    -------
    numpy.ndarray
        J [electrons per a.u. per formula unit], of the shape of ``pz``; its integral over all p_z is
        :func:`electrons` (within ~1 %: the tables stop at 100 a.u.).

    Examples
    --------
    >>> round(float(compound_profile({3: 1.0}, 0.0)), 2)
    2.59
    """
    c = composition(comp)
    p = np.asarray(pz, dtype=np.float64)
    total = np.zeros(p.shape, dtype=np.float64)
    for z, n in c.items():
        total += n * atomic_profile(z, p)
    return total


def compton_spectrum(comp: Mapping[int, float] | str, energy_kev: Any, e1_kev: float = 115.0,
                     angle_deg: float = 90.0, *, kn_factor: bool = True) -> np.ndarray:
    """Compton energy spectrum dN/dE2 of a compound per formula unit in the impulse approximation.

    ``dN/dE2 = (E2 / E1) · J(p_z(E2)) · dp_z/dE2`` (electrons per keV, for a unit cross-section per
    electron): the profile J of :func:`compound_profile` mapped from p_z to energy by Eq. 5 with its
    Jacobian :func:`dpz_de`, times the smooth factor ``E2/E1`` of the impulse-approximation double
    differential cross-section (Ribberfors 1975; its slowly varying Klein–Nishina-like factor X is
    taken as constant over the Compton peak). With ``kn_factor=False`` the factor is left out and
    the spectrum integrates exactly to the electrons within the tabulated p_z range. No binding-energy
    cut-off is applied (the impulse approximation for all electrons).

    Parameters
    ----------
    comp : mapping or str
        Composition ``{Z: n}`` (or anything :func:`composition` takes).
    energy_kev : array_like
        Scattered energies E2 [keV].
    e1_kev : float
        Incident energy [keV].
    angle_deg : float
        Scattering angle θ [degrees].
    kn_factor : bool
        Include the ``E2/E1`` factor (default).

    Returns
    -------
    numpy.ndarray
        dN/dE2 [per keV per formula unit] at ``energy_kev``; 0 for E2 ≥ E1, E2 ≤ 0 and |p_z| > 100 a.u.
    """
    e2 = np.asarray(energy_kev, dtype=np.float64)
    ok = (e2 > 0) & (e2 < e1_kev)
    out = np.zeros(e2.shape, dtype=np.float64)
    if not np.any(ok):
        return out
    sel = e2[ok]
    pz = pz_au(e1_kev, sel, angle_deg)
    spec = compound_profile(comp, pz) * dpz_de(e1_kev, sel, angle_deg)
    if kn_factor:
        spec = spec * (sel / e1_kev)
    out[ok] = spec
    return out


# --------------------------------------------------------------------------------------------
# lines


def _lines(elements: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for symbol in elements:
        z = xraylib.SymbolToAtomicNumber(symbol)
        out[f"{symbol} Ka1"] = float(xraylib.LineEnergy(z, xraylib.KA1_LINE))
        out[f"{symbol} Kb1"] = float(xraylib.LineEnergy(z, xraylib.KB1_LINE))
    return out


def fluorescence_lines() -> dict[str, float]:
    """K fluorescence lines [keV] of the CdZnTe detector: ``"Cd Ka1"``, ``"Cd Kb1"``, ``"Te Ka1"``, ``"Te Kb1"``.

    Examples
    --------
    >>> {k: round(v, 1) for k, v in fluorescence_lines().items()}
    {'Cd Ka1': 23.2, 'Cd Kb1': 26.1, 'Te Ka1': 27.5, 'Te Kb1': 31.0}
    """
    return _lines(("Cd", "Te"))


def shielding_lines() -> dict[str, float]:
    """K fluorescence lines [keV] of the W/Pb shielding: ``"W Ka1"``, ``"W Kb1"``, ``"Pb Ka1"``, ``"Pb Kb1"``.

    Examples
    --------
    >>> {k: round(v, 1) for k, v in shielding_lines().items()}
    {'W Ka1': 59.3, 'W Kb1': 67.2, 'Pb Ka1': 75.0, 'Pb Kb1': 84.9}
    """
    return _lines(("W", "Pb"))
