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

import logging
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np
import xarray as xr
from pydantic import Field, model_validator

from xrdscale.exceptions import ConfigError, InputError
from xrdscale.io import storage

# re-exported for callers of the stage module (the definitions live in xrdscale.physics.attenuation)
from xrdscale.physics.attenuation import AMORPHOUS_COMPOSITION as AMORPHOUS_COMPOSITION
from xrdscale.physics.attenuation import mass_attenuation as mass_attenuation
from xrdscale.physics.attenuation import mu_from_fractions
from xrdscale.physics.attenuation import phase_composition as phase_composition
from xrdscale.physics.constants import DEFAULT_ENERGY_KEV
from xrdscale.recon.geometry import Geometry
from xrdscale.stages.base import StageConfig, guarded, runtime_field, write_output
from xrdscale.stages.reconstruct import open_sinogram

logger = logging.getLogger(__name__)


class AbsorptionConfig(StageConfig):
    """Settings of the ``absorption`` stage (``pipeline.absorption`` of a campaign).

    μ comes from exactly one of ``mu_map`` and ``maps``. In a campaign both may contain
    ``{dataset}``, replaced by each dataset's id (per-dataset maps from an earlier run).
    """

    stage: ClassVar[str] = "absorption"

    enabled: bool = runtime_field(False, "run the stage in a campaign (the functions ignore it)")
    mu_map: str | None = Field(None, description="linear attenuation map [1/mm] (y, x): a .npy file or a store "
                                                 "with a `mu` variable, on the reconstruction grid")
    maps: str | None = Field(None, description="a maps store whose phase fractions give μ (see basis)")
    energy_kev: float | None = Field(None, gt=0, description="beam energy [keV]; default: from the phase "
                                                             "library's wavelength, else 95 keV")
    basis: Literal["volume", "weight"] = Field("volume", description="the maps' `scale` as volume fractions, or "
                                                                      "`weight_fraction` with a packing fraction")
    packing: float = Field(1.0, gt=0, le=1, description="volume fraction of solid in a voxel (weight basis)")
    min_transmission: float = Field(1e-3, gt=0, lt=1, description="rays transmitting less are divided by this")

    @model_validator(mode="after")
    def _one_source(self) -> AbsorptionConfig:
        if self.mu_map and self.maps:
            raise ValueError("give one of mu_map and maps, not both")
        if self.enabled and not (self.mu_map or self.maps):
            raise ValueError("absorption is enabled but neither mu_map nor maps is given; set mu_map to a .npy "
                             "file or a store with a `mu` (y, x) variable in 1/mm, or maps to a maps store")
        return self


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
                 packing: float = 1.0, phases: Mapping[str, Any] | None = None) -> np.ndarray:
    """μ map [1/mm] from a ``maps`` store (``scale`` as volume fractions, or ``weight_fraction``).

    ``phases`` (name → phase object of a phase library) give the composition of phases that
    are not built in (a library ``composition:``).
    """
    ds = storage.open_store(maps_url)
    var = "scale" if basis == "volume" else "weight_fraction"
    if var not in ds or "phase" not in ds[var].dims:
        raise InputError(f"maps store {storage.redact(maps_url)} has no {var!r} (phase, y, x) variable; "
                         "produce it with the analyse stage")
    maps = ds[var].transpose("phase", "y", "x").values
    fractions = {str(p): maps[i] for i, p in enumerate(ds["phase"].values)}
    return mu_from_fractions(fractions, energy_kev=energy_kev, basis=basis, packing=packing, phases=phases)


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
    import astra

    from xrdscale.recon.astra_engine import astra_geometry

    vol_geom, proj_geom, projector = astra_geometry(geometry)
    mu_px = (mu_mm * geometry.step_mm)[::-1].astype(np.float32)  # ASTRA rows run from +y down
    sino_id, line_integrals = astra.create_sino(np.ascontiguousarray(mu_px), projector)
    astra.data2d.delete(sino_id)
    return np.exp(-line_integrals.astype(np.float64))


def correct_absorption(sinogram_url: str, out_url: str, *, mu_map: np.ndarray | str | None = None,
                       config: AbsorptionConfig | None = None, phases: Mapping[str, Any] | None = None,
                       client: Any = None, progress: bool = True, **settings: Any) -> str:
    """Divide every ray of a sinogram store by its transmission (zero-order correction).

    Parameters
    ----------
    sinogram_url : str
        ``sinogram`` store to correct.
    out_url : str
        Destination ``sinogram`` store (same layout and chunks).
    mu_map : array or str, optional
        μ [1/mm] ``(y, x)`` on the reconstruction grid as an array (a URL goes in the config).
    config : AbsorptionConfig, optional
        ``mu_map`` or ``maps`` (the source of μ), ``energy_kev``, ``basis``, ``packing``,
        ``min_transmission``; keyword ``settings`` of the same names override it.
    phases : mapping, optional
        Phase objects of a phase library, for μ of phases that are not built in.
    client : distributed.Client, optional
        Dask client to run on.
    progress : bool
        Show progress.

    Returns
    -------
    str
        ``out_url``.

    Examples
    --------
    >>> correct_absorption("work/c1/sinogram.zarr", "work/c1/sino-abs.zarr", maps="work/c1/maps.zarr")  # doctest: +SKIP
    """
    array = mu_map if isinstance(mu_map, np.ndarray) else None
    if mu_map is not None and array is None:
        settings["mu_map"] = mu_map
    cfg = AbsorptionConfig.build(config, **settings)
    if (array is None and cfg.mu_map is None) == (cfg.maps is None):
        raise ConfigError("give exactly one source of μ: mu_map (--mu-map: a .npy file or a store with `mu`) "
                          "or maps (--maps: a maps store)")
    energy = cfg.energy_kev or DEFAULT_ENERGY_KEV

    def body() -> str:
        intensity, geometry = open_sinogram(sinogram_url)
        if cfg.maps is not None:
            mu = mu_from_maps(cfg.maps, energy_kev=energy, basis=cfg.basis, packing=cfg.packing, phases=phases)
        else:
            mu = load_mu_map(array if array is not None else str(cfg.mu_map))
        trans = transmission(np.asarray(mu, dtype=np.float64), geometry)
        logger.info("absorption: transmission %.3g … %.3g over %d rays", trans.min(), trans.max(), trans.size)
        factor = xr.DataArray((1.0 / np.maximum(trans, cfg.min_transmission)).astype(np.float32),
                              dims=("angle", "translation"))
        corrected = (intensity * factor).astype(np.float32).transpose("angle", "translation", "q")
        corrected.attrs = dict(intensity.attrs)
        out = corrected.to_dataset(name="intensity")
        out["transmission"] = xr.DataArray(trans.astype(np.float32), dims=("angle", "translation"))
        out = out.chunk({"angle": -1, "translation": -1, "q": intensity.data.chunksize[2]})
        for var in out.variables.values():
            var.encoding.clear()
        record = {**cfg.record(), "energy_kev": energy, "source": storage.redact(sinogram_url), "order": 0,
                  "mu": "array" if array is not None else storage.redact(str(cfg.mu_map or cfg.maps))}
        return write_output(out, out_url, kind="sinogram", config=record, client=client, progress=progress,
                            label="absorption")

    return guarded(out_url, body)
