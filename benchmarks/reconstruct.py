"""Benchmark: xrdscale reconstruction (astra and batched engines) against a bare ASTRA loop.

Runs, on the same ellipse-phantom sinograms (every channel a scaled, noisy copy):

1. a bare per-channel ASTRA CPU FBP loop (one projector, ``FBP`` per channel);
2. xrdscale's ``astra`` engine and ``batched`` engine (operator build timed apart);
3. the whole ``reconstruct`` stage (zarr in, zarr out) on two Dask LocalClusters, of 1 and
   of 2 single-threaded worker processes, started side by side and run alternately (4 runs
   each, so both see the same load of the machine); first with the workers free to use any
   core, then with each worker's threads (task thread and zarr's I/O pool) on a core of its
   own, as in a deployment of one core per worker; and the peak memory of a worker for two
   channel counts.

Prints channels/s for each (best of 2) and the ratios. Everything runs with one thread per process
(OMP_NUM_THREADS=1), so ratios are per core. ``--quick``: the small size only.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import astra  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import xarray as xr  # noqa: E402

from xrdscale.io import storage  # noqa: E402
from xrdscale.recon.astra_engine import AstraEngine  # noqa: E402
from xrdscale.recon.batched import BatchedEngine, clear_operators  # noqa: E402
from xrdscale.recon.geometry import Geometry  # noqa: E402
from xrdscale.recon.phantoms import default_ellipses, ellipse_sinogram  # noqa: E402
from xrdscale.stages.reconstruct import reconstruct  # noqa: E402


def make_sinograms(n: int, a: int, c: int, seed: int = 0) -> tuple[Geometry, np.ndarray]:
    geometry = Geometry(tuple(np.arange(a) * 180.0 / a), n, 0.03)
    base = ellipse_sinogram(geometry, default_ellipses(n)).astype(np.float32)
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.2, 2.0, c).astype(np.float32)
    sino = base[:, :, None] * scales[None, None, :]
    sino += rng.normal(0, 0.02 * base.max(), sino.shape).astype(np.float32)
    return geometry, sino


def bare_astra_loop(geometry: Geometry, sino: np.ndarray) -> np.ndarray:
    """The plain ASTRA CPU FBP loop a user would write."""
    vg = astra.create_vol_geom(geometry.n_det, geometry.n_det)
    pg = astra.create_proj_geom("parallel", 1.0, geometry.n_det, geometry.angles_rad)
    pid = astra.create_projector("linear", pg, vg)
    out = np.empty((geometry.n_det, geometry.n_det, sino.shape[2]), np.float32)
    for c in range(sino.shape[2]):
        sid = astra.data2d.create("-sino", pg, np.ascontiguousarray(sino[:, :, c]))
        rid = astra.data2d.create("-vol", vg)
        cfg = astra.astra_dict("FBP")
        cfg.update(ProjectorId=pid, ProjectionDataId=sid, ReconstructionDataId=rid, FilterType="ram-lak")
        aid = astra.algorithm.create(cfg)
        astra.algorithm.run(aid)
        out[:, :, c] = astra.data2d.get(rid)[::-1]
        astra.algorithm.delete(aid)
        astra.data2d.delete([sid, rid])
    astra.projector.delete(pid)
    return out


def rate(func, n_channels: int, repeat: int = 1) -> tuple[float, object]:
    best, result = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = func()
        best = min(best, time.perf_counter() - t0)
    return n_channels / best, result


def write_sino_store(url: str, geometry: Geometry, sino: np.ndarray) -> str:
    n = geometry.n_det
    ds = xr.Dataset({"intensity": (("angle", "translation", "q"), sino)},
                    coords={"angle": list(geometry.angles_deg),
                            "translation": (np.arange(n) - (n - 1) / 2) * geometry.step_mm,
                            "q": np.linspace(0.5, 3.85, sino.shape[2])}).chunk({"q": 8})
    return storage.write_store(ds, url, stage="sinogram", config={"benchmark": True})


def _cluster(stack: contextlib.ExitStack, workers: int):
    """A client of a fresh LocalCluster of single-threaded worker processes, closed with ``stack``."""
    from distributed import Client, LocalCluster

    from xrdscale.runtime.cluster import worker_environ

    # the worker environment of the clusters xrdscale starts (campaign runner, --workers N)
    stack.enter_context(worker_environ())
    cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                               dashboard_address=":0", memory_limit=0,
                                               env={"OMP_NUM_THREADS": "1"}))
    return stack.enter_context(Client(cluster))


def _peaks(client) -> list[float]:
    """Peak RSS [GB] of each worker of ``client``."""
    return list(client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6).values())


def _pin_to_own_core(client) -> dict[str, int]:
    """Confine every thread of each worker of ``client`` to a core of its own (worker k → k-th core).

    A worker's threads include zarr's I/O and codec pool besides the task thread; unpinned,
    a single worker borrows an idle core for them, which a deployment of one core per worker
    (a Kubernetes pod with ``cpu: 1``) does not give it. Threads started later inherit this.
    """
    cores = sorted(os.sched_getaffinity(0))
    names = sorted(info["name"] for info in client.scheduler_info()["workers"].values())
    core_of = {name: cores[k % len(cores)] for k, name in enumerate(names)}

    def pin(dask_worker) -> int:
        core = core_of[dask_worker.name]
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), {core})
        return core

    return client.run(pin)


def stage_pairs(url: str, out: str, chunk: int,
                repeat: int = 4) -> dict[bool, dict[int, tuple[list[float], list[float]]]]:
    """Stage seconds of every run on 1 and on 2 workers, and per-worker peak RSS [GB], unpinned and pinned.

    Both clusters are started and warmed (operators built) once; then the runs alternate
    1 worker, 2 workers, ``repeat`` times, so that both see the same load of this shared
    machine (an idle cluster costs nothing measurable): first with the workers free to use
    any core, then (key ``True``) with each worker on a core of its own
    (:func:`_pin_to_own_core`); the driver and scheduler are never pinned.
    """
    results = {}
    with contextlib.ExitStack() as stack:
        clients = {w: _cluster(stack, w) for w in (1, 2)}
        for client in clients.values():
            reconstruct(url, out, engine="batched", channels_per_chunk=chunk, client=client)  # warm
        for pin in (False, True):
            if pin:
                for client in clients.values():
                    _pin_to_own_core(client)
            times: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(repeat):
                for w, client in clients.items():
                    t0 = time.perf_counter()
                    reconstruct(url, out, engine="batched", channels_per_chunk=chunk, client=client)
                    times[w].append(time.perf_counter() - t0)
            if pin:  # a worker the nanny restarted meanwhile would run unpinned: say so
                for w, client in clients.items():
                    free = [a for a, n in client.run(lambda: len(os.sched_getaffinity(0))).items() if n != 1]
                    if free:
                        print(f"warning: {len(free)} worker(s) of the {w}-worker cluster lost their core "
                              "(restarted during the runs); these numbers are not one core per worker")
            results[pin] = {w: (times[w], _peaks(client)) for w, client in clients.items()}
    return results


def peak_rss_one_worker(url: str, out: str, chunk: int) -> float:
    """Peak RSS [GB] of a single worker that reconstructed ``url`` once."""
    with contextlib.ExitStack() as stack:
        client = _cluster(stack, 1)
        reconstruct(url, out, engine="batched", channels_per_chunk=chunk, client=client)
        return _peaks(client)[0]


def run_size(n: int, a: int, c: int, bare_channels: int, chunk: int, tmp: str) -> None:
    print(f"\n== {n} px × {a} angles × {c} channels ==")
    geometry, sino = make_sinograms(n, a, c)
    sub = sino[:, :, :bare_channels]
    bare_rate, bare = rate(lambda: bare_astra_loop(geometry, sub), bare_channels, repeat=2)
    astra_rate, mine = rate(lambda: AstraEngine("cpu").fbp(geometry, sub, "ram-lak"), bare_channels, repeat=2)
    eng = BatchedEngine("cpu")
    t0 = time.perf_counter()
    op = eng.operator(geometry)
    build = time.perf_counter() - t0

    def batched_all() -> np.ndarray:
        return np.concatenate([eng.fbp(geometry, sino[:, :, i:i + chunk], "ram-lak")
                               for i in range(0, c, chunk)], axis=2)

    batched_rate, batched = rate(batched_all, c, repeat=2)
    err = np.sqrt(np.mean((batched[:, :, :bare_channels] - bare) ** 2) / np.mean(bare ** 2))
    same = np.abs(mine - bare).max() / np.abs(bare).max()
    print(f"bare ASTRA FBP loop      : {bare_rate:9.2f} channels/s  ({bare_channels} channels)")
    print(f"xrdscale astra engine    : {astra_rate:9.2f} channels/s  ratio {astra_rate / bare_rate:5.2f}× bare"
          f"  (max |diff| / max = {same:.1e})")
    print(f"xrdscale batched engine  : {batched_rate:9.2f} channels/s  ratio {batched_rate / bare_rate:5.2f}× bare"
          f"  (rel. RMSE vs ASTRA {err:.2e}; chunks of {chunk})")
    print(f"batched operator build   : {build:9.2f} s one-off, {op.nnz:.3g} non-zeros, "
          f"{op.nnz * 8 / 1e9:.2f} GB (float32 + int32)")
    del eng, op, batched  # the stage's workers build their own: free this process's copy
    clear_operators()
    url = write_sino_store(os.path.join(tmp, f"sino{n}.zarr"), geometry, sino)
    for pin, runs in stage_pairs(url, os.path.join(tmp, f"vol{n}.zarr"), chunk).items():
        label = "one core per worker" if pin else "workers unpinned"
        for workers, (seconds, peaks) in runs.items():
            print(f"stage, {workers} worker(s)     : {c / min(seconds):9.2f} channels/s  ({label}; zarr in → volume "
                  f"store out, best of {len(seconds)}; peak RSS per worker {', '.join(f'{p:.2f}' for p in peaks)} GB)")
        pairs = [one / two for one, two in zip(runs[1][0], runs[2][0])]
        print(f"2 workers / 1 worker     : {min(runs[1][0]) / min(runs[2][0]):5.2f}× ({label}, best runs); run by run "
              f"{', '.join(f'{r:.2f}' for r in pairs)}")
    half = write_sino_store(os.path.join(tmp, f"half{n}.zarr"), geometry, sino[:, :, : c // 2].copy())
    for label, u in ((c // 2, half), (c, url)):
        print(f"peak RSS, 1 worker, {label:4d} channels: {peak_rss_one_worker(u, os.path.join(tmp, f'mem{n}.zarr'), chunk):.2f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small size only")
    parser.add_argument("--channels", type=int, default=256, help="channels at paper geometry")
    parser.add_argument("--bare-channels", type=int, default=16, help="channels timed for the ASTRA loops at "
                        "paper geometry (per-channel rates)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} cores; one thread per process; torch {torch.__version__}, "
          f"astra {astra.__version__} (CUDA: {astra.use_cuda()})")
    tmp = tempfile.mkdtemp(prefix="xrdscale-bench-")
    try:
        run_size(128, 90, 64, 64, 32, tmp)
        if not args.quick:
            run_size(637, 400, args.channels, args.bare_channels, 32, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
