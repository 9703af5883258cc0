"""The X-ray Compton scattering stages: EMR maps of spectrum cubes, and Li stoichiometry maps.

:class:`XcsConfig` is the config of ``xrdscale xcs emr`` (and ``pipeline.xcs`` of a
campaign): the scattering geometry (E1, θ), the p_z windows, the three-plane separation
(α, β), which spectra are read (charge sharing), per-pixel energy calibration and the
masking of dead and noisy pixels. :func:`emr_maps` reads one spectrum cube per state and
writes an ``xcs`` store; :func:`lithium` adds the x maps of a calibration to it.

The work runs on Dask: one task per block of detector rows of every state reads its
spectra, separates the planes, and reduces every pixel to its two window sums, its
variances and its Compton peak, plus the block's summed spectrum per region; a worker never
holds more than one block.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar

import numpy as np
import xarray as xr
from pydantic import Field, model_validator

from xrdscale.config import one_of
from xrdscale.exceptions import InputError
from xrdscale.io import storage
from xrdscale.stages.base import StageConfig, compute, guarded, runtime_field

logger = logging.getLogger(__name__)

Separation = Annotated[str, one_of(("auto", "three-plane", "none"), "plane separation")]
ChargeSharing = Annotated[str, one_of(("auto", "raw", "corrected"), "charge-sharing spectra")]

#: the plane names of the paper's three beam positions
THREE_PLANES = ("R1", "R2", "R3")


class XcsConfig(StageConfig):
    """Settings of EMR maps of Compton spectra (``xrdscale xcs emr``, ``pipeline.xcs``)."""

    stage: ClassVar[str] = "xcs"

    incident_kev: float = Field(115.0, gt=0, description="incident X-ray energy E1 in keV")
    angle: float = Field(90.0, gt=0, lt=180, description="scattering angle θ in degrees")
    pz_low: float = Field(1.0, gt=0, description="valence window |p_z| < pz_low (a.u.)")
    pz_high: float = Field(5.0, gt=0, description="core window pz_low < |p_z| < pz_high (a.u.)")
    separation: Separation = Field("auto", description="three-plane component separation (Eqs. 2-3): auto (when the "
                                                       "cube has planes R1, R2, R3 and alpha, beta are given), "
                                                       "three-plane, or none (every plane as it is)")
    alpha: float | None = Field(None, ge=0, description="anode volume in plane R2 relative to R3 (Eq. 2)")
    beta: float | None = Field(None, ge=0, description="anode volume in plane R1 relative to R3 (Eq. 3)")
    target: str | None = Field(None, description="region whose EMR is the emr map (and the x map): default "
                                                 "cathode when separated, else the first plane")
    planes: list[str] | None = Field(None, description="names of the planes of each state (default: from the file, "
                                                       "or R1, R2, R3 for three plane files)")
    charge_sharing: ChargeSharing = Field("auto", description="spectra to read: auto (charge-sharing corrected when "
                                                              "the file has them), raw, or corrected")
    dataset: str | None = Field(None, description="path of the spectra dataset in HDF5 files (default: spectra)")
    energy_lines: list[float] | None = Field(None, description="known lines (keV, e.g. Cd/Te fluorescence, the elastic "
                                                               "line) for a per-pixel linear energy calibration")
    mask_bad_pixels: bool = Field(True, description="mask dead and noisy pixels (robust statistics of the counts)")
    dead_fraction: float = Field(0.1, ge=0, lt=1, description="dead: total counts below this fraction of the median")
    noisy_sigma: float = Field(6.0, gt=0, description="noisy: total counts above median + this many robust σ")
    peak_half_width: float = Field(1.5, gt=0, description="half width (keV) of the Compton peak centroid window")
    pz_max: float = Field(10.0, gt=0, description="the profiles J(p_z) span -pz_max … pz_max a.u.")
    pz_step: float = Field(0.1, gt=0, description="p_z step (a.u.) of the profiles")
    chunk_rows: int = runtime_field(8, "detector rows per Dask task", ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> XcsConfig:
        problems = []
        if self.pz_high <= self.pz_low:
            problems.append(f"pz_high ({self.pz_high}) must exceed pz_low ({self.pz_low})")
        if self.separation == "three-plane" and (self.alpha is None or self.beta is None):
            problems.append("separation: three-plane needs alpha and beta (the anode volume of R2 and R1 relative "
                            "to R3; `xrdscale ct roughness --beam-plane …` measures them)")
        if self.energy_lines is not None and len(self.energy_lines) < 2:
            problems.append(f"energy_lines needs at least two lines for a linear calibration; got {self.energy_lines}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class LithiumConfig(StageConfig):
    """Settings of Li stoichiometry maps from EMR maps (``xrdscale xcs lithium``)."""

    stage: ClassVar[str] = "xcs-lithium"

    clip: bool = Field(False, description="clip x to ≥ 0 (noise can push a pixel's EMR below the calibration's zero)")


# -- reading states ----------------------------------------------------------------------

def _state_files(source: str) -> list[str]:
    """The plane files of one state: one file, or several joined by commas (one per plane)."""
    return [s.strip() for s in str(source).split(",") if s.strip()]


def open_state(source: str, cfg: XcsConfig) -> Any:
    """The cube of one state: one file with every plane, or one file per plane (``a.hxt,b.hxt,c.hxt``)."""
    import dask.array as da

    from xrdscale.xcs import spectra

    files = _state_files(source)
    cubes = [spectra.open_cube(f, dataset=cfg.dataset, charge_sharing=cfg.charge_sharing, chunk_rows=cfg.chunk_rows)
             for f in files]
    first = cubes[0]
    for f, c in zip(files[1:], cubes[1:], strict=True):
        if c.counts.shape[1:3] != first.counts.shape[1:3] or not np.allclose(c.energy, first.energy):
            raise InputError(f"the plane files of one state must share the pixel grid and energy bins: {files[0]} "
                             f"has {first.counts.shape[1:3]} pixels, {first.energy.size} bins; {f} has "
                             f"{c.counts.shape[1:3]}, {c.energy.size}")
    counts = da.concatenate([c.counts for c in cubes], axis=0) if len(cubes) > 1 else first.counts
    n_planes = counts.shape[0]
    if cfg.planes is not None:
        names = tuple(cfg.planes)
    elif len(cubes) > 1:
        names = THREE_PLANES if n_planes == 3 else tuple(f"plane{i}" for i in range(n_planes))
    else:
        names = tuple(first.planes)
    if len(names) != n_planes or len(set(names)) != n_planes:
        raise InputError(f"{source}: {n_planes} plane(s) but plane names {list(names)}; give one unique name per "
                         "plane (--planes R1,R2,R3)")
    mask = None
    for c in cubes:
        if c.mask is not None:
            mask = c.mask if mask is None else (mask | c.mask)
    return spectra.Cube(counts=counts, energy=np.asarray(first.energy, dtype=np.float64), planes=names, mask=mask,
                        meta={**first.meta, "source": source})


def _separates(cfg: XcsConfig, planes: Sequence[str]) -> bool:
    has_three = tuple(planes) == THREE_PLANES
    if cfg.separation == "none":
        return False
    if cfg.separation == "three-plane":
        if not has_three:
            raise InputError(f"separation: three-plane needs the planes R1, R2, R3; the cube has {list(planes)} "
                             "(name them with --planes)")
        return True
    return has_three and cfg.alpha is not None and cfg.beta is not None


def _read_mask(source: str | np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    """A pixel mask (y, x) from an array or a .npy/HDF5 file (nonzero = excluded)."""
    if source is None:
        return None
    if isinstance(source, np.ndarray):
        arr = source
    else:
        import io

        import h5py

        data = storage.read_bytes(source)
        if data.startswith(b"\x93NUMPY"):
            arr = np.load(io.BytesIO(data))
        elif data.startswith(b"\x89HDF"):
            with h5py.File(io.BytesIO(data), "r") as h5:
                sets = [k for k in h5 if isinstance(h5[k], h5py.Dataset) and h5[k].ndim == 2]
                if len(sets) != 1:
                    raise InputError(f"{storage.redact(source)}: a mask file holds one 2D dataset; found {sets}")
                arr = h5[sets[0]][()]
        else:
            raise InputError(f"{storage.redact(source)}: a mask is a .npy or HDF5 file of one 2D array")
    if arr.shape != shape:
        raise InputError(f"the mask has shape {arr.shape} but the detector has {shape} pixels")
    return np.asarray(arr) != 0


# -- the per-block reduction -------------------------------------------------------------

def _block(counts: np.ndarray, energy: np.ndarray, mask: np.ndarray, cfg: XcsConfig, separate: bool,
           bins: slice) -> dict:
    """Reduce a block ``(plane, rows, x, bin)`` of one state to per-pixel and summed quantities.

    After the energy calibration (which needs the whole spectrum's lines) only the ``bins``
    around the Compton peak that the windows and profiles use are carried on.
    """
    from xrdscale.runtime.progress import report
    from xrdscale.xcs import emr, separation, spectra

    raw = np.asarray(counts)
    spectra.check_counts(raw)
    total = raw.sum(axis=-1, dtype=np.float64)
    if cfg.energy_lines is not None:  # the lines lie far from the Compton peak: calibrate the whole spectra
        c = np.array(raw, dtype=np.float64)
        for p in range(c.shape[0]):
            gain, offset = spectra.calibrate_energy(c[p], energy, cfg.energy_lines)
            c[p] = spectra.apply_energy_calibration(c[p], energy, gain, offset)
        c = c[..., bins]
    else:
        c = np.asarray(raw[..., bins], dtype=np.float64)
    energy = energy[bins]
    if separate:
        regions, var = separation.separate(c[0], c[1], c[2], alpha=float(cfg.alpha or 0), beta=float(cfg.beta or 0))
    else:
        regions, var = c, c
    win = _windows(energy, cfg)
    sums = emr.window_sums(regions, win, var)
    peak = emr.peak_position(regions, energy, incident_kev=cfg.incident_kev, angle_deg=cfg.angle,
                             half_width_kev=cfg.peak_half_width)
    keep = ~mask
    out = {"low": sums.low, "high": sums.high, "var_low": sums.var_low, "var_high": sums.var_high, "peak": peak,
           "spectrum": regions[:, keep].sum(axis=1), "variance": var[:, keep].sum(axis=1),
           "total": total}
    report(int(c.shape[1] * c.shape[2]))
    return out


def _windows(energy: np.ndarray, cfg: XcsConfig) -> Any:
    from xrdscale.xcs import emr

    return emr.windows(energy, incident_kev=cfg.incident_kev, angle_deg=cfg.angle, low=(0.0, cfg.pz_low),
                       high=(cfg.pz_low, cfg.pz_high))


def _pixel_masks(cubes: Sequence[Any], user: np.ndarray | None, cfg: XcsConfig, *, client: Any,
                 progress: bool) -> list[np.ndarray]:
    """Per state: the user's mask | the file's mask | dead and noisy pixels (from total counts)."""
    from xrdscale.xcs import spectra

    shape = cubes[0].counts.shape[1:3]
    masks = [np.zeros(shape, bool) if user is None else user.copy() for _ in cubes]
    for m, cube in zip(masks, cubes, strict=True):
        if cube.mask is not None:
            m |= cube.mask
    if cfg.mask_bad_pixels:
        totals = compute([c.counts.sum(axis=(0, 3)) for c in cubes], progress=progress, client=client,
                         label="xcs emr (pixel totals)")
        for m, t in zip(masks, totals, strict=True):
            m |= spectra.bad_pixels(np.asarray(t), dead_fraction=cfg.dead_fraction, noisy_sigma=cfg.noisy_sigma)
    return masks


def emr_maps(cubes: Sequence[str], out: str, *, config: XcsConfig | None = None, labels: Sequence[str] | None = None,
             mask: str | None = None, client: Any = None, progress: bool = True, **settings: Any) -> str:
    """EMR maps, Compton peaks and profiles of one spectrum cube per state, as an ``xcs`` store.

    Every state is read lazily (:func:`open_state`); a first pass over the cubes sums each
    pixel's counts to find dead and noisy pixels, the second reduces every block of rows:
    the plane separation of Eqs. 2–3 when it applies, the two p_z window sums with their
    Poisson variances, the Compton peak, and the summed spectrum of every region (plane or
    component) over the unmasked pixels. The regions' EMR, peak energy, implied scattering
    angle (Eq. 4) and Compton profile J(p_z) come from those sums.

    Parameters
    ----------
    cubes : sequence of str
        One source per state: an HDF5/NeXus cube (``spectra`` (y, x, bin) or (plane, y, x,
        bin) with ``energy`` in keV), an HXT file, or plane files joined by commas.
    out : str
        The ``xcs`` zarr store to write.
    config : XcsConfig, optional
        Keyword ``settings`` override its fields.
    labels : sequence of str, optional
        State labels (default: the file names without extension).
    mask : str, optional
        Pixel mask file (.npy or HDF5, nonzero = excluded), for every state.
    client : distributed.Client, optional
        Default: the current one, else local threads.
    progress : bool
        Show progress (pixels done).

    Returns
    -------
    str
        ``out``.

    Raises
    ------
    InputError
        Bins that do not cover the Compton window, negative counts, an unreadable cube,
        states of different pixel grids or planes.
    """
    import dask

    cfg = XcsConfig.build(config, **settings)
    sources = list(cubes)
    if not sources:
        raise InputError("xcs emr needs at least one spectrum cube")
    names = list(labels) if labels else [posixpath.splitext(posixpath.basename(_state_files(s)[0]))[0]
                                         for s in sources]
    if len(names) != len(sources) or len(set(names)) != len(names):
        raise InputError(f"one unique label per state is needed: {len(sources)} states, labels {names}")
    states = [open_state(s, cfg) for s in sources]
    grid = states[0].counts.shape[1:3]
    planes = states[0].planes
    for n, s in zip(names, states, strict=True):
        if s.counts.shape[1:3] != grid or s.planes != planes or s.energy.size != states[0].energy.size:
            raise InputError(f"every state needs one pixel grid, plane set and number of energy bins: {names[0]} has "
                             f"{grid} pixels, planes {list(planes)}, {states[0].energy.size} bins; {n} has "
                             f"{s.counts.shape[1:3]}, {list(s.planes)}, {s.energy.size}")
    separate = _separates(cfg, planes)
    regions = tuple(_regions(planes, separate))
    target = cfg.target or (regions[0])
    if target not in regions:
        raise InputError(f"target {target!r} is not a region of these cubes; choose one of {', '.join(regions)}")
    for s in states:  # the window must lie inside every state's bins (before any data is read)
        _windows(s.energy, cfg)
    bins = _compton_bins(states[0].energy, cfg)
    user_mask = _read_mask(mask, tuple(grid))

    def body() -> str:
        masks = _pixel_masks(states, user_mask, cfg, client=client, progress=progress)
        tasks = []
        for s, m in zip(states, masks, strict=True):
            counts = s.counts.rechunk({0: -1, 1: cfg.chunk_rows, 2: -1, 3: -1})
            blocks = counts.to_delayed().ravel()
            rows = np.cumsum((0, *counts.chunks[1]))
            tasks.append([dask.delayed(_block, pure=True)(b, s.energy, m[r0:r1], cfg, separate, bins)
                          for b, r0, r1 in zip(blocks, rows[:-1], rows[1:], strict=True)])
        total = len(states) * int(np.prod(grid))
        done = compute(tasks, client=client, progress=progress, label="xcs emr", total=total, unit="pixels")
        ds = _dataset(names, states, masks, done, regions, target, separate, cfg, bins)
        storage.create_store(ds, out, stage="xcs", config=cfg.record())
        storage.write_bytes(storage.join(out, "regions.csv"), _region_table(ds).to_csv(index=False).encode())
        storage.mark_complete(out, {"stage": "xcs", "states": names})
        med = float(np.nanmedian(ds["emr"].values)) if np.isfinite(ds["emr"].values).any() else float("nan")
        logger.info("xcs emr of %d state(s), %d×%d pixels, regions %s: median %s EMR %.4f -> %s", len(names),
                    *grid, ", ".join(regions), target, med, storage.redact(out))
        return out

    return guarded(out, body)


def _compton_bins(energy: np.ndarray, cfg: XcsConfig) -> slice:
    """The bins within |p_z| ≤ max(pz_high, pz_max) + 1 a.u. of the Compton peak (all the analysis reads)."""
    from xrdscale.xcs import physics

    reach = max(cfg.pz_high, cfg.pz_max) + 1.0
    pz = physics.pz_au(cfg.incident_kev, np.asarray(energy, dtype=np.float64), cfg.angle)
    inside = np.flatnonzero(np.abs(pz) <= reach)
    i0, i1 = max(int(inside[0]) - 1, 0), min(int(inside[-1]) + 2, len(energy))
    return slice(i0, i1)


def _regions(planes: Sequence[str], separate: bool) -> list[str]:
    from xrdscale.xcs.separation import COMPONENTS

    return list(COMPONENTS) if separate else list(planes)


def _dataset(names: list[str], states: list[Any], masks: list[np.ndarray], done: list[list[dict]],
             regions: tuple[str, ...], target: str, separate: bool, cfg: XcsConfig, bins: slice) -> xr.Dataset:
    """The ``xcs`` store of the reduced blocks of every state."""
    from xrdscale.xcs import emr

    def stack(key: str, axis: int) -> np.ndarray:
        return np.stack([np.concatenate([b[key] for b in blocks], axis=axis) for blocks in done])

    low, high = stack("low", 1), stack("high", 1)  # (state, region, y, x)
    var_low, var_high = stack("var_low", 1), stack("var_high", 1)
    peak = stack("peak", 1)
    mask = np.stack(masks)  # (state, y, x)
    ratio, ratio_std = emr.emr_ratio(low, high, var_low, var_high)
    ratio = np.where(mask[:, None], np.nan, ratio)
    ratio_std = np.where(mask[:, None], np.nan, ratio_std)
    peak = np.where(mask[:, None], np.nan, peak)
    spectrum = np.stack([sum(b["spectrum"] for b in blocks) for blocks in done])  # (state, region, bin)
    variance = np.stack([sum(b["variance"] for b in blocks) for blocks in done])
    pz_grid = np.round(np.arange(-cfg.pz_max, cfg.pz_max + cfg.pz_step / 2, cfg.pz_step), 10)
    region_emr, region_std, region_peak, profiles = [], [], [], []
    for s, state in enumerate(states):
        energy = state.energy[bins]
        win = _windows(energy, cfg)
        sums = emr.window_sums(spectrum[s], win, variance[s])
        r, r_std = sums.ratio()
        region_emr.append(r)
        region_std.append(r_std)
        region_peak.append(emr.peak_position(spectrum[s], energy, incident_kev=cfg.incident_kev,
                                             angle_deg=cfg.angle, half_width_kev=cfg.peak_half_width))
        profiles.append(emr.profile(spectrum[s], win, pz_grid))
    region_peak_arr = np.asarray(region_peak)
    t = regions.index(target)
    ny, nx = mask.shape[1:]
    f32 = np.float32
    ds = xr.Dataset(
        {
            "emr": (("state", "y", "x"), ratio[:, t].astype(f32), {"long_name": f"EMR of {target}", "units": "1"}),
            "emr_std": (("state", "y", "x"), ratio_std[:, t].astype(f32), {"long_name": "Poisson 1σ of emr"}),
            "emr_region": (("state", "region", "y", "x"), ratio.astype(f32),
                           {"long_name": "EMR of every region, per pixel"}),
            "emr_region_std": (("state", "region", "y", "x"), ratio_std.astype(f32)),
            "counts_low": (("state", "region", "y", "x"), low.astype(f32),
                           {"long_name": f"counts at |p_z| < {cfg.pz_low:g}"}),
            "counts_high": (("state", "region", "y", "x"), high.astype(f32),
                            {"long_name": f"counts at {cfg.pz_low:g} < |p_z| < {cfg.pz_high:g}"}),
            "peak_kev": (("state", "region", "y", "x"), peak.astype(f32),
                         {"long_name": "Compton peak energy", "units": "keV"}),
            "total_counts": (("state", "plane", "y", "x"), stack("total", 1).astype(f32),
                             {"long_name": "counts of every bin"}),
            "mask": (("state", "y", "x"), mask, {"long_name": "excluded pixels (dead, noisy, or masked)"}),
            "profile": (("state", "region", "pz"), np.asarray(profiles, dtype=f32),
                        {"long_name": "Compton profile J(p_z) of the region's summed spectrum",
                         "units": "counts per a.u."}),
            "spectrum": (("state", "region", "bin"), spectrum.astype(f32),
                         {"long_name": "summed spectrum of the region's unmasked pixels, around the Compton peak"}),
            "region_emr": (("state", "region"), np.asarray(region_emr), {"long_name": "EMR of the summed region"}),
            "region_emr_std": (("state", "region"), np.asarray(region_std)),
            "region_peak_kev": (("state", "region"), region_peak_arr, {"units": "keV"}),
            "region_angle_deg": (("state", "region"), emr.implied_angle(region_peak_arr, cfg.incident_kev),
                                 {"long_name": "scattering angle implied by the peak (Eq. 4)", "units": "deg"}),
        },
        coords={"state": np.asarray(names, dtype=object), "region": np.asarray(regions, dtype=object),
                "plane": np.asarray(states[0].planes, dtype=object), "y": np.arange(ny), "x": np.arange(nx),
                "pz": pz_grid, "energy": (("state", "bin"), np.stack([s.energy[bins] for s in states]))},
    )
    ds["pz"].attrs["units"] = "a.u."
    ds["energy"].attrs["units"] = "keV"
    from xrdscale.xcs import physics

    ds.attrs.update({"incident_kev": cfg.incident_kev, "angle_deg": cfg.angle, "target": target,
                     "separated": separate, "alpha": cfg.alpha if separate else None,
                     "beta": cfg.beta if separate else None,
                     "compton_kev": float(physics.compton_energy(cfg.incident_kev, cfg.angle)),
                     "windows": [[0.0, cfg.pz_low], [cfg.pz_low, cfg.pz_high]]})
    return ds


def _region_table(ds: xr.Dataset) -> Any:
    """Per state and region: EMR ± σ, peak energy, implied angle (and x ± σ once calibrated)."""
    import pandas as pd

    rows = []
    for s in ds["state"].values:
        for r in ds["region"].values:
            row = {"state": str(s), "region": str(r),
                   "emr": float(ds["region_emr"].sel(state=s, region=r)),
                   "emr_std": float(ds["region_emr_std"].sel(state=s, region=r)),
                   "peak_kev": float(ds["region_peak_kev"].sel(state=s, region=r)),
                   "angle_deg": float(ds["region_angle_deg"].sel(state=s, region=r))}
            if "region_x_li" in ds and str(r) == ds.attrs.get("target"):
                row["x_li"] = float(ds["region_x_li"].sel(state=s))
                row["x_li_std"] = float(ds["region_x_li_std"].sel(state=s))
            rows.append(row)
    return pd.DataFrame(rows)


def lithium(emr_store: str, calibration: str, out: str, *, config: LithiumConfig | None = None, client: Any = None,
            progress: bool = True, **settings: Any) -> str:
    """Li stoichiometry maps x = a + b · EMR of an ``xcs`` store, with σ from the EMR and the fit.

    Writes a copy of the store with ``x_li`` and ``x_li_std`` (state, y, x) of its target
    region, and ``region_x_li`` (state) of the region's summed EMR.

    Parameters
    ----------
    emr_store : str
        An ``xcs`` store (``xrdscale xcs emr``).
    calibration : str
        A calibration JSON (``xrdscale xcs calibrate``) or a CSV of (emr, x) points.
    out : str
        The ``xcs`` store to write.

    Returns
    -------
    str
        ``out``.
    """
    from xrdscale.xcs import calibration as calib

    cfg = LithiumConfig.build(config, **settings)
    cal = calib.load(calibration)
    ds = storage.open_store(emr_store, stage="xcs").load()
    if "emr" not in ds:
        raise InputError(f"{storage.redact(emr_store)} has no emr map; make it with `xrdscale xcs emr`")
    if storage.redact(emr_store).rstrip("/") == storage.redact(out).rstrip("/"):
        raise InputError("xcs lithium writes a new store: give an OUT other than the EMR store")
    x, x_std = cal.predict(ds["emr"].values, ds["emr_std"].values)
    target = ds.attrs.get("target", str(ds["region"].values[0]))
    rx, rx_std = cal.predict(ds["region_emr"].sel(region=target).values,
                             ds["region_emr_std"].sel(region=target).values)
    if cfg.clip:
        x = np.clip(x, 0, None)
        rx = np.clip(rx, 0, None)
    ds["x_li"] = (("state", "y", "x"), x.astype(np.float32),
                  {"long_name": f"Li stoichiometry x of {target} (x = a + b·EMR)", "units": "1"})
    ds["x_li_std"] = (("state", "y", "x"), x_std.astype(np.float32), {"long_name": "1σ of x_li (EMR and fit)"})
    ds["region_x_li"] = ("state", rx, {"long_name": f"x of the summed {target}"})
    ds["region_x_li_std"] = ("state", rx_std)
    ds.attrs["calibration"] = cal.to_dict()
    emr_config = json.loads(ds.attrs.pop("config", "{}") or "{}")  # what made the EMR maps stays on record
    for key in ("stage", "xrdscale_version", "created"):
        ds.attrs.pop(key, None)

    def body() -> str:
        storage.create_store(ds, out, stage="xcs", config={"xcs": emr_config, "lithium": cfg.record(),
                                                           "emr_store": storage.redact(emr_store),
                                                           "calibration": storage.redact(calibration)})
        storage.write_bytes(storage.join(out, "regions.csv"), _region_table(ds).to_csv(index=False).encode())
        storage.mark_complete(out, {"stage": "xcs", "states": [str(s) for s in ds["state"].values], "x_li": True})
        logger.info("x maps of %d state(s) (%s) -> %s", ds.sizes["state"], cal.summary(), storage.redact(out))
        return out

    del client, progress
    return guarded(out, body)
