"""The Bragg CDI stages: phase retrieval of one 3D diffraction pattern, and a charge-state series.

:class:`CdiConfig` is the one config of both (``xrdscale cdi reconstruct`` and
``xrdscale cdi series``, ``pipeline.cdi`` of a campaign): what is read from the data
(detector ROI, binning, crop), how the object is retrieved (algorithm, iterations, random
starts, shrink-wrap support) and the geometry that turns phase into displacement and strain.
"""

from __future__ import annotations

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

ALGORITHMS = ("hio", "raar", "er")
INITS = ("random", "cnn")

Algorithm = Annotated[str, one_of(ALGORITHMS, "phase-retrieval algorithm")]
Init = Annotated[str, one_of(INITS, "initial guess")]
SeriesStart = Annotated[str, one_of(("reference", "independent"), "series start")]


class CdiConfig(StageConfig):
    """Settings of Bragg CDI phase retrieval (``xrdscale cdi reconstruct`` / ``series``).

    The defaults reach the documented accuracy on simulated crystals at ≥ 1e6 photons
    without tuning: a user should not have to choose iterations or a support.
    """

    stage: ClassVar[str] = "cdi"

    # --- data in --------------------------------------------------------------------------
    roi: tuple[int, int, int, int] | None = Field(
        None, description="detector region of interest (row0, row1, col0, col1) in pixels; default: the whole frame")
    binning: tuple[int, int, int] = Field((1, 1, 1), description="bin (rocking, rows, cols) by these integer factors")
    crop: int | None = Field(None, ge=8, description="crop a cube of this side around the intensity maximum "
                                                     "(default: the whole array, padded to even sides)")
    orthogonalize: bool = Field(False, description="grid the detector frame onto an orthogonal lab frame "
                                                   "(xrayutilities) before phasing")

    # --- phase retrieval ------------------------------------------------------------------
    algorithm: Algorithm = Field("hio", description="iterative algorithm of the main cycles")
    iterations: int = Field(600, ge=1, description="iterations per start, final ER included")
    final_er: int = Field(60, ge=0, description="error-reduction iterations that end every start")
    beta: float = Field(0.9, gt=0, lt=1, description="feedback parameter of HIO and RAAR")
    starts: int = Field(8, ge=1, description="random starts per pattern (run as one batch on the device)")
    average: int = Field(1, ge=1, description="average this many best starts (after twin and phase alignment)")
    init: Init = Field("random", description="start from random phases, or from the CNN's prediction")
    cnn_model: str | None = Field(None, description="CDI CNN registry entry (from `xrdscale cdi train-cnn`) "
                                                    "for init: cnn")
    cnn_epochs: int = Field(200, ge=0, description="per-pattern refinement epochs of the CNN (Fourier-modulus loss)")
    support_size: float = Field(0.6, gt=0, le=1, description="initial support: this fraction of the array's "
                                                            "autocorrelation extent")
    support_threshold: float = Field(0.2, gt=0, lt=1, description="shrink-wrap threshold, a fraction of the "
                                                                  "smoothed amplitude's maximum")
    sigma_start: float = Field(2.0, gt=0, description="shrink-wrap Gaussian sigma at the start (voxels)")
    sigma_end: float = Field(0.5, gt=0, description="shrink-wrap Gaussian sigma at the end (voxels)")
    shrinkwrap_every: int = Field(20, ge=1, description="update the support every this many iterations")
    positivity: bool = Field(False, description="project the amplitude's real part onto ≥ 0 inside the support")
    seed: int = Field(0, description="seed of the random starts")
    series_start: SeriesStart = Field("reference", description="series: start every other state from the first "
                                                               "state's object and support (reference), or from "
                                                               "random starts (independent)")

    # --- geometry (voxel size, displacement, strain) --------------------------------------
    energy_kev: float = Field(13.5, gt=0, description="X-ray energy in keV")
    two_theta_deg: float = Field(28.8, gt=0, lt=180, description="scattering angle 2θ of the reflection")
    distance_m: float = Field(2.8, gt=0, description="sample-detector distance in m")
    pixel_um: float = Field(55.0, gt=0, description="detector pixel size in µm")
    rocking_step_deg: float = Field(0.005, gt=0, description="rocking-curve step in degrees")

    # --- resources ------------------------------------------------------------------------
    device: str = runtime_field("auto", "torch device: auto (CUDA when it works), cpu, cuda, cuda:N")
    starts_per_task: int | None = runtime_field(
        None, "random starts per Dask task (default: all starts of a pattern in one batched task)", ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> CdiConfig:
        problems = []
        if self.final_er > self.iterations:
            problems.append(f"final_er ({self.final_er}) exceeds iterations ({self.iterations})")
        if self.average > self.starts:
            problems.append(f"average ({self.average}) exceeds starts ({self.starts})")
        if self.sigma_end > self.sigma_start:
            problems.append(f"sigma_end ({self.sigma_end}) exceeds sigma_start ({self.sigma_start})")
        if self.roi is not None and not (0 <= self.roi[0] < self.roi[1] and 0 <= self.roi[2] < self.roi[3]):
            problems.append(f"roi {self.roi} is not (row0 < row1, col0 < col1) with non-negative bounds")
        if self.init == "cnn" and not self.cnn_model:
            problems.append("init: cnn needs cnn_model, a CDI CNN registry entry; train one with "
                            "`xrdscale cdi train-cnn OUT` and pass --cnn-model OUT")
        if any(b < 1 for b in self.binning):
            problems.append(f"binning {self.binning} has a factor below 1")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def geometry(cfg: CdiConfig, shape: tuple[int, ...]) -> dict[str, Any]:
    """|Q| (m⁻¹) and the voxel size (nm) of a pattern of ``shape`` in the detector frame."""
    from xrdscale.cdi import gridding

    voxel = gridding.voxel_size_nm(tuple(shape), energy_kev=cfg.energy_kev, two_theta_deg=cfg.two_theta_deg,
                                   distance_m=cfg.distance_m, pixel_um=cfg.pixel_um,
                                   rocking_step_deg=cfg.rocking_step_deg)
    return {"q_norm": float(gridding.q_norm(cfg.energy_kev, cfg.two_theta_deg)),
            "voxel_size_nm": tuple(float(v) for v in voxel)}


def load_pattern(data: str, cfg: CdiConfig, *, mask: str | np.ndarray | None = None) -> Any:
    """The pattern of ``data`` after the ROI, binning and crop of ``cfg`` (and the lab-frame gridding)."""
    from xrdscale.cdi import gridding, io

    pattern = io.read_pattern(data, roi=cfg.roi, binning=cfg.binning, crop=cfg.crop, mask=mask)
    if not cfg.orthogonalize:
        return pattern
    if pattern.mask is not None and pattern.mask.any():
        raise InputError(f"{data}: orthogonalize cannot grid masked voxels; give the pattern without a mask, "
                         "or phase it in the detector frame (orthogonalize: false)")
    grid, dq = gridding.orthogonalize(pattern.intensity, energy_kev=cfg.energy_kev,
                                      two_theta_deg=cfg.two_theta_deg, distance_m=cfg.distance_m,
                                      pixel_um=cfg.pixel_um, rocking_step_deg=cfg.rocking_step_deg)
    meta = {**pattern.meta, "orthogonal_q_spacing_inv_angstrom": tuple(float(v) for v in dq)}
    return io.Pattern(intensity=np.ascontiguousarray(grid, dtype=np.float32), mask=None, meta=meta)


def _read_support(source: str | np.ndarray | None) -> np.ndarray | None:
    """A support given as an array, or as a ``.npy``/HDF5/CXI file (its single 3D dataset; nonzero = inside)."""
    if source is None or isinstance(source, np.ndarray):
        return source
    from xrdscale.cdi import io

    return io.read_pattern(source).intensity > 0


def _start_batches(cfg: CdiConfig) -> list[list[int]]:
    size = cfg.starts_per_task or cfg.starts
    return [list(range(i, min(i + size, cfg.starts))) for i in range(0, cfg.starts, size)]


def _retrieve_task(intensity: np.ndarray, mask: np.ndarray | None, init: np.ndarray | None,
                   support: np.ndarray | None, cfg: CdiConfig, starts: list[int]) -> list[Any]:
    from xrdscale.cdi import phasing
    from xrdscale.runtime.progress import report

    results = phasing.retrieve(intensity, mask=mask, config=cfg, init=init, support=support, start_indices=starts)
    report(len(starts))
    return results


def _initial_object(pattern: Any, cfg: CdiConfig) -> np.ndarray | None:
    if cfg.init != "cnn" or cfg.cnn_model is None:
        return None
    from xrdscale.cdi import cnn

    return cnn.cnn_guess(pattern.intensity, cfg.cnn_model, mask=pattern.mask, epochs=cfg.cnn_epochs,
                         device=cfg.device)


def _retrieve_all(patterns: Sequence[Any], cfg: CdiConfig, *, support: np.ndarray | None, client: Any,
                  progress: bool, label: str, init: np.ndarray | None = None) -> list[Any]:
    """Phase every pattern: states × start batches as Dask tasks, then the best start(s) of each.

    ``init`` (an object) starts every pattern; default: the CNN's guess (``init: cnn``) or
    random starts.
    """
    import dask

    from xrdscale.cdi import phasing

    batches = _start_batches(cfg)
    tasks = []
    for pattern in patterns:
        start = init if init is not None else _initial_object(pattern, cfg)  # each pattern its own CNN guess
        arrays = [dask.delayed(a) for a in (pattern.intensity, pattern.mask, start, support)]
        tasks.append([dask.delayed(_retrieve_task, pure=False)(*arrays, cfg, b) for b in batches])
    done = compute(tasks, client=client, progress=progress, label=label, total=len(patterns) * cfg.starts,
                   unit="starts")
    return [phasing.select([r for batch in per_state for r in batch], config=cfg) for per_state in done]


def reconstruct(data: str, out: str, *, config: CdiConfig | None = None, mask: str | None = None,
                support: str | None = None, client: Any = None, progress: bool = True, **settings: Any) -> str:
    """Retrieve the complex object of one 3D Bragg pattern and write it as CXI.

    The pattern is read (:func:`xrdscale.cdi.io.read_pattern`: ROI, binning, crop, mask),
    optionally gridded to the lab frame, then ``starts`` random starts (or the CNN's guess
    and perturbations of it) are phased in batches on the device, as Dask tasks. The best
    start by χ² (Eq. 1), or the average of the ``average`` best, is centred, its phase ramp
    removed and its mean phase zeroed.

    Parameters
    ----------
    data : str
        ``.npy``, HDF5, CXI or NeXus rocking-curve file(s) (any fsspec URL).
    out : str
        The CXI file to write: ``entry_1/image_1/data`` (object), ``support``, ``chi2``.
    config : CdiConfig, optional
        Keyword ``settings`` override its fields.
    mask : str, optional
        Detector mask (nonzero = not measured), a frame or a volume.
    support : str, optional
        Initial support (a 3D array file of the data's shape, nonzero = inside).
    client : distributed.Client, optional
        Default: the current one, else local threads.
    progress : bool
        Show progress (random starts done).

    Returns
    -------
    str
        ``out``.
    """
    from xrdscale.cdi import io, post

    cfg = CdiConfig.build(config, **settings)
    pattern = load_pattern(data, cfg, mask=mask)
    support_arr = _read_support(support)
    result = _retrieve_all([pattern], cfg, support=support_arr, client=client, progress=progress,
                           label="cdi reconstruct")[0]
    obj, sup = post.align(result.obj, support=result.support)
    geo = geometry(cfg, obj.shape)
    attrs = storage.provenance("cdi", cfg.record(), source=str(data), chi2=result.chi2, best_start=result.best_start,
                               device=result.device, seconds=result.seconds, q_norm=geo["q_norm"],
                               voxel_size_nm=list(geo["voxel_size_nm"]))
    extra = {"chi2_starts": np.asarray(result.chi2_starts), "history": np.asarray(result.history)}
    io.write_cxi(out, obj, support=sup, chi2=result.chi2, intensity=pattern.intensity, extra=extra, attrs=attrs)
    logger.info("%s: χ² %.4g (best of %d starts), support %d voxels -> %s", data, result.chi2, cfg.starts,
                int(sup.sum()), storage.redact(out))
    return out


def series(data: Sequence[str], out: str, *, config: CdiConfig | None = None, mask: str | None = None,
           support: str | None = None, labels: Sequence[str] | None = None, client: Any = None,
           progress: bool = True, **settings: Any) -> str:
    """Every state of a charge-state series: retrieve, align, strain, PCA, Table 1.

    All states × random starts run as one Dask graph. The first state is the reference:
    every other state is twin-resolved and registered to it (sub-voxel), the states'
    supports are merged into one common support, and the phase differences to the first
    state go into the PCA of :mod:`xrdscale.cdi.series` (Eqs. 2–4).

    Parameters
    ----------
    data : sequence of str
        One pattern per state, in order (the first is the reference).
    out : str
        The ``cdi-series`` zarr store to write; Table 1 is also written as ``table1.csv`` in it.
    config, mask, support, client, progress, settings
        As :func:`reconstruct`.
    labels : sequence of str, optional
        State labels (default: the file names without extension).

    Returns
    -------
    str
        ``out``.

    Raises
    ------
    InputError
        Fewer than two states, labels of the wrong length, or states of different shapes.
    """
    from xrdscale.cdi import post
    from xrdscale.cdi import series as analysis

    cfg = CdiConfig.build(config, **settings)
    data = list(data)
    if len(data) < 2:
        raise InputError(f"a series needs at least two states; got {len(data)}: {data}")
    names = list(labels) if labels is not None else [posixpath.splitext(posixpath.basename(str(d)))[0] for d in data]
    if len(names) != len(data) or len(set(names)) != len(names):
        raise InputError(f"a series needs one unique label per state: {len(data)} states, labels {names}")
    patterns = [load_pattern(d, cfg, mask=mask) for d in data]
    shapes = {n: p.intensity.shape for n, p in zip(names, patterns, strict=True)}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n}: {s}" for n, s in shapes.items())
        raise InputError(f"the states of a series must have one shape after ROI/binning/crop; got {listed}. "
                         "Give the same --roi/--crop for all, or crop them to one size (--crop N)")
    support_arr = _read_support(support)

    def body() -> str:
        if cfg.series_start == "reference":
            # the same crystal in every state: the reference's object and support start the others
            first = _retrieve_all(patterns[:1], cfg, support=support_arr, client=client, progress=progress,
                                  label="cdi series (reference state)")
            rest = _retrieve_all(patterns[1:], cfg, support=first[0].support, init=first[0].obj, client=client,
                                 progress=progress, label="cdi series (other states)")
            results = first + rest
        else:
            results = _retrieve_all(patterns, cfg, support=support_arr, client=client, progress=progress,
                                    label="cdi series")
        ref_obj, ref_sup = post.align(results[0].obj, support=results[0].support)
        objs, sups = [ref_obj], [ref_sup]
        for r in results[1:]:
            o, s = post.align(r.obj, reference=ref_obj, support=r.support)
            objs.append(o)
            sups.append(s)
        common = analysis.common_support(sups)
        geo = geometry(cfg, ref_obj.shape)
        voxel_m = tuple(v * 1e-9 for v in geo["voxel_size_nm"])
        # the global phase between states is not measured: the unchanged bulk sets it (Δφ = 0 there)
        offsets = analysis.bulk_offsets(objs, common)
        objs = [o * np.exp(-1j * off).astype(np.complex64) for o, off in zip(objs, offsets, strict=True)]
        dphi = analysis.phase_differences(objs, common)
        result = analysis.pca(dphi)
        strain = np.stack([post.strain(o, common, voxel_size_m=voxel_m, q_norm=geo["q_norm"]) for o in objs])
        t1 = analysis.table(labels=names, chi2=[r.chi2 for r in results], dphi=dphi, q_norm=geo["q_norm"],
                            strain=strain[:, common], omega=result.omega)
        ds = _series_dataset(names, objs, sups, common, dphi, result, strain, t1, geo)
        storage.create_store(ds, out, stage="cdi-series", config=cfg.record())
        storage.write_bytes(storage.join(out, "table1.csv"), t1.to_csv(index=False).encode())
        storage.mark_complete(out, {"stage": "cdi-series", "states": names})
        logger.info("cdi series of %d states: PC1 explains %.1f %% of the phase variation -> %s", len(names),
                    100 * result.explained, storage.redact(out))
        return out

    return guarded(out, body)


def _on_grid(values: np.ndarray, support: np.ndarray) -> np.ndarray:
    """(S, N) values on the support voxels → (S, Z, Y, X) float32, NaN outside."""
    grid = np.full((values.shape[0], *support.shape), np.nan, dtype=np.float32)
    grid[:, support] = values
    return grid


def _series_dataset(names: list[str], objs: list[np.ndarray], sups: list[np.ndarray], common: np.ndarray,
                    dphi: np.ndarray, pca: Any, strain: np.ndarray, t1: Any, geo: dict[str, Any]) -> xr.Dataset:
    """The ``cdi-series`` store: per-state volumes on (state, z, y, x), Table 1 along state."""
    dims = ("state", "z", "y", "x")
    obj = np.stack(objs)
    phase = np.where(np.stack(sups), np.angle(obj), np.nan).astype(np.float32)
    voxel = geo["voxel_size_nm"]
    coords = {"state": np.asarray(names, dtype=object),
              **{d: (np.arange(n) - n // 2) * v for d, n, v in zip("zyx", common.shape, voxel, strict=True)}}
    ds = xr.Dataset(
        {
            "amplitude": (dims, np.abs(obj).astype(np.float32), {"long_name": "amplitude |ρ|", "units": "1"}),
            "phase": (dims, phase, {"long_name": "phase φ in each state's support", "units": "rad"}),
            "displacement": (dims, (phase / geo["q_norm"] * 1e10).astype(np.float32),
                             {"long_name": "displacement along Q, u = φ/|Q|", "units": "Å"}),
            "strain": (dims, strain.astype(np.float32), {"long_name": "strain along Q (common support)", "units": "1"}),
            "state_support": (dims, np.stack(sups), {"long_name": "support of each state"}),
            "support": (("z", "y", "x"), common, {"long_name": "common support of the series"}),
            "dphi": (dims, _on_grid(dphi, common), {"long_name": "Δφ_i = arg(ρ_i conj ρ_0)", "units": "rad"}),
            "pca_phi": (dims, _on_grid(pca.phi, common), {"long_name": "Φ_i = Δφ_i − ψ₁ (Eq. 4)", "units": "rad"}),
            "pca_component": (("z", "y", "x"), _on_grid(pca.component[None], common)[0],
                              {"long_name": "principal component ψ₁ (Eq. 2)"}),
            **{col: ("state", t1[col].to_numpy(dtype=float)) for col in t1.columns if col != "state"},
            "eigenvalue": ("component", pca.eigenvalues),
        },
        coords=coords,
    )
    for d in "zyx":
        ds[d].attrs["units"] = "nm"
    ds["chi2"].attrs["long_name"] = "χ² of the reconstruction (Eq. 1)"
    ds["omega"].attrs["long_name"] = "order parameter Ω_i = ψ₁ · Δφ_i (Eq. 3)"
    ds.attrs.update({"q_norm": geo["q_norm"], "voxel_size_nm": list(voxel), "pca_explained": pca.explained})
    return ds
