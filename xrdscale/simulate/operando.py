"""A simulated operando series: repeated point (or line) scans of a cycling cell, with their truth.

The cell follows :mod:`xrdscale.simulate.cycling` (two 1C cycles of the paper's Figure 3 by
default). Every ``scan_interval_s`` the beam measures ``points`` positions along a line
(``points=1``: a point scan) through the anode; each frame is the anode's pattern
(:func:`xrdscale.physics.pattern.simulate_patterns` of the four LiCx phases, their scale
the volume fraction from the weight fractions and densities) on a Chebyshev background,
turned into a detector image with Poisson counts by the beamtime simulator's
:class:`~xrdscale.simulate.geometry.DetectorModel` — a 128 × 64 px strip of 172 µm pixels
1 m from the sample, beside the beam, covering q ≈ 1.4–2.5 1/Å.

Files written under ``out``::

    raw/operando.nxs        frames in the raw layout (rotation angle 0, translation the line
                            position) plus /entry/data/time (s) and /entry/start_time, and the
                            potentiostat's log as the NeXus group /entry/echem; with
                            ``files=K``, raw/operando-001.nxs … -K.nxs instead, each with its
                            share of the scans (times from the same t = 0) and the log up to
                            its last scan (the last file: all of it), as a beamline writes
                            one file per N scans
    echem/cell.csv          the same log as CSV (time/s, voltage/V, current/A)
    truth/operando.zarr     ``truth`` store: scale, a, c, size, weight_fraction (phase, frame),
                            coords time, voltage, current, cycle, step (frame)
    calib/operando.poni     pyFAI geometry; calib/mask.edf the detector mask

The profile matches the 4LiCx library (xrdscale/data/phases/licx4.yaml): its Caglioti W less
the pixels' own broadening, so that integrated patterns have the library's peak widths.

Examples
--------
>>> urls = simulate_operando("/tmp/op", scan_interval_s=120.0)   # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import logging
from importlib import resources
from typing import Any

import h5py
import numpy as np
import xarray as xr

from xrdscale.exceptions import ConfigError
from xrdscale.io import echem, storage
from xrdscale.io.frames import START_TIME, TIME
from xrdscale.physics.crystal import Phase, builtin_phase
from xrdscale.physics.pattern import Instrument, simulate_patterns
from xrdscale.physics.quant import mass_factor
from xrdscale.simulate.cycling import PHASES, Protocol, cycling_truth, echem_log
from xrdscale.simulate.geometry import DetectorModel
from xrdscale.simulate.scan import ScanPlan, _layout, _local_target, _progress, simulation_grid

logger = logging.getLogger(__name__)

#: Crystallite size of the anode phases [nm].
SIZE_NM = 300.0
#: Pixel broadening (Gaussian-equivalent, deg² of 2θ) taken off the library's W.
PIXEL_W = 1.0e-4
#: Background level, as a fraction of the mean strongest peak.
BACKGROUND = 0.02
START = "2021-05-04T10:00:00+00:00"


def library_url() -> str:
    """Path of the packaged 4LiCx phase library (the model of the paper's point scans)."""
    return str(resources.files("xrdscale") / "data" / "phases" / "licx4.yaml")


def point_detector(*, wavelength: float, seed: int = 0) -> DetectorModel:
    """A 128 × 64 px strip (172 µm pixels) 1 m from the sample, its inner edge 170 px from the beam."""
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    pixel = 172e-6
    det = Detector(pixel1=pixel, pixel2=pixel, max_shape=(64, 128))
    ai = AzimuthalIntegrator(dist=1.0, poni1=32.3 * pixel, poni2=-170.4 * pixel, detector=det,
                             wavelength=wavelength * 1e-10)
    mask = np.random.default_rng(seed).random((64, 128)) < 0.003
    mask[30:32, :] = True   # a module gap
    return DetectorModel.from_integrator(ai, mask, polarization_factor=0.99)


def instrument() -> Instrument:
    """The 4LiCx library's profile, less the pixels' broadening (what the frames are simulated with)."""
    from xrdscale.physics.phaselib import PhaseLibrary

    lib = PhaseLibrary.load(library_url())
    ins = lib.instrument_model()
    return Instrument(lib.wavelength, U=ins.U, V=ins.V, W=max(ins.W - PIXEL_W, 1e-6), X=ins.X)


def _phase(name: str) -> Phase:
    phase = builtin_phase(name)
    assert isinstance(phase, Phase), name  # the LiCx phases are crystalline
    return phase


def volume_scales(weight_percent: np.ndarray) -> np.ndarray:
    """Scale factors (volume fractions, summing to 1) of weight % (n, phase) of :data:`PHASES`.

    ``scale_i ∝ W_i / k_i`` with ``k = ZMV/V²`` (:func:`xrdscale.physics.quant.mass_factor`),
    the inverse of the Hill & Howard weight fraction of :mod:`xrdscale.analysis.fractions`.
    """
    k = np.array([mass_factor(_phase(p)) for p in PHASES])
    v = np.asarray(weight_percent, dtype=float) / k
    return v / v.sum(axis=1, keepdims=True)


def simulate_operando(out: str, *, protocol: Protocol | None = None, scan_interval_s: float = 60.0,
                      points: int = 1, line_step_mm: float = 0.05, echem_interval_s: float = 10.0,
                      peak_counts: float = 3000.0, start_time: str = START, seed: int = 0,
                      files: int = 1, progress: bool = False) -> dict[str, Any]:
    """Simulate an operando series under ``out``; returns the URLs of what it wrote.

    Parameters
    ----------
    out : str
        Destination folder (local path or fsspec URL).
    protocol : Protocol, optional
        The cycling protocol (default: two 1C cycles, 2.65–4.2 V).
    scan_interval_s : float
        Seconds between the starts of two scans.
    points : int
        Positions per scan (1: a point scan; more: a line scan of ``line_step_mm`` steps).
    line_step_mm : float
        Step of a line scan [mm].
    echem_interval_s : float
        Seconds between entries of the potentiostat's log.
    peak_counts : float
        Expected counts of the strongest pixel of a typical frame.
    start_time : str
        Wall-clock time (ISO 8601) of t = 0 of both the frames and the log.
    seed : int
        Seed of the I0 fluctuations, the counting noise and the log's voltage noise.
    files : int
        Raw files to split the scans into (consecutive scans each; 1: ``raw/operando.nxs``).
    progress : bool
        Show a progress bar.

    Returns
    -------
    dict
        ``raw`` (the first raw file), ``raw_files`` (all, in time order), ``echem``, ``truth``,
        ``poni``, ``mask`` URLs and ``n_frames``.
    """
    from xrdscale.simulate.beamtime import write_geometry

    p = protocol or Protocol()
    if scan_interval_s <= 0 or points < 1:
        raise ConfigError(f"scan_interval_s={scan_interval_s}, points={points}: give a positive interval and at "
                          "least one point per scan")
    n_scans = int(np.ceil(p.duration_s / scan_interval_s))
    if not 1 <= files <= n_scans:
        raise ConfigError(f"files={files}: give between 1 and the number of scans ({n_scans})")
    dwell = 0.01  # s per frame (the paper's 10 ms exposure)
    scan_t = np.arange(0.0, p.duration_s, scan_interval_s)
    offsets = (np.arange(points) - (points - 1) / 2.0) * line_step_mm
    time = (scan_t[:, None] + dwell * np.arange(points)[None, :]).ravel()
    position = np.tile(offsets, scan_t.size)
    truth = cycling_truth(time, p)
    scales = volume_scales(truth.weight_percent) * (1.0 + 0.03 * np.cos(position / max(line_step_mm, 1e-9)))[:, None]
    ins = instrument()
    detector = point_detector(wavelength=ins.wavelength, seed=seed)
    q = simulation_grid(detector)
    lattice = {name: _phase(name).lattice for name in PHASES}
    unit = np.concatenate([simulate_patterns(q, [builtin_phase(name)], {name: {
        "scale": np.ones(1), **{k: np.array([v]) for k, v in lattice[name].items()},
        "size_nm": np.array([SIZE_NM])}}, ins) for name in PHASES]).astype(np.float64)
    patterns = scales @ unit
    level = BACKGROUND * float(patterns.max(axis=1).mean())
    patterns += level * (1.0 + 0.3 * (q - q[0]) / (q[-1] - q[0]))[None, :]
    rng = np.random.default_rng(seed)
    i0 = peak_counts / max(float(patterns.max()) * float(detector.gain.max()), 1e-30)
    monitor = i0 * np.clip(1 + 0.03 * rng.standard_normal(time.size), 0.5, 1.5)
    names = ["operando.nxs"] if files == 1 else [f"operando-{k + 1:03d}.nxs" for k in range(files)]
    raws = [storage.join(out, "raw", name) for name in names]
    urls = {"raw": raws[0], "echem": storage.join(out, "echem", "cell.csv"),
            "truth": storage.join(out, "truth", "operando.zarr"), "poni": storage.join(out, "calib", "operando.poni"),
            "mask": storage.join(out, "calib", "mask.edf")}
    write_geometry(detector, urls["poni"], urls["mask"])
    log = echem_log(p, interval_s=echem_interval_s, seed=seed + 1)
    log_out = echem.EchemLog(log.time, log.voltage, log.current, "simulated", start_time)
    echem.write_csv(urls["echem"], log_out)
    config = {"protocol": p.__dict__, "scan_interval_s": scan_interval_s, "points": points,
              "line_step_mm": line_step_mm, "peak_counts": peak_counts, "i0": i0, "seed": seed,
              "start_time": start_time, "raw": storage.redact(urls["raw"]), "files": files}
    with _progress(progress, "operando scans", time.size) as bump:
        for k, (url, scans) in enumerate(zip(raws, np.array_split(np.arange(scan_t.size), files), strict=True)):
            sel = slice(int(scans[0]) * points, (int(scans[-1]) + 1) * points)
            so_far = log_out if k == files - 1 else log_until(log_out, float(time[sel.stop - 1]))  # the last: all
            plan = ScanPlan(angle=np.zeros(sel.stop - sel.start), translation=position[sel],
                            line_angles=np.zeros(scans.size), translations=offsets, axis_mm=0.0)
            _write_raw(url, plan, detector, q, patterns[sel], monitor[sel], time[sel], rng, ins.wavelength,
                       config, so_far, start_time, bump)
    _write_truth(urls["truth"], truth, scales, lattice, position, config)
    logger.info("operando series: %d frames (%d scans × %d points) over %.1f h to %s", time.size, scan_t.size,
                points, p.duration_s / 3600, storage.redact(out))
    return {**urls, "raw_files": raws, "n_frames": str(time.size)}


def log_until(log: echem.EchemLog, t: float) -> echem.EchemLog:
    """The part of ``log`` a potentiostat has written by time ``t`` (at least up to ``t``, one entry past it)."""
    n = min(int(np.searchsorted(log.time, t, side="left")) + 1, log.time.size)
    n = max(n, 2)
    return echem.EchemLog(log.time[:n], log.voltage[:n], log.current[:n], log.source, log.start_time)


def _write_raw(url: str, plan: ScanPlan, detector: DetectorModel, q: np.ndarray, patterns: np.ndarray,
               monitor: np.ndarray, time: np.ndarray, rng: np.random.Generator, wavelength: float, config: dict,
               log: echem.EchemLog, start_time: str, bump: Any) -> None:
    """One raw NeXus file of frames, their times and the log so far."""
    local, cleanup = _local_target(url)
    try:
        with h5py.File(local, "w") as f:
            data = _layout(f, plan, monitor, detector.shape, wavelength, config)
            _time_layout(f, time, start_time, log)
            for s in range(0, time.size, detector.batch):
                sel = slice(s, min(s + detector.batch, time.size))
                data[sel] = detector.frames(q, patterns[sel], monitor[sel], rng)
                for _ in range(sel.stop - sel.start):
                    bump()
        storage.put_file(local, url)
    finally:
        cleanup()


def _time_layout(f: h5py.File, time: np.ndarray, start_time: str, log: echem.EchemLog) -> None:
    """Frame times, the start time and the echem log as NeXus fields of the raw file."""
    f[TIME] = time
    f[TIME].attrs["units"] = "s"
    f[START_TIME] = dt.datetime.fromisoformat(start_time).isoformat()
    g = f.create_group("entry/echem")
    g.attrs.update({"NX_class": "NXcollection", "start_time": start_time})
    for key, unit in (("time", "s"), ("voltage", "V"), ("current", "A")):
        g.create_dataset(key, data=getattr(log, key)).attrs["units"] = unit


def _write_truth(url: str, truth, scales: np.ndarray, lattice: dict, position: np.ndarray, config: dict) -> None:
    n = truth.time.size
    a = np.array([np.full(n, lattice[p]["a"]) for p in PHASES])
    c = np.array([np.full(n, lattice[p].get("c", np.nan)) for p in PHASES])
    ds = xr.Dataset(
        {"scale": (("phase", "frame"), scales.T), "a": (("phase", "frame"), a), "c": (("phase", "frame"), c),
         "size": (("phase", "frame"), np.full((len(PHASES), n), SIZE_NM)),
         "weight_fraction": (("phase", "frame"), truth.weight_percent.T / 100.0),
         "soc": (("frame",), truth.soc)},
        coords={"phase": list(PHASES), "frame": np.arange(n), "time": ("frame", truth.time),
                "voltage": ("frame", truth.voltage), "current": ("frame", truth.current),
                "cycle": ("frame", truth.cycle), "step": ("frame", truth.step), "translation": ("frame", position)})
    ds["time"].attrs["units"] = "s"
    ds["voltage"].attrs["units"] = "V"
    ds["current"].attrs["units"] = "A"
    ds["weight_fraction"].attrs.update(units="1", long_name="weight fraction (truth)")
    storage.write_store(ds, url, stage="truth", config=config)
