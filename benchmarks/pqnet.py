"""PQ-Net inference and training throughput against bare torch / ONNX Runtime, on the same patterns.

Prints, for a 13-phase scale-factor model on patterns of the packaged 18650 library:

- a bare torch forward loop of one member (the reference), and a bare ONNX Runtime loop;
- xrdscale inference (Dask reading a patterns store → Ray actors → maps store), in
  patterns/s per ensemble and per member (= per ensemble × members), with 1 and 2 actors,
  and the ratio per member / bare torch;
- training time per epoch of one member on a 13-phase library.

    python benchmarks/pqnet.py [--quick] [--members M] [--patterns N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import xarray as xr  # noqa: E402

from xrdscale.io import storage  # noqa: E402
from xrdscale.pqnet import registry  # noqa: E402
from xrdscale.pqnet.engine import export_onnx  # noqa: E402
from xrdscale.pqnet.library import make_library  # noqa: E402
from xrdscale.pqnet.model import ModelSpec, PQNet, count_parameters  # noqa: E402
from xrdscale.pqnet.predict import predict  # noqa: E402
from xrdscale.pqnet.serve import ServerPool  # noqa: E402
from xrdscale.pqnet.train import train_ensemble  # noqa: E402
from xrdscale.physics.phaselib import PhaseLibrary  # noqa: E402

LIBRARY = os.path.join(os.path.dirname(__file__), "..", "xrdscale", "data", "phases", "cell18650.yaml")
BATCH = 1024


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:10.0f} patterns/s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small, fast run")
    ap.add_argument("--members", type=int, default=None, help="ensemble size (default 5, quick 2)")
    ap.add_argument("--patterns", type=int, default=None, help="patterns to infer (default 40000, quick 8000)")
    args = ap.parse_args()
    members = args.members or (2 if args.quick else 5)
    n = args.patterns or (8000 if args.quick else 40000)
    torch.set_num_threads(1)
    lib = PhaseLibrary.load(LIBRARY)
    rng = np.random.default_rng(0)
    base = lib.simulate(lib.sample(min(n, 4000), rng), rng)
    patterns = np.concatenate([base] * int(np.ceil(n / len(base))))[:n]
    names = lib.phase_names
    spec = ModelSpec(phases=tuple(names), routes=tuple((p, "scale") for p in names), npt=lib.q.size,
                     target_mean=(0.5,) * len(names), target_std=(0.3,) * len(names))
    print(f"cores: {os.cpu_count()}  phases: {len(names)}  npt: {lib.q.size}  patterns: {n}  members: {members}")
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(members):
            torch.manual_seed(i)
            m = PQNet(spec).eval()
            files.append(registry.MemberFiles(registry.state_bytes(m), export_onnx(m), {"seed": i}))
        model_url = os.path.join(tmp, "model")
        registry.write_entry(model_url, spec=spec, q=lib.q, phases_yaml=lib.text, members=files, metrics={},
                             config={"benchmark": True})
        member = registry.open_entry(model_url).load_member(0)
        print(f"member parameters: {count_parameters(member)}")

        x = torch.from_numpy(patterns)
        with torch.inference_mode():
            member(x[:BATCH])
            t0 = time.perf_counter()
            for s in range(0, n, BATCH):
                member(x[s:s + BATCH])
            t_torch = time.perf_counter() - t0
        print(f"bare torch forward, one member     {rate(n, t_torch)}")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(files[0].onnx, opts, providers=["CPUExecutionProvider"])
        sess.run(None, {"patterns": patterns[:BATCH]})
        t0 = time.perf_counter()
        for s in range(0, n, BATCH):
            sess.run(None, {"patterns": patterns[s:s + BATCH]})
        t_ort = time.perf_counter() - t0
        print(f"bare ONNX Runtime, one member      {rate(n, t_ort)}   (x{t_torch / t_ort:.2f} of torch)")

        ds = xr.Dataset({"intensity": (("frame", "q"), patterns)},
                        coords={"q": lib.q, "angle": ("frame", np.zeros(n)), "translation": ("frame", np.zeros(n))})
        src = storage.write_store(ds.chunk({"frame": 8192}), os.path.join(tmp, "patterns.zarr"), stage="patterns")
        results = {}
        for actors in (1, 2):
            with ServerPool(model_url, actors=actors, engine="onnx", threads=1) as pool:
                t0 = time.perf_counter()
                predict(model_url, src, os.path.join(tmp, f"maps{actors}.zarr"), pool=pool, batch=BATCH)
                results[actors] = time.perf_counter() - t0
            per_ens = n / results[actors]
            print(f"xrdscale, {actors} actor(s): ensemble {per_ens:8.0f} patterns/s, per member "
                  f"{per_ens * members:8.0f} patterns/s, ratio per member / bare torch "
                  f"{per_ens * members / (n / t_torch):.2f}")
        print(f"2 actors / 1 actor: x{results[1] / results[2]:.2f}")

        n_lib = 1000 if args.quick else 4000
        lib_url = make_library(LIBRARY, os.path.join(tmp, "lib.zarr"), n=n_lib, block=500)
        t0 = time.perf_counter()
        train_ensemble(lib_url, os.path.join(tmp, "trained"), ensemble=1, epochs=1, outputs=["scale"],
                       parallel=False, device="cpu")
        epoch = registry.open_entry(os.path.join(tmp, "trained")).members[0]["curves"]["epoch_seconds"][0]
        n_train = int(0.8 * n_lib)
        print(f"training, 13-phase library: {epoch:.1f} s per epoch of {n_train} patterns "
              f"({n_train / epoch:.0f} patterns/s; 200,000-pattern library: ~{200_000 * 0.8 / (n_train / epoch) / 60:.0f}"
              f" min per epoch); total with setup {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
