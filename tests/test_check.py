"""`xrdscale check` and xrdscale.io.contracts: every kind valid, planted defects named, exit status."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import hdf5plugin
import numpy as np
import pytest
import xarray as xr
import yaml
from typer.testing import CliRunner

from xrdscale.cli import app
from xrdscale.io import contracts, storage

PHASES = os.path.join(os.path.dirname(contracts.__file__), os.pardir, "data", "phases", "nca.yaml")
Q = np.linspace(1.2, 3.0, 8)


def cli(*args: str):
    res = CliRunner().invoke(app, ["check", *args])
    return res.exit_code, res.stdout


# -- data of every kind --------------------------------------------------------------------

def patterns_ds(n=6):
    return xr.Dataset({"intensity": (("frame", "q"), np.ones((n, Q.size), np.float32))},
                      coords={"q": Q, "angle": ("frame", np.linspace(0, 150, n)),
                              "translation": ("frame", np.linspace(-0.2, 0.2, n))})


def sinogram_ds(angles=np.arange(0.0, 180.0, 30.0), n_t=7):
    t = (np.arange(n_t) - (n_t - 1) / 2) * 0.1
    ds = xr.Dataset({"intensity": (("angle", "translation", "q"), np.ones((angles.size, n_t, Q.size), np.float32))},
                    coords={"angle": angles, "translation": t, "q": Q})
    ds["translation"].attrs["units"] = "mm"
    ds["angle"].attrs["units"] = "deg"
    return ds


def volume_ds(n=5):
    c = np.arange(n) * 0.03
    return xr.Dataset({"intensity": (("y", "x", "q"), np.ones((n, n, Q.size), np.float32))},
                      coords={"y": c, "x": c, "q": Q})


def maps_ds(n=4, std=True):
    c = np.arange(n) * 0.03
    data = {}
    for v in contracts.MAP_PARAMS:
        data[v] = (("phase", "y", "x"), np.full((2, n, n), 0.5, np.float32))
        if std:
            data[v + "_std"] = (("phase", "y", "x"), np.full((2, n, n), 0.1, np.float32))
    data["c"][1][:] = np.nan  # no c for the cubic phase
    data["weight_fraction"] = (("phase", "y", "x"), np.full((2, n, n), 0.5, np.float32))
    return xr.Dataset(data, coords={"phase": ["NCA", "Al"], "y": c, "x": c})


def unrolled_ds():
    return xr.Dataset({"scale": (("phase", "radius", "angle"), np.ones((2, 4, 8)))},
                      coords={"phase": ["NCA", "Al"], "radius": np.arange(4) * 0.1, "angle": np.arange(8) * 45.0})


def regions_ds(n=4):
    c = np.arange(n) * 0.03
    region = np.array([[-1, 0, 1, 2]] * n, dtype=np.int8)
    return xr.Dataset({"region": (("y", "x"), region)}, coords={"y": c, "x": c})


def truth_ds():
    ds = maps_ds(std=False)
    ds["region"] = (("y", "x"), np.zeros((4, 4), np.int8))
    return ds


STORES = {"patterns": patterns_ds, "sinogram": sinogram_ds, "volume": volume_ds, "maps": maps_ds,
          "unrolled": unrolled_ds, "regions": regions_ds, "truth": truth_ds}


def write_raw(path, *, dtype=np.int32, compress=True, drop=None, n=6):
    with h5py.File(path, "w") as f:
        kw = hdf5plugin.Bitshuffle(cname="lz4") if compress else {}
        f.create_dataset("entry/data/data", data=np.ones((n, 8, 8), dtype=dtype), chunks=(1, 8, 8), **kw)
        vectors = {"entry/instrument/monitor/data": np.full(n, 1e5),
                   "entry/sample/rotation_angle": np.linspace(0, 150, n),
                   "entry/sample/translation": np.linspace(-0.2, 0.2, n)}
        for key, vec in vectors.items():
            if key != drop:
                f.create_dataset(key, data=vec)
    return str(path)


def write_spec(path, **over):
    spec = {"version": 1, "campaign": "test", "workspace": "./work", "geometry": {"poni": "calib/det.poni"},
            "phases": "phases/lib.yaml",
            "cycles": [{"cycle": 1, "datasets": [
                {"id": "c1-charged", "state": "charged", "voltage": 4.2, "raw": "raw/a.nxs"}]}]}
    spec.update(over)
    path.write_text(yaml.safe_dump(spec))
    return str(path)


# -- valid inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(STORES))
def test_every_store_kind_valid(tmp_path, kind):
    url = storage.write_store(STORES[kind](), str(tmp_path / f"{kind}.zarr"), stage=kind)
    assert contracts.check(url) == (kind, [])
    code, out = cli(url)
    assert code == 0 and out.strip() == f"OK {url} ({kind})"


def test_files_of_every_kind_valid(tmp_path):
    from _builders import tiny_spec, write_random_entry

    raw = write_raw(tmp_path / "scan.nxs")
    spec = write_spec(tmp_path / "campaign.yaml")
    model = str(tmp_path / "model")
    write_random_entry(model, tiny_spec(), np.linspace(1.2, 2.8, 64))
    for url, kind in ((raw, "raw"), (PHASES, "phases"), (spec, "spec"), (model, "model")):
        assert contracts.check(url) == (kind, []), url
    code, out = cli(raw, PHASES, spec, model)
    assert code == 0, out
    assert out.splitlines() == [f"OK {raw} (raw)", f"OK {PHASES} (phases)", f"OK {spec} (spec)",
                                f"OK {model} (model)"]


def test_detection_without_suffix_and_from_variables(tmp_path):
    raw = write_raw(tmp_path / "scan.data")  # HDF5 signature, no suffix
    assert contracts.detect(raw) == "raw"
    plain = str(tmp_path / "plain.zarr")
    sinogram_ds().to_zarr(plain, consolidated=False)  # no attrs['stage']: told by its variables
    assert contracts.check(plain) == ("sinogram", [])
    assert contracts.dataset_kind(truth_ds()) == "truth" and contracts.dataset_kind(maps_ds()) == "maps"


# -- planted defects -------------------------------------------------------------------------

def test_store_defects_named(tmp_path):
    ds = maps_ds().drop_vars("c_std")
    ds["rwp"] = (("phase", "y", "x"), np.zeros((2, 4, 4)))
    maps = storage.write_store(ds, str(tmp_path / "maps.zarr"), stage="maps")
    sino = storage.write_store(sinogram_ds().transpose("translation", "angle", "q"), str(tmp_path / "s.zarr"),
                               stage="sinogram")
    turn = storage.write_store(sinogram_ds(np.arange(0.0, 360.0, 30.0)), str(tmp_path / "t.zarr"), stage="sinogram")
    patt = storage.write_store(patterns_ds().rename(intensity="counts"), str(tmp_path / "p.zarr"), stage="patterns")
    reg = regions_ds()
    reg["region"][0, 0] = 7
    regions = storage.write_store(reg, str(tmp_path / "r.zarr"), stage="regions")
    code, out = cli(maps, sino, turn, patt, regions)
    assert code == 1
    lines = out.splitlines()
    assert f"{maps}: no variable 'c_std'; expected c_std (phase, y, x) (found {sorted(ds.data_vars)})" in lines
    assert f"{maps}: variable rwp has dims (phase, y, x); expected (y, x)" in lines
    assert f"{sino}: variable intensity has dims (translation, angle, q); expected (angle, translation, q)" in lines
    assert f"{turn}: coordinate angle spans 0 … 330 deg; expected strictly ascending angles in [0, 180)" in lines
    assert f"{patt}: no variable 'intensity'; expected intensity (frame, q) (found ['counts'])" in lines
    assert f"{regions}: variable region holds codes [7]; expected -1 outside, 0 HL, 1 DL, 2 IN" in lines
    assert not any(line.startswith("OK ") for line in lines)


def test_incomplete_and_mislabelled_stores(tmp_path):
    url = storage.write_store(volume_ds(), str(tmp_path / "v.zarr"), stage="volume")
    first = cli(url, "--kind", "sinogram")[1].splitlines()[0]
    assert first == f"{url}: attrs['stage'] is 'volume'; expected 'sinogram'"
    storage.clear(os.path.join(url, storage.MARKER))
    code, out = cli(url)
    assert code == 1
    assert out.splitlines() == [f"{url}: incomplete: xrdscale started this store and never marked it complete "
                                f"(no {storage.MARKER} marker); run the stage that writes it again"]


def test_raw_defects_named(tmp_path):
    floats = write_raw(tmp_path / "floats.nxs", dtype=np.float32)
    plain = write_raw(tmp_path / "plain.nxs", compress=False)
    nomon = write_raw(tmp_path / "nomon.nxs", drop="entry/instrument/monitor/data")
    with h5py.File(tmp_path / "short.nxs", "w") as f:
        f.create_dataset("entry/data/data", data=np.ones((4, 8, 8), np.uint16), compression="gzip")
        f.create_dataset("entry/instrument/monitor/data", data=np.ones(4))
        f.create_dataset("entry/sample/rotation_angle", data=np.arange(3.0))
        f.create_dataset("entry/sample/translation", data=np.zeros(4))
    short = str(tmp_path / "short.nxs")
    (tmp_path / "junk.nxs").write_text("not hdf5")
    code, out = cli(floats, plain, nomon, short, str(tmp_path / "junk.nxs"))
    assert code == 1
    lines = out.splitlines()
    assert f"{floats}: /entry/data/data has dtype float32; expected integer counts" in lines
    assert (f"{plain}: /entry/data/data is not compressed (stored without filters); expected an HDF5 compression "
            "filter (hdf5plugin Bitshuffle-LZ4, Blosc, LZ4, Zstd, or gzip)") in lines
    assert f"{nomon}: missing /entry/instrument/monitor/data; expected the incident intensity I0 (n_frames)" in lines
    assert f"{short}: /entry/sample/rotation_angle has shape (3,); expected (4,), one value per frame" in lines
    assert any(line.startswith(f"{tmp_path / 'junk.nxs'}: not a readable HDF5/NeXus file") for line in lines)
    assert len(lines) == 5


def test_yaml_and_model_defects_named(tmp_path):
    from _builders import tiny_spec, write_random_entry

    spec = write_spec(tmp_path / "spec.yaml", pipline={"integrate": {}})
    lib = tmp_path / "lib.yaml"
    with open(PHASES) as f:
        lib.write_text(f.read().replace("builtin: Al,", "builtin: Alu,").replace("a: [2.810, 2.875]",
                                                                                  "a: [2.875, 2.810]"))
    model = str(tmp_path / "model")
    write_random_entry(model, tiny_spec(), np.linspace(1.2, 2.8, 64))
    storage.clear(os.path.join(model, storage.MARKER))
    code, out = cli(spec, str(lib), model)
    assert code == 1
    lines = out.splitlines()
    assert any(line.startswith(f"{spec}: pipline: unknown key; valid keys here are: ") for line in lines)
    assert f"{lib}: phases.NCA.a: range [2.875, 2.81] has min > max; write [min, max]" in lines
    assert any(line.startswith(f"{lib}: phases.Al: unknown builtin phase 'Alu'") for line in lines)
    assert any(line.startswith(f"model {model} is a partial registry entry") for line in lines)
    assert len(lines) == 4


def test_missing_unknown_and_bad_kind(tmp_path):
    good = storage.write_store(volume_ds(), str(tmp_path / "v.zarr"), stage="volume")
    (tmp_path / "notes.txt").write_text("hello")
    code, out = cli(good, str(tmp_path / "nothing.zarr"), str(tmp_path / "notes.txt"))
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == f"OK {good} (volume)"
    assert lines[1] == f"{tmp_path / 'nothing.zarr'}: does not exist; check the path or URL"
    assert lines[2].startswith(f"{tmp_path / 'notes.txt'}: not a raw NeXus/HDF5 file")
    broken = storage.write_store(volume_ds(), str(tmp_path / "broken.zarr"), stage="volume")
    with open(os.path.join(broken, "zarr.json"), "w") as f:
        f.write("{not json")
    kind, problems = contracts.check(broken)
    assert kind == "store" and problems[0].startswith(f"{broken}: cannot be opened as a zarr store (")
    assert contracts.check(good, "banana")[1] == [f"{good}: unknown kind 'banana'; expected one of "
                                                  + ", ".join(contracts.KINDS)]


def test_cli_entry_point_exit_status(tmp_path):
    ok = storage.write_store(patterns_ds(), str(tmp_path / "p.zarr"), stage="patterns")
    bad = write_raw(tmp_path / "plain.nxs", compress=False)
    run = [sys.executable, "-m", "xrdscale.cli", "check"]
    proc = subprocess.run([*run, ok], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == f"OK {ok} (patterns)", proc.stderr
    proc = subprocess.run([*run, ok, bad, "--kind", "raw"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert f"{bad}: /entry/data/data is not compressed" in proc.stdout
    proc = subprocess.run([*run, ok, "--kind", "banana"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "--kind 'banana': expected one of raw, patterns" in proc.stderr
