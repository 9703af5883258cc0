"""Benchmark: the batched full-profile fit against PQ-Net inference on the same simulated pixels.

On N simulated Poisson patterns (2 phases of the packaged NCA library: NCA and Al, scale, a, c,
size and a Chebyshev background; ``--quick``: 64, else 256):

1. the fit (:func:`xrdscale.fitting.batch.fit_batch`, float64 on the CPU, one thread): time,
   pixels/s, converged fraction, median iterations, median χ²/dof and Rwp, lattice and size
   errors against their std errors;
2. PQ-Net inference of the same patterns (an ensemble of 2 members of the default PQ-Net size;
   inference time does not depend on the weights, so they are untrained), torch engine;
3. the ratio PQ-Net time / fit time (the paper: PQ-Net ≈ 5 % of the conventional time);
4. the ``fit`` stage (zarr in, zarr out) on Dask LocalClusters of 1 and of 2 single-threaded
   worker processes: pixels/s.

Nothing is asserted on time.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import xarray as xr  # noqa: E402

from xrdscale.fitting.batch import fit_batch  # noqa: E402
from xrdscale.fitting.torch_model import PatternModel  # noqa: E402
from xrdscale.io import storage  # noqa: E402
from xrdscale.physics.pattern import simulate_patterns  # noqa: E402
from xrdscale.physics.phaselib import PhaseLibrary  # noqa: E402
from xrdscale.stages.fit import fit_maps  # noqa: E402

LIBRARY = """version: 1
wavelength: 0.130509
q_grid: {min: 1.16, max: 2.84, npt: 500}
instrument: {U: 0.0, V: 0.0, W: 4.0e-4, X: 0.0}
background: {chebyshev_order: 2, amplitude: [0.0, 0.05]}
phases:
  NCA: {builtin: NCA, scale: [0.05, 1], a: [2.810, 2.875], c: [14.15, 14.55], size_nm: [60, 1000]}
  Al: {builtin: Al, scale: [0, 1], a: [4.03, 4.07], size_nm: [60, 1000]}
"""


def simulate(lib: PhaseLibrary, n: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    labels = lib.sample(n, rng)
    for d in labels.values():
        d["scale"] = d["scale"] * 0.05          # counts of ~10⁴ at the strongest peak
    bg = np.c_[rng.uniform(50, 200, n), rng.uniform(-20, 20, n), rng.uniform(-10, 10, n)]
    clean = simulate_patterns(lib.q, lib.phases, labels, lib.instrument_model(), background=bg)
    return rng.poisson(np.clip(clean, 0, None)).astype(np.float32), labels


def pqnet_time(lib: PhaseLibrary, y: np.ndarray) -> float:
    from xrdscale.pqnet.engine import Ensemble
    from xrdscale.pqnet.model import ModelSpec, PQNet

    routes = tuple(lib.label_names())
    spec = ModelSpec(phases=tuple(lib.phase_names), routes=routes, npt=lib.q.size,
                     target_mean=tuple(1.0 for _ in routes), target_std=tuple(1.0 for _ in routes))
    members = []
    for i in range(2):
        torch.manual_seed(i)
        members.append(PQNet(spec).eval())
    ens = Ensemble(members, engine="torch", device="cpu")
    ens.predict(y[:8])
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        ens.predict(y)
        best = min(best, time.perf_counter() - t0)
    return best


def stage_rate(lib_path: str, data: str, out: str, n: int, workers: int) -> float:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        t0 = time.perf_counter()
        fit_maps(lib_path, data, out, client=client, progress=False, batch=max(8, n // (4 * workers)))
        return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 patterns instead of 256")
    args = parser.parse_args()
    n = 64 if args.quick else 256
    torch.set_num_threads(1)
    lib = PhaseLibrary.from_text(LIBRARY)
    y, labels = simulate(lib, n)
    model = PatternModel(lib)
    t0 = time.perf_counter()
    res = fit_batch(model, y)
    t_fit = time.perf_counter() - t0
    ok = res.converged
    print(f"fit: {n} patterns in {t_fit:.1f} s ({n / t_fit:.1f} px/s), converged {ok.mean():.0%}, "
          f"median iterations {np.median(res.iterations):.0f}, median chi2/dof {np.median(res.chi2[ok]):.3f}, "
          f"median Rwp {np.median(res.rwp):.4f}")
    for phase, key in (("NCA", "a"), ("NCA", "c"), ("Al", "a"), ("NCA", "size_nm"), ("Al", "size_nm")):
        j = model.index(phase, key)
        assert j is not None
        err = res.params[ok, j] - labels[phase][key][ok]
        z = err / res.std[ok, j]
        print(f"  {phase}.{key}: median |err| {np.median(np.abs(err)):.3g}, "
              f"median std {np.nanmedian(res.std[ok, j]):.3g}, "
              f"rms(err/std) {np.sqrt(np.nanmean(z**2)):.2f}, |err|<3std {np.mean(np.abs(z) < 3):.0%}")
    t_pq = pqnet_time(lib, y)
    print(f"PQ-Net (2 members, torch, 1 thread): {t_pq * 1e3:.1f} ms ({n / t_pq:.0f} px/s); "
          f"PQ-Net / fit time = {t_pq / t_fit:.2%}")
    tmp = tempfile.mkdtemp()
    try:
        lib_path = os.path.join(tmp, "lib.yaml")
        with open(lib_path, "w") as fh:
            fh.write(LIBRARY)
        ds = xr.Dataset({"intensity": (("frame", "q"), y)},
                        coords={"q": ("q", lib.q, {"units": "1/angstrom"}),
                                "angle": ("frame", np.zeros(n), {"units": "deg"}),
                                "translation": ("frame", np.zeros(n), {"units": "mm"})})
        data = storage.write_store(ds, os.path.join(tmp, "patterns.zarr"), stage="patterns")
        for workers in (1, 2):
            rate = stage_rate(lib_path, data, os.path.join(tmp, f"maps{workers}.zarr"), n, workers)
            print(f"fit stage, LocalCluster of {workers} single-threaded worker(s): {rate:.1f} px/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
