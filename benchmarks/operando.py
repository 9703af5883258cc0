"""Benchmark: the ``operando`` stage vs the bare library calls it wraps, on the same patterns.

A simulated two-cycle series (``--interval`` s between scans, ``--points`` per scan) is
integrated once; then, on the same patterns store, with the same ensemble:

- xrdscale: :func:`xrdscale.stages.operando.operando` (patterns store → PQ-Net on a running
  Ray actor → Hill & Howard weight fractions with std → echem per frame → ``operando`` zarr
  store with provenance and marker), quality maps off;
- bare: read the patterns with xarray, interpolate onto the model's q grid with numpy, the
  ensemble in-process (:meth:`xrdscale.pqnet.engine.Ensemble.predict`, ONNX), the same
  weight-fraction formula in numpy, ``np.interp`` of the log, ``Dataset.to_zarr``.

The model (a small 4LiCx ensemble) is trained first and the actor started before timing.
It prints the absolute rates (frames/s) and the ratio (xrdscale / bare).

    python benchmarks/operando.py            # 10 s between scans: 1,680 frames
    python benchmarks/operando.py --quick    # 60 s: 280 frames
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import xarray as xr

from analysis import best_of  # benchmarks/analysis.py, beside this script
from xrdscale.io import storage
from xrdscale.io.echem import read_echem
from xrdscale.physics.quant import mass_factor
from xrdscale.pqnet.library import make_library
from xrdscale.pqnet.predict import interpolation
from xrdscale.pqnet.registry import open_entry
from xrdscale.pqnet.serve import ServerPool, load_ensemble
from xrdscale.pqnet.train import train_ensemble
from xrdscale.simulate.operando import _phase, library_url, simulate_operando
from xrdscale.stages.integrate import integrate
from xrdscale.stages.operando import operando


def bare(patterns_url: str, echem_url: str, model_url: str, out_url: str) -> None:
    """The stage's computation as plain calls: no Dask graph, no actor, no provenance."""
    entry = open_entry(model_url)
    ds = xr.open_zarr(patterns_url)
    x = np.asarray(ds["intensity"].values, dtype=np.float32)
    hi, w = interpolation(ds["q"].values, entry.q, "bench")
    x = x[:, hi - 1] * (1 - w) + x[:, hi] * w
    mean, std = load_ensemble(model_url).predict(x)
    k = np.array([mass_factor(_phase(p)) for p in entry.spec.phases])
    u, su = np.clip(mean, 0, None) * k, std * k
    total = u.sum(axis=1, keepdims=True)
    wf = u / total
    var = ((1 - wf) ** 2 * su**2 + wf**2 * ((su**2).sum(axis=1, keepdims=True) - su**2)) / total**2
    log = read_echem(echem_url)
    t = ds["time"].values
    out = xr.Dataset({"weight_fraction": (("frame", "phase"), wf), "weight_fraction_std": (("frame", "phase"),
                                                                                           np.sqrt(var)),
                      "scale": (("frame", "phase"), mean), "scale_std": (("frame", "phase"), std)},
                     coords={"time": ("frame", t), "voltage": ("frame", np.interp(t, log.time, log.voltage)),
                             "phase": list(entry.spec.phases)})
    out.to_zarr(out_url, mode="w")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="60 s between scans, one repeat")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between scans")
    ap.add_argument("--points", type=int, default=1, help="positions per scan")
    args = ap.parse_args()
    interval, repeat = (60.0, 1) if args.quick else (args.interval, 3)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        urls = simulate_operando(os.path.join(tmp, "sim"), scan_interval_s=interval, points=args.points)
        patterns = os.path.join(tmp, "patterns.zarr")
        integrate(urls["raw"], patterns, poni=urls["poni"], mask=urls["mask"], npt=500, q_range=(1.55, 2.27),
                  progress=False)
        lib = make_library(library_url(), os.path.join(tmp, "lib.zarr"), n=3000)
        model = os.path.join(tmp, "model")
        train_ensemble(lib, model, ensemble=2, epochs=5, outputs=["scale"], parallel=False, device="cpu", bounds=0)
        n = storage.open_store(patterns).sizes["frame"]
        print(f"{n} frames ({args.points} per scan, every {interval:g} s), 2-member 4LiCx ensemble; "
              f"{os.cpu_count()} cores")
        pool = ServerPool(model, actors=1, engine="onnx", device="cpu")
        try:
            t_x = best_of(lambda: operando(model, patterns, urls["echem"], os.path.join(tmp, "op.zarr"), pool=pool,
                                           quality=False, progress=False), repeat)
        finally:
            pool.close()
        t_bare = best_of(lambda: bare(patterns, urls["echem"], model, os.path.join(tmp, "bare.zarr")), repeat)
    print(f"operando          xrdscale {n / t_x:10.1f} frames/s   bare {n / t_bare:10.1f} frames/s   "
          f"ratio {t_x / t_bare:5.2f}x the bare time")
    ray.shutdown()


if __name__ == "__main__":
    main()
