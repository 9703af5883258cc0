"""``xrdscale demo [DIR]``: simulate the demo beamtime, train (or reuse) a small PQ-Net, run the campaign.

The demo is the whole of xrdscale on a laptop: a simulated 18650 cell at three voltages
(:func:`xrdscale.simulate.beamtime.simulate_beamtime`, preset ``demo``), a small PQ-Net
ensemble trained on its 13-phase library, the campaign run locally (Dask ``LocalCluster``
+ local Ray) through every stage, and the HTML report. Running it again reuses whatever is
complete: the beamtime, the model and every finished stage.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import typer
import yaml

from xrdscale.io import storage

logger = logging.getLogger(__name__)

#: Pipeline settings of the demo campaign (small enough for 2 cores in a few minutes).
DEMO_PIPELINE = {
    "integrate": {"npt": 1000, "q_range": [1.16, 3.82]},
    "sinogram": {"center": "auto"},
    "reconstruct": {"algorithm": "fbp"},
    # scale factors of all 13 phases and the NCA lattice: what the demo's report shows
    "train": {"n": 5000, "ensemble": 2, "epochs": 8, "seed": 0, "outputs": ["scale", "NCA.a", "NCA.c"]},
    "analyse": {"actors": 1, "batch": 256},
}
DEMO_SPEC = "jobs/demo.yaml"


def demo_spec(beamtime_spec: dict, model: str | None = None) -> dict:
    """The demo campaign spec: the simulated beamtime's spec with the demo's pipeline settings."""
    spec = dict(beamtime_spec)
    spec["campaign"] = "demo"
    spec["pipeline"] = DEMO_PIPELINE
    spec["runner"] = {"concurrency": 3, "retries": 1}
    spec["cluster"] = {"kind": "local", "workers": 2, "threads_per_worker": 1}
    spec["model"] = model
    return spec


def prepare(out: str, *, seed: int = 0, model: str | None = None) -> str:
    """Simulate the demo beamtime under ``out`` unless it is there; write and return ``out/jobs/demo.yaml``."""
    from xrdscale.simulate.beamtime import simulate_beamtime

    sim_spec = storage.join(out, "jobs", "demo-18650.yaml")
    have = storage.exists(sim_spec)
    if have:
        raw = yaml.safe_load(storage.read_bytes(sim_spec))
        base = os.path.dirname(os.path.abspath(sim_spec)) if not storage.is_remote(sim_spec) else None
        have = all(storage.exists(storage.resolve(d["raw"], base)) for c in raw["cycles"] for d in c["datasets"])
    if not have:
        logger.info("simulating the demo beamtime in %s", storage.redact(out))
        sim_spec = simulate_beamtime(out, "demo", seed, progress=False)
    raw = yaml.safe_load(storage.read_bytes(sim_spec))
    url = storage.join(out, "jobs", "demo.yaml")
    header = "# The xrdscale demo campaign (written by `xrdscale demo`); rerun: xrdscale campaign run <this file>\n"
    storage.write_bytes(url, (header + yaml.safe_dump(demo_spec(raw, model), sort_keys=False)).encode())
    return url


def prepare_live(out: str, *, seed: int = 0, model: str | None = None) -> tuple[str, list[str], str]:
    """The live demo: the beamtime under ``out``, and ``out/jobs/demo-live.yaml`` watching ``out/live/``.

    Returns the spec URL, the raw files in the order they land, and the drop folder.
    """
    url = prepare(out, seed=seed, model=model)
    spec = yaml.safe_load(storage.read_bytes(url))
    base = os.path.dirname(os.path.abspath(url)) if not storage.is_remote(url) else None
    raws = [storage.resolve(d["raw"], base) for c in spec["cycles"] for d in c["datasets"]]
    spec.update(campaign="demo-live", workspace="../work-live", cycles=[],
                watch={"pattern": "../live/c{cycle}-{voltage}V.nxs", "stable_seconds": 2.0, "refresh": 10})
    live_url = storage.join(out, "jobs", "demo-live.yaml")
    header = ("# The live xrdscale demo (written by `xrdscale demo --live`): datasets join as their files land in "
              "../live/\n")
    storage.write_bytes(live_url, (header + yaml.safe_dump(spec, sort_keys=False)).encode())
    return live_url, raws, storage.join(out, "live")


def land_files(raws: list[str], drop: str, *, after: Any, interval: float = 1.0) -> None:
    """Write ``raws`` into ``drop`` one at a time, each once ``after`` says the previous one was processed.

    Each file is written under a temporary name and renamed, as a detector writer would close
    it; ``after(i)`` blocks until dataset ``i - 1`` is in the report (or returns False to stop).
    """
    import shutil
    import time

    for i, raw in enumerate(raws):
        if not after(i):
            return
        time.sleep(interval)
        name = os.path.basename(raw)
        target = storage.join(drop, name)
        if storage.exists(target):
            continue
        if storage.is_remote(drop):
            storage.write_bytes(target, storage.read_bytes(raw))
        else:
            os.makedirs(drop, exist_ok=True)
            shutil.copyfile(raw, target + ".part")
            os.replace(target + ".part", target)
        logger.info("live demo: %s landed in %s", name, storage.redact(drop))


def register(app: typer.Typer) -> None:
    """Add the ``demo`` command to the root app."""

    @app.command("demo")
    def demo_cmd(
        out: str = typer.Argument("demo-beamtime", help="Folder of the simulated beamtime and its workspace."),
        seed: int = typer.Option(0, "--seed", help="Seed of the simulated beamtime."),
        model: str | None = typer.Option(None, "--model", help="Use this trained PQ-Net registry entry instead "
                                         "of training one."),
        live: bool = typer.Option(False, "--live", help="Live mode: the datasets land one at a time in DIR/live/ "
                                  "while `campaign watch` processes each one as it lands."),
    ) -> None:
        """Simulate the demo beamtime, train (or reuse) a small PQ-Net, run the campaign and write its report."""
        from rich.console import Console

        from xrdscale.campaign.spec import load_spec
        from xrdscale.cli.campaign import run_and_print

        console = Console(stderr=True)
        out_abs = out if storage.is_remote(out) else os.path.abspath(out)
        if live:
            _live_demo(out_abs, seed, model, console)
            return
        with console.status("simulating the demo beamtime (or reusing it)…"):
            spec_url = prepare(out_abs, seed=seed, model=model)
        run_and_print(load_spec(spec_url),
                      note=f"campaign spec: {storage.redact(spec_url)} (run it again with `xrdscale campaign run`)")


def _live_demo(out: str, seed: int, model: str | None, console: Any) -> None:
    """Land the demo's datasets one by one while watching them; print each one's latency."""
    import threading

    from xrdscale.campaign.spec import load_spec
    from xrdscale.cli.campaign import watch_and_print

    with console.status("simulating the demo beamtime (or reusing it)…"):
        spec_url, raws, drop = prepare_live(out, seed=seed, model=model)
    spec = load_spec(spec_url)
    processed = threading.Semaphore(0)
    stopping = threading.Event()

    def after(i: int) -> bool:
        # the first file lands at once; each next one once the watcher processed the previous one
        while i > 0 and not processed.acquire(timeout=1.0):
            if stopping.is_set():
                return False
        return not stopping.is_set()

    writer = threading.Thread(target=land_files, args=(raws, drop), kwargs={"after": after}, daemon=True,
                              name="xrdscale-live-demo")
    console.print(f"live demo: watching {storage.redact(drop)}; {len(raws)} dataset(s) will land one at a time")
    writer.start()
    try:
        watch_and_print(spec, poll=2.0, max_datasets=len(raws), on_processed=lambda did: processed.release())
    finally:
        stopping.set()
    console.print(f"campaign spec: {storage.redact(spec_url)} (watch it again with `xrdscale campaign watch`)")
