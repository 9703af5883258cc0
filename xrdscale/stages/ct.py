"""The absorption-CT stages of correlative XCS-CT: reconstruction, and interface roughness.

:class:`CtConfig` (``xrdscale ct reconstruct``, ``pipeline.ct``) turns projections into a
``ct-volume`` store: flat/dark correction, −log, ring removal (algotom: Vo et al. 2018, the
methods the XCS paper cites), the centre of rotation, and ASTRA FBP of every slice of a 360°
parallel-beam scan. One Dask task reconstructs a block of detector rows for all angles,
and the volume is written block by block, so no worker holds more than a block.

:class:`RoughnessConfig` (``xrdscale ct roughness``) segments the volume, extracts the
anode/SPE and cathode/SPE height maps Z(x, y), and reports R_a (ISO 4287, Eq. 6) after
removing the mean plane, R_q and the volume fraction of every component; with beam-plane
positions it also measures the α and β of the three-plane separation.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, ClassVar

import numpy as np
import xarray as xr
from pydantic import Field, model_validator

from xrdscale.config import one_of
from xrdscale.exceptions import InputError
from xrdscale.io import storage
from xrdscale.stages.base import StageConfig, compute, guarded, runtime_field, write_output

logger = logging.getLogger(__name__)

Rings = Annotated[str, one_of(("all", "sorting", "none"), "ring removal")]
Filter = Annotated[str, one_of(("ram-lak", "shepp-logan", "cosine", "hamming", "hann"), "FBP filter")]


class CtConfig(StageConfig):
    """Settings of absorption-CT reconstruction (``xrdscale ct reconstruct``)."""

    stage: ClassVar[str] = "ct"

    rings: Rings = Field("all", description="ring removal of algotom: all (remove_all_stripe: large, partial and "
                                            "full stripes), sorting (remove_stripe_based_sorting), or none")
    snr: float = Field(3.0, gt=0, description="ring removal: stripe detection ratio")
    la_size: int = Field(61, ge=3, description="ring removal: window of large stripes (pixels, odd)")
    sm_size: int = Field(21, ge=3, description="ring removal: window of small-to-medium stripes (pixels, odd)")
    center: float | None = Field(None, description="rotation-axis column (pixels); default: found from the "
                                                   "middle slice's 0-180° and 180-360° halves")
    filter_name: Filter = Field("ram-lak", description="FBP filter")
    min_transmission: float = Field(1e-3, gt=0, lt=1, description="transmission floor before -log")
    rows: tuple[int, int] | None = Field(None, description="reconstruct detector rows [r0, r1) only (default: all)")
    pixel_um: float | None = Field(None, gt=0, description="detector pixel size in µm (default: from the file, "
                                                           "else 1: the volume is then in pixels)")
    chunk_rows: int = runtime_field(8, "detector rows (slices) per Dask task", ge=1)
    device: str = runtime_field("auto", "auto (ASTRA CUDA when it works), cpu, cuda")

    @model_validator(mode="after")
    def _consistent(self) -> CtConfig:
        if self.rows is not None and not (0 <= self.rows[0] < self.rows[1]):
            raise ValueError(f"rows {self.rows} is not [r0, r1) with 0 ≤ r0 < r1")
        return self


class RoughnessConfig(StageConfig):
    """Settings of interface roughness and volume fractions (``xrdscale ct roughness``)."""

    stage: ClassVar[str] = "ct-roughness"

    voxel_um: float | None = Field(None, gt=0, description="voxel size in µm (default: from the volume store)")
    cutoff_um: float | None = Field(None, gt=0, description="ISO 16610 Gaussian cut-off wavelength λc (µm) "
                                                            "separating roughness from waviness (default: none)")
    roi: tuple[int, int, int, int] | None = Field(None, description="lateral region of interest (y0, y1, x0, x1) "
                                                                    "in voxels (default: the whole field)")
    thresholds: tuple[float, float, float] | None = Field(
        None, description="attenuation thresholds air|anode|SPE|cathode (default: multi-Otsu)")
    beam_planes: dict[str, tuple[int, int]] | None = Field(
        None, description="slices [z0, z1) of the XCS beam planes R1, R2, R3: gives α and β of the separation")
    tile_rows: int = runtime_field(32, "lateral rows (y) per Dask task", ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> RoughnessConfig:
        if self.beam_planes is not None and set(self.beam_planes) != {"R1", "R2", "R3"}:
            raise ValueError(f"beam_planes names the planes R1, R2, R3; got {sorted(self.beam_planes)}")
        if self.roi is not None and not (0 <= self.roi[0] < self.roi[1] and 0 <= self.roi[2] < self.roi[3]):
            raise ValueError(f"roi {self.roi} is not (y0 < y1, x0 < x1) with non-negative bounds")
        return self


# -- reconstruction ----------------------------------------------------------------------

def _device(cfg: CtConfig) -> str:
    if cfg.device == "cpu":
        return "cpu"
    from xrdscale.recon.astra_engine import AstraEngine

    usable = AstraEngine.cuda_available()
    if cfg.device == "cuda" and not usable:
        raise InputError("device cuda: ASTRA sees no usable CUDA device here; use --device auto or cpu")
    return "cuda" if usable else "cpu"


def _sinograms(block: np.ndarray, flats: np.ndarray | None, darks: np.ndarray | None, cfg: CtConfig) -> np.ndarray:
    """(angle, rows, col) raw → (rows, angle, col) attenuation line integrals, rings removed."""
    from xrdscale.xcs import ct

    sino = np.ascontiguousarray(np.moveaxis(ct.normalize(block, flats, darks, min_transmission=cfg.min_transmission),
                                            1, 0))
    if cfg.rings != "none":
        for i in range(sino.shape[0]):
            sino[i] = ct.remove_rings(sino[i], method=cfg.rings, snr=cfg.snr, la_size=cfg.la_size,
                                      sm_size=cfg.sm_size)
    return sino


def _slab(block: np.ndarray, flats: np.ndarray | None, darks: np.ndarray | None, angles: np.ndarray, center: float,
          cfg: CtConfig, device: str, pixel_um: float | None) -> np.ndarray:
    """One Dask task: the slices of a block of detector rows."""
    from xrdscale.runtime.progress import report
    from xrdscale.xcs import ct

    sino = _sinograms(np.asarray(block), flats, darks, cfg)
    vol = ct.reconstruct_slices(sino, angles, center=center, filter_name=cfg.filter_name, device=device,
                                pixel_size_um=pixel_um)
    report(sino.shape[0])
    return np.asarray(vol, dtype=np.float32)


def _rows(f: np.ndarray | None, r0: int, r1: int) -> np.ndarray | None:
    return None if f is None else np.ascontiguousarray(f[:, r0:r1])


def reconstruct(projections: str, out: str, *, config: CtConfig | None = None, flats: str | None = None,
                darks: str | None = None, client: Any = None, progress: bool = True, **settings: Any) -> str:
    """Reconstruct a 360° absorption-CT scan into a ``ct-volume`` store (z, y, x).

    Parameters
    ----------
    projections : str
        NXtomo (``data`` with ``image_key`` and ``rotation_angle``) or an HDF5 file with
        ``projections``, ``flats``, ``darks``, ``angles`` (degrees).
    out : str
        The ``ct-volume`` zarr store to write.
    config : CtConfig, optional
        Keyword ``settings`` override its fields.
    flats, darks : str, optional
        Flat and dark fields from other HDF5 files (when the scan has none).

    Returns
    -------
    str
        ``out``.

    Raises
    ------
    InputError
        Projections without flats, angles that do not match the projections, rows outside
        the detector.
    """
    import dask
    import dask.array as da

    from xrdscale.xcs import ct

    cfg = CtConfig.build(config, **settings)
    # one mean flat and dark frame: what every task needs of them
    proj = ct.open_projections(projections, flats=flats, darks=darks, chunk_rows=cfg.chunk_rows).averaged()
    n_angles, n_rows, n_cols = proj.data.shape
    r0, r1 = cfg.rows or (0, n_rows)
    if r1 > n_rows:
        raise InputError(f"rows [{r0}, {r1}) run past the detector's {n_rows} rows")
    device = _device(cfg)
    angles = np.asarray(proj.angles_deg, dtype=np.float64)
    center = cfg.center
    if center is None:  # from the mean sinogram of (at most) eight rows around the middle: bounded memory
        mid = (r0 + r1) // 2
        rows = (max(r0, mid - 4), min(r1, mid + 4))
        center = float(ct.estimate_center(proj, rows=rows, rings=cfg.rings))
        logger.info("centre of rotation %.3f px (detector centre %.1f), from rows %d-%d", center, (n_cols - 1) / 2,
                    *rows)
    known_um = cfg.pixel_um or proj.meta.get("pixel_um")
    pixel_um = float(known_um or 1.0)
    data = proj.data[:, r0:r1]
    data = data.rechunk({0: -1, 1: cfg.chunk_rows, 2: -1})
    edges = np.cumsum((r0, *data.chunks[1]))
    slabs = []
    for block, a, b in zip(data.to_delayed().ravel(), edges[:-1], edges[1:], strict=True):
        task = dask.delayed(_slab, pure=True)(block, _rows(proj.flats, a, b), _rows(proj.darks, a, b), angles,
                                              center, cfg, device, known_um)
        slabs.append(da.from_delayed(task, shape=(int(b - a), n_cols, n_cols), dtype=np.float32))
    volume = da.concatenate(slabs, axis=0)
    axis = (np.arange(n_cols) - n_cols // 2) * pixel_um  # the rotation axis is at pixel (n // 2, n // 2)
    coords = {"z": np.arange(r0, r1) * pixel_um, "y": axis, "x": axis.copy()}
    ds = xr.Dataset({"attenuation": (("z", "y", "x"), volume,
                                     {"long_name": "linear attenuation coefficient μ",
                                      "units": "1/um" if known_um else "1/pixel"})},
                    coords=coords)
    for c in "zyx":
        ds[c].attrs["units"] = "um"
    ds.attrs.update({"center": center, "voxel_um": float(pixel_um), "rings": cfg.rings, "device": device,
                     "source": projections, "angles": int(n_angles),
                     "angle_range_deg": [float(angles.min()), float(angles.max())]})
    write_output(ds, out, kind="ct-volume", config=cfg.record(), client=client, progress=progress,
                 label="ct reconstruct", total=int(r1 - r0), unit="slices")
    return out


# -- roughness ---------------------------------------------------------------------------

def _tile(volume: np.ndarray, thresholds: tuple[float, ...], planes: list[tuple[int, int]] | None) -> dict[str, Any]:
    """Labels' voxel counts, the two interface height maps and the anode voxels of each beam plane of a tile."""
    from xrdscale.xcs import roughness as rough
    from xrdscale.xcs import separation

    vol = np.asarray(volume, dtype=np.float32)
    labels, _ = rough.segment(vol, thresholds=thresholds)
    heights = {name: rough.interface_height(vol, labels, lower, upper, thresholds=thresholds)
               for name, (lower, upper) in INTERFACES.items()}
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=len(rough.COMPONENTS))
    anode = separation.plane_fractions(labels, planes, component=1) if planes else None
    return {"heights": heights, "counts": counts, "anode": anode}


#: the interfaces and the (lower, upper) components that meet there, bottom to top
INTERFACES = {"anode/spe": (1, 2), "cathode/spe": (2, 3)}


def roughness(volume: str, out: str, *, config: RoughnessConfig | None = None, client: Any = None,
              progress: bool = True, **settings: Any) -> str:
    """Interface height maps, R_a, R_q and volume fractions of a ``ct-volume`` store.

    The attenuation thresholds come from a subsample of the whole volume (multi-Otsu, or
    ``thresholds``); then one Dask task per lateral tile segments its columns and finds the
    sub-voxel heights where anode meets SPE and SPE meets cathode. R_a of each height map
    (Eq. 6) is taken after removing its least-squares mean plane (and, with ``cutoff_um``,
    the Gaussian waviness).

    Returns
    -------
    str
        ``out``; the table is also written as ``roughness.csv`` inside it.
    """
    import dask

    from xrdscale.xcs import roughness as rough
    from xrdscale.xcs import separation

    cfg = RoughnessConfig.build(config, **settings)
    src = storage.open_store(volume, stage="ct-volume")
    if "attenuation" not in src:
        raise InputError(f"{storage.redact(volume)} has no attenuation volume; make it with `xrdscale ct reconstruct`")
    vol = src["attenuation"]
    # thresholds from a subsample of the whole field (an ROI inside the cell may show no air)
    step = max(1, int(round((vol.size / 2e6) ** (1 / 3))))
    sample = np.asarray(vol.data[::step, ::step, ::step].compute())
    thresholds = tuple(float(t) for t in (cfg.thresholds or rough.segment(sample)[1]))
    if cfg.roi is not None:
        y0, y1, x0, x1 = cfg.roi
        if y1 > vol.sizes["y"] or x1 > vol.sizes["x"]:
            raise InputError(f"roi {cfg.roi} lies outside the volume's {vol.sizes['y']} × {vol.sizes['x']} field")
        vol = vol.isel(y=slice(y0, y1), x=slice(x0, x1))
    voxel_um = float(cfg.voxel_um or src.attrs.get("voxel_um") or 1.0)
    data = vol.data
    if len(thresholds) != 3 or not np.all(np.diff(thresholds) > 0):
        raise InputError(f"segmentation needs three increasing thresholds (air|anode|SPE|cathode); got {thresholds}")
    ny = data.shape[1]
    bounds = list(range(0, ny, cfg.tile_rows)) + [ny]
    planes = [cfg.beam_planes[p] for p in ("R1", "R2", "R3")] if cfg.beam_planes else None
    tasks = [dask.delayed(_tile, pure=True)(data[:, a:b], thresholds, planes)
             for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def body() -> str:
        tiles = compute(tasks, client=client, progress=progress, label="ct roughness", unit="tiles")
        heights = {name: np.concatenate([t["heights"][name] for t in tiles], axis=0) for name in INTERFACES}
        counts = np.sum([t["counts"] for t in tiles], axis=0)
        inside = counts[1:].sum()
        fractions = {c: float(counts[i] / inside) if inside else float("nan")
                     for i, c in enumerate(rough.COMPONENTS) if i > 0}
        # heights in voxels; roughness_ra/rq scale them (and the cut-off's lateral axis) by the voxel size
        ra = {n: rough.roughness_ra(z, pixel_size=voxel_um, cutoff=cfg.cutoff_um) for n, z in heights.items()}
        rq = {n: rough.roughness_rq(z, pixel_size=voxel_um, cutoff=cfg.cutoff_um) for n, z in heights.items()}
        attrs: dict[str, Any] = {"voxel_um": voxel_um, "thresholds": list(thresholds), "cutoff_um": cfg.cutoff_um,
                                 "source": volume}
        if cfg.beam_planes is not None:
            alpha, beta = separation.alpha_beta_from_fractions(*np.sum([t["anode"] for t in tiles], axis=0))
            attrs.update({"alpha": alpha, "beta": beta, "beam_planes": {k: list(v) for k, v in
                                                                        cfg.beam_planes.items()}})
            logger.info("beam planes: α = %.4f, β = %.4f", alpha, beta)
        z0 = float(src["z"].values[0]) if "z" in src.coords else 0.0
        names = list(INTERFACES)
        ds = xr.Dataset(
            {"height": (("interface", "y", "x"), np.stack([heights[n] * voxel_um + z0 for n in names]).astype(
                np.float32), {"long_name": "interface height Z(x, y)", "units": "um"}),
             "ra": ("interface", [ra[n] for n in names], {"long_name": "R_a (ISO 4287, Eq. 6)", "units": "um"}),
             "rq": ("interface", [rq[n] for n in names], {"long_name": "R_q (RMS)", "units": "um"}),
             "fraction": ("component", [fractions[c] for c in rough.COMPONENTS[1:]],
                          {"long_name": "volume fraction of the cell"})},
            coords={"interface": np.asarray(names, dtype=object),
                    "component": np.asarray(rough.COMPONENTS[1:], dtype=object),
                    "y": vol["y"].values, "x": vol["x"].values})
        ds.attrs.update(attrs)
        storage.create_store(ds, out, stage="ct-roughness", config=cfg.record())
        storage.write_bytes(storage.join(out, "roughness.csv"), _table(ds).to_csv(index=False).encode())
        storage.mark_complete(out, {"stage": "ct-roughness"})
        logger.info("R_a anode/SPE %.3f µm, cathode/SPE %.3f µm -> %s", ra["anode/spe"], ra["cathode/spe"],
                    storage.redact(out))
        return out

    return guarded(out, body)


def _table(ds: xr.Dataset) -> Any:
    import pandas as pd

    rows: list[dict[str, Any]] = [{"quantity": f"R_a {i} (um)", "value": float(ds["ra"].sel(interface=i))}
                                  for i in ds["interface"].values]
    rows += [{"quantity": f"R_q {i} (um)", "value": float(ds["rq"].sel(interface=i))} for i in ds["interface"].values]
    rows += [{"quantity": f"fraction {c}", "value": float(ds["fraction"].sel(component=c))}
             for c in ds["component"].values]
    for k in ("alpha", "beta"):
        if k in ds.attrs:
            rows.append({"quantity": k, "value": float(ds.attrs[k])})
    return pd.DataFrame(rows)
