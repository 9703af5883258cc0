"""Benchmark: Compton-imaging EMR maps and absorption-CT slices, beside the bare loops they replace.

1. EMR maps of an 80 × 80 × 4000-bin spectrum cube (the HEXITEC's pixels; Poisson counts
   of a simulated cell, one plane), ``--quick``: 40 × 40:

   - a plain numpy loop over pixels: the two window masks from p_z of the bins (Eq. 5)
     once, then for each pixel the two masked sums and their ratio;
   - ``xrdscale.xcs.emr.window_sums`` on the whole in-memory cube (the vectorised kernel:
     fractional edge bins, Poisson variances);
   - the same loop after reading the cube from its HDF5 file with h5py (what the stage
     does too: the file is gzip-compressed, as the simulator writes it);
   - the ``xrdscale xcs emr`` stage (``emr_maps``) from the HDF5 file to the zarr store:
     reading, window sums, σ, Compton peaks, profiles and the store (no bad-pixel pass),
     on the local threaded scheduler; its ratio is to the read + loop row.

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

import h5py  # noqa: E402
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

    def read_and_loop() -> np.ndarray:
        with h5py.File(cube, "r") as h5:
            return numpy_loop(h5["spectra"][()], h5["energy"][()])

    t_read_loop, _ = best(read_and_loop, 1 if side > 40 else repeat)
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
    print(f"  numpy loop over pixels     {n / t_loop:12,.0f} pixels/s   (cube in memory)")
    print(f"  h5py read + numpy loop     {n / t_read_loop:12,.0f} pixels/s")
    print(f"  emr.window_sums (kernel)   {n / t_kernel:12,.0f} pixels/s   {t_loop / t_kernel:7.1f} × the loop")
    print(f"  xcs emr stage (HDF5→zarr)  {n / t_stage:12,.0f} pixels/s   {t_read_loop / t_stage:7.2f} × read + loop")
    print(f"  largest relative EMR difference kernel vs loop: {diff:.2e}")


def bare_astra(proj: np.ndarray, flat: np.ndarray, dark: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """Flat/dark and −log in numpy, then ASTRA's CPU FBP slice by slice on one projector (centre at n/2)."""
    import astra

    n_angles, n_rows, n = proj.shape
    line = -np.log(np.clip((proj - dark) / (flat - dark), 1e-3, None)).astype(np.float32)
    vol_geom = astra.create_vol_geom(n, n)
    proj_geom = astra.create_proj_geom("parallel", 1.0, n, np.deg2rad(angles_deg))
    projector = astra.create_projector("linear", proj_geom, vol_geom)
    sino_id = astra.data2d.create("-sino", proj_geom, 0.0)
    vol_id = astra.data2d.create("-vol", vol_geom, 0.0)
    cfg = astra.astra_dict("FBP")
    cfg.update({"ProjectionDataId": sino_id, "ReconstructionDataId": vol_id, "ProjectorId": projector})
    alg = astra.algorithm.create(cfg)
    out = np.empty((n_rows, n, n), np.float32)
    try:
        for r in range(n_rows):
            astra.data2d.store(sino_id, np.ascontiguousarray(line[:, r]))
            astra.algorithm.run(alg)
            out[r] = astra.data2d.get(vol_id)
    finally:
        astra.algorithm.delete(alg)
        astra.data2d.delete([sino_id, vol_id])
        astra.projector.delete(projector)
    return out


def bench_ct(slices: int, size: int, n_angles: int, repeat: int, tmp: str) -> None:
    from xrdscale.stages.ct import reconstruct
    from xrdscale.xcs.phantom import coin_cell_phantom, simulate_scan, write_scan

    phantom = coin_cell_phantom(shape=(slices, size, size), seed=0, amplitude=(slices / 20, slices / 40))
    scan = simulate_scan(phantom, n_angles=n_angles, seed=0)
    url = write_scan(os.path.join(tmp, "scan.h5"), scan, layout="nxtomo")
    proj = np.asarray(scan["projections"], dtype=np.float32)
    flat = np.asarray(scan["flats"], dtype=np.float32).mean(axis=0)
    dark = np.asarray(scan["darks"], dtype=np.float32).mean(axis=0)
    t_bare, _ = best(lambda: bare_astra(proj, flat, dark, np.asarray(scan["angles_deg"])), repeat)
    center = float(scan["center"])

    def stage(rings: str) -> str:
        out = os.path.join(tmp, f"vol-{rings}.zarr")
        shutil.rmtree(out, ignore_errors=True)
        return reconstruct(url, out, rings=rings, center=center, progress=False, device="cpu")

    t_none, _ = best(lambda: stage("none"), repeat)
    t_all, _ = best(lambda: stage("all"), repeat)
    print(f"\nCT, {slices} slices of {size} × {size}, {n_angles} projections over 360°:")
    print(f"  bare ASTRA FBP loop (numpy flat/dark, -log)  {slices / t_bare:9.2f} slices/s")
    print(f"  ct reconstruct, no ring removal              {slices / t_none:9.2f} slices/s   "
          f"{t_bare / t_none:6.2f} × bare")
    print(f"  ct reconstruct, rings: all (algotom)         {slices / t_all:9.2f} slices/s   "
          f"{t_bare / t_all:6.2f} × bare")


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
