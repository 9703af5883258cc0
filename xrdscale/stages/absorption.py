"""The ``absorption`` stage: zero-order self-absorption correction of sinograms.

What is corrected. In XRD-CT with a pencil beam the beam scattered at a voxel leaves at a
small angle 2θ (2–5° at 95 keV), so the incoming path to the voxel and the outgoing path
from it lie, to zero order, on the same line: every voxel on a ray is attenuated by the
transmission of the *whole* ray, ``T(θ, t) = exp(−∫ μ dl)``. The zero-order correction of
the paper divides each sinogram ray (all q channels) by ``T``, computed from a μ map by a
forward projection (ASTRA's ``linear`` projector, the geometry of the sinogram). The
first-order, per-voxel correction (outgoing paths that depend on 2θ and on the position of
the voxel on the ray) is not done.

Where μ comes from: a μ map given in 1/mm (an array, a ``.npy`` file, or a store with a
``mu`` variable ``(y, x)``), or a ``maps`` store: phase volume fractions (the ``scale``
maps, whose absolute units make a voxel full of one phase have scale 1) or
``weight_fraction`` maps with a packing fraction, times each phase's density and its mass
attenuation coefficient from xraylib (``CS_Total_Kissel`` summed over the element mass
fractions) at the beam energy. Iterating (reconstruct → maps → μ → correct) means running
the pipeline again with the new maps.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

import astra
import numpy as np
import xarray as xr
import xraylib

from xrdscale.io import storage
from xrdscale.exceptions import ConfigError, InputError
from xrdscale.recon.astra_engine import astra_geometry
from xrdscale.recon.geometry import Geometry
from xrdscale.stages.reconstruct import open_sinogram

logger = logging.getLogger(__name__)

#: beam energy of the 18650 experiment [keV] (λ = 0.130509 Å)
DEFAULT_ENERGY_KEV = 12.398419843320026 / 0.130509
#: composition (element mass fractions) and density [g/cm³] of phases without a crystal
#: structure: the separator is a polyolefin film (polyethylene, (C2H4)n)
AMORPHOUS_COMPOSITION: Mapping[str, tuple[Mapping[str, float], float]] = {
    "separator": ({"C": 0.8563, "H": 0.1437}, 0.94),
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
        total += w * xraylib.CS_Total_Kissel(z, float(energy_kev))
    return total


def phase_composition(name: str) -> tuple[Mapping[str, float], float]:
    """``(mass_fractions, density)`` of a built-in phase of :mod:`xrdscale.physics.crystal`."""
    if name in AMORPHOUS_COMPOSITION:
        return AMORPHOUS_COMPOSITION[name]
    from xrdscale.physics.crystal import builtin_phase

    phase = builtin_phase(name)
    return phase.mass_fractions, phase.density()


def mu_from_fractions(fractions: Mapping[str, np.ndarray], *, energy_kev: float = DEFAULT_ENERGY_KEV,
                      basis: str = "volume", packing: float = 1.0,
                      composition: Mapping[str, tuple[Mapping[str, float], float]] | None = None) -> np.ndarray:
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
        Phase → ``(mass_fractions, density)``; default: the built-in phases.
    """
    if basis not in ("volume", "weight"):
        raise ConfigError(f"unknown fraction basis {basis!r}; expected 'volume' or 'weight'")
    if not fractions:
        raise InputError("no phase fraction maps given; give at least one phase")
    mu_cm = None
    inv_rho = None
    for name, frac in fractions.items():
        mass_fractions, rho = (composition or {}).get(name) or phase_composition(name)
        f = np.nan_to_num(np.asarray(frac, dtype=np.float64), nan=0.0)
        mu_rho = mass_attenuation(mass_fractions, energy_kev)
        term = f * (rho * mu_rho if basis == "volume" else mu_rho)
        mu_cm = term if mu_cm is None else mu_cm + term
        inv_rho = f / rho if inv_rho is None else inv_rho + f / rho
    if basis == "weight":
        rho_mix = np.divide(1.0, inv_rho, out=np.zeros_like(inv_rho), where=inv_rho > 0)
        mu_cm = packing * rho_mix * mu_cm
    return mu_cm / 10.0  # 1/cm -> 1/mm


def load_mu_map(mu_map: np.ndarray | str) -> np.ndarray:
    """A μ map [1/mm] ``(y, x)`` from an array, a ``.npy`` URL or a store with a ``mu`` variable."""
    if isinstance(mu_map, np.ndarray):
        return mu_map
    if str(mu_map).endswith(".npy"):
        import io

        return np.load(io.BytesIO(storage.read_bytes(mu_map)))
    ds = storage.open_store(mu_map)
    if "mu" not in ds:
        raise InputError(f"{storage.redact(mu_map)} has no 'mu' variable (found {list(ds.data_vars)}); "
                         "give a store with mu (y, x) in 1/mm or a .npy file")
    return ds["mu"].values


def mu_from_maps(maps_url: str, *, energy_kev: float = DEFAULT_ENERGY_KEV, basis: str = "volume",
                 packing: float = 1.0) -> np.ndarray:
    """μ map [1/mm] from a ``maps`` store (``scale`` as volume fractions, or ``weight_fraction``)."""
    ds = storage.open_store(maps_url)
    var = "scale" if basis == "volume" else "weight_fraction"
    if var not in ds or "phase" not in ds[var].dims:
        raise InputError(f"maps store {storage.redact(maps_url)} has no {var!r} (phase, y, x) variable; "
                         "produce it with the analyse stage")
    maps = ds[var].transpose("phase", "y", "x").values
    fractions = {str(p): maps[i] for i, p in enumerate(ds["phase"].values)}
    return mu_from_fractions(fractions, energy_kev=energy_kev, basis=basis, packing=packing)


def transmission(mu_mm: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Transmission ``exp(−∫ μ dl)`` of every ray ``(angle, translation)`` of ``geometry``.

    Parameters
    ----------
    mu_mm : numpy.ndarray
        ``(y, x)`` μ map in 1/mm, ``y`` ascending, pixel = one translation step.
    geometry : Geometry
        Sinogram geometry.
    """
    if mu_mm.shape != (geometry.n_det, geometry.n_det):
        raise InputError(f"the μ map has shape {mu_mm.shape} but the sinogram needs "
                         f"({geometry.n_det}, {geometry.n_det}) (its translation count); "
                         "compute the map on the reconstruction grid of this sinogram")
    if not np.isfinite(mu_mm).all() or (mu_mm < 0).any():
        raise InputError("the μ map has NaN, infinite or negative values; μ must be finite and ≥ 0 (1/mm)")
    vol_geom, proj_geom, projector = astra_geometry(geometry)
    mu_px = (mu_mm * geometry.step_mm)[::-1].astype(np.float32)  # ASTRA rows run from +y down
    sino_id, line_integrals = astra.create_sino(np.ascontiguousarray(mu_px), projector)
    astra.data2d.delete(sino_id)
    return np.exp(-line_integrals.astype(np.float64))


def correct_absorption(sinogram_url: str, out_url: str, *, mu_map: np.ndarray | str | None = None,
                       maps_url: str | None = None, energy_kev: float = DEFAULT_ENERGY_KEV,
                       basis: str = "volume", packing: float = 1.0, min_transmission: float = 1e-3,
                       client=None) -> str:
    """Divide every ray of a sinogram store by its transmission (zero-order correction).

    Parameters
    ----------
    sinogram_url : str
        ``sinogram`` store to correct.
    out_url : str
        Destination ``sinogram`` store (same layout and chunks).
    mu_map : array, str, optional
        μ [1/mm] ``(y, x)`` on the reconstruction grid (array, ``.npy`` URL or store URL).
    maps_url : str, optional
        ``maps`` store to compute μ from (see :func:`mu_from_maps`); exactly one of
        ``mu_map`` and ``maps_url``.
    energy_kev, basis, packing
        See :func:`mu_from_fractions`.
    min_transmission : float
        Rays transmitting less are divided by this value instead (keeps noise bounded).
    client : distributed.Client, optional
        Dask client to run on.

    Returns
    -------
    str
        ``out_url``.

    Examples
    --------
    >>> correct_absorption("work/c1/sinogram.zarr", "work/c1/sino-abs.zarr", maps_url="work/c1/maps.zarr")  # doctest: +SKIP
    """
    if (mu_map is None) == (maps_url is None):
        raise ConfigError("give exactly one of a μ map (--mu-map) and a maps store (--maps)")
    if not 0 < min_transmission < 1:
        raise ConfigError(f"min_transmission must be in (0, 1), got {min_transmission}")
    intensity, geometry = open_sinogram(sinogram_url)
    mu = load_mu_map(mu_map) if mu_map is not None else mu_from_maps(maps_url, energy_kev=energy_kev,
                                                                      basis=basis, packing=packing)
    trans = transmission(np.asarray(mu, dtype=np.float64), geometry)
    logger.info("absorption: transmission %.3g … %.3g over %d rays", trans.min(), trans.max(), trans.size)
    factor = xr.DataArray((1.0 / np.maximum(trans, min_transmission)).astype(np.float32),
                          dims=("angle", "translation"))
    corrected = (intensity * factor).astype(np.float32).transpose("angle", "translation", "q")
    corrected.attrs = dict(intensity.attrs)
    out = corrected.to_dataset(name="intensity")
    out["transmission"] = xr.DataArray(trans.astype(np.float32), dims=("angle", "translation"))
    out = out.chunk({"angle": -1, "translation": -1, "q": intensity.data.chunksize[2]})
    for var in out.variables.values():
        var.encoding.clear()
    config = {"energy_kev": energy_kev, "source": storage.redact(sinogram_url), "order": 0,
              "mu": "array" if isinstance(mu_map, np.ndarray) else storage.redact(str(mu_map or maps_url)),
              "basis": basis if maps_url else None, "packing": packing if maps_url else None,
              "min_transmission": min_transmission}
    with client.as_current() if client is not None else contextlib.nullcontext():
        return storage.write_store(out, out_url, stage="sinogram", config=config)
