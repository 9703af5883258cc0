"""Physical constants and the defaults of the 18650 experiment, defined once for all of xrdscale.

Everything that converts between photon energy and wavelength, and every default of the
non-crystalline ``separator`` component of the cell (its single diffraction peak, the
training ranges of that peak, its composition and density for attenuation), lives here.
Modules import these names rather than repeating the numbers.

Examples
--------
>>> round(energy_kev(DEFAULT_WAVELENGTH), 2)
95.0
>>> SEPARATOR.name, SEPARATOR.q, SEPARATOR.fwhm
('separator', 1.525, 0.03)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

#: h·c [keV·Å] (CODATA 2018, exact in SI): E [keV] = HC_KEV_ANGSTROM / λ [Å].
HC_KEV_ANGSTROM = 12.398419843320026
#: Avogadro's number [1/mol], for densities.
AVOGADRO = 6.02214076e23
#: Wavelength of the 18650 experiment [Å] (seed 000, Methods: 95 keV).
DEFAULT_WAVELENGTH = 0.130509
#: The constant K of ``I_hkl = K · scale · m|F|² · LP / V²``: 1, the absolute units of
#: shared/DESIGN.md ("Pattern model"), so the pattern model carries no such factor at all.
#: Training libraries and PQ-Net models record it, because those made before xrdscale
#: followed the contract were simulated with K = 10⁻² (scale factors 100 times the contract's).
INTENSITY_UNIT = 1.0


def energy_kev(wavelength: float) -> float:
    """Photon energy [keV] of a wavelength [Å]."""
    return HC_KEV_ANGSTROM / float(wavelength)


def wavelength_angstrom(energy: float) -> float:
    """Wavelength [Å] of a photon energy [keV]."""
    return HC_KEV_ANGSTROM / float(energy)


#: Beam energy of the 18650 experiment [keV] (≈ 95 keV).
DEFAULT_ENERGY_KEV = energy_kev(DEFAULT_WAVELENGTH)


@dataclass(frozen=True)
class AmorphousDefaults:
    """Defaults of a non-crystalline component modelled as one pseudo-Voigt peak.

    Attributes
    ----------
    name : str
        Phase name (as in ``maps`` stores and phase libraries).
    q_range, fwhm_range : (float, float)
        Training ranges of the peak position and width [1/Å]; :attr:`q` and :attr:`fwhm`
        (their midpoints) are the peak of the built-in phase.
    mass_fractions : mapping
        Element → mass fraction, for attenuation.
    density : float
        Density [g/cm³].
    """

    name: str
    q_range: tuple[float, float]
    fwhm_range: tuple[float, float]
    mass_fractions: Mapping[str, float] = field(default_factory=dict)
    density: float = 1.0

    @property
    def q(self) -> float:
        """Peak position of the built-in phase [1/Å] (the middle of :attr:`q_range`)."""
        return round(0.5 * (self.q_range[0] + self.q_range[1]), 9)

    @property
    def fwhm(self) -> float:
        """Peak width of the built-in phase [1/Å] (the middle of :attr:`fwhm_range`)."""
        return round(0.5 * (self.fwhm_range[0] + self.fwhm_range[1]), 9)

    @property
    def composition(self) -> tuple[Mapping[str, float], float]:
        """``(mass_fractions, density)`` as :func:`xrdscale.physics.attenuation.phase_composition` returns it."""
        return self.mass_fractions, self.density


#: The separator of the 18650 cell: a polyolefin film (polyethylene, (C2H4)n, 0.94 g/cm³)
#: with one broad peak; q 1.52–1.53 1/Å and FWHM 0.01–0.05 1/Å are the PQ-Net training
#: ranges of the paper (seed 000; its Table S1 lists the peak at q ≈ 1.818 1/Å).
SEPARATOR = AmorphousDefaults(
    name="separator", q_range=(1.52, 1.53), fwhm_range=(0.01, 0.05),
    mass_fractions=MappingProxyType({"C": 0.8563, "H": 0.1437}), density=0.94,
)

#: Non-crystalline components xrdscale knows by name.
AMORPHOUS_DEFAULTS: Mapping[str, AmorphousDefaults] = MappingProxyType({SEPARATOR.name: SEPARATOR})
