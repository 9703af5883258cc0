"""Quantitative phase analysis: the Hill & Howard mass factor of xrdscale's scale factors.

Hill & Howard (J. Appl. Cryst. 20, 467, 1987) give the weight fraction of phase *i* of a
mixture from Rietveld scale factors ``S`` as ``W_i = S_i (ZMV)_i / Σ_j S_j (ZMV)_j``, Z·M
the mass of the unit cell and V its volume, for an ``S`` that multiplies ``m |F|²`` alone.
The pattern model of xrdscale (:mod:`xrdscale.physics.pattern`) folds the ``1/V²`` of the
kinematic intensity into the phase, ``I_hkl = scale · m |F|² · LP / V²``, so
``S_HH = scale / V²`` and the factor that turns a ``scale`` into a mass is

    k = ZMV / V² = Z·M / V      [g/mol per Å³; ∝ the crystallographic density]

(``scale`` is proportional to the volume fraction of a phase; ``k`` turns volume into mass).
This module is the one implementation every analysis uses
(:mod:`xrdscale.analysis.fractions`, :mod:`xrdscale.analysis.regions`).

Examples
--------
>>> from xrdscale.physics.crystal import builtin_phase
>>> al = builtin_phase("Al")
>>> bool(np.isclose(mass_factor(al), al.zmv() / al.volume() ** 2))
True
>>> lattice_exponents(al)
{'a': 3.0}
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from xrdscale.physics.crystal import Phase, cell_volume

logger = logging.getLogger(__name__)


def is_crystalline(phase: object) -> bool:
    """True for a phase with a unit cell (Z, M, V); False for a single non-crystalline peak."""
    return hasattr(phase, "zmv") and bool(getattr(phase, "lattice_keys", ()))


def mass_factor(phase: Phase, **lattice: np.ndarray | float | None) -> np.ndarray | float:
    """Hill & Howard ``ZMV / V²`` of ``phase`` [g/mol/Å³], at the given (or the CIF's) lattice.

    Parameters
    ----------
    phase : Phase
        A crystalline phase.
    **lattice : float or ndarray
        Lattice parameters (``a``, ``c``) [Å], scalars or arrays of one shape; a missing
        or ``None`` key keeps the structure's value.

    Returns
    -------
    float or ndarray
        A float for scalar (or no) lattice parameters, else an array of their shape.

    Raises
    ------
    ValueError
        ``phase`` has no unit cell (a single peak has no mass factor).
    """
    if not is_crystalline(phase):
        raise ValueError(f"phase {getattr(phase, 'name', phase)!r} is not crystalline: it has no Hill & Howard "
                         "mass factor (no Z, M, V)")
    lat: dict[str, Any] = dict(phase.lattice)
    lat.update({k: v for k, v in lattice.items() if v is not None})
    vol = cell_volume(phase.system, lat["a"], lat.get("c"))
    out = phase.cell_mass / vol
    return float(out) if np.ndim(out) == 0 else out


def lattice_exponents(phase: Phase) -> dict[str, float]:
    """``∂ln V/∂ln key`` for each lattice key of ``phase`` (3 for cubic ``a``; 2, 1 for hexagonal ``a``, ``c``).

    ``∂ln k/∂ln key`` of the mass factor is minus these (``k = ZM/V``).
    """
    base = phase.lattice
    v0 = phase.volume()
    return {key: round(float(np.log(phase.volume(**{key: value * 1.01}) / v0) / np.log(1.01)), 9)
            for key, value in base.items()}
