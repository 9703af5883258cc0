"""Benchmark: the campaign runner's overhead vs the sum of its stages run directly.

On the simulated demo beamtime (64² phantom, 40 angles; ``--quick``: one dataset) with a
small PQ-Net trained once beforehand (not timed), it times in one run, on the same local
Dask cluster and Ray instance:

- direct: every stage of every dataset (integrate → sinogram → reconstruct → analyse) and
  the report, called one after the other through the same stage functions;
- runner: :class:`xrdscale.campaign.runner.Runner` on a fresh workspace (hashing, job store,
  completion checks, concurrent datasets), and a second run that skips everything.

It prints both wall times, the ratio runner / direct and the cost of a fully skipped rerun.

    python benchmarks/campaign.py            # the 3 datasets of the demo
    python benchmarks/campaign.py --quick    # 1 dataset
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one dataset")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from xrdscale.campaign.runner import Plan, Runner, open_job_store
    from xrdscale.campaign.spec import load_spec
    from xrdscale.campaign.stages import StageCall
    from xrdscale.runtime.cluster import connect
    from xrdscale.pqnet.library import make_library
    from xrdscale.pqnet.train import train_ensemble
    from xrdscale.simulate.beamtime import simulate_beamtime

    tmp = tempfile.mkdtemp(prefix="xrdscale-bench-campaign-")
    spec_url = simulate_beamtime(os.path.join(tmp, "bt"), "demo", 0)
    raw = yaml.safe_load(open(spec_url))
    if args.quick:
        raw["cycles"][0]["datasets"] = raw["cycles"][0]["datasets"][:1]
    model = os.path.join(tmp, "model")
    make_library(os.path.join(tmp, "bt", "phases", "cell18650.yaml"), os.path.join(tmp, "lib.zarr"), n=600)
    train_ensemble(os.path.join(tmp, "lib.zarr"), model, ensemble=2, epochs=2, parallel=False)
    raw.update(model=model, cluster={"kind": "local", "workers": 2, "threads_per_worker": 1, "dashboard": False},
               runner={"concurrency": 2, "retries": 0})
    raw["pipeline"]["report"] = {"rois": {}}  # the tiny model does not resolve the default ROIs

    def spec_in(name: str):
        raw_ws = dict(raw, workspace=f"../{name}")
        path = os.path.join(tmp, "bt", "jobs", f"{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(raw_ws, f)
        return load_spec(path)

    with connect(spec_in("direct").cluster) as (client, ray_handle):
        ray_handle.ensure()
        spec = spec_in("direct")
        plan = Plan(spec)
        tasks = [t for ts in plan.dataset_tasks.values() for t in ts]
        t0 = time.perf_counter()
        for t in tasks:
            t.stage.run(StageCall(spec, t.dataset, t.inputs, t.out, t.config, ray_handle))
        report = plan.report_task({did: ts[-1] for did, ts in plan.dataset_tasks.items()})
        report.stage.run(StageCall(spec, None, report.inputs, report.out, report.config, ray_handle))
        direct = time.perf_counter() - t0

        spec = spec_in("runner")
        store = open_job_store(spec)
        t0 = time.perf_counter()
        result = Runner(Plan(spec), store, ray=ray_handle).run()
        runner = time.perf_counter() - t0
        assert result.ok, result.failed
        t0 = time.perf_counter()
        Runner(Plan(spec), store, ray=ray_handle).run()
        rerun = time.perf_counter() - t0
        store.close()

    n = len(plan.dataset_tasks)
    print(f"campaign of {n} dataset(s), {len(tasks) + 1} stage runs, {os.cpu_count()} cores")
    print(f"  stages run directly : {direct:8.2f} s  ({(len(tasks) + 1) / direct:.2f} stages/s)")
    print(f"  campaign runner     : {runner:8.2f} s  ({(len(tasks) + 1) / runner:.2f} stages/s)")
    print(f"  ratio runner/direct : {runner / direct:8.2f}")
    print(f"  rerun, all skipped  : {rerun:8.2f} s")


if __name__ == "__main__":
    main()
