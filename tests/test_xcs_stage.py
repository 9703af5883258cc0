"""``xrdscale xcs emr|calibrate|lithium`` end to end: stores, the physics they must agree with, bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from xrdscale.io import contracts, storage
from xrdscale.xcs import calibration, physics


def _cube(path, counts, energy):
    with h5py.File(path, "w") as h5:
        h5["spectra"] = counts
        h5["energy"] = energy
    return str(path)


def _compton_cube(rng, shape=(6, 5), bins=4000):
    energy = np.linspace(5.0, 120.0, bins)
    pz = physics.pz_au(115.0, energy, 90.0)
    width = rng.uniform(1.2, 2.0, shape)[..., None]
    expected = 40 * np.exp(-0.5 * (pz / width) ** 2) + 10 * np.exp(-0.5 * (pz / 5) ** 2) + 0.5
    return rng.poisson(expected).astype(np.float32), energy


def test_emr_of_an_hdf5_cube_with_the_defaults(tmp_path, rng, xrdscale_cli):
    counts, energy = _compton_cube(rng)
    cube = _cube(tmp_path / "cube.h5", counts, energy)
    out = str(tmp_path / "emr.zarr")
    code, stdout, err = xrdscale_cli("xcs", "emr", cube, out, "--no-mask-bad-pixels")
    assert code == 0, err
    assert contracts.check(out) == ("xcs", [])
    ds = storage.open_store(out, stage="xcs")
    pz = physics.pz_au(115.0, energy, 90.0)  # the window-sum definition, on bin centres
    definition = counts[..., np.abs(pz) < 1].sum(-1) / counts[..., (np.abs(pz) > 1) & (np.abs(pz) < 5)].sum(-1)
    np.testing.assert_allclose(ds["emr"].values[0], definition, rtol=0.03)
    assert np.all(ds["emr_std"].values > 0)
    assert float(ds["region_peak_kev"].values[0, 0]) == pytest.approx(physics.compton_energy(115.0, 90.0), abs=0.1)
    assert float(ds["region_angle_deg"].values[0, 0]) == pytest.approx(90.0, abs=1.0)
    assert ds.attrs["stage"] == "xcs" and "config" in ds.attrs and "xrdscale_version" in ds.attrs
    assert ds["profile"].dims == ("state", "region", "pz")


def test_bad_cubes_give_clear_errors_and_no_complete_store(tmp_path, rng, xrdscale_cli):
    counts, energy = _compton_cube(rng)
    negative = counts.copy()
    negative[2, 3, 100] = -4
    bad = _cube(tmp_path / "negative.h5", negative, energy)
    out = str(tmp_path / "neg.zarr")
    code, _, err = xrdscale_cli("xcs", "emr", bad, out)
    assert code != 0 and "negative counts" in err
    assert not storage.is_complete(out)
    short = _cube(tmp_path / "short.h5", counts[..., :2800], energy[:2800])  # stops at ~85 keV
    code, _, err = xrdscale_cli("xcs", "emr", short, str(tmp_path / "short.zarr"))
    assert code != 0 and "do not cover the Compton window" in err
    assert not storage.exists(str(tmp_path / "short.zarr")) or not storage.is_complete(str(tmp_path / "short.zarr"))


def _cells(tmp_path, xs, *, counts=3e5, hxt=False):
    from xrdscale.xcs.simulate import write_cell

    paths = write_cell(str(tmp_path / "cells"), states=xs, labels=[f"x{x}" for x in xs], shape=(8, 8),
                       counts_per_pixel=counts, hxt=hxt, alpha=0.3, beta=0.2, seed=3)
    return {p.rsplit("/", 1)[-1]: p for p in paths}


@pytest.mark.slow
def test_simulated_cells_emr_is_monotonic_and_the_calibration_recovers_a_held_out_state(tmp_path, xrdscale_cli):
    xs = (0.3, 0.6, 1.0, 0.8)
    files = _cells(tmp_path, xs)
    cubes = [files[f"x{x}.h5"] for x in xs]
    out = str(tmp_path / "emr.zarr")
    code, _, err = xrdscale_cli("xcs", "emr", *cubes, out, "--alpha", "0.3", "--beta", "0.2",
                                *[a for x in xs for a in ("--labels", f"x{x}")])
    assert code == 0, err
    ds = storage.open_store(out, stage="xcs")
    assert ds.attrs["target"] == "cathode" and bool(ds.attrs["separated"])
    region = ds["region_emr"].sel(region="cathode").values
    order = np.argsort(xs)
    assert np.all(np.diff(region[order]) > 0), region  # EMR rises with the Li content
    # calibrate on three states, predict the held-out x = 0.8
    table = tmp_path / "table.csv"
    table.write_text("state,emr,x\n" + "\n".join(f"x{x},{e},{x}" for x, e in zip(xs[:3], region[:3], strict=True)))
    code, stdout, err = xrdscale_cli("xcs", "calibrate", str(table), "--out", str(tmp_path / "cal.json"))
    assert code == 0, err
    assert "R² =" in stdout
    lit = str(tmp_path / "lithium.zarr")
    code, _, err = xrdscale_cli("xcs", "lithium", out, str(tmp_path / "cal.json"), lit)
    assert code == 0, err
    assert contracts.check(lit) == ("xcs", [])
    li = storage.open_store(lit, stage="xcs")
    held = float(li["region_x_li"].sel(state="x0.8"))
    assert held == pytest.approx(0.8, abs=0.03)
    assert float(li["region_x_li_std"].sel(state="x0.8")) < 0.05
    # the per-pixel x map scatters around the truth with its σ
    x_map = li["x_li"].sel(state="x0.8").values
    assert abs(np.nanmean(x_map) - 0.8) < 0.05


def test_plane_files_and_a_dask_cluster_give_the_same_maps(tmp_path, xrdscale_cli, dask_client):
    from xrdscale.stages.xcs import emr_maps

    files = _cells(tmp_path, (0.7,), counts=2e4, hxt=True)
    planes = ",".join(files[f"x0.7_{p}.hxt"] for p in ("R1", "R2", "R3"))
    a = emr_maps([files["x0.7.h5"]], str(tmp_path / "a.zarr"), alpha=0.3, beta=0.2, progress=False)
    b = emr_maps([planes], str(tmp_path / "b.zarr"), alpha=0.3, beta=0.2, client=dask_client, progress=False,
                 labels=["x0.7"])
    da, db = storage.open_store(a, stage="xcs"), storage.open_store(b, stage="xcs")
    np.testing.assert_allclose(da["emr"].values, db["emr"].values, rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(da["region_emr"].values, db["region_emr"].values, rtol=1e-6)


def test_three_plane_separation_needs_alpha_and_beta(tmp_path, xrdscale_cli):
    files = _cells(tmp_path, (0.7,), counts=2e3)
    code, _, err = xrdscale_cli("xcs", "emr", files["x0.7.h5"], str(tmp_path / "o.zarr"), "--separation",
                                "three-plane")
    assert code != 0 and "alpha and beta" in err
    code, _, err = xrdscale_cli("xcs", "emr", files["x0.7.h5"], str(tmp_path / "o.zarr"), "--target", "anode")
    assert code != 0 and "target 'anode'" in err  # not separated: the regions are the planes


def test_calibrate_cli_on_the_papers_table1_and_on_bad_tables(tmp_path, xrdscale_cli):
    table = tmp_path / "table1.csv"
    table.write_text("emr,x\n" + "\n".join(f"{e},{x}" for e, x in calibration.PAPER_TABLE1))
    code, stdout, err = xrdscale_cli("xcs", "calibrate", str(table))
    assert code == 0, err
    r2 = float(stdout.split("R² = ")[1].split(",")[0])
    assert r2 >= 0.99
    assert calibration.load(str(tmp_path / "table1.json")).r2 == pytest.approx(r2, abs=1e-5)
    (tmp_path / "one.csv").write_text("emr,x\n1.2,1.0\n")
    code, _, err = xrdscale_cli("xcs", "calibrate", str(tmp_path / "one.csv"))
    assert code != 0 and "at least two" in err
    (tmp_path / "flat.csv").write_text("emr,x\n1.2,1.0\n1.2,0.5\n")
    code, _, err = xrdscale_cli("xcs", "calibrate", str(tmp_path / "flat.csv"))
    assert code != 0 and "singular" in err


def test_broken_hxt_files_give_clear_errors(tmp_path, rng, xrdscale_cli):
    from xrdscale.xcs import spectra

    counts, energy = _compton_cube(rng, shape=(4, 3), bins=2000)
    good = spectra.write_hxt(str(tmp_path / "good.hxt"), counts.astype(np.float64), energy)
    data = (tmp_path / "good.hxt").read_bytes()
    code, _, err = xrdscale_cli("xcs", "emr", good, str(tmp_path / "good.zarr"), "--no-mask-bad-pixels")
    assert code == 0, err
    (tmp_path / "label.hxt").write_bytes(b"HEXITECX" + data[8:])
    code, _, err = xrdscale_cli("xcs", "emr", str(tmp_path / "label.hxt"), str(tmp_path / "label.zarr"))
    assert code != 0 and "HEXITECH" in err
    (tmp_path / "short.hxt").write_bytes(data[: len(data) - 1000])
    out = str(tmp_path / "short.zarr")
    code, _, err = xrdscale_cli("xcs", "emr", str(tmp_path / "short.hxt"), out)
    assert code != 0 and "truncated" in err.lower()
    assert not storage.exists(out) or not storage.is_complete(out)
