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

``--paper`` runs instead the whole campaign of one dataset at the paper's scan geometry
(preset ``scale``: 637 translations × 400 angles, 4 interlaced subsets, zigzag, 30 µm steps,
on the demo's 128×128 detector; ``--quarter``: preset ``scale-quarter``, a quarter of the
frames), simulate → integrate → sinogram → reconstruct (1,000 channels) → PQ-Net maps →
report, through the campaign runner on a local cluster (2 Dask workers × 1 thread, Ray). It
prints each stage's wall time, rate, and peak RSS per Dask worker, Ray worker and the driver
(sampled every second), and projects the measured per-core rates to the paper's campaign
(16 datasets, 4 million Pilatus 2M frames; the integration cost of a Pilatus 2M frame is
measured with pyFAI on that detector's geometry).

    python benchmarks/campaign.py --paper --data /big/scale --json scale.json
    python benchmarks/campaign.py --paper --quarter --data /big/quarter --json quarter.json
    python benchmarks/campaign.py --paper --data /big/scale --compare quarter.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import threading
import time

import yaml

#: The paper's campaign: 16 datasets (cycles × voltages) of 637 × 400 Pilatus 2M frames.
PAPER_DATASETS = 16
PAPER_FRAMES = 637 * 400
DETECTOR_RATE = 100.0   # frames/s of the detector the campaign must keep pace with


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one dataset")
    parser.add_argument("--paper", action="store_true", help="one dataset at the paper's scan geometry")
    parser.add_argument("--quarter", action="store_true", help="with --paper: a quarter of its frames")
    parser.add_argument("--data", help="with --paper: folder of the simulated beamtime (reused when it exists)")
    parser.add_argument("--json", help="with --paper: write the measured table here")
    parser.add_argument("--compare", help="with --paper: a --json of another run; prints the peak RSS ratios")
    parser.add_argument("--model", help="with --paper: a trained model to reuse (default: the spec trains one)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.paper:
        run_paper(preset="scale-quarter" if args.quarter else "scale", data=args.data, json_out=args.json,
                  compare=args.compare, model=args.model)
        return

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


class RssSampler(threading.Thread):
    """Every ``interval`` s, the RSS of this process and of all its descendants, with their role."""

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, int, str, int]] = []   # (unix time, pid, role, rss bytes)
        self.dask_pids: set[int] = set()
        self._halt = threading.Event()

    def role(self, proc) -> str:
        if proc.pid == os.getpid():
            return "driver"
        if proc.pid in self.dask_pids:
            return "dask worker"
        try:
            title = " ".join(proc.cmdline()[:1])
        except Exception:
            return "other"
        return "ray worker" if title.startswith("ray::") else "other"

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._halt.is_set():
            now = time.time()
            for proc in [me, *me.children(recursive=True)]:
                try:
                    self.samples.append((now, proc.pid, self.role(proc), proc.memory_info().rss))
                except psutil.Error:
                    pass
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def peak(self, start: float, end: float, role: str) -> int:
        """The largest RSS of one process of ``role`` between ``start`` and ``end``."""
        values = [rss for t, _, r, rss in self.samples if start <= t <= end + self.interval and r == role]
        return max(values, default=0)


def pilatus_frame_seconds(frames: int = 6) -> float:
    """Seconds of one core per Pilatus 2M frame: the integrate stage's pyFAI call (trimmed mean)."""
    from xrdscale.simulate.beamtime import LIBRARY_Q, make_detector
    from xrdscale.stages.integrate import IntegratorSpec, integrate_frame, integrator

    det = make_detector("pilatus2m")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "p2m.poni")
        det.integrator.write(path)
        poni = open(path).read()
    spec = IntegratorSpec(poni=poni, mask_url=None, mask_sha256=None, frame_shape=tuple(det.shape),
                          npt=LIBRARY_Q[2], q_range=LIBRARY_Q[:2], method="trimmed_mean", percentile=(10.0, 90.0),
                          polarization_factor=0.99, sigma_clip_threshold=5.0)
    ai, _ = integrator(spec)
    import numpy as np

    frame = np.random.default_rng(0).poisson(20.0, det.shape).astype(np.int32)
    integrate_frame(ai, frame, spec, 1.0)
    t0 = time.perf_counter()
    for _ in range(frames):
        integrate_frame(ai, frame, spec, 1.0)
    return (time.perf_counter() - t0) / frames


def run_paper(*, preset: str, data: str | None, json_out: str | None, compare: str | None,
              model: str | None = None) -> None:
    """Simulate (or reuse) one ``scale`` dataset, run its campaign, print the table and the projection."""
    import logging

    import psutil

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("xrdscale").setLevel(logging.INFO)

    from xrdscale.campaign.runner import Plan, Runner, open_job_store
    from xrdscale.campaign.spec import load_spec
    from xrdscale.io import storage
    from xrdscale.runtime.cluster import connect
    from xrdscale.simulate.beamtime import PRESETS, simulate_beamtime

    p = PRESETS[preset]
    root = os.path.abspath(data or tempfile.mkdtemp(prefix=f"xrdscale-bench-{preset}-"))
    spec_path = os.path.join(root, "jobs", f"{preset}-18650.yaml")
    sampler = RssSampler()
    sampler.start()
    rows: list[dict] = []
    if not os.path.exists(spec_path):
        t0 = time.time()
        simulate_beamtime(root, preset, 0)
        t1 = time.time()
        rows.append({"stage": "simulate", "wall_s": t1 - t0, "items": p.frames_per_dataset, "unit": "frames",
                     "cores": 1, "rss": {"driver": sampler.peak(t0, t1, "driver")}})
    raw = yaml.safe_load(open(spec_path))
    raw.update(workspace="../work", cluster={"kind": "local", "workers": 2, "threads_per_worker": 1},
               runner={"concurrency": 1, "retries": 0})
    if model:
        raw["model"] = os.path.abspath(model)
    run_spec = os.path.join(root, "jobs", "bench.yaml")
    with open(run_spec, "w") as f:
        yaml.safe_dump(raw, f)
    spec = load_spec(run_spec)
    t_start = time.time()
    with connect(spec.cluster) as (client, ray_handle):
        sampler.dask_pids = set(client.run(os.getpid).values())
        store = open_job_store(spec)
        result = Runner(Plan(spec), store, ray=ray_handle).run()
        runs = store.runs(spec.campaign, invocation=result.invocation)
        store.close()
    t_end = time.time()
    sampler.stop()
    if not result.ok:
        raise SystemExit(f"the campaign failed: {result.failed}")
    n_lib = raw["pipeline"]["train"]["n"]
    maps = storage.open_store(next(iter(result.maps.values())), stage="maps")
    n_pix = maps.sizes["y"] * maps.sizes["x"]       # the centred reconstruction grid (a few columns wider)
    items = {"library": (n_lib, "patterns"), "train": (n_lib, "patterns"),
             "integrate": (p.frames_per_dataset, "frames"), "sinogram": (p.frames_per_dataset, "frames"),
             "reconstruct": (raw["pipeline"]["integrate"]["npt"], "channels"), "analyse": (n_pix, "pixels"),
             "report": (1, "reports")}
    for r in sorted((r for r in runs if r.status == "done" and r.started_at and r.ended_at),
                    key=lambda r: r.started_at):
        t0, t1 = r.started_at.timestamp(), r.ended_at.timestamp()
        n, unit = items.get(r.stage, (1, "runs"))
        cores = 1 if r.stage == "report" else 2
        rows.append({"stage": r.stage, "wall_s": t1 - t0, "items": n, "unit": unit, "cores": cores,
                     "rss": {role: sampler.peak(t0, t1, role) for role in ("dask worker", "ray worker", "driver")}})
    whole = {role: sampler.peak(t_start, t_end, role) for role in ("dask worker", "ray worker", "driver")}
    p2m = pilatus_frame_seconds()
    _print_table(preset, p, rows, whole, p2m, n_pix)
    out = {"preset": preset, "frames": p.frames_per_dataset, "pixels": n_pix, "rows": rows, "peak": whole,
           "pilatus2m_core_s_per_frame": p2m, "cores": os.cpu_count(), "memory_gb": psutil.virtual_memory().total / 1e9,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "report": result.report}
    if json_out:
        with open(json_out, "w") as f:
            json.dump(out, f, indent=1)
    if compare:
        other = json.load(open(compare))
        print(f"\npeak RSS per process, this run ({preset}, {p.frames_per_dataset} frames) / {other['preset']} "
              f"({other['frames']} frames):")
        for role, v in whole.items():
            ref = other["peak"].get(role, 0)
            if ref:
                print(f"  {role:12s} {v / 2**20:8.0f} MiB / {ref / 2**20:8.0f} MiB = {v / ref:5.2f}")


def _print_table(preset, p, rows, whole, p2m, n_pix) -> None:
    mib = 2 ** 20
    print(f"\n{preset}: {p.size} translations x {p.n_angles} angles = {p.frames_per_dataset} frames, "
          f"maps of {n_pix} pixels, {os.cpu_count()} cores")
    print(f"{'stage':12s} {'wall':>9s} {'rate':>22s} {'per core':>16s} {'dask worker':>12s} {'ray worker':>11s} "
          f"{'driver':>8s}  (peak RSS, MiB)")
    for r in rows:
        rate = r["items"] / r["wall_s"]
        rss = r["rss"]
        print(f"{r['stage']:12s} {r['wall_s']:8.1f}s {rate:12.1f} {r['unit'] + '/s':>9s} "
              f"{rate / r['cores']:10.1f}/core {rss.get('dask worker', 0) / mib:12.0f} "
              f"{rss.get('ray worker', 0) / mib:11.0f} {rss.get('driver', 0) / mib:8.0f}")
    print(f"{'whole run':12s} {'':>9s} {'':>22s} {'':>16s} {whole['dask worker'] / mib:12.0f} "
          f"{whole['ray worker'] / mib:11.0f} {whole['driver'] / mib:8.0f}")
    # Projection: core-seconds per dataset of every stage, scaled to the paper's campaign. The
    # integration of a Pilatus 2M frame is measured (it is what depends on the detector); the
    # other stages see patterns, sinograms, volumes and maps of the same size as here.
    frames_scale = PAPER_FRAMES / p.frames_per_dataset
    print(f"\nprojection to the paper's campaign: {PAPER_DATASETS} datasets x {PAPER_FRAMES} Pilatus 2M frames "
          f"= {PAPER_DATASETS * PAPER_FRAMES / 1e6:.2f} M frames")
    print(f"  pyFAI trimmed mean of one Pilatus 2M frame: {p2m:.3f} core-s ({1 / p2m:.1f} frames/s per core)")
    total_per_frame = 0.0
    print(f"  {'stage':12s} {'core-h':>10s} {'core-s per frame':>18s}")
    for r in rows:
        if r["stage"] in ("simulate", "library", "train"):
            continue
        if r["stage"] == "integrate":
            per_frame = p2m
        else:   # core-seconds of one dataset, scaled linearly in frames from a smaller run
            per_frame = r["wall_s"] * r["cores"] * frames_scale / PAPER_FRAMES
        total_per_frame += per_frame
        print(f"  {r['stage']:12s} {per_frame * PAPER_DATASETS * PAPER_FRAMES / 3600:10.1f} {per_frame:18.5f}")
    print(f"  {'all':12s} {total_per_frame * PAPER_DATASETS * PAPER_FRAMES / 3600:10.1f} {total_per_frame:18.5f}")
    print(f"  cores to keep pace with a {DETECTOR_RATE:.0f} frames/s detector: {total_per_frame * DETECTOR_RATE:.0f}")


if __name__ == "__main__":
    main()
