"""Pencil-beam XRD-CT of a phantom, streamed to a raw NeXus/HDF5 file plus its ``truth`` store.

Acquisition as in the paper: zigzag line scans (the translation direction alternates from
line to line) at rotation angles collected as interlaced subsets over [0, 180) — each
subset has the same angular step and a staggered start. Each frame is the ray sum of the
voxel patterns along the beam (:func:`xrdscale.simulate.geometry.ray_matrix`), turned into
a 2D detector image by :class:`xrdscale.simulate.geometry.DetectorModel` with the frame's
incident intensity I0 (a few % fluctuation) and Poisson counts. The rotation axis sits a
non-integer number of translation steps off the centre of the translation range.

Frames are written line by line (never all in memory) to a local temporary HDF5 file,
``/entry/data/data`` int32 one frame per chunk with Bitshuffle-LZ4 (hdf5plugin), then
moved or uploaded to the destination URL. The ``truth`` store holds the phantom maps and
the noise-free ``projection`` (angle, translation, q): angle ascending, translation in mm
with the rotation axis at 0, in the same absolute units as the phantom's patterns (line
integrals in voxel-length units).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import dask.array as da
import h5py
import hdf5plugin
import numpy as np
import scipy.sparse as sp
import xarray as xr

from xrdscale import __version__
from xrdscale.exceptions import ConfigError, InputError
from xrdscale.io import storage
from xrdscale.physics.crystal import builtin_phase
from xrdscale.physics.pattern import Instrument, simulate_patterns
from xrdscale.simulate.geometry import DetectorModel, ray_matrix

logger = logging.getLogger(__name__)

_MAX_COMPONENTS = 50_000


@dataclass(frozen=True)
class ScanPlan:
    """Positioner values of an interlaced zigzag scan, in acquisition order.

    ``angle`` [deg] and ``translation`` [mm] per frame; ``line_angles`` the angle of each
    line; ``translations`` the ascending grid; ``axis_mm`` the translation at which the beam
    crosses the rotation axis.
    """

    angle: np.ndarray
    translation: np.ndarray
    line_angles: np.ndarray
    translations: np.ndarray
    axis_mm: float

    @property
    def n_frames(self) -> int:
        """Number of frames."""
        return self.angle.size

    def line(self, k: int) -> tuple[float, np.ndarray]:
        """Angle and translation order of line ``k`` (ascending on even lines, descending on odd)."""
        t = self.translations if k % 2 == 0 else self.translations[::-1]
        return float(self.line_angles[k]), t


def plan_scan(n_angles: int, n_translations: int, step_mm: float, *, subsets: int = 4,
              axis_offset_steps: float = 2.37) -> ScanPlan:
    """Positioners of an interlaced zigzag XRD-CT scan.

    Parameters
    ----------
    n_angles : int
        Total projections over [0, 180), a multiple of ``subsets``.
    n_translations : int
        Translation steps per line.
    step_mm : float
        Translation step [mm].
    subsets : int
        Interlaced angular subsets; subset ``s`` starts at ``s · Δ / subsets`` with
        ``Δ = 180 · subsets / n_angles`` its own step.
    axis_offset_steps : float
        Position of the rotation axis from the centre of the translation range, in steps.

    Returns
    -------
    ScanPlan

    Examples
    --------
    >>> p = plan_scan(8, 3, 0.5, subsets=2, axis_offset_steps=0.0)
    >>> p.line_angles.tolist()
    [0.0, 45.0, 90.0, 135.0, 22.5, 67.5, 112.5, 157.5]
    >>> p.translation[:6].tolist()
    [-0.5, 0.0, 0.5, 0.5, 0.0, -0.5]
    """
    if n_angles < 2 or subsets < 1 or n_angles % subsets:
        raise ConfigError(f"{n_angles} angles cannot be split into {subsets} interlaced subsets of equal size; "
                          "give a number of angles that is a multiple of the number of subsets")
    if n_translations < 2 or step_mm <= 0:
        raise ConfigError(f"need at least 2 translations and a positive step, got {n_translations} × {step_mm} mm")
    per = n_angles // subsets
    delta = 180.0 / per
    line_angles = np.concatenate([s * delta / subsets + delta * np.arange(per) for s in range(subsets)])
    translations = (np.arange(n_translations) - (n_translations - 1) / 2.0) * step_mm
    angle = np.repeat(line_angles, n_translations)
    translation = np.concatenate([translations if k % 2 == 0 else translations[::-1] for k in range(n_angles)])
    return ScanPlan(angle, translation, line_angles, translations, float(axis_offset_steps * step_mm))


def phantom_components(phantom: xr.Dataset) -> tuple[dict[str, dict[str, np.ndarray]], list[str], sp.csc_matrix]:
    """Split a phantom into distinct (phase, lattice, size) components and their voxel weights.

    Returns
    -------
    params : dict
        ``simulate_patterns`` parameters per phase, one row per component, scale 1.
    names : list of str
        Phase name of each component (in the column order of ``weights``).
    weights : scipy.sparse.csc_matrix (n_voxels, n_components)
        The phase scale of each voxel for its component.
    """
    scale = phantom["scale"].values
    n_vox = scale.shape[1] * scale.shape[2]
    params: dict[str, dict[str, np.ndarray]] = {}
    names: list[str] = []
    rows, cols, vals = [], [], []
    for i, phase_name in enumerate(phantom["phase"].values.tolist()):
        s = scale[i].ravel()
        present = np.flatnonzero(s > 0)
        if present.size == 0:
            continue
        phase = builtin_phase(phase_name)
        keys = [*phase.lattice_keys, "size_nm"] if phase.lattice_keys else []
        src = {"a": "a", "c": "c", "size_nm": "size"}
        table = np.stack([phantom[src[k]].values[i].ravel()[present] for k in keys], axis=1) if keys else \
            np.zeros((present.size, 0))
        if np.isnan(table).any():
            raise InputError(f"phantom phase {phase_name!r} has voxels with scale > 0 but no {keys}; "
                             "give every present phase its lattice parameters and size")
        uniq, inverse = np.unique(table, axis=0, return_inverse=True)
        params[phase_name] = {"scale": np.ones(len(uniq)), **{k: uniq[:, j] for j, k in enumerate(keys)}}
        rows.append(present)
        cols.append(len(names) + inverse.ravel())
        vals.append(s[present])
        names += [phase_name] * len(uniq)
    if len(names) > _MAX_COMPONENTS:
        raise InputError(f"the phantom has {len(names)} distinct (phase, lattice, size) combinations, more than "
                         f"{_MAX_COMPONENTS}; use piecewise-constant parameter maps (domains)")
    if not names:
        raise InputError("the phantom holds no phase (all scales are 0); nothing to scan")
    weights = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                            shape=(n_vox, len(names)))
    return params, names, weights


def unit_patterns(q: np.ndarray, params: dict, names: list[str], instrument: Instrument) -> np.ndarray:
    """Patterns of every component at scale 1 on ``q``, shape (n_components, npt)."""
    out = []
    for phase_name in dict.fromkeys(names):
        out.append(simulate_patterns(q, [builtin_phase(phase_name)], {phase_name: params[phase_name]}, instrument))
    return np.concatenate(out, axis=0).astype(np.float64) if out else np.zeros((0, q.size))


def simulation_grid(detector: DetectorModel, step: float = 0.002) -> np.ndarray:
    """A q grid [1/Å] covering every pixel of ``detector`` with ``step`` spacing."""
    lo, hi = detector.q_range()
    lo = max(step, np.floor(lo / step) * step)
    return np.arange(lo, hi + 2 * step, step)


def scan_phantom(phantom: xr.Dataset, raw_url: str, truth_url: str, detector: DetectorModel, instrument: Instrument,
                 *, n_angles: int, subsets: int = 4, axis_offset_steps: float = 2.37, truth_q: np.ndarray,
                 i0: float | None = None, i0_noise: float = 0.03, peak_counts: float = 2000.0, seed: int = 0,
                 progress: bool = False) -> dict:
    """Scan ``phantom``: write the raw NeXus file at ``raw_url`` and the ``truth`` store at ``truth_url``.

    Parameters
    ----------
    phantom : xarray.Dataset
        From :func:`xrdscale.simulate.phantom.make_phantom`; one translation step per voxel.
    raw_url, truth_url : str
        Destinations (any fsspec URL).
    detector : DetectorModel
        Geometry, mask and per-pixel corrections.
    instrument : Instrument
        Profile model; its wavelength must be the detector's.
    n_angles, subsets, axis_offset_steps
        See :func:`plan_scan`.
    truth_q : ndarray
        q grid [1/Å] of the truth projection.
    i0 : float, optional
        Mean incident intensity: detector counts per unit of the absolute pattern intensity
        (:mod:`xrdscale.physics.pattern`) before solid angle and polarisation; by default
        chosen so the strongest pixel expects about ``peak_counts`` (the frames' counts then do
        not depend on the intensity unit, and I0-normalised patterns are in absolute units).
    i0_noise : float
        Relative standard deviation of I0 from frame to frame.
    seed : int
        Seed of I0 fluctuations and counting noise.
    progress : bool
        Show a progress bar.

    Returns
    -------
    dict
        ``i0`` (the mean used), ``n_frames``, ``axis_mm``, ``raw``, ``truth``.
    """
    wl = detector.integrator.wavelength * 1e10
    if abs(wl - instrument.wavelength) > 1e-6 * wl:
        raise ConfigError(f"detector wavelength {wl:.6f} Å differs from the instrument's {instrument.wavelength} Å")
    n = phantom.sizes["x"]
    vox = float(phantom.attrs["voxel_size_mm"])
    plan = plan_scan(n_angles, n, vox, subsets=subsets, axis_offset_steps=axis_offset_steps)
    params, names, weights = phantom_components(phantom)
    q_sim = simulation_grid(detector)
    u_sim, u_truth = (unit_patterns(g, params, names, instrument) for g in (q_sim, np.asarray(truth_q, float)))
    rng = np.random.default_rng(seed)
    t_vox = (plan.translations - plan.axis_mm) / vox            # ray positions from the axis, voxel units

    def line_patterns(angle: float) -> np.ndarray:
        return (ray_matrix(n, angle, t_vox) @ weights).toarray()        # (n_t, K) dense

    if i0 is None:
        peak = max(float((line_patterns(a) @ u_sim).max()) for a in (0.0, 45.0, 90.0, 135.0))
        i0 = peak_counts / max(peak * float(detector.gain.max()), 1e-30)
    monitor = i0 * np.clip(1 + i0_noise * rng.standard_normal(plan.n_frames), 0.5, 1.5)
    order = np.argsort(plan.line_angles, kind="stable")
    sorted_index = np.empty_like(order)
    sorted_index[order] = np.arange(order.size)
    config = {"n_angles": n_angles, "subsets": subsets, "axis_offset_steps": axis_offset_steps, "i0": i0,
              "i0_noise": i0_noise, "seed": seed, "voltage": phantom.attrs.get("voltage"),
              "detector_shape": list(detector.shape), "raw": storage.redact(raw_url)}
    _begin_truth(phantom, truth_url, plan, np.asarray(truth_q, float), vox, config)
    local, cleanup = _local_target(raw_url)
    try:
        with h5py.File(local, "w") as f:
            data = _layout(f, plan, monitor, detector.shape, instrument.wavelength, config)
            with _progress(progress, f"scan {os.path.basename(raw_url)}", n_angles) as bump:
                for k in range(n_angles):
                    angle, _ = plan.line(k)
                    r = line_patterns(angle)
                    rays = (r if k % 2 == 0 else r[::-1]) @ u_sim
                    for s in range(0, n, detector.batch):
                        sel = slice(k * n + s, k * n + min(s + detector.batch, n))
                        data[sel] = detector.frames(q_sim, rays[s:s + detector.batch], monitor[sel], rng)
                    _write_truth_row(truth_url, sorted_index[k], (r @ u_truth).astype(np.float32))
                    bump()
        storage.put_file(local, raw_url)
    finally:
        cleanup()
    storage.mark_complete(truth_url, {"stage": "truth"})
    logger.info("scanned %d frames to %s (I0 %.3g)", plan.n_frames, storage.redact(raw_url), i0)
    return {"i0": float(i0), "n_frames": plan.n_frames, "axis_mm": plan.axis_mm, "raw": raw_url, "truth": truth_url}


def _layout(f: h5py.File, plan: ScanPlan, monitor: np.ndarray, shape: tuple[int, int], wavelength: float,
            config: dict) -> h5py.Dataset:
    """Create the NeXus groups of DESIGN.md's raw layout; returns the (empty) frame dataset."""
    entry = f.create_group("entry")
    entry.attrs.update({"NX_class": "NXentry", "default": "data", "program": f"xrdscale {__version__} simulate"})
    data_group = entry.create_group("data")
    data_group.attrs.update({"NX_class": "NXdata", "signal": "data"})
    data = data_group.create_dataset("data", shape=(plan.n_frames, *shape), dtype=np.int32, chunks=(1, *shape),
                                     **hdf5plugin.Bitshuffle(cname="lz4"))
    data.attrs.update({"units": "counts", "interpretation": "image"})
    instrument = entry.create_group("instrument")
    instrument.attrs["NX_class"] = "NXinstrument"
    mon = instrument.create_group("monitor")
    mon.attrs["NX_class"] = "NXmonitor"
    mon.create_dataset("data", data=monitor.astype(np.float64)).attrs["units"] = "counts"
    beam = instrument.create_group("beam")
    beam.attrs["NX_class"] = "NXbeam"
    beam.create_dataset("incident_wavelength", data=wavelength).attrs["units"] = "angstrom"
    sample = entry.create_group("sample")
    sample.attrs["NX_class"] = "NXsample"
    sample.create_dataset("rotation_angle", data=plan.angle).attrs["units"] = "deg"
    sample.create_dataset("translation", data=plan.translation).attrs["units"] = "mm"
    entry.create_dataset("simulation_config", data=storage.provenance("raw", config)["config"])
    return data


def _begin_truth(phantom: xr.Dataset, url: str, plan: ScanPlan, q: np.ndarray, vox: float, config: dict) -> None:
    """Write the truth store's maps and an empty ``projection`` (filled row by row, marker last)."""
    n_a, n_t = plan.line_angles.size, plan.translations.size
    ds = phantom.copy()
    ds["projection"] = (("angle", "translation", "q"),
                        da.zeros((n_a, n_t, q.size), dtype=np.float32, chunks=(1, n_t, q.size)))
    ds = ds.assign_coords(angle=np.sort(plan.line_angles), translation=plan.translations - plan.axis_mm, q=q)
    ds["angle"].attrs["units"] = "deg"
    ds["translation"].attrs["units"] = "mm"
    ds["q"].attrs["units"] = "1/angstrom"
    ds.attrs.update({"center_offset_mm": plan.axis_mm, "center_offset_steps": plan.axis_mm / vox,
                     "projection_units": "line integral in voxel-length units"})
    storage.create_store(ds, url, stage="truth", config=config, compute=False)


def _write_truth_row(url: str, index: int, row: np.ndarray) -> None:
    block = xr.Dataset({"projection": (("angle", "translation", "q"), row[None])})
    with storage.io_errors(url, "write the truth projection"):
        block.to_zarr(url, region={"angle": slice(index, index + 1), "translation": slice(None), "q": slice(None)},
                      storage_options=storage.storage_options(url) or None)


def _local_target(url: str) -> tuple[str, Callable[[], None]]:
    """A local file to write before moving/uploading to ``url``, and its cleanup."""
    if not storage.is_remote(url):
        path = os.path.abspath(storage.filesystem(url)[1])
        with storage.io_errors(url, "create the folder of"):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        local = path + ".partial"
    else:
        fd, local = tempfile.mkstemp(suffix=".nxs")
        os.close(fd)

    def cleanup() -> None:
        if os.path.exists(local):
            os.remove(local)

    return local, cleanup


class _progress:
    """A rich progress bar (or nothing) as a context manager yielding an advance callback."""

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self.enabled, self.label, self.total = enabled, label, total
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
