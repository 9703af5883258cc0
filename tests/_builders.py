"""Builders of test inputs with a known truth, shared by the test modules.

Test modules import these from here (``from _builders import …``), never from each other:
a test module is a set of tests, not a library. ``tests`` is on ``sys.path`` through
``pythonpath`` in ``pyproject.toml``, whatever pytest's import mode. pyFAI and torch are
imported inside the builders that need them, so importing this module stays cheap.

These stay in the test tree rather than in a public ``xrdscale.testing`` module: each one
is shaped by what a particular test compares against (a pyFAI ``calcfrom1d`` detector
image, exact disk chords, an ellipse phantom, a random-weight model entry), none is a
simulator a user would run — that is :mod:`xrdscale.simulate` — and keeping them here
leaves them free to change with the tests.

Groups (each from the test module that first needed it):

- raw frames (``test_frames``): :func:`make_ai`, :func:`peak_pattern`, :func:`make_raw`;
- sinograms of the ellipse phantom (``test_reconstruct``): :func:`phantom_sinograms`,
  :func:`write_sinogram`;
- patterns stores of a two-disk phantom with known spectra (``test_sinogram``):
  :func:`disk_projection`, :func:`scan_patterns`;
- PQ-Net registry entries (``test_pqnet_model``): :func:`tiny_spec`, :func:`write_random_entry`;
  a tiny trained 4LiCx ensemble (``test_operando``, ``test_operando_watch``): :func:`train_licx4`;
- analysis maps with a known answer (``test_analysis_*``): :func:`series_with_truth`,
  :func:`cathode_maps`, :func:`spiral_maps`.

The stage-table doubles of the runner tests are in ``campaign_doubles.py`` (also run as a
script by the crash test).
"""

from __future__ import annotations

import h5py
import hdf5plugin
import numpy as np
import xarray as xr

from xrdscale.analysis.regions import CHARGE_ORDER, DL, HL, IN, OUTSIDE
from xrdscale.io import frames, storage
from xrdscale.recon.geometry import Geometry
from xrdscale.recon.phantoms import default_ellipses, ellipse_image, ellipse_sinogram

# ---------------------------------------------------------------------------------------
# Raw frames: contract-layout HDF5 files whose frames pyFAI made from known 1D patterns

WAVELENGTH = 0.130509  # Å
FRAME_SHAPE = (48, 40)


def make_ai(shape=FRAME_SHAPE):
    """A small Pilatus-pixel pyFAI integrator at :data:`WAVELENGTH`."""
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    det = Detector(pixel1=172e-6, pixel2=172e-6, max_shape=shape)
    return AzimuthalIntegrator(dist=0.1, poni1=-0.0015, poni2=0.0035, rot1=0.0, detector=det,
                               wavelength=WAVELENGTH * 1e-10)


def peak_pattern(tth: np.ndarray, centres, widths, heights) -> np.ndarray:
    """Gaussian peaks on a flat background of 5 counts."""
    out = np.full_like(tth, 5.0)
    for c, w, h in zip(centres, widths, heights):
        out += h * np.exp(-0.5 * ((tth - c) / w) ** 2)
    return out


def make_raw(path, angles, translations, *, shape=FRAME_SHAPE, rng=None, monitor=None, poni_path=None):
    """Write a contract-layout raw file; frame i shows a 1D pattern whose peak heights vary with i.

    Returns the per-frame 1D patterns' parameters (heights) so callers can check them.
    """
    rng = rng or np.random.default_rng(0)
    ai = make_ai(shape)
    if poni_path is not None:
        ai.write(str(poni_path))
    n = len(angles)
    tth = np.linspace(0.0, 6.0, 2000)
    heights = rng.uniform(50, 400, size=(n, 3))
    monitor = np.asarray(monitor if monitor is not None else rng.uniform(0.9, 1.1, n), dtype=np.float64)
    with h5py.File(path, "w") as h5:
        data = h5.create_dataset(frames.DATA, shape=(n, *shape), dtype=np.int32, chunks=(1, *shape),
                                 **hdf5plugin.Bitshuffle())
        for i in range(n):
            one_d = peak_pattern(tth, (1.4, 2.2, 3.1), (0.05, 0.08, 0.06), heights[i])
            img = ai.calcfrom1d(tth, one_d, shape=shape, dim1_unit="2th_deg", correctSolidAngle=True,
                                polarization_factor=0.99)
            data[i] = rng.poisson(np.clip(img, 0, None) * monitor[i]).astype(np.int32)
        h5[frames.MONITOR] = monitor
        h5[frames.ANGLE] = np.asarray(angles, dtype=np.float64)
        h5[frames.TRANSLATION] = np.asarray(translations, dtype=np.float64)
    return heights


# ---------------------------------------------------------------------------------------
# Sinograms of the ellipse phantom (exact line integrals, xrdscale.recon.phantoms)

PHANTOM_N, PHANTOM_A = 48, 72  # translations (= image size), angles over 180°


def write_sinogram(url: str, sino: np.ndarray, angles_deg: np.ndarray, step_mm: float = 0.03) -> str:
    """A ``sinogram`` store following the contract (as the sinogram stage writes it)."""
    n = sino.shape[1]
    ds = xr.Dataset(
        {"intensity": (("angle", "translation", "q"), sino.astype(np.float32))},
        coords={"angle": angles_deg, "translation": (np.arange(n) - (n - 1) / 2) * step_mm,
                "q": np.linspace(1.2, 3.8, sino.shape[2])},
    ).chunk({"angle": -1, "translation": -1, "q": 2})
    return storage.write_store(ds, url, stage="sinogram", config={"test": True})


def phantom_sinograms(n: int = PHANTOM_N, a: int = PHANTOM_A, scales=(1.0, 2.0, 0.5)):
    """Channels = the ellipse phantom times a per-channel scale; returns (sino, truth, angles)."""
    angles = np.arange(a) * 180.0 / a
    g = Geometry(tuple(angles), n)
    ellipses = default_ellipses(n)
    base = ellipse_sinogram(g, ellipses)
    sino = np.stack([s * base for s in scales], axis=-1)
    truth = np.stack([s * ellipse_image(n, ellipses) for s in scales], axis=-1)
    return sino, truth, angles


# ---------------------------------------------------------------------------------------
# Patterns stores of a two-disk phantom with known spectra (exact chords)

DISK_Q = np.linspace(1.0, 3.0, 24)
DISKS = [  # x, y (mm), radius (mm), spectrum peak q
    (0.8, -0.5, 1.2, 1.5),
    (-1.0, 0.6, 0.7, 2.5),
]
DISK_STEP = 0.1
DISK_AIR = 0.05 + 0.02 * DISK_Q


def disk_spectrum(q0):
    """The spectrum of a disk whose peak is at ``q0``, on :data:`DISK_Q`."""
    return np.exp(-0.5 * ((DISK_Q - q0) / 0.15) ** 2) + 0.1


def disk_projection(theta_deg, u):
    """Exact parallel-beam projections of the disks at axis-relative positions u: (len(u), len(DISK_Q))."""
    th = np.radians(theta_deg)
    out = np.zeros((np.size(u), DISK_Q.size))
    for x, y, r, q0 in DISKS:
        s = np.asarray(u) - (x * np.cos(th) + y * np.sin(th))
        chord = 2 * np.sqrt(np.clip(r * r - s * s, 0, None))
        out += chord[:, None] * disk_spectrum(q0)[None, :]
    return out


def scan_patterns(path, *, center, angles, n_trans=81, rng=None, shuffle=True):
    """Write a patterns store of a zigzag scan (every other line reversed), frames in acquisition order."""
    t_grid = np.arange(n_trans) * DISK_STEP
    rows, ang, trans = [], [], []
    for k, a in enumerate(angles):
        t = t_grid if k % 2 == 0 else t_grid[::-1]
        rows.append(disk_projection(a, t - center) + DISK_AIR)
        ang.append(np.full(t.size, a))
        trans.append(t)
    inten = np.concatenate(rows)
    if rng is not None:
        inten = rng.poisson(inten * 200) / 200
    ang, trans = np.concatenate(ang), np.concatenate(trans)
    if shuffle:  # positioners, not order, decide where a pattern goes
        perm = np.random.default_rng(1).permutation(ang.size)
        inten, ang, trans = inten[perm], ang[perm], trans[perm]
    ds = xr.Dataset({"intensity": (("frame", "q"), inten.astype(np.float32))},
                    coords={"q": DISK_Q, "angle": ("frame", ang), "translation": ("frame", trans)})
    storage.write_store(ds.chunk({"frame": 500}), str(path), stage="patterns")
    return str(path)


# ---------------------------------------------------------------------------------------
# PQ-Net: a tiny network spec and registry entries of random-weight members

PQNET_YAML = """\
version: 1
wavelength: 0.130509
q_grid: {min: 1.16, max: 2.84, npt: 128}
instrument: {U: 0.0, V: 0.0, W: 4.0e-4, X: 0.0}
background: {chebyshev_order: 2, amplitude: [0.0, 0.05]}
noise: {counts: [1.0e5, 1.0e7]}
phases:
  NCA: {builtin: NCA, scale: [0.1, 1], a: [2.810, 2.875], c: [14.15, 14.55]}
  separator: {peak: {q: [1.52, 1.53], fwhm: [0.01, 0.05]}, scale: [0, 1]}
"""


def tiny_spec(npt: int = 64):
    """A ModelSpec small enough to build and export in a fraction of a second."""
    from xrdscale.pqnet.model import ModelSpec

    routes = (("NCA", "scale"), ("NCA", "a"), ("NCA", "c"), ("Al", "scale"))
    return ModelSpec(phases=("NCA", "Al"), routes=routes, npt=npt, target_mean=(0.5, 2.84, 14.3, 0.2),
                     target_std=(0.2, 0.02, 0.1, 0.1), pattern_channels=4, phase_channels=3, hidden=8)


def write_random_entry(url: str, spec, q: np.ndarray, n: int = 2) -> str:
    """A registry entry of ``n`` untrained members (torch seeds 0 … n-1); returns its entry id."""
    import torch

    from xrdscale.pqnet import registry
    from xrdscale.pqnet.engine import export_onnx
    from xrdscale.pqnet.model import PQNet

    members = []
    for i in range(n):
        torch.manual_seed(i)
        m = PQNet(spec).eval()
        members.append(registry.MemberFiles(registry.state_bytes(m), export_onnx(m), {"seed": i}))
    return registry.write_entry(url, spec=spec, q=q, phases_yaml=PQNET_YAML, members=members, metrics={},
                                config={})


# ---------------------------------------------------------------------------------------
# Analysis maps with a known answer

VOLTS = (2.65, 3.7, 3.79, 3.85, 3.95, 4.2)
HL_STAGE = (0, 1, 2, 3, 4, 5)        # graphite → LiC30+ → LiC30 → LiC18 → LiC12 → LiC6
DL_STAGE = (0, 0, 1, 2, 3, 5)        # one stage late, caught up at the top
IN_STAGE = (0, 1, 1, 2, 2, 2)        # never beyond LiC30


def series_with_truth(rng, n=32):
    """A voltage series of graphite-stage maps with known HL/DL/IN regions; returns (series, truth)."""
    truth = np.full((n, n), OUTSIDE, dtype=int)
    truth[4:28, 4:28] = HL
    truth[8:16, 6:20] = DL
    truth[20:26, 14:26] = IN
    out = []
    for k, v in enumerate(VOLTS):
        scale = np.zeros((len(CHARGE_ORDER), n, n))
        for code, stages in ((HL, HL_STAGE), (DL, DL_STAGE), (IN, IN_STAGE)):
            scale[stages[k]][truth == code] = 1.0
        scale = np.clip(scale + rng.normal(0, 0.08, scale.shape), 0, None)
        maps = xr.Dataset({"scale": (("phase", "y", "x"), scale)},
                          coords={"phase": list(CHARGE_ORDER), "y": np.arange(n) * 0.1, "x": np.arange(n) * 0.1})
        out.append((v, maps.chunk({"y": 16})))
    return out, truth


def cathode_maps(rng, n=40):
    """NCA everywhere in a band, an Al tab strip; NCA a/c differ next to the tab."""
    ax = np.arange(n) * 0.1
    scale = np.zeros((2, n, n))
    scale[0, 5:35, :] = 1.0                       # NCA band
    scale[1, 18:22, 10:30] = 2.0                  # Al tab
    near = np.zeros((n, n), bool)
    near[16:24, 8:32] = True
    a = np.where(near, 2.851, 2.819) + rng.normal(0, 0.001, (n, n))
    c = np.where(near, 14.30, 14.48) + rng.normal(0, 0.002, (n, n))
    nan = np.full((n, n), np.nan)
    ds = xr.Dataset({
        "scale": (("phase", "y", "x"), scale + rng.normal(0, 0.01, scale.shape)),
        "a": (("phase", "y", "x"), np.stack([a, np.full((n, n), 4.05)])),
        "c": (("phase", "y", "x"), np.stack([c, nan])),
        "a_std": (("phase", "y", "x"), np.full((2, n, n), 0.002)),
    }, coords={"phase": ["NCA", "Al"], "y": ax, "x": ax})
    return ds, near


#: One jelly-roll repeat (phase, thickness mm), innermost first.
LAYERS = (("Cu", 0.3), ("LiC6", 0.5), ("separator", 0.3), ("NCA", 0.6), ("Al", 0.3))
PITCH = sum(t for _, t in LAYERS)
SPIRAL_PHASES = ("Fe", "pin") + tuple(p for p, _ in LAYERS)


def layer_at(rho: np.ndarray) -> np.ndarray:
    """Index into LAYERS of the layer at spiral coordinate rho (mm past the roll start)."""
    edges = np.cumsum([t for _, t in LAYERS])
    return np.searchsorted(edges, np.mod(rho, PITCH), side="right")


def spiral_maps(n: int = 128, px: float = 0.15, centre=(0.31, -0.22), r0: float = 1.5, turns: float = 3.0,
                r_case: float = 9.0, rng=None) -> xr.Dataset:
    """A jelly-roll cross-section: pin, spiral of LAYERS, steel casing; scale maps (phase, y, x)."""
    ax = (np.arange(n) - (n - 1) / 2) * px
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    r = np.hypot(yy - centre[0], xx - centre[1])
    theta = np.mod(np.arctan2(yy - centre[0], xx - centre[1]), 2 * np.pi)
    rho = r - r0 - PITCH * theta / (2 * np.pi)
    in_roll = (rho >= 0) & (r - r0 <= turns * PITCH)
    lay = layer_at(rho)
    scale = np.zeros((len(SPIRAL_PHASES), n, n))
    scale[SPIRAL_PHASES.index("pin")] = r < r0 * 0.6
    scale[SPIRAL_PHASES.index("Fe")] = (r > r_case) & (r < r_case + 0.4)
    for k, (name, _) in enumerate(LAYERS):
        scale[SPIRAL_PHASES.index(name)] += in_roll & (lay == k)
    if rng is not None:
        scale += rng.normal(0, 0.05, scale.shape)
    coords = {"phase": list(SPIRAL_PHASES), "y": ax, "x": ax}
    return xr.Dataset({"scale": (("phase", "y", "x"), scale)}, coords=coords)


# NCA (scale, a, c) and Al at demo noise (the counts of the packaged libraries): a small phase library
NCA_AL_YAML = """\
version: 1
wavelength: 0.130509
q_grid: {min: 1.16, max: 2.84, npt: 192}
instrument: {U: 0.0, V: 0.0, W: 4.0e-4, X: 0.0}
background: {chebyshev_order: 2, amplitude: [0.0, 0.05]}
noise: {counts: [1.0e5, 1.0e7]}
phases:
  NCA: {builtin: NCA, scale: [0.1, 1], a: [2.810, 2.875], c: [14.15, 14.55]}
  Al: {builtin: Al, scale: [0, 0.2]}
"""


def train_licx4(root) -> str:
    """A tiny 4LiCx ensemble (3,000 patterns, 2 members, 8 epochs) under ``root``: ~10 s on one core."""
    from xrdscale.pqnet.library import make_library
    from xrdscale.pqnet.train import train_ensemble
    from xrdscale.simulate.operando import library_url

    lib = make_library(library_url(), str(root / "lib.zarr"), n=3000, seed=1)
    url = str(root / "model")
    train_ensemble(lib, url, ensemble=2, epochs=8, outputs=["scale"], parallel=False, device="cpu", bounds=0,
                   model_options={"pattern_channels": 8, "phase_channels": 4, "hidden": 16})
    return url
