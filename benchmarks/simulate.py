"""Benchmark: simulated frame generation vs the bare pyFAI call, for the demo and Pilatus 2M detectors.

For each detector it times, on the same 1D patterns and in one run:

- xrdscale: ``DetectorModel.frames`` (pixel-extent q averaging, solid angle, polarisation,
  Poisson counts, mask) + writing each frame as one Bitshuffle-LZ4 chunk with h5py;
- bare: pyFAI's own 1D → 2D ``AzimuthalIntegrator.calcfrom1d`` (point sampling at pixel
  centres, solid angle, polarisation) × I0 + ``numpy`` Poisson + the same h5py write;

and, for the demo detector, the whole ``scan_phantom`` (ray sums, frames, truth store).
It prints frames/s for each and the ratio xrdscale / bare.

    python benchmarks/simulate.py            # 256 demo frames, 12 Pilatus 2M frames
    python benchmarks/simulate.py --quick    # 64 demo frames, 3 Pilatus 2M frames
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import h5py
import hdf5plugin
import numpy as np

from xrdscale.simulate.beamtime import WAVELENGTH, make_detector
from xrdscale.physics.pattern import Instrument, simulate_patterns
from xrdscale.simulate.phantom import make_phantom
from xrdscale.physics.crystal import builtin_phase
from xrdscale.simulate.scan import scan_phantom, simulation_grid


def patterns_for(det, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n patterns of Cu + NCA + graphite with varying scales on the detector's simulation grid."""
    q = simulation_grid(det)
    rng = np.random.default_rng(0)
    phases = [builtin_phase(p) for p in ("Cu", "NCA", "graphite")]
    params = {p.name: {"scale": rng.uniform(1, 20, n), "size_nm": np.full(n, 200.0)} for p in phases}
    return q, simulate_patterns(q, phases, params, Instrument(WAVELENGTH)).astype(np.float64)


def run(label: str, fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    print(f"  {label:<42s} {n / dt:10.1f} frames/s  ({dt:.2f} s for {n})")
    return n / dt


def bench_detector(kind: str, n: int, tmp: str) -> None:
    det = make_detector(kind)
    q, pats = patterns_for(det, n)
    i0 = 2000.0 / (pats.max() * det.gain.max())
    ai, shape = det.integrator, det.shape
    tth = np.rad2deg(2 * np.arcsin(q * WAVELENGTH / (4 * np.pi)))
    print(f"{kind}: {shape[0]}×{shape[1]} pixels, {q.size}-point patterns, {os.cpu_count()} cores")

    def h5(path):
        f = h5py.File(path, "w")
        return f, f.create_dataset("data", (n, *shape), np.int32, chunks=(1, *shape),
                                   **hdf5plugin.Bitshuffle(cname="lz4"))

    def ours():
        rng = np.random.default_rng(1)
        f, d = h5(os.path.join(tmp, f"{kind}-ours.h5"))
        with f:
            for s in range(0, n, det.batch):
                d[s:s + det.batch] = det.frames(q, pats[s:s + det.batch], np.full(min(det.batch, n - s), i0), rng)

    def bare():
        rng = np.random.default_rng(1)
        f, d = h5(os.path.join(tmp, f"{kind}-bare.h5"))
        with f:
            for k in range(n):
                img = ai.calcfrom1d(tth, pats[k], shape=shape, mask=det.mask, dim1_unit="2th_deg",
                                    correctSolidAngle=True, polarization_factor=det.polarization_factor)
                counts = rng.poisson(np.clip(img * i0, 0, None)).astype(np.int32)
                counts[det.mask] = -1
                d[k] = counts

    # warm-up: pyFAI builds its caches (q arrays, solid angle) and xrdscale its pixel operator on first use
    bare()
    det.expected(q, pats[:1], np.array([i0]))
    r_ours = run("xrdscale DetectorModel.frames + h5py", ours, n)
    r_bare = run("bare pyFAI calcfrom1d + poisson + h5py", bare, n)
    print(f"  ratio xrdscale / bare: {r_ours / r_bare:.2f}")


def bench_scan(size: int, n_angles: int, tmp: str) -> None:
    det = make_detector("demo")
    ph = make_phantom(size, voltage=3.85)
    n = size * n_angles
    print(f"demo scan_phantom: {size}² phantom × {n_angles} angles")
    run("scan_phantom (ray sums, frames, truth)", lambda: scan_phantom(
        ph, os.path.join(tmp, "scan.nxs"), os.path.join(tmp, "truth.zarr"), det, Instrument(WAVELENGTH, W=4e-4),
        n_angles=n_angles, truth_q=np.linspace(1.16, 3.82, 1000)), n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small fast run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_detector("demo", 64 if args.quick else 256, tmp)
        bench_detector("pilatus2m", 3 if args.quick else 12, tmp)
        bench_scan(32 if args.quick else 64, 8 if args.quick else 40, tmp)


if __name__ == "__main__":
    main()
