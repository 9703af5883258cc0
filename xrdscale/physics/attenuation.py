"""X-ray attenuation of phases: compositions, mass attenuation coefficients, μ maps.

A phase's attenuation needs its composition (element mass fractions) and its density. A
crystalline phase has both from its structure (cell contents, cell volume); a
non-crystalline component (the separator) has them from
:data:`xrdscale.physics.constants.AMORPHOUS_DEFAULTS`; any phase of a phase library may
give its own with a ``composition:`` entry (:class:`xrdscale.physics.phaselib.CompositionSpec`),
which is then carried by the phase object and used here before anything else.

Mass attenuation coefficients are xraylib's ``CS_Total_Kissel`` (photoelectric with
Kissel's cross sections, Rayleigh and Compton scattering) summed over the element mass
fractions, the NIST XCOM convention the paper's zero-order correction uses (``CS_Total``
for an element Kissel's tables do not cover at that energy, such as H at 95 keV).

Examples
--------
>>> comp = Composition.from_formula("C2H4", density=0.94)
>>> round(comp.mass_fractions["C"], 3)
0.856
>>> round(mass_attenuation(comp.mass_fractions, 95.0), 3)
0.173
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import xraylib

from xrdscale.exceptions import ConfigError, InputError
from xrdscale.physics.constants import AMORPHOUS_DEFAULTS, DEFAULT_ENERGY_KEV

if TYPE_CHECKING:
    from xrdscale.physics.crystal import AmorphousPeak, Phase

logger = logging.getLogger(__name__)


class Composition(NamedTuple):
    """Element mass fractions and density [g/cm³] of a phase (unpacks as ``(mass_fractions, density)``)."""

    mass_fractions: Mapping[str, float]
    density: float

    @classmethod
    def from_elements(cls, elements: Mapping[str, float], density: float) -> Composition:
        """From amounts of each element (atoms per formula unit, any normalisation).

        Raises
        ------
        InputError
            An unknown element symbol, a negative amount, or nothing at all.
        """
        weights = {el: float(n) * _atomic_weight(el) for el, n in elements.items()}
        if any(n < 0 for n in elements.values()):
            raise InputError(f"composition {dict(elements)} has negative amounts; give atoms per formula unit ≥ 0")
        total = sum(weights.values())
        if total <= 0:
            raise InputError(f"composition {dict(elements)} holds no atoms; give e.g. {{Li: 1, C: 6}}")
        return cls({el: w / total for el, w in weights.items() if w > 0}, float(density))

    @classmethod
    def from_formula(cls, formula: str, density: float) -> Composition:
        """From a chemical formula (xraylib's parser: ``LiC6``, ``C2H4``, ``LiNi0.8Co0.15Al0.05O2``).

        Raises
        ------
        InputError
            xraylib cannot parse the formula.
        """
        try:
            parsed = xraylib.CompoundParser(str(formula))
        except ValueError as exc:
            raise InputError(f"formula {formula!r} cannot be parsed ({exc}); write it like LiC6 or C2H4") from exc
        fractions = {xraylib.AtomicNumberToSymbol(int(z)): float(w)
                     for z, w in zip(parsed["Elements"], parsed["massFractions"], strict=True)}
        return cls(fractions, float(density))


def _atomic_weight(element: str) -> float:
    try:
        return float(xraylib.AtomicWeight(xraylib.SymbolToAtomicNumber(str(element))))
    except ValueError as exc:
        raise InputError(f"unknown element {element!r} in a phase composition; use symbols like Li, C, O") from exc


#: Composition (element mass fractions) and density [g/cm³] of the non-crystalline
#: components xrdscale knows by name (the separator: polyethylene, (C2H4)n).
AMORPHOUS_COMPOSITION: Mapping[str, Composition] = {
    name: Composition(dict(d.mass_fractions), d.density) for name, d in AMORPHOUS_DEFAULTS.items()
}


def mass_attenuation(mass_fractions: Mapping[str, float], energy_kev: float) -> float:
    """Total mass attenuation coefficient [cm²/g] of a composition (xraylib, Kissel).

    Parameters
    ----------
    mass_fractions : mapping
        Element symbol → mass fraction.
    energy_kev : float
        Photon energy in keV.
    """
    total = 0.0
    for element, w in mass_fractions.items():
        try:
            z = xraylib.SymbolToAtomicNumber(element)
        except ValueError as exc:
            raise InputError(f"unknown element {element!r} in a phase composition") from exc
        try:
            mu = xraylib.CS_Total_Kissel(z, float(energy_kev))
        except ValueError:
            # Kissel's photoionisation tables stop short for the lightest elements (H above
            # ~ tens of keV), where the photoelectric part is negligible: xraylib's own total.
            mu = xraylib.CS_Total(z, float(energy_kev))
        total += w * mu
    return total


def phase_composition(phase: str | Phase | AmorphousPeak) -> Composition:
    """``(mass_fractions, density)`` of a phase object or of a built-in phase name.

    A phase object's own ``composition`` (from a phase library's ``composition:`` entry)
    comes first; then, for a crystalline phase, its structure's cell contents and
    crystallographic density; for a name, the known non-crystalline components
    (:data:`AMORPHOUS_COMPOSITION`) and the built-in phases of
    :mod:`xrdscale.physics.crystal`.

    Raises
    ------
    InputError
        A non-crystalline phase without a composition, or an unknown name.
    """
    from xrdscale.physics.crystal import BUILTIN_PHASES, Phase, builtin_phase

    if isinstance(phase, str):
        if phase in AMORPHOUS_COMPOSITION:
            return AMORPHOUS_COMPOSITION[phase]
        if phase not in BUILTIN_PHASES:
            raise InputError(f"no composition for phase {phase!r}: it is not a built-in phase "
                             f"({', '.join(BUILTIN_PHASES)}, {', '.join(AMORPHOUS_COMPOSITION)}); give it a "
                             "`composition: {elements: {...}, density: ...}` in the phase library")
        phase = builtin_phase(phase)
    own = getattr(phase, "composition", None)
    if own is not None:
        return Composition(*own)
    if isinstance(phase, Phase):
        return Composition(phase.mass_fractions, phase.density())
    if phase.name in AMORPHOUS_COMPOSITION:
        return AMORPHOUS_COMPOSITION[phase.name]
    raise InputError(f"no composition for the peak phase {phase.name!r}: a peak has no structure to take it from; "
                     "give it a `composition: {elements: {C: 2, H: 4}, density: 0.94}` (or `formula: C2H4`) "
                     "in the phase library")


def mu_from_fractions(fractions: Mapping[str, np.ndarray], *, energy_kev: float = DEFAULT_ENERGY_KEV,
                      basis: str = "volume", packing: float = 1.0,
                      composition: Mapping[str, tuple[Mapping[str, float], float]] | None = None,
                      phases: Mapping[str, Any] | None = None) -> np.ndarray:
    """Linear attenuation map μ [1/mm] from per-phase fraction maps.

    Parameters
    ----------
    fractions : mapping
        Phase name → ``(y, x)`` map; NaN counts as 0.
    energy_kev : float
        Beam energy.
    basis : {"volume", "weight"}
        ``volume``: volume fractions φᵢ, ``μ = Σ φᵢ ρᵢ (μ/ρ)ᵢ``. ``weight``: weight
        fractions wᵢ of the solid, ``μ = packing · ρ_mix · Σ wᵢ (μ/ρ)ᵢ`` with
        ``1/ρ_mix = Σ wᵢ/ρᵢ`` (0 where all fractions are 0).
    packing : float
        Volume fraction of solid in a voxel (``weight`` basis only).
    composition : mapping, optional
        Phase → ``(mass_fractions, density)``, used before anything else.
    phases : mapping, optional
        Phase → phase object (e.g. ``dict(zip(lib.phase_names, lib.phases))`` of a phase
        library), for phases that are not built in or carry their own composition.
    """
    if basis not in ("volume", "weight"):
        raise ConfigError(f"unknown fraction basis {basis!r}; expected 'volume' or 'weight'")
    if not fractions:
        raise InputError("no phase fraction maps given; give at least one phase")
    mu_cm: Any = 0.0
    inv_rho: Any = 0.0
    for name, frac in fractions.items():
        given = (composition or {}).get(name)
        mass_fractions, rho = given or phase_composition((phases or {}).get(name, name))
        f = np.nan_to_num(np.asarray(frac, dtype=np.float64), nan=0.0)
        mu_rho = mass_attenuation(mass_fractions, energy_kev)
        mu_cm = mu_cm + f * (rho * mu_rho if basis == "volume" else mu_rho)
        inv_rho = inv_rho + f / rho
    if basis == "weight":
        rho_mix = np.divide(1.0, inv_rho, out=np.zeros_like(inv_rho), where=inv_rho > 0)
        mu_cm = packing * rho_mix * mu_cm
    return np.asarray(mu_cm, dtype=np.float64) / 10.0  # 1/cm -> 1/mm
