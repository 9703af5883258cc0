"""Training a small PQ-Net ensemble: held-out accuracy, out-of-distribution uncertainty, maps vs truth."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import xarray as xr

from _builders import NCA_AL_YAML
from xrdscale.io import storage
from xrdscale.physics.crystal import builtin_phase
from xrdscale.physics.pattern import simulate_patterns
from xrdscale.physics.phaselib import PhaseLibrary
from xrdscale.pqnet.library import make_library
from xrdscale.pqnet.registry import open_entry
from xrdscale.pqnet.serve import load_ensemble
from xrdscale.pqnet.train import train_ensemble

# NCA (scale, a, c) and Al at demo noise (the counts of the packaged libraries).
YAML = NCA_AL_YAML
SMALL = {"pattern_channels": 8, "phase_channels": 8, "hidden": 32}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    (root / "lib.yaml").write_text(YAML)
    lib_url = make_library(str(root / "lib.yaml"), str(root / "lib.zarr"), n=4000, block=1000)
    model_url = str(root / "model")
    train_ensemble(lib_url, model_url, ensemble=3, epochs=12, batch=64, lr=2e-3, parallel=False,
                   model_options=SMALL)
    return root, model_url


@pytest.mark.slow
def test_held_out_accuracy_is_recorded_and_meets_the_targets(trained):
    _, model_url = trained
    entry = open_entry(model_url)
    out = entry.metrics["outputs"]
    assert entry.metrics["n_test"] == 400
    assert out["NCA.scale"]["r2"] >= 0.98
    assert out["Al.scale"]["r2"] >= 0.98
    assert out["NCA.a"]["mae"] <= 0.003
    assert out["NCA.c"]["mae"] <= 0.015
    assert len(entry.members) == 3 and all(len(m["curves"]["val_mae"]) >= 1 for m in entry.members)
    # every output beside its Cramér–Rao bound on the held-out split; all are determined here and accepted
    assert entry.metrics["bounds"]["n"] == 256 and entry.metrics["bounds"]["source"] == "replayed"
    assert all(o["r2_bound"] >= 0.99 and o["r2"] <= o["r2_bound"] + 0.005 for o in out.values()), out
    assert all(o["accepted"] and not o["weakly_determined"] for o in out.values()), out


@pytest.mark.slow
def test_ensemble_std_is_larger_out_of_distribution(trained):
    root, model_url = trained
    lib = PhaseLibrary.load(str(root / "lib.yaml"))
    rng = np.random.default_rng(99)
    labels = lib.sample(300, rng)
    clean = lib.simulate(labels, rng, noise=False)
    licx = builtin_phase("LiC6")  # a phase the library never contained (~20 % of the intensity)
    extra = simulate_patterns(lib.q, [licx], {"LiC6": {"scale": rng.uniform(1.0, 3.0, 300)}}, lib.instrument_model())
    ens = load_ensemble(model_url, engine="torch")
    std_in = ens.predict(clean)[1].mean(axis=0)          # per output, absolute units
    std_out = ens.predict(clean + extra)[1].mean(axis=0)
    ratio = std_out / std_in
    assert (ratio > 1.0).all(), ratio
    assert ratio.mean() > 2.0, ratio


@pytest.mark.slow
def test_maps_from_a_phantom_volume_correlate_with_the_truth(trained, tmp_path):
    root, model_url = trained
    lib = PhaseLibrary.load(str(root / "lib.yaml"))
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:12, 0:12] / 11.0
    truth = {"NCA": {"scale": 0.1 + 0.9 * xx.ravel(), "a": 2.81 + 0.065 * yy.ravel(),
                     "c": 14.15 + 0.4 * (1 - yy.ravel())},
             "Al": {"scale": 0.1 + 0.1 * np.sin(3 * yy.ravel() + xx.ravel())}}
    patterns = lib.simulate(truth, rng).reshape(12, 12, -1)
    vol = xr.Dataset({"intensity": (("y", "x", "q"), patterns)},
                     coords={"y": np.arange(12) * 0.03, "x": np.arange(12) * 0.03, "q": lib.q})
    vol_url = storage.write_store(vol.chunk({"y": 6}), str(tmp_path / "volume.zarr"), stage="volume")
    from xrdscale.pqnet.predict import predict

    maps = storage.open_store(predict(model_url, vol_url, str(tmp_path / "maps.zarr")), stage="maps")
    for phase, var in [("NCA", "scale"), ("Al", "scale"), ("NCA", "a"), ("NCA", "c")]:
        got = maps[var].sel(phase=phase).values.ravel()
        assert np.corrcoef(got, truth[phase][var])[0, 1] >= 0.9, (phase, var)
    assert np.isnan(maps["a"].sel(phase="Al").values).all() and np.isnan(maps["size"].values).all()


@pytest.fixture(scope="module")
def tiny_library(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    (root / "lib.yaml").write_text(YAML)
    return make_library(str(root / "lib.yaml"), str(root / "lib.zarr"), n=300, block=150), root


EPOCH = re.compile(r"^member (\d)/2 \(seed (\d)\): epoch (\d)/2, loss \d+\.\d{4}, val \d+\.\d{4}, "
                   r"\d+\.\d s/epoch, (at most \d+ (s|min \d+ s) left|done)")


def _epoch_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "xrdscale.pqnet.train" and "epoch" in r.getMessage()]


def test_cuda_without_a_gpu_trains_on_the_cpu_logs_every_epoch_and_leaves_torch_as_it_was(tiny_library, caplog,
                                                                                           monkeypatch):
    """The one device rule (no ConfigError), an INFO line per epoch, no global torch state left changed."""
    import torch

    from xrdscale.runtime import devices

    lib_url, root = tiny_library
    devices.clear_cache()
    monkeypatch.setattr(devices, "cuda_problem", lambda index=None: "torch sees no CUDA device")
    threads, rng_state = torch.get_num_threads(), torch.random.get_rng_state()
    with caplog.at_level(logging.INFO, logger="xrdscale"):
        train_ensemble(lib_url, str(root / "model-cpu"), ensemble=2, epochs=2, batch=64, device="cuda",
                       parallel=False, model_options=SMALL)
    devices.clear_cache()
    assert open_entry(str(root / "model-cpu")).config["device"] == "cpu"
    assert [m for m in caplog.messages if "CUDA is not usable" in m] == [
        "pqnet train: CUDA is not usable here (torch sees no CUDA device); running on the CPU"]
    lines = _epoch_lines(caplog)
    assert len(lines) == 4 and all(EPOCH.match(line) for line in lines), lines
    assert [EPOCH.match(line).group(1, 3) for line in lines] == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng_state)


@pytest.mark.slow
def test_members_on_ray_stream_their_epochs_to_the_driver(tiny_library, caplog):
    from xrdscale.runtime import ray as ray_runtime

    lib_url, root = tiny_library
    ray = ray_runtime.ensure(num_cpus=2)
    try:
        with caplog.at_level(logging.INFO, logger="xrdscale.pqnet.train"):
            train_ensemble(lib_url, str(root / "model-ray"), ensemble=2, epochs=2, batch=64, device="cpu",
                           parallel=True, model_options=SMALL)
    finally:
        ray.shutdown()
    lines = _epoch_lines(caplog)
    assert sorted(EPOCH.match(line).group(1, 3) for line in lines) == [("1", "1"), ("1", "2"), ("2", "1"),
                                                                       ("2", "2")], lines
    # logged by the driver as the epochs came, not after the members returned
    times = [r.created for r in caplog.records if r.name == "xrdscale.pqnet.train" and "epoch 1/2" in r.getMessage()]
    done = [r.created for r in caplog.records if r.name == "xrdscale.pqnet.train" and "epoch 2/2" in r.getMessage()]
    assert min(times) < max(done)
