"""PQ-Net inference on Ray actors: maps from volume and patterns stores, failures, restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import xarray as xr

from xrdscale.io import contracts, storage
from xrdscale.exceptions import InputError
from xrdscale.pqnet.model import ModelSpec
from xrdscale.pqnet.predict import predict
from xrdscale.pqnet.registry import open_entry
from xrdscale.pqnet.serve import ServerPool

from _builders import write_random_entry

ray = pytest.importorskip("ray")

Q = np.linspace(1.2, 2.8, 64)


@pytest.fixture(scope="module")
def model_url(tmp_path_factory):
    spec = ModelSpec(phases=("NCA", "Al"), routes=(("NCA", "scale"), ("NCA", "a"), ("NCA", "c"), ("Al", "scale")),
                     npt=Q.size, target_mean=(0.5, 2.84, 14.3, 0.2), target_std=(0.2, 0.02, 0.1, 0.1),
                     pattern_channels=4, phase_channels=3, hidden=8)
    url = str(tmp_path_factory.mktemp("reg") / "model")
    write_random_entry(url, spec, Q, n=3)
    return url


def write_volume(url: str, data: np.ndarray, q: np.ndarray) -> str:
    ny, nx, _ = data.shape
    ds = xr.Dataset({"intensity": (("y", "x", "q"), data.astype(np.float32))},
                    coords={"y": np.arange(ny) * 0.03, "x": np.arange(nx) * 0.03, "q": q})
    return storage.write_store(ds.chunk({"y": 3, "x": 4, "q": 16}), url, stage="volume")


def reference(model_url: str, patterns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bare torch forward pass of every member, mean and std over members."""
    entry = open_entry(model_url)
    with torch.inference_mode():
        out = np.stack([entry.load_member(i)(torch.from_numpy(patterns.astype(np.float32))).numpy()
                        for i in range(len(entry.members))])
    return out.mean(0), out.std(0)


def check_maps(ds: xr.Dataset, mean: np.ndarray, std: np.ndarray, pix_shape: tuple[int, ...]) -> None:
    assert list(ds["phase"].values) == ["NCA", "Al"]
    for j, (phase, var) in enumerate([("NCA", "scale"), ("NCA", "a"), ("NCA", "c"), ("Al", "scale")]):
        np.testing.assert_allclose(ds[var].sel(phase=phase).values, mean[:, j].reshape(pix_shape), rtol=1e-4,
                                   atol=1e-5)
        np.testing.assert_allclose(ds[var + "_std"].sel(phase=phase).values, std[:, j].reshape(pix_shape),
                                   rtol=1e-3, atol=1e-5)
    assert np.isnan(ds["c"].sel(phase="Al").values).all() and np.isnan(ds["size"].values).all()
    assert (ds["scale"].values >= 0).all()  # the scale outputs are a softplus: never negative
    # quality maps over the pixel dims, from the same tasks (the entry's library rebuilds from its text)
    for var in ("rwp", "chi2", "ood"):
        assert ds[var].dims == tuple(ds["scale"].dims[1:]), var
    assert np.isfinite(ds["rwp"].values).all() and (ds["rwp"].values >= 0).all()
    assert ds["ood"].dtype == np.uint8 and set(np.unique(ds["ood"].values)) <= set(range(8))
    assert list(ds["ood"].attrs["flag_masks"]) == [1, 2, 4]
    assert ds["ood"].attrs["flag_meanings"] == "residual ensemble_spread range_edge"


def test_volume_to_maps_with_two_actors_matches_bare_torch(ray_local, model_url, tmp_path, rng):
    data = rng.uniform(0.5, 5.0, (5, 7, Q.size))
    vol = write_volume(str(tmp_path / "volume.zarr"), data, Q)
    out = str(tmp_path / "maps.zarr")
    predict(model_url, vol, out, actors=2, batch=8)
    ds = storage.open_store(out, stage="maps")
    assert ds["scale"].dims == ("phase", "y", "x")
    check_maps(ds, *reference(model_url, data.reshape(-1, Q.size)), (5, 7))
    assert ds.attrs["model_id"] == open_entry(model_url).id
    problems = contracts.check_store(out, "maps")
    assert problems == [], problems


def test_patterns_store_and_interpolation_to_the_model_grid(ray_local, model_url, tmp_path, rng):
    q_data = np.linspace(1.0, 3.0, 150)
    frames = rng.uniform(0.5, 5.0, (11, q_data.size))
    ds = xr.Dataset({"intensity": (("frame", "q"), frames.astype(np.float32))},
                    coords={"q": q_data, "angle": ("frame", np.linspace(0, 90, 11)),
                            "translation": ("frame", np.zeros(11))})
    src = storage.write_store(ds, str(tmp_path / "patterns.zarr"), stage="patterns")
    out = str(tmp_path / "maps.zarr")
    predict(model_url, src, out, engine="torch", batch=4)
    maps = storage.open_store(out, stage="maps")
    assert maps["scale"].dims == ("phase", "frame") and "angle" in maps.coords
    interp = np.stack([np.interp(Q, q_data, f.astype(np.float32)) for f in frames])
    check_maps(maps, *reference(model_url, interp), (11,))


def test_q_grid_not_covered_is_refused(ray_local, model_url, tmp_path, rng):
    q = np.linspace(1.5, 3.5, 64)
    vol = write_volume(str(tmp_path / "volume.zarr"), rng.uniform(1, 2, (3, 4, 64)), q)
    out = str(tmp_path / "maps.zarr")
    with pytest.raises(InputError, match=r"not covered by the q range \[1.5, 3.5\]"):
        predict(model_url, vol, out)
    assert not storage.exists(out)
    res = subprocess.run([sys.executable, "-m", "xrdscale.cli", "pqnet", "predict", model_url, vol, out],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "not covered" in res.stderr


def test_nan_pattern_is_named_and_no_maps_marked_complete(ray_local, model_url, tmp_path, rng):
    data = rng.uniform(1, 2, (6, 8, Q.size))
    data[4, 5, 10] = np.nan
    vol = write_volume(str(tmp_path / "volume.zarr"), data, Q)
    out = str(tmp_path / "maps.zarr")
    with pytest.raises(InputError, match="y=4, x=5"):
        predict(model_url, vol, out)
    assert not storage.is_complete(out)


def test_corrupt_model_is_refused_before_serving(ray_local, model_url, tmp_path, rng):
    import shutil

    bad = tmp_path / "bad-model"
    shutil.copytree(model_url, bad)
    onnx = bad / "members" / "member_002.onnx"
    onnx.write_bytes(b"garbage")
    vol = write_volume(str(tmp_path / "volume.zarr"), rng.uniform(1, 2, (3, 4, Q.size)), Q)
    with pytest.raises(InputError, match="member_002.onnx does not match"):
        predict(str(bad), vol, str(tmp_path / "maps.zarr"))
    assert not storage.exists(str(tmp_path / "maps.zarr"))


def test_killed_actors_are_restarted_and_the_run_completes(ray_local, model_url, tmp_path, rng):
    data = rng.uniform(0.5, 5.0, (6, 8, Q.size))
    vol = write_volume(str(tmp_path / "volume.zarr"), data, Q)
    out = str(tmp_path / "maps.zarr")
    with ServerPool(model_url, actors=2) as pool:
        before = pool.pids()
        os.kill(before[0], signal.SIGKILL)
        ray.kill(pool.handles[1], no_restart=False)
        predict(model_url, vol, out, pool=pool, batch=4)
        after = pool.pids()
    assert after[0] != before[0] and after[1] != before[1]
    check_maps(storage.open_store(out, stage="maps"), *reference(model_url, data.reshape(-1, Q.size)), (6, 8))


def test_a_pool_waits_for_resources_another_pool_holds(ray_local, model_url, caplog):
    """A second dataset's actors wait for the first's to finish, however long past ``timeout`` that is."""
    import threading
    import time

    first = ServerPool(model_url, actors=1, threads=2, device="cpu")   # every CPU of the local instance
    started: list[ServerPool] = []
    with caplog.at_level("INFO", logger="xrdscale.pqnet.serve"):
        waiter = threading.Thread(target=lambda: started.append(
            ServerPool(model_url, actors=1, threads=2, device="cpu", timeout=1.0)))
        waiter.start()
        time.sleep(4.0)                       # several timeouts go by: the second pool still waits
        assert not started and waiter.is_alive()
        first.close()
        waiter.join(timeout=120)
    assert started, "the second pool did not start once the first released its CPUs"
    started[0].close()
    assert sum("wait for Ray resources in use" in r.getMessage() for r in caplog.records) == 1
