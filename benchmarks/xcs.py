"""Benchmark: Compton-imaging EMR maps and absorption-CT slices, beside the bare loops they replace.

1. EMR maps of an 80 × 80 × 4000-bin spectrum cube (the HEXITEC's pixels; Poisson counts
   of a simulated cell, one plane), ``--quick``: 40 × 40:

   - a plain numpy loop over pixels: the two window masks from p_z of the bins (Eq. 5)
     once, then for each pixel the two masked sums and their ratio;
   - ``xrdscale.xcs.emr.window_sums`` on the whole in-memory cube (the vectorised kernel:
     fractional edge bins, Poisson variances);
   - the ``xrdscale xcs emr`` stage (``emr_maps``) from the HDF5 file to the zarr store:
     reading, the bad-pixel pass, window sums, σ, Compton peaks, profiles and the store,
     on the local threaded scheduler.

   Printed: pixels/s (best of ``--repeat``) and the ratios to the numpy loop, and the
   largest relative difference of the EMR maps (the loop takes whole bins by their
   centres, the kernel splits the edge bins, so they differ by a fraction of a bin).
2. CT slices of a 360° scan (``--quick``: 24 slices of 64 × 64, 180 angles; full: 64
   slices of 256 × 256, 720 angles) of the coin-cell phantom with ring artefacts:

   - a bare ASTRA loop: flat/dark correction and −log in numpy, then one ``FBP`` per
     slice on one projector (the same geometry, no ring removal, centre known);
   - ``xrdscale ct reconstruct`` (``reconstruct`` stage) without ring removal, and with
     algotom's ``remove_all_stripe`` (the default), centre given, local threads.

   Printed: slices/s and the ratio to the bare loop.

One thread per process (OMP_NUM_THREADS=1): ratios are per core. Nothing is asserted on time.

    python benchmarks/xcs.py --quick
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from xrdscale.xcs import emr, physics, spectra  # noqa: E402


def best(fn, repeat: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def numpy_loop(counts: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """EMR pixel by pixel, the way a per-pixel script computes it (the windows computed once)."""
    ny, nx, _ = counts.shape
    pz = np.abs(physics.pz_au(115.0, energy, 90.0))
    low_bins, high_bins = pz < 1, (pz > 1) & (pz < 5)
    out = np.empty((ny, nx))
    for iy in range(ny):
        for ix in range(nx):
            spectrum = counts[iy, ix]
            out[iy, ix] = spectrum[low_bins].sum() / spectrum[high_bins].sum()
    return out


def bench_emr(side: int, repeat: int, tmp: str) -> None:
    from xrdscale.stages.xcs import emr_maps
    from xrdscale.xcs.simulate import simulate_cell

    cell = simulate_cell(x=0.8, shape=(side, side), bins=4000, counts_per_pixel=2e4, seed=0)
    counts = cell["counts"][0]  # plane R1: (y, x, bin)
    energy = cell["energy"]
    cube = spectra.write_cube(os.path.join(tmp, "cube.h5"), counts, energy)
    n = side * side
    t_loop, ref = best(lambda: numpy_loop(counts, energy), 1 if side > 40 else repeat)
    win = emr.windows(energy)
    t_kernel, sums = best(lambda: emr.window_sums(counts, win), repeat)
    ratio = np.asarray(sums.ratio()[0])  # type: ignore[attr-defined]

    def stage() -> str:
        out = os.path.join(tmp, "emr.zarr")
        shutil.rmtree(out, ignore_errors=True)
        return emr_maps([cube], out, progress=False, mask_bad_pixels=False)

    t_stage, _ = best(stage, repeat)
    diff = float(np.nanmax(np.abs(ratio - np.asarray(ref)) / np.asarray(ref)))
    print(f"\nEMR maps, {side} × {side} pixels × {energy.size} bins ({counts.nbytes / 2**20:.0f} MiB):")
    print(f"  numpy loop over pixels     {n / t_loop:12,.0f} pixels/s")
    print(f"  emr.window_sums (kernel)   {n / t_kernel:12,.0f} pixels/s   {t_loop / t_kernel:7.1f} × the loop")
    print(f"  xcs emr stage (HDF5→zarr)  {n / t_stage:12,.0f} pixels/s   {t_loop / t_stage:7.1f} × the loop")
    print(f"  largest relative EMR difference kernel vs loop: {diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 × 40 pixels, 24 CT slices of 64²")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores; one thread per process")
    tmp = tempfile.mkdtemp(prefix="xrdscale-bench-")
    try:
        bench_emr(40 if args.quick else 80, args.repeat, tmp)
        bench_ct(*((24, 64, 180) if args.quick else (64, 256, 720)), args.repeat, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
