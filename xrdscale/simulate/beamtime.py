"""A whole simulated beamtime: cycles × voltages of raw XRD-CT datasets with their truth.

Folder layout under ``OUT`` (any fsspec URL)::

    raw/<id>.nxs            raw NeXus/HDF5 frames (DESIGN.md raw layout), one per dataset
    truth/<id>.zarr         ``truth`` store: phantom maps + noise-free projection
    calib/<detector>.poni   pyFAI geometry (pyFAI's own writer)
    calib/mask.edf          detector mask (EDF, non-zero = masked; pyFAI reads it with fabio)
    calib/ceo2.edf          a CeO2 calibration frame; calib/ceo2.txt its pyFAI integration (q [1/Å], I)
    phases/cell18650.yaml   phase library (DESIGN.md format) + phases/cif/*.cif
    jobs/<campaign>.yaml    campaign spec naming all of the above with relative paths

Presets: ``demo`` (1 cycle × 3 voltages, 64² phantom, 40 angles, 128×128-pixel detector;
well under a minute on 2 cores), ``paper`` (1 cycle × the 6 voltages of the paper,
637 translations × 400 angles as 4 × 100 interlaced, Pilatus 2M), ``scale`` (one 4.2 V
dataset at the paper's scan geometry on the demo detector: 254,800 frames, the paper's map
size), ``scale-quarter`` (a quarter of its frames) and ``lattice`` (see :data:`PRESETS`).

The campaign spec a preset writes carries pipeline settings sized to its data, a
``pipeline.train`` section above all (:class:`TrainSettings`): the demo's small ensemble
trains in minutes on 2 cores; the paper's is the paper's recipe (200,000 patterns, 10
members, up to 35 epochs), hours on a GPU and days on a laptop, like the rest of that preset
(254,800 Pilatus 2M frames, ~2.5 TB of int32 before compression, per dataset).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import yaml

from xrdscale.exceptions import ConfigError
from xrdscale.io import storage
from xrdscale.physics.constants import DEFAULT_WAVELENGTH, SEPARATOR
from xrdscale.physics.crystal import Phase, builtin_cif
from xrdscale.physics.pattern import Instrument, simulate_patterns
from xrdscale.simulate import phantom as phantom_mod
from xrdscale.simulate.geometry import DetectorModel
from xrdscale.simulate.scan import scan_phantom, simulation_grid

logger = logging.getLogger(__name__)

WAVELENGTH = DEFAULT_WAVELENGTH  # Å (95 keV)
CEO2_A = 5.411651              # Å, NIST SRM 674b
LIBRARY_Q = (1.16, 3.82, 1000)  # q grid of the 13-phase library [1/Å]


@dataclass(frozen=True)
class TrainSettings:
    """The ``pipeline.train`` section a preset's campaign spec carries (library size and ensemble).

    ``outputs`` are the scale factors of all 13 phases and the NCA lattice: what the report
    of a campaign shows.
    """

    n: int
    ensemble: int
    epochs: int
    seed: int = 0
    outputs: tuple[str, ...] = ("scale", "NCA.a", "NCA.c")

    def section(self) -> dict:
        """The YAML mapping of ``pipeline.train``."""
        return {"n": self.n, "ensemble": self.ensemble, "epochs": self.epochs, "seed": self.seed,
                "outputs": list(self.outputs)}


@dataclass(frozen=True)
class Preset:
    """Size of a simulated beamtime, and the training its campaign spec asks for."""

    size: int
    n_angles: int
    subsets: int
    voltages: tuple[float, ...]
    cycle: int
    detector: str
    instrument: tuple[float, float, float, float]   # U, V, W, X
    axis_offset_steps: float
    peak_counts: float
    train: TrainSettings
    nca_gradient: float = 0.0

    @property
    def frames_per_dataset(self) -> int:
        """Detector frames of one dataset (angles × translations)."""
        return self.n_angles * self.size


PRESETS = {
    # 2 members × ≤ 8 epochs on 5,000 patterns (4,000 for training): the model of `xrdscale demo`
    # (xrdscale.cli.demo), a few minutes of training on 2 cores.
    "demo": Preset(size=64, n_angles=40, subsets=4, voltages=(2.65, 3.85, 4.2), cycle=1, detector="demo",
                   instrument=(0.0, 0.0, 4.0e-4, 0.0), axis_offset_steps=1.37, peak_counts=2000.0,
                   train=TrainSettings(n=5000, ensemble=2, epochs=8)),
    # The paper's libraries and ensemble (seed 000: 200,000 patterns, 10 members, < 35 epochs).
    "paper": Preset(size=637, n_angles=400, subsets=4, voltages=phantom_mod.STAGE_VOLTAGES, cycle=7,
                    detector="pilatus2m", instrument=(0.0, 0.0, 1.5e-4, 0.0), axis_offset_steps=3.37,
                    peak_counts=5000.0, train=TrainSettings(n=200_000, ensemble=10, epochs=35)),
    # The paper's scan geometry (637 translations × 400 angles in 4 interlaced subsets, zigzag,
    # 30 µm steps over the paper's 19.11 mm) on the demo's 128×128 detector, one charged dataset:
    # the whole campaign at the paper's sinogram and map size on a 2-core machine
    # (`benchmarks/campaign.py --paper`). `scale-quarter` is a quarter of its frames (319 × 200,
    # 60 µm steps, the same cell), the reference of its memory check.
    "scale": Preset(size=637, n_angles=400, subsets=4, voltages=(4.2,), cycle=1, detector="demo",
                    instrument=(0.0, 0.0, 4.0e-4, 0.0), axis_offset_steps=3.37, peak_counts=2000.0,
                    train=TrainSettings(n=5000, ensemble=2, epochs=8)),
    "scale-quarter": Preset(size=319, n_angles=200, subsets=4, voltages=(4.2,), cycle=1, detector="demo",
                            instrument=(0.0, 0.0, 4.0e-4, 0.0), axis_offset_steps=1.87, peak_counts=2000.0,
                            train=TrainSettings(n=5000, ensemble=2, epochs=8)),
    # One charging dataset whose cathode has a known radial state-of-charge gradient (NCA a and c
    # change across the roll, :func:`xrdscale.simulate.phantom.make_phantom` nca_gradient): the
    # beamtime on which the fit is judged against PQ-Net's lattice maps.
    "lattice": Preset(size=40, n_angles=48, subsets=2, voltages=(3.4,), cycle=1, detector="demo",
                      instrument=(0.0, 0.0, 4.0e-4, 0.0), axis_offset_steps=1.37, peak_counts=2000.0,
                      train=TrainSettings(n=5000, ensemble=2, epochs=8), nca_gradient=0.6),
}


def make_detector(kind: str, *, wavelength: float = WAVELENGTH, seed: int = 0) -> DetectorModel:
    """The demo detector (128×128 px of 172 µm, beam near a corner, 0.28 m) or a Pilatus 2M at 1 m.

    Both get a mask: the Pilatus 2M module gaps plus a beam stop, or for the demo detector a
    two-row "gap" and 0.3 % bad pixels.
    """
    from pyFAI.detectors import Detector, detector_factory
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    rng = np.random.default_rng(seed)
    if kind == "demo":
        det = Detector(pixel1=172e-6, pixel2=172e-6, max_shape=(128, 128))
        ai = AzimuthalIntegrator(dist=0.28, poni1=-4.3 * 172e-6, poni2=-3.6 * 172e-6, detector=det,
                                 wavelength=wavelength * 1e-10)
        mask = np.zeros((128, 128), dtype=bool)
        mask[70:72, :] = True
        mask |= rng.random(mask.shape) < 0.003
    elif kind == "pilatus2m":
        det = detector_factory("Pilatus2M")
        ny, nx = det.max_shape
        ai = AzimuthalIntegrator(dist=1.0, poni1=(ny / 2 + 3.3) * det.pixel1, poni2=(nx / 2 - 5.6) * det.pixel2,
                                 detector=det, wavelength=wavelength * 1e-10)
        gaps = det.calc_mask()
        mask = gaps.astype(bool) if gaps is not None else np.zeros((ny, nx), dtype=bool)
        yy, xx = np.ogrid[:ny, :nx]
        mask |= np.hypot(yy + 0.5 - ai.poni1 / det.pixel1, xx + 0.5 - ai.poni2 / det.pixel2) < 20
    else:
        raise ConfigError(f"unknown detector {kind!r}; choose demo or pilatus2m")
    return DetectorModel.from_integrator(ai, mask, polarization_factor=0.99)


def simulate_beamtime(out: str, preset: str = "demo", seed: int = 0, *, progress: bool = False) -> str:
    """Simulate a whole beamtime under ``out``; returns the URL of the campaign spec.

    Parameters
    ----------
    out : str
        Destination folder (local path or fsspec URL).
    preset : str
        A name in :data:`PRESETS`.
    seed : int
        Seed of the phantom, the I0 fluctuations and the counting noise.
    progress : bool
        Show progress bars.

    Returns
    -------
    str
        URL of ``jobs/<campaign>.yaml``.

    Examples
    --------
    >>> spec = simulate_beamtime("/tmp/bt", "demo", seed=1)   # doctest: +SKIP
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    campaign = f"{preset}-18650"
    detector = make_detector(p.detector, seed=seed)
    instrument = Instrument(WAVELENGTH, *p.instrument)
    poni_rel = f"calib/{p.detector}.poni"
    _write_calibration(out, detector, instrument, poni_rel, seed)
    _write_phase_library(out, instrument)
    truth_q = np.linspace(*LIBRARY_Q)
    datasets, i0 = [], None
    for k, voltage in enumerate(p.voltages):
        ds_id = f"c{p.cycle}-{voltage:.2f}V"
        ph = phantom_mod.make_phantom(p.size, voltage=voltage, seed=seed, nca_gradient=p.nca_gradient)
        result = scan_phantom(ph, storage.join(out, "raw", f"{ds_id}.nxs"), storage.join(out, "truth", f"{ds_id}.zarr"),
                              detector, instrument, n_angles=p.n_angles, subsets=p.subsets,
                              axis_offset_steps=p.axis_offset_steps, truth_q=truth_q, i0=i0,
                              peak_counts=p.peak_counts, seed=seed * 1000 + k, progress=progress)
        i0 = result["i0"]
        datasets.append({"id": ds_id, "state": phantom_mod.state_of(voltage), "voltage": float(voltage),
                         "raw": f"../raw/{ds_id}.nxs"})
    spec = {
        "version": 1,
        "campaign": campaign,
        "workspace": "../work",
        "geometry": {"poni": f"../{poni_rel}", "mask": "../calib/mask.edf"},
        "phases": "../phases/cell18650.yaml",
        "model": None,
        "cluster": {"kind": "local"},
        "pipeline": {"integrate": {"npt": LIBRARY_Q[2], "q_range": [LIBRARY_Q[0], LIBRARY_Q[1]]},
                     "sinogram": {"center": "auto"},
                     "train": p.train.section()},
        "cycles": [{"cycle": p.cycle, "datasets": datasets}],
    }
    header = (f"# Simulated beamtime (xrdscale simulate beamtime --preset {preset} --seed {seed}).\n"
              f"# Truth stores: ../truth/<id>.zarr. Preset: {asdict(p)}\n"
              f"# Size: {len(datasets)} dataset(s) of {p.frames_per_dataset} frames of {detector.shape[0]}x"
              f"{detector.shape[1]} pixels; training: {p.train.n} patterns, {p.train.ensemble} member(s), "
              f"<= {p.train.epochs} epochs.\n")
    url = storage.join(out, "jobs", f"{campaign}.yaml")
    storage.write_bytes(url, (header + yaml.safe_dump(spec, sort_keys=False)).encode())
    logger.info("beamtime %s: %d datasets, campaign spec %s", preset, len(datasets), storage.redact(url))
    return url


def write_geometry(detector: DetectorModel, poni_url: str, mask_url: str) -> None:
    """Write the detector's PONI file (pyFAI's own writer) and its mask (EDF, 1 = masked)."""
    import fabio

    with tempfile.TemporaryDirectory() as tmp:
        poni = os.path.join(tmp, "geometry.poni")
        detector.integrator.write(poni)
        storage.write_bytes(poni_url, _read(poni))
        mask_path = os.path.join(tmp, "mask.edf")
        fabio.edfimage.EdfImage(data=detector.mask.astype(np.int8)).write(mask_path)
        storage.write_bytes(mask_url, _read(mask_path))


def _write_calibration(out: str, detector: DetectorModel, instrument: Instrument, poni_rel: str, seed: int) -> None:
    """PONI (pyFAI's writer), mask (EDF), a CeO2 frame (EDF) and its pyFAI integration (text)."""
    import fabio

    write_geometry(detector, storage.join(out, poni_rel), storage.join(out, "calib", "mask.edf"))
    with tempfile.TemporaryDirectory() as tmp:
        ceo2 = Phase.from_parameters("CeO2", "Fm-3m", {"a": CEO2_A},
                                     [("Ce", 0, 0, 0, 1.0), ("O", 0.25, 0.25, 0.25, 1.0)])
        q = simulation_grid(detector)
        pattern = simulate_patterns(q, [ceo2], {"CeO2": {"scale": np.array([1.0])}}, instrument)
        i0 = 2.0e4 / max(float(pattern.max()) * float(detector.gain.max()), 1e-30)
        frame = detector.frames(q, pattern, np.array([i0]), np.random.default_rng(seed + 7))[0]
        frame_path = os.path.join(tmp, "ceo2.edf")
        fabio.edfimage.EdfImage(data=frame, header={"monitor": f"{i0:.6g}", "calibrant": "CeO2"}).write(frame_path)
        storage.write_bytes(storage.join(out, "calib", "ceo2.edf"), _read(frame_path))
        res = detector.integrator.integrate1d(frame, LIBRARY_Q[2], unit="q_A^-1", radial_range=LIBRARY_Q[:2],
                                              mask=detector.mask, correctSolidAngle=True,
                                              polarization_factor=detector.polarization_factor, normalization_factor=i0)
        text = "# CeO2 calibration frame integrated with pyFAI (normalised by the monitor)\n# q [1/A]  intensity\n"
        text += "\n".join(f"{a:.6f} {b:.6g}" for a, b in zip(res.radial, res.intensity))
        storage.write_bytes(storage.join(out, "calib", "ceo2.txt"), (text + "\n").encode())


#: Probability that a phase is absent from a training pattern: a voxel holds a few of the 13 phases.
ABSENT = 0.6


def _write_phase_library(out: str, instrument: Instrument) -> None:
    """The 13-phase library: packaged CIFs copied beside it, ranges covering the phantom's values."""
    phases = {}
    for name in phantom_mod.PHASES:
        if name == SEPARATOR.name:
            phases[name] = {"peak": {"q": list(SEPARATOR.q_range), "fwhm": list(SEPARATOR.fwhm_range)},
                            "scale": [0.0, 1.0], "absent": ABSENT}
            continue
        storage.write_bytes(storage.join(out, "phases", "cif", f"{name}.cif"), _read(builtin_cif(name)))
        entry = {"cif": f"cif/{name}.cif", "scale": [0.0, 1.0], "absent": ABSENT}
        for key, (lo, hi) in phantom_mod.RANGES[name].items():
            entry[key] = [60.0, 1000.0] if key == "size_nm" else [lo, hi]
        phases[name] = entry
    lib = {
        "version": 1,
        "wavelength": instrument.wavelength,
        "q_grid": {"min": LIBRARY_Q[0], "max": LIBRARY_Q[1], "npt": LIBRARY_Q[2]},
        # The instrument profile is fitted to the integrated CeO2 frame, as at the beamline: it then
        # includes the detector's own broadening, which the simulated frames have too.
        "instrument": {"calibrant": "CeO2", "pattern": "../calib/ceo2.txt"},
        "background": {"chebyshev_order": 2, "amplitude": [0.0, 0.05]},
        "noise": {"counts": [1.0e5, 1.0e7]},
        "phases": phases,
    }
    header = ("# Phase library of the simulated 18650 beamtime; scale = volume fraction of a voxel (absolute units).\n"
              f"# The frames were simulated with U={instrument.U:g} V={instrument.V:g} W={instrument.W:g} "
              f"X={instrument.X:g} (deg^2, deg) before the detector's pixel broadening.\n")
    storage.write_bytes(storage.join(out, "phases", "cell18650.yaml"),
                        (header + yaml.safe_dump(lib, sort_keys=False)).encode())


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
