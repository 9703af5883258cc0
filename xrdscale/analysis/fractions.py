"""Weight fractions from scale factors (Hill & Howard), per pixel, with uncertainty.

Hill & Howard (J. Appl. Cryst. 20, 467, 1987) give the weight fraction of phase *i* in
a mixture from Rietveld scale factors ``S`` as ``W_i = S_i (ZMV)_i / Σ_j S_j (ZMV)_j``,
where Z·M is the mass of the unit cell and V its volume. Their ``S`` multiplies
``m |F|²`` alone. xrdscale's pattern model (DESIGN.md) folds the ``1/V²`` of the
kinematic intensity into the phase: a reflection is ``scale · m |F|² · LP / V²``. Hence
``S_HH = scale / V²`` and, per pixel, with the mass factor ``k = ZMV/V²`` of
:func:`xrdscale.physics.quant.mass_factor`,

    W_i = scale_i (ZMV)_i / V_i² / Σ_j scale_j (ZMV)_j / V_j²   ( = scale_i ρ_i / Σ scale_j ρ_j )

i.e. ``scale`` is proportional to the volume fraction of a phase and the density ρ turns
it into mass. V (and so ZMV/V²) is computed at the pixel's own lattice parameters where
the ``a``/``c`` maps hold values, else at the CIF's.

Uncertainty (first order, independent errors): with ``u_i = scale_i k_i``,
``k_i = (ZMV)_i / V_i²`` and ``T = Σ_j u_j``,

    σ²(W_i) = [ (1 − W_i)² σ²(u_i) + W_i² Σ_{j≠i} σ²(u_j) ] / T²,
    σ²(u_i) = k_i² σ²(scale_i) + u_i² Σ_keys (n_key σ(key)/key)²

where the ensemble standard deviations ``scale_std``, ``a_std``, ``c_std`` of the maps are
the σ's and ``n_key = ∂ln k/∂ln key`` (−3 for a cubic ``a``; −2, −1 for hexagonal ``a``, ``c``).
Covariances between phases are neglected.

Non-crystalline components (the separator) have no unit cell: they are excluded from
the sum and their weight fraction is NaN (a note is stored in the attrs).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from xrdscale.exceptions import InputError
from xrdscale.physics.constants import AMORPHOUS_DEFAULTS
from xrdscale.physics.crystal import BUILTIN_PHASES, builtin_phase
from xrdscale.physics.quant import is_crystalline, lattice_exponents, mass_factor

logger = logging.getLogger(__name__)

#: Map variables a weight-fraction computation needs.
REQUIRED = ("scale",)


def resolve_phases(names: Sequence[str], phases: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Return the phase object of every name, from ``phases`` or the built-in phases.

    Parameters
    ----------
    names : sequence of str
        Phase names of a ``maps`` store.
    phases : mapping, optional
        Name → :class:`~xrdscale.physics.crystal.Phase` (or ``AmorphousPeak``), e.g. from
        the phase library the model was trained on. Names not in it fall back to the
        built-in phases of the 18650 cell.

    Raises
    ------
    InputError
        A name is neither in ``phases`` nor a built-in phase.
    """
    out: dict[str, Any] = {}
    unknown = []
    for name in names:
        if phases is not None and name in phases:
            out[name] = phases[name]
        elif name in BUILTIN_PHASES or name in AMORPHOUS_DEFAULTS:
            out[name] = builtin_phase(name)
        else:
            unknown.append(name)
    if unknown:
        raise InputError(
            f"no structure for phase(s) {unknown}: they are neither built-in phases "
            f"({', '.join([*BUILTIN_PHASES, *AMORPHOUS_DEFAULTS])}) nor in the given phase library; "
            "pass the phase library the model was trained on (--phases PHASES.yaml)"
        )
    return out


def require(maps: xr.Dataset, variables: Sequence[str] = (), phases: Sequence[str] = (), *, what: str) -> None:
    """Raise :class:`InputError` if ``maps`` lacks any of ``variables`` or ``phases``.

    Parameters
    ----------
    maps : xarray.Dataset
        A ``maps`` store.
    variables, phases : sequence of str
        What the analysis needs.
    what : str
        The analysis, for the message (e.g. ``"weight fractions"``).
    """
    missing_vars = [v for v in variables if v not in maps.data_vars]
    have = [str(p) for p in maps["phase"].values] if "phase" in maps.coords else []
    missing_phases = [p for p in phases if p not in have]
    if missing_vars or missing_phases:
        src = maps.attrs.get("source_url", "the maps store")
        parts = []
        if missing_vars:
            parts.append(f"variable(s) {missing_vars} (it has {sorted(map(str, maps.data_vars))})")
        if missing_phases:
            parts.append(f"phase(s) {missing_phases} (it has {have})")
        raise InputError(f"{what} need(s) {' and '.join(parts)}, missing from {src}; "
                         "analyse the dataset with a model that predicts them")


def _mass_factor(maps: xr.Dataset, objs: Mapping[str, Any],
                 names: Sequence[str]) -> tuple[xr.DataArray, xr.DataArray]:
    """``k = ZMV/V²`` (phase, …) per pixel and its relative variance from the lattice std maps."""
    ph = xr.DataArray(list(names), dims="phase", name="phase")
    k = xr.DataArray([mass_factor(objs[n]) for n in names], dims="phase", coords={"phase": ph})
    k = k * xr.ones_like(maps["scale"].sel(phase=list(names)), dtype=float)
    rel_var = xr.zeros_like(k)
    exps = {n: lattice_exponents(objs[n]) for n in names}
    for key in sorted({key for e in exps.values() for key in e}):
        if key not in maps.data_vars:
            continue
        # k = ZMV / V² = ZM / V, so ∂ln k/∂ln key = −∂ln V/∂ln key
        n_k = xr.DataArray([-exps[n].get(key, 0.0) for n in names], dims="phase", coords={"phase": ph})
        lat0 = xr.DataArray([objs[n].lattice.get(key, 1.0) for n in names], dims="phase", coords={"phase": ph})
        lat = maps[key].sel(phase=list(names))
        valid = np.isfinite(lat) & (lat > 0) & (n_k != 0)
        lat = lat.where(valid, lat0)  # invalid lattice values leave k unchanged (and raise no warnings)
        k = k * (lat / lat0) ** n_k
        if f"{key}_std" in maps.data_vars:
            std = maps[f"{key}_std"].sel(phase=list(names))
            rel_var = rel_var + xr.where(valid & np.isfinite(std), (n_k * std / lat) ** 2, 0.0)
    return k, rel_var


def weight_fractions(maps: xr.Dataset, phases: Mapping[str, object] | None = None) -> xr.Dataset:
    """Per-pixel weight fractions (Hill & Howard) and their first-order uncertainty.

    Works lazily on dask-backed maps (chunk by chunk); nothing is computed here.

    Parameters
    ----------
    maps : xarray.Dataset
        A ``maps`` store with ``scale`` (phase, …) and optionally ``scale_std``, ``a``,
        ``c``, ``a_std``, ``c_std``.
    phases : mapping, optional
        Name → phase object for names that are not built-in phases.

    Returns
    -------
    xarray.Dataset
        ``weight_fraction`` and ``weight_fraction_std`` (phase, …); NaN for
        non-crystalline phases and where no crystalline phase has a positive scale.

    Raises
    ------
    InputError
        No ``scale`` map, a phase without a structure, or no crystalline phase at all.

    Examples
    --------
    >>> wf = weight_fractions(open_store("work/c1/maps.zarr", stage="maps"))  # doctest: +SKIP
    """
    require(maps, REQUIRED, what="weight fractions")
    names = [str(p) for p in maps["phase"].values]
    objs = resolve_phases(names, phases)
    crystalline = [n for n in names if is_crystalline(objs[n])]
    excluded = [n for n in names if n not in crystalline]
    if not crystalline:
        raise InputError(f"weight fractions need at least one crystalline phase; the maps have only {names}")
    k, rel_var = _mass_factor(maps, objs, crystalline)
    u = maps["scale"].sel(phase=crystalline).clip(min=0.0) * k
    var_u = u**2 * rel_var
    if "scale_std" in maps.data_vars:
        var_u = var_u + (k * maps["scale_std"].sel(phase=crystalline).fillna(0.0)) ** 2
    total = u.sum("phase")
    total = total.where(total > 0)
    w = u / total
    var = ((1 - w) ** 2 * var_u + w**2 * (var_u.sum("phase") - var_u)) / total**2
    out = xr.Dataset({"weight_fraction": w, "weight_fraction_std": np.sqrt(var)})
    out = out.reindex(phase=names).transpose(*maps["scale"].dims)  # non-crystalline phases → NaN
    note = "Hill & Howard, W_i = S_i (ZMV)_i / V_i^2 / sum_j; first-order std from the ensemble std"
    if excluded:
        note += f"; excluded as non-crystalline (NaN): {', '.join(excluded)}"
        logger.info("weight fractions: %s excluded (non-crystalline)", ", ".join(excluded))
    out["weight_fraction"].attrs.update(units="1", long_name="weight fraction", note=note)
    out["weight_fraction_std"].attrs.update(units="1", long_name="weight fraction std (first order)")
    return out


def with_weight_fractions(maps: xr.Dataset, phases: Mapping[str, object] | None = None) -> xr.Dataset:
    """Return ``maps`` with ``weight_fraction``/``weight_fraction_std`` (re)computed."""
    wf = weight_fractions(maps, phases)
    return maps.drop_vars(["weight_fraction", "weight_fraction_std"], errors="ignore").merge(wf)
