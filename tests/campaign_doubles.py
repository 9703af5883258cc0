"""Test doubles of the stage table for the runner tests (tests only; the shipped runner calls the real stages).

Each double does real chunked Dask work on real zarr stores through xrdscale.io.storage, so
the runner's skipping, retrying and resuming is tested against the same storage contract
as the real stages; :func:`reference` computes the expected outputs with plain numpy.
"""

from __future__ import annotations

import os
import sys
import time

import dask.array as da
import numpy as np
import xarray as xr
import yaml

from xrdscale.io import storage
from xrdscale.campaign.stages import MODEL, Stage

N_FRAMES, NPT = 64, 16


def _slow(block, delay):
    time.sleep(delay)
    return block


def _write(arr, url, stage, config):
    ds = xr.Dataset({"intensity": (("frame", "q"), arr)})
    storage.write_store(ds, url, stage=stage, config=config)


def _delay():
    return float(os.environ.get("XRDSCALE_TEST_STAGE_DELAY", "0"))


def _integrate(call):
    raw = np.load(call.dataset.raw)
    arr = da.from_array(raw, chunks=(8, NPT)).map_blocks(_slow, _delay(), dtype=raw.dtype)
    if os.environ.get("XRDSCALE_TEST_FAIL") == call.dataset.id:
        raise RuntimeError(f"injected failure for {call.dataset.id}")
    _write(arr * call.config["gain"], call.out, "patterns", call.config)


def _sinogram(call):
    ds = storage.open_store(call.inputs["integrate"])
    arr = ds["intensity"].data.map_blocks(_slow, _delay(), dtype=ds["intensity"].dtype)
    _write(arr + call.config["offset"], call.out, "sinogram", call.config)


def _reconstruct(call):
    ds = storage.open_store(call.inputs["sinogram"])
    _write(ds["intensity"].data ** 2, call.out, "volume", call.config)


def _library(call):
    w = np.linspace(0.0, 1.0, NPT) * call.config["seed"]
    storage.write_store(xr.Dataset({"w": ("q", w)}), call.out, stage="library")


def _train(call):
    w = storage.open_store(call.inputs["library"])["w"].values
    storage.write_store(xr.Dataset({"w": ("q", w + 1.0)}), call.out, stage="model")


def _analyse(call):
    w = storage.open_store(call.inputs[MODEL])["w"].values
    vol = storage.open_store(call.inputs["reconstruct"])["intensity"].data
    scale = (vol * w).sum(axis=1)
    storage.write_store(xr.Dataset({"scale": (("frame",), scale)}), call.out, stage="maps")


def _report(call):
    keys = sorted(k for k in call.inputs if k.startswith("analyse:"))
    total = np.array([float(storage.open_store(call.inputs[k])["scale"].sum()) for k in keys])
    storage.write_store(xr.Dataset({"total": ("dataset", total)}, coords={"dataset": keys}), call.out,
                        stage="report")


def stages(gain: float = 2.0):
    """The double stage table: library → train, integrate → sinogram → [absorption] → reconstruct → analyse."""
    return [
        Stage("library", _library, lambda s: {"seed": 3}, scope="model", external=lambda s, d: {"phases": s.phases}),
        Stage("train", _train, lambda s: {}, needs=("library",), scope="model"),
        Stage("integrate", _integrate, lambda s: {"gain": gain}, external=lambda s, d: {"raw": d.raw}),
        Stage("sinogram", _sinogram, lambda s: {"offset": 1.0}, needs=("integrate",)),
        Stage("absorption", _sinogram, lambda s: {}, needs=("sinogram",), enabled=lambda s: False),
        Stage("reconstruct", _reconstruct, lambda s: {}, needs=("absorption",)),
        Stage("analyse", _analyse, lambda s: {}, needs=("reconstruct", MODEL)),
        Stage("report", _report, lambda s: {}, scope="report", suffix=""),
    ]


def reference(raw: np.ndarray, gain: float = 2.0) -> np.ndarray:
    """The expected ``analyse`` output of the doubles, computed directly with numpy."""
    w = np.linspace(0.0, 1.0, NPT) * 3 + 1.0
    return (((raw * gain) + 1.0) ** 2 * w).sum(axis=1)


def make_campaign(root, n_datasets: int = 3, *, workspace: str | None = None, extra: dict | None = None) -> str:
    """Write raw .npy files, a phase-library placeholder, a PONI placeholder and a spec; return the spec path."""
    root = str(root)
    os.makedirs(os.path.join(root, "raw"), exist_ok=True)
    rng = np.random.default_rng(7)
    datasets = []
    for i in range(n_datasets):
        np.save(os.path.join(root, "raw", f"d{i}.npy"), rng.random((N_FRAMES, NPT)))
        datasets.append({"id": f"d{i}", "state": "charged", "voltage": 4.2, "raw": f"raw/d{i}.npy"})
    with open(os.path.join(root, "lib.yaml"), "w") as f:
        f.write("placeholder input of the test doubles\n")
    with open(os.path.join(root, "det.poni"), "w") as f:  # a PONI pyFAI can use (the real integrate checks it)
        f.write("poni_version: 2\nDetector: Pilatus1M\nDistance: 0.3\nPoni1: 0.05\nPoni2: 0.05\nRot1: 0\nRot2: 0\n"
                "Rot3: 0\nWavelength: 1.30509e-11\n")
    spec = {"version": 1, "campaign": "doubles", "workspace": workspace or "work",
            "geometry": {"poni": "det.poni"}, "phases": "lib.yaml",
            "cluster": {"kind": "local", "workers": 1, "dashboard": False},
            "runner": {"concurrency": 2, "retries": 1},
            "cycles": [{"cycle": 1, "datasets": datasets}]}
    spec.update(extra or {})
    path = os.path.join(root, "spec.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    return path


def main() -> None:
    """Run the doubles' campaign of the spec in argv[1] (the driver of the crash test)."""
    from xrdscale.campaign.runner import run_campaign
    from xrdscale.campaign.spec import load_spec

    result = run_campaign(load_spec(sys.argv[1]), stages=stages(), retry_delay=0.1)
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
