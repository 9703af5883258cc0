"""Benchmark: xrdscale's Bragg CDI phase retrieval against cohere-core (APS), and its batching and scaling.

Runs, in one process and on the same simulated crystals (``simulate_crystal``, faceted
crystal with phase domains, 1e7 photons, Poisson noise, seed 0):

1. one random start of phase retrieval, HIO (β = 0.9) then ER, shrink-wrap every 20
   iterations (threshold 0.1 of the smoothed amplitude's maximum, Gaussian σ = 1 voxel,
   constant), the same number of iterations for both (64³: 200 = 160 HIO + 40 ER; 128³:
   100 = 80 + 20; ``--quick``: 64³ only, 100 = 80 + 20), by

   - xrdscale: ``xrdscale.cdi.phasing.retrieve(intensity, config=CdiConfig(...), start_indices=[k])``
     (torch on the CPU, complex64);
   - cohere-core, driven from Python on the numpy array (see "cohere-core" below), with its
     torch backend (``pkg="torch"``, complex64, the same precision as xrdscale) and, in the
     full run, its numpy/scipy backend (``pkg="np"``, which works in complex128);

   each with one torch thread (``torch.set_num_threads(1)``; scipy.fft 1 worker) and then
   two (scipy.fft ``set_workers(2)`` for cohere's numpy backend). Printed: iterations/s
   (best of ``--repeat``, every start timed from the intensity to the final object, setup
   included: xrdscale's first support and random start; cohere's ``Rec``, ``init_dev``,
   which reads its ``.npy``, and ``init_iter_loop``), the ratio xrdscale / cohere, and the
   χ² of each library's final objects (median and range over the repeats, each repeat a
   different random start).
2. batching of random starts in xrdscale at 64³: N starts (8 × 100 iterations;
   ``--quick`` 4 × 50) in one batch, ``retrieve(..., start_indices=range(N))``, against N
   calls of one start each (``start_indices=[k]``), one thread: starts/s both ways and the
   ratio, and that both ways give the same χ² per start (start k is seeded from (seed, k)
   alone).
3. states × starts on Dask: the ``xrdscale.stages.cdi.series`` stage (phasing as one
   graph of states × start batches, then alignment, common support, PCA and strain on the
   driver, zarr store out) of a 4-state charge-state series at 48³ (``simulate_series``)
   with 4 starts per state of 200 iterations (``--quick`` 2 of 100), ``starts_per_task=2``
   (``--quick`` 1) so that there are 8 tasks, on a ``distributed.LocalCluster`` of 1 and
   of 2 single-threaded worker processes (OMP_NUM_THREADS=1), both started and warmed
   before the clock, run alternately (best of ``--repeat``): wall time, starts/s and the ratio, and the χ² of
   each state's best start. The wall time includes the driver's reading of the ``.npy``
   files and its post-processing (alignment, PCA, strain, the store), which do not scale
   with the workers.

A summary table (rate, ratio, χ²) ends the output. Nothing is asserted on time.

One metric for both: χ² (Eq. 1), ``xrdscale.cdi.fourier.chi2(intensity, obj)`` =
Σ(√D − |F|)² / Σ|F|², ``F = fftshift(fftn(ifftshift(obj), norm="ortho"))``, computed on each
library's final object after the same number of iterations. χ² is blind to a global
phase, to whole-voxel circular shifts (so to cohere's ``fftshift``-ed origin) and to the
twin, but not to the object's scale or to the direction of the transform:

- cohere keeps its data ``fftshift``-ed (peak at index 0), takes ``ifftn(·, norm="forward")``
  (exp(+i…), unnormalised) to the far field and returns its image divided by its maximum
  amplitude. Its far-field modulus is ``|ifftn(ρ)|``, which is ``|fftn(conj ρ)|`` (up to
  scale), so its object in xrdscale's convention is ``fftshift(conj(ρ))`` (the shift does
  not change χ²). The benchmark evaluates χ² for both plausible conventions, ``ρ`` and
  ``conj ρ``, and keeps the lower (always ``conj ρ``; ``ρ`` gives about 0.35: the far
  field point-reflected);
- the scale: Eq. 1 of ``s·ρ`` is lowest at ``s = Σ D / Σ √D |F|``, where it is
  ``1 − (Σ √D |F|)² / (Σ D · Σ |F|²)``; both libraries' objects are evaluated at that
  scale (cohere's own scale is gone after its normalisation; for xrdscale's object this
  changes χ² in the third significant digit, and its χ² as returned is printed too).

cohere-core (``cohere_core.controller.phasing.Rec``, no config files): the measured
amplitude ``√D`` (centred, float32) is saved as a ``.npy`` in a temporary directory
(``Rec`` reads its data from a file and ``fftshift``-s it itself), then::

    rec = Rec(params, "data.npy", pkg)      # pkg "torch" or "np"; sets the library
    rec.init_dev(-1)                        # -1: the CPU
    rec.init_iter_loop()                    # random start, initial support, the flow
    rec.iterate()                           # all iterations; the image is normalised to max 1
    rho = rec.get_image()                   # torch tensor or numpy array, complex

with the minimal ``params``::

    {"algorithm_sequence": "160*HIO+40*ER",      # (iterations - final_er)*HIO + final_er*ER
     "hio_beta": 0.9,
     "shrink_wrap_trigger": [20, 20],            # at the start of iterations 20, 40, … < total
     "shrink_wrap_threshold": 0.1,
     "shrink_wrap_gauss_sigma": 1.0,
     "initial_support_area": [0.5, 0.5, 0.5]}    # its default, written out

``shrink_wrap_type`` (only "GAUSS" exists) is read by cohere's config verifier, not by
``Rec``. cohere runs the shrink-wrap at the start of an iteration, before the Fourier
steps, so ``[20, 20]`` updates the support after the 20th, 40th, … iteration, as
xrdscale's ``shrinkwrap_every=20`` (neither after the last); both keep updating it during
the final ER. What still differs between the two, by each library's design: the first
support (cohere: a centred box of half the array per side; xrdscale: the intensity's
autocorrelation extent scaled by ``support_size`` 0.5), the random start (cohere torch:
uniform random real values in the box, cohere numpy: uniform random complex values, seeded
from the clock and pid, so not reproducible; xrdscale: the measured amplitude with random
phases, transformed back and cut to the support), the shrink-wrap (cohere smooths |ρ| of
the HIO iterate, outside-support values included, with a 5-voxel zero-padded kernel
(torch) or ``scipy.ndimage.gaussian_filter`` (numpy) and keeps ≥ threshold; xrdscale
smooths |ρ·S| with a circular Gaussian by FFT and keeps > threshold), and cohere computes
its own error at every iteration (one more reduction), xrdscale χ² every 10th. The rates
compare the libraries as a user runs them; χ² after a few hundred iterations depends on
the start, hence the range over repeats.

    python benchmarks/cdi.py           # 64³ and 128³, 8 batched starts, 4 × 4 series; ~10 min on 2 cores
    python benchmarks/cdi.py --quick   # 64³ only, 100 iterations, 4 starts, 4 × 2 series; ~2 min
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import scipy.fft  # noqa: E402
import torch  # noqa: E402
import xarray as xr  # noqa: E402
from cohere_core.controller.phasing import Rec  # noqa: E402

from xrdscale.cdi import fourier, phasing  # noqa: E402
from xrdscale.cdi.simulate import simulate_crystal, simulate_series  # noqa: E402
from xrdscale.stages.cdi import CdiConfig, series  # noqa: E402

BETA = 0.9
SHRINKWRAP_EVERY = 20
THRESHOLD = 0.1
SIGMA = 1.0
PHOTONS = 1e7


@dataclass
class Run:
    """Timings (seconds) and χ² of the repeats of one configuration."""

    seconds: list[float]
    chi2: list[float]
    note: str = ""

    def rate(self, work: float) -> float:
        return work / min(self.seconds)

    def chi2_text(self) -> str:
        c = np.asarray(self.chi2)
        return f"{np.median(c):.4f} [{c.min():.4f}–{c.max():.4f}]"


def crystal_intensity(n: int) -> np.ndarray:
    return simulate_crystal((n, n, n), photons=PHOTONS, seed=0).intensity


def xrdscale_config(iterations: int, final_er: int, **fields) -> CdiConfig:
    return CdiConfig(algorithm="hio", iterations=iterations, final_er=final_er, beta=BETA,
                     shrinkwrap_every=SHRINKWRAP_EVERY, support_threshold=THRESHOLD, sigma_start=SIGMA,
                     sigma_end=SIGMA, seed=0, device="cpu", **fields)


def cohere_params(iterations: int, final_er: int) -> dict:
    """The minimal ``Rec`` params of the same schedule (a fresh dict: ``Rec`` adds its defaults to it)."""
    return {"algorithm_sequence": f"{iterations - final_er}*HIO+{final_er}*ER",
            "hio_beta": BETA,
            "shrink_wrap_trigger": [SHRINKWRAP_EVERY, SHRINKWRAP_EVERY],
            "shrink_wrap_threshold": THRESHOLD,
            "shrink_wrap_gauss_sigma": SIGMA,
            "initial_support_area": [0.5, 0.5, 0.5]}


def best_scale_chi2(intensity: np.ndarray, obj: np.ndarray) -> float:
    """Eq. 1 (``fourier.chi2``) of ``s·obj`` at the scale ``s = Σ D / Σ √D |F|`` that minimises it."""
    obj = np.asarray(obj, dtype=np.complex64)
    mod = np.abs(fourier.forward_np(obj)).astype(np.float64)
    amp = np.sqrt(intensity.astype(np.float64))
    scale = float((amp ** 2).sum() / max((amp * mod).sum(), 1e-300))
    return float(fourier.chi2(intensity, obj * np.complex64(scale)))


def cohere_chi2(intensity: np.ndarray, rho: np.ndarray) -> tuple[float, str]:
    """χ² of cohere's object in xrdscale's convention: the lower of ``fftshift(ρ)`` and ``fftshift(conj ρ)``."""
    candidates = {"conj": np.fft.fftshift(np.conj(rho)), "as is": np.fft.fftshift(rho)}
    values = {name: best_scale_chi2(intensity, o) for name, o in candidates.items()}
    name = min(values, key=values.get)
    return values[name], name


def run_xrdscale(intensity: np.ndarray, cfg: CdiConfig, start: int) -> tuple[float, np.ndarray, float]:
    """Seconds of one start, its object, and its χ² as returned."""
    t0 = time.perf_counter()
    (result,) = phasing.retrieve(intensity, config=cfg, start_indices=[start])
    return time.perf_counter() - t0, result.obj, result.chi2


def run_cohere(data_path: str, params: dict, pkg: str, seed: int) -> tuple[float, np.ndarray]:
    """Seconds of one cohere reconstruction of the amplitude in ``data_path`` (setup included) and its image."""
    torch.manual_seed(seed)  # the torch backend's start; the numpy one reseeds itself from the clock
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # cohere prints the shape and the iteration time
        rec = Rec(params, data_path, pkg, debug=True)
        if rec.init_dev(-1) < 0 or rec.init_iter_loop() < 0 or rec.iterate() < 0:
            raise RuntimeError(f"cohere-core ({pkg}) failed")
        rho = rec.get_image()
    seconds = time.perf_counter() - t0
    rho = rho.cpu().numpy() if isinstance(rho, torch.Tensor) else np.asarray(rho)
    return seconds, rho


@contextlib.contextmanager
def threads(n: int):
    """``n`` torch threads and ``n`` scipy.fft workers (cohere's numpy backend) inside the block."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with scipy.fft.set_workers(n):
            yield
    finally:
        torch.set_num_threads(saved)


def compare(n: int, iterations: int, final_er: int, pkgs: tuple[str, ...], repeat: int, tmp: str,
            summary: list) -> None:
    """Part 1 at ``n``³: xrdscale and cohere-core, 1 then 2 threads, interleaved repeats."""
    print(f"\n== 1. phase retrieval, one start, {n}³, {iterations} iterations "
          f"({iterations - final_er} HIO β={BETA} + {final_er} ER, shrink-wrap every {SHRINKWRAP_EVERY}), "
          f"best of {repeat}; load average {os.getloadavg()[0]:.1f} ==")
    intensity = crystal_intensity(n)
    data_path = os.path.join(tmp, f"amplitude{n}.npy")
    np.save(data_path, np.sqrt(intensity).astype(np.float32))  # cohere phases amplitudes, centred on disk
    cfg = xrdscale_config(iterations, final_er, starts=1)
    warm_cfg = xrdscale_config(2 * SHRINKWRAP_EVERY, 1, starts=1)
    with threads(1):  # FFT plans, conv3d, allocator: not timed
        run_xrdscale(intensity, warm_cfg, 0)
        for pkg in pkgs:
            run_cohere(data_path, cohere_params(2 * SHRINKWRAP_EVERY, 1), pkg, 0)
    for n_threads in (1, 2):
        runs = {"xrdscale": Run([], []), **{f"cohere {pkg}": Run([], []) for pkg in pkgs}}
        own: list[float] = []
        conventions = set()
        with threads(n_threads):
            for k in range(repeat):
                seconds, obj, chi = run_xrdscale(intensity, cfg, k)
                runs["xrdscale"].seconds.append(seconds)
                runs["xrdscale"].chi2.append(best_scale_chi2(intensity, obj))
                own.append(chi)
                for pkg in pkgs:
                    seconds, rho = run_cohere(data_path, cohere_params(iterations, final_er), pkg, k)
                    chi, convention = cohere_chi2(intensity, rho)
                    runs[f"cohere {pkg}"].seconds.append(seconds)
                    runs[f"cohere {pkg}"].chi2.append(chi)
                    conventions.add(convention)
        ref = runs["xrdscale"].rate(iterations)
        for name, run in runs.items():
            r = run.rate(iterations)
            ratio = "" if name == "xrdscale" else f"   xrdscale / this {ref / r:5.2f}×"
            print(f"{name:<14} {n_threads} thread(s): {r:8.2f} iterations/s  χ² {run.chi2_text()}{ratio}")
            summary.append((f"{n}³ {name}, {n_threads} thr", r, "it/s",
                            "" if name == "xrdscale" else f"{ref / r:.2f}× (xrdscale/cohere)", run.chi2_text()))
        print(f"{'':14} xrdscale χ² as returned (own scale): {np.median(own):.4f}; cohere's object taken as "
              f"fftshift({' / '.join(sorted(conventions))} ρ) (lowest χ² of ρ, conj ρ)")
        if n_threads == 2:
            for name, run in runs.items():
                one = next(row for row in summary if row[0] == f"{n}³ {name}, 1 thr")[1]
                print(f"{name:<14} 2 threads / 1 thread: {run.rate(iterations) / one:5.2f}×")


def batching(n: int, starts: int, iterations: int, final_er: int, repeat: int, summary: list) -> None:
    """Part 2: N starts as one batch vs N calls of one start, one thread."""
    print(f"\n== 2. xrdscale batched random starts, {n}³, {starts} starts × {iterations} iterations, 1 thread, "
          f"best of {repeat}; load average {os.getloadavg()[0]:.1f} ==")
    intensity = crystal_intensity(n)
    cfg = xrdscale_config(iterations, final_er, starts=starts)
    one_by_one, batched = Run([], []), Run([], [])
    with threads(1):
        phasing.retrieve(intensity, config=xrdscale_config(SHRINKWRAP_EVERY, 1, starts=2), start_indices=[0, 1])
        for _ in range(repeat):
            t0 = time.perf_counter()
            singles = [phasing.retrieve(intensity, config=cfg, start_indices=[k])[0] for k in range(starts)]
            one_by_one.seconds.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            batch = phasing.retrieve(intensity, config=cfg, start_indices=range(starts))
            batched.seconds.append(time.perf_counter() - t0)
    one_by_one.chi2 = [r.chi2 for r in singles]
    batched.chi2 = [r.chi2 for r in batch]
    diff = max(abs(a - b) for a, b in zip(one_by_one.chi2, batched.chi2, strict=True))
    r1, rb = one_by_one.rate(starts), batched.rate(starts)
    for label, r, run in ((f"{starts} calls of 1 start", r1, one_by_one), (f"1 batch of {starts} starts", rb, batched)):
        print(f"{label:<22} : {r:8.3f} starts/s  ({r * iterations:7.1f} iterations/s)  χ² {run.chi2_text()}")
    print(f"batched / one by one   : {rb / r1:5.2f}×   (max |Δχ²| per start between the two ways: {diff:.1e})")
    summary.append((f"{n}³ {starts} starts one by one", r1, "starts/s", "", one_by_one.chi2_text()))
    summary.append((f"{n}³ {starts} starts batched", rb, "starts/s", f"{rb / r1:.2f}× (batched/single)",
                    batched.chi2_text()))


def _cluster(stack: contextlib.ExitStack, workers: int):
    """A client of a fresh LocalCluster of single-threaded worker processes, closed with ``stack``."""
    from distributed import Client, LocalCluster

    from xrdscale.runtime.cluster import worker_environ

    stack.enter_context(worker_environ())
    cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                               dashboard_address=":0", memory_limit=0,
                                               env={"OMP_NUM_THREADS": "1"}, silence_logs=logging.ERROR))
    return stack.enter_context(Client(cluster))


def dask_series(n: int, n_states: int, starts: int, per_task: int, iterations: int, final_er: int, repeat: int,
                tmp: str, summary: list) -> None:
    """Part 3: the series stage on 1 and on 2 workers, alternately."""
    tasks = n_states * -(-starts // per_task)
    print(f"\n== 3. cdi series stage on Dask, {n_states} states × {starts} starts at {n}³, {iterations} iterations, "
          f"{per_task} start(s) per task ({tasks} tasks), best of {repeat}; load average {os.getloadavg()[0]:.1f} ==")
    sim = simulate_series(n_states, (n, n, n), photons=PHOTONS, seed=0)
    paths = []
    for i, state in enumerate(sim.states):
        paths.append(os.path.join(tmp, f"state{i}.npy"))
        np.save(paths[-1], state.intensity)
    cfg = xrdscale_config(iterations, final_er, starts=starts, starts_per_task=per_task)
    warm = xrdscale_config(SHRINKWRAP_EVERY, 1, starts=starts, starts_per_task=per_task)
    times: dict[int, list[float]] = {1: [], 2: []}
    chi2: dict[int, list[float]] = {1: [], 2: []}
    with contextlib.ExitStack() as stack:
        clients = {w: _cluster(stack, w) for w in (1, 2)}
        for w, client in clients.items():  # imports and first FFTs in every worker, not timed
            series(paths, os.path.join(tmp, f"warm{w}.zarr"), config=warm, client=client, progress=False)
        for k in range(repeat):
            for w, client in clients.items():
                out = os.path.join(tmp, f"series{w}-{k}.zarr")
                t0 = time.perf_counter()
                series(paths, out, config=cfg, client=client, progress=False)
                times[w].append(time.perf_counter() - t0)
                chi2[w] = [float(c) for c in xr.open_zarr(out)["chi2"].values]
    total = n_states * starts
    for w in (1, 2):
        run = Run(times[w], chi2[w])
        print(f"{w} worker(s)  : {min(times[w]):7.2f} s  {run.rate(total):7.3f} starts/s  (best of {repeat}; "
              f"runs {', '.join(f'{t:.2f}' for t in times[w])} s)  χ² per state {run.chi2_text()}")
        summary.append((f"series {n_states}×{starts} at {n}³, {w} worker(s)", run.rate(total), "starts/s",
                        "" if w == 1 else f"{min(times[1]) / min(times[2]):.2f}× (2w/1w)", run.chi2_text()))
    pairs = [a / b for a, b in zip(times[1], times[2], strict=True)]
    print(f"2 workers / 1 worker: {min(times[1]) / min(times[2]):5.2f}× (best runs); run by run "
          f"{', '.join(f'{r:.2f}' for r in pairs)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64³ only, fewer iterations, starts and repeats")
    parser.add_argument("--repeat", type=int, default=None, help="timed repeats per configuration, the best "
                        "printed (default 2; --quick 1 for parts 2 and 3)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*torch.meshgrid.*")  # from cohere's torch Gaussian kernel
    torch.set_num_threads(1)
    repeat = args.repeat or 2
    from importlib.metadata import version

    import cohere_core

    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, "
          f"cohere-core {version('cohere-core')} ({os.path.dirname(cohere_core.__file__)}); "
          f"{PHOTONS:.0e} photons, Poisson noise; χ²: xrdscale.cdi.fourier.chi2 at the best global scale")
    summary: list = []
    tmp = tempfile.mkdtemp(prefix="xrdscale-bench-cdi-")
    try:
        if args.quick:
            compare(64, 100, 20, ("torch",), repeat, tmp, summary)
            batching(64, 4, 50, 10, args.repeat or 1, summary)
            dask_series(48, 4, 2, 1, 100, 20, args.repeat or 1, tmp, summary)
        else:
            compare(64, 200, 40, ("torch", "np"), repeat, tmp, summary)
            compare(128, 100, 20, ("torch", "np"), repeat, tmp, summary)
            batching(64, 8, 100, 20, repeat, summary)
            dask_series(48, 4, 4, 2, 200, 40, repeat, tmp, summary)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n== summary ==")
    print(f"{'configuration':<40} {'rate':>10} {'unit':<9} {'ratio':<28} χ² (median [range])")
    for name, rate, unit, ratio, chi in summary:
        print(f"{name:<40} {rate:10.3f} {unit:<9} {ratio:<28} {chi}")


if __name__ == "__main__":
    main()
