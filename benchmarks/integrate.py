"""Benchmark: xrdscale integration vs a bare pyFAI loop on the same Pilatus 2M frames.

Writes a temporary raw dataset (Pilatus3 X CdTe 2M frames, 1679 x 1475 int32,
bitshuffle-LZ4 per-frame chunks, the shared/DESIGN.md layout), then for the trimmed
mean and the mean:

- the bare loop: h5py reads frame after frame, one pyFAI integrator integrates each,
  in a fresh process with one OpenMP thread (as a Dask worker) and with all cores
  (same options as xrdscale: q_A^-1, q range, polarisation, solid angle, I0);
- xrdscale's ``integrate`` on the local cluster of ``xrdscale integrate --workers N`` (a
  distributed LocalCluster, threads_per_worker=1) with 1 and 2 workers, writing the
  patterns store (before the clock starts, workers import h5py, hdf5plugin, pyFAI and
  xrdscale's frame reader and load pyFAI's engines on a 16x16 toy detector, as the bare
  loop's process has; the Pilatus integrators are built inside the timed run in both
  cases);

and prints frames/s of each and the ratios, twice. Per run: a first run of N frames from a
fresh start (new process or cluster), fixed setup included — building a Pilatus
integrator (~1 s per worker process and per bare loop), the driver's geometry check,
store creation. Steady: each configuration then runs n (about N/4: whole chunks, as many
per worker) and N frames again, warm, and the rate is (N - n) / (t_N - t_n): the
per-frame throughput with every fixed cost cancelled. A dataset of ~255,000 frames is
steady state: there the setup is ~0.001 % of the run. The setup (first run minus the
warm run of the same frames) is printed too. Then prints the peak resident memory of
each worker for two dataset lengths 4x apart (it must not grow with the length).

    python benchmarks/integrate.py           # 384 (mean) / 96 (trimmed mean) frames, best of 2
    python benchmarks/integrate.py --quick   # 96 / 24 frames
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import tempfile
import time

import h5py
import hdf5plugin
import numpy as np
import pyFAI
from pyFAI.detectors import detector_factory
from pyFAI.integrator.azimuthal import AzimuthalIntegrator

from xrdscale.io import frames
from xrdscale.cli.stages import dask_client
from xrdscale.stages.integrate import integrate

NPT = 1000
Q_RANGE = (0.5, 3.85)


def make_dataset(path: str, n: int, poni_path: str) -> None:
    det = detector_factory("Pilatus2MCdTe")
    ai = AzimuthalIntegrator(dist=0.9, poni1=0.13, poni2=0.12, detector=det, wavelength=0.130509e-10)
    ai.write(poni_path)
    tth = np.linspace(0, 25, 5000)
    one_d = 20 + sum(h * np.exp(-0.5 * ((tth - c) / 0.03) ** 2) for c, h in [(2.1, 400), (3.3, 250), (4.6, 300)])
    base = np.clip(ai.calcfrom1d(tth, one_d, shape=det.shape, dim1_unit="2th_deg", polarization_factor=0.99), 0, None)
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as h5:
        data = h5.create_dataset(frames.DATA, shape=(n, *det.shape), dtype=np.int32, chunks=(1, *det.shape),
                                 **hdf5plugin.Bitshuffle())
        noisy = [rng.poisson(base).astype(np.int32) for _ in range(4)]
        for i in range(n):
            data[i] = noisy[i % 4]
        h5[frames.MONITOR] = rng.uniform(0.95, 1.05, n)
        h5[frames.ANGLE] = np.repeat(np.arange(n // 8 + 1) * 1.0, 8)[:n]
        h5[frames.TRANSLATION] = np.tile(np.arange(8) * 0.03, n // 8 + 1)[:n]


def bare_series(paths: tuple[str, ...], poni: str, method: str, threads: int) -> list[float]:
    """:func:`bare_series_here` in a fresh process with ``threads`` OpenMP threads.

    pyFAI's integrators are OpenMP-parallel; Dask workers run with OMP_NUM_THREADS=1, so the
    bare loop that one worker is compared with gets one thread too (and the whole machine
    when it is compared with all workers).
    """
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(bare_series_here, (paths, poni, method))
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved


def bare_series_here(paths: tuple[str, ...], poni: str, method: str) -> list[float]:
    """Seconds of the bare loop on each of ``paths`` in turn: the first from scratch, the
    others with the integrator it built (as :func:`xrdscale_series` reuses the workers')."""
    first, ai = bare_loop(paths[0], poni, method)
    return [first] + [bare_loop(path, poni, method, ai)[0] for path in paths[1:]]


def bare_loop(path: str, poni: str, method: str, ai=None):
    """Seconds of a plain h5py + pyFAI loop over every frame of ``path`` (and its integrator).

    Without ``ai`` the integrator is loaded from the PONI inside the timed loop, and its
    first frame builds pyFAI's engine, as a user's script would.
    """
    t0 = time.perf_counter()
    ai = ai or pyFAI.load(poni)
    with h5py.File(path) as h5:
        data, monitor = h5[frames.DATA], h5[frames.MONITOR][()]
        n = data.shape[0]
        for i in range(n):
            kw = dict(unit="q_A^-1", radial_range=Q_RANGE, polarization_factor=0.99, correctSolidAngle=True,
                      normalization_factor=float(monitor[i]))
            if method == "trimmed_mean":
                ai.medfilt1d_ng(data[i], NPT, percentile=(10, 90), **kw)
            else:
                ai.integrate1d(data[i], NPT, **kw)
    return time.perf_counter() - t0, ai


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _warm() -> None:
    """Import what the bare loop's process imports before its clock starts (h5py, hdf5plugin,
    pyFAI, xrdscale's frame reader) and load pyFAI's engines (a 16x16-pixel integration)."""
    import h5py  # noqa: F401
    import hdf5plugin  # noqa: F401
    from pyFAI.detectors import Detector

    import xrdscale.io.frames  # noqa: F401
    import xrdscale.stages.integrate  # noqa: F401

    ai = AzimuthalIntegrator(dist=0.1, detector=Detector(1e-4, 1e-4, max_shape=(16, 16)), wavelength=1e-11)
    img = np.ones((16, 16), dtype=np.int32)
    ai.integrate1d(img, 8, unit="q_A^-1")
    ai.medfilt1d_ng(img, 8, unit="q_A^-1", percentile=(10, 90))


def xrdscale_series(paths: tuple[str, ...], poni: str, method: str, workers: int, out: str,
                    chunk: int) -> tuple[list[float], list[float]]:
    """Seconds of ``integrate`` on each of ``paths`` in turn, on one fresh cluster (the first
    run builds the workers' integrators, later ones reuse them), and each worker's peak RSS (MB)."""
    seconds = []
    with dask_client(workers, None) as client:  # the CLI's --workers N local cluster
        client.run(_warm)
        for path in paths:
            t0 = time.perf_counter()
            integrate(path, out, poni=poni, npt=NPT, q_range=Q_RANGE, method=method, frames_per_chunk=chunk,
                      client=client, progress=False)
            seconds.append(time.perf_counter() - t0)
        peaks = list(client.run(_peak_rss_mb).values())
    return seconds, peaks


class Timing:
    """Best (shortest) seconds of one configuration: a first run of the long dataset from a
    fresh start, then the short and the long dataset again, warm."""

    def __init__(self, n_long: int, n_short: int) -> None:
        self.n_long, self.n_short = n_long, n_short
        self.first = self.short = self.long = float("inf")

    def add(self, first: float, short: float, long: float) -> None:
        self.first, self.short, self.long = min(self.first, first), min(self.short, short), min(self.long, long)

    @property
    def per_run(self) -> float:
        """Frames/s of the first run of the long dataset, setup included."""
        return self.n_long / self.first

    @property
    def steady(self) -> float:
        """Frames/s once warm: the slope between the two warm lengths (fixed per-run costs cancel)."""
        return (self.n_long - self.n_short) / max(self.long - self.short, 1e-9)

    @property
    def setup(self) -> float:
        """Seconds the first run spends on one-off setup (integrator build, imports, worker start-up)."""
        return self.first - self.long


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small, fast run (96 frames for the mean, 24 for the trimmed mean)")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved repeats; the best of each is printed")
    args = parser.parse_args()
    n = 24 if args.quick else 96
    chunk = 4 if args.quick else 16  # frames per task (the CLI default is 64; smaller keeps every worker busy in short runs)
    # the mean is ~10x faster per frame: give it 4x the frames so fixed costs (geometry check,
    # store creation, scheduling) weigh about as much as for the trimmed mean
    n_frames = {"mean": 4 * n, "trimmed_mean": n}
    tmp = tempfile.mkdtemp(prefix="xrdscale-bench-")
    try:
        poni, out = os.path.join(tmp, "det.poni"), os.path.join(tmp, "patterns.zarr")
        print(f"# Pilatus 2M frames (1679x1475), npt={NPT}, cores={os.cpu_count()}, "
              f"load average {os.getloadavg()[0]:.1f}, best of {args.repeat}")
        cores = os.cpu_count() or 1
        header = (f"{'method':<13} {'rate':<9} {'frames':>6} {'bare1 fps':>9} {'bareN fps':>9} {'1w fps':>8} "
                  f"{'2w fps':>8} {'1w/bare1':>8} {'2w/bareN':>8} {'2w/1w':>6}")
        print(header)
        print("# bare1: the bare loop with one OpenMP thread (as one worker); bareN: with all cores")
        print("# per run: N frames / seconds of a first run; steady: (N - n) frames / (t_N - t_n) of warm runs, "
              "n a few chunks per worker; setup: first run - warm run")
        for method in ("mean", "trimmed_mean"):
            n_long = n_frames[method]
            # whole chunks, as many on each of the 2 workers, so both lengths keep the workers equally busy
            n_short = 2 * chunk * max(1, n_long // (8 * chunk))
            raws = {}
            for length in (n_long, n_short):
                raws[length] = os.path.join(tmp, f"raw-{method}-{length}.nxs")
                make_dataset(raws[length], length, poni)
            series = (raws[n_long], raws[n_short], raws[n_long])
            runs = {
                "bare1": lambda: bare_series(series, poni, method, 1),
                "bareN": lambda: bare_series(series, poni, method, cores),
                "1w": lambda: xrdscale_series(series, poni, method, 1, out, chunk)[0],
                "2w": lambda: xrdscale_series(series, poni, method, 2, out, chunk)[0],
            }
            timings = {name: Timing(n_long, n_short) for name in runs}
            # interleaved repeats, best of each: the machine is shared, the best run is the least disturbed
            for _ in range(args.repeat):
                for name, run in runs.items():
                    timings[name].add(*run())
            for kind in ("per_run", "steady"):
                r = {name: getattr(t, kind) for name, t in timings.items()}
                label = "per run" if kind == "per_run" else "steady"
                print(f"{method:<13} {label:<9} {n_long:6d} {r['bare1']:9.2f} {r['bareN']:9.2f} {r['1w']:8.2f} "
                      f"{r['2w']:8.2f} {r['1w'] / r['bare1']:8.2f} {r['2w'] / r['bareN']:8.2f} {r['2w'] / r['1w']:6.2f}")
            print(f"{method:<13} setup s   " + " ".join(f"{name} {t.setup:.2f}" for name, t in timings.items()))
            for raw in raws.values():
                os.remove(raw)
        print("# peak resident memory per worker (MB), mean method, 2 workers")
        for length in (n // 4, n):
            short = os.path.join(tmp, f"raw{length}.nxs")
            make_dataset(short, length, poni)
            _, peaks = xrdscale_series((short,), poni, "mean", 2, out, chunk)
            print(f"frames={length:<5d} " + " ".join(f"{p:8.0f}" for p in peaks))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
