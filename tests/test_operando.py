"""Operando point scans: simulated two-cycle series → integrate → PQ-Net → weight fractions over time → report."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from _builders import train_licx4
from xrdscale.exceptions import InputError
from xrdscale.io import contracts, storage
from xrdscale.io.echem import EchemLog, cycle_numbers, read_echem, steps, write_csv
from xrdscale.simulate.cycling import PHASES, Protocol, cycling_truth

pytest.importorskip("ray")

MAE_LIMIT = 5.0  # wt %, per phase (issue #17)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    from xrdscale.simulate.operando import simulate_operando

    return simulate_operando(str(tmp_path_factory.mktemp("operando")), scan_interval_s=150.0, seed=3)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny 4LiCx ensemble: ~10 s on one core."""
    return train_licx4(tmp_path_factory.mktemp("licx4"))


@pytest.fixture(scope="module")
def result(ray_local, series, model, tmp_path_factory):
    """``xrdscale operando run`` on the simulated series (the command's function, every option given)."""
    from xrdscale.cli.operando import run_cmd

    out = str(tmp_path_factory.mktemp("run"))
    run_cmd(series["raw"], series["echem"], out, model=model, poni=series["poni"], mask=series["mask"], npt=500,
            margin=0.05, truth=series["truth"], ensemble=None)
    return out


def test_recovered_fractions_follow_truth(result, series):
    ds = storage.open_store(storage.join(result, "operando.zarr"), stage="operando").load()
    truth = storage.open_store(series["truth"], stage="truth").load()
    np.testing.assert_allclose(ds["time"].values, truth["time"].values)
    mae = {}
    for p in PHASES:
        err = 100 * (ds["weight_fraction"].sel(phase=p).values - truth["weight_fraction"].sel(phase=p).values)
        mae[p] = float(np.abs(err).mean())
    print("MAE wt %:", {p: round(v, 2) for p, v in mae.items()})
    assert all(v <= MAE_LIMIT for v in mae.values()), mae
    # the bands are the ensemble's spread: finite, non-negative, not all zero
    std = ds["weight_fraction_std"].values
    assert np.isfinite(std).all() and (std >= 0).all() and std.max() > 0
    # the fractions move with the truth (a constant answer would fail): correlation per phase
    for p in PHASES:
        r = np.corrcoef(ds["weight_fraction"].sel(phase=p), truth["weight_fraction"].sel(phase=p))[0, 1]
        assert r > 0.95, (p, r)


def test_store_meets_contract_with_echem_per_frame(result, series):
    url = storage.join(result, "operando.zarr")
    assert contracts.check(url) == ("operando", [])
    ds = storage.open_store(url, stage="operando").load()
    truth = storage.open_store(series["truth"], stage="truth").load()
    assert np.abs(ds["voltage"].values - truth["voltage"].values).max() < 0.05   # log noise + interpolation
    assert (ds["cycle"].values == truth["cycle"].values).all()
    assert (ds["step"].values == truth["step"].values).mean() > 0.97     # steps change between log entries
    assert set(ds["cycle"].values.tolist()) == {1, 2}
    assert ds.sizes["echem"] > ds.sizes["frame"]


def test_report_shows_fractions_against_the_voltage_curve(result):
    import pandas as pd

    html = storage.read_bytes(storage.join(result, "report", "report.html")).decode("utf-8")
    assert html.count("<img") == 2 and "Weight fractions against time with the voltage curve" in html
    assert "Recovered weight fractions against the simulation" in html
    for name in ("operando_time.png", "operando_cycles.png"):
        assert storage.read_bytes(storage.join(result, "report", "figures", name))[:4] == b"\x89PNG"
    table = pd.read_csv(storage.join(result, "report", "fractions.csv"))
    assert {"time_s", "voltage_V", "cycle", "step", "LiC6_wt%", "LiC6_std_wt%", "graphite_truth_wt%"} \
        <= set(table.columns)
    assert set(table["step"]) == {"charge", "discharge", "rest"}


def test_patterns_carry_the_frame_times(result, series):
    ds = storage.open_store(storage.join(result, "patterns.zarr"), stage="patterns")
    with h5py.File(series["raw"], "r") as h5:
        times = h5["entry/data/time"][()]
        start = h5["entry/start_time"][()].decode()
    np.testing.assert_array_equal(ds["time"].values, times)
    assert ds["time"].attrs["units"] == "s" and ds["time"].attrs["start_time"] == start


def test_simulated_cycling_follows_the_paper_sequence():
    p = Protocol()
    t = np.arange(0.0, p.duration_s, 30.0)
    truth = cycling_truth(t, p)
    np.testing.assert_allclose(truth.weight_percent.sum(axis=1), 100.0)
    assert 2.6 <= truth.voltage.min() < 2.7 and 4.15 < truth.voltage.max() <= 4.21
    first = truth.cycle == 1
    charge = first & (truth.step == 1)
    wt = {ph: truth.weight_percent[:, i] for i, ph in enumerate(PHASES)}
    onset = {ph: t[charge][np.argmax(wt[ph][charge] > 10)] for ph in ("LiC30", "LiC12", "LiC6")}
    assert onset["LiC30"] < onset["LiC12"] < onset["LiC6"]
    assert wt["graphite"][charge][0] == 100 and wt["LiC30"][charge].max() == pytest.approx(90)
    end = np.flatnonzero(truth.cycle == 2)[0] - 1
    assert wt["graphite"][end] == pytest.approx(80) and wt["LiC30"][end] == pytest.approx(20)
    signs = np.sign(truth.current[truth.current != 0])
    assert (np.diff(signs) != 0).sum() == 3    # charge, discharge, charge, discharge
    np.testing.assert_array_equal(cycle_numbers(truth.current), truth.cycle)
    np.testing.assert_array_equal(steps(truth.current), truth.step)


def test_echem_csv_and_nexus_logs_agree_with_units_and_aliases(tmp_path, series):
    csv_log = read_echem(series["echem"])
    nx_log = read_echem(series["raw"] + "::/entry/echem")
    for k in ("time", "voltage", "current"):
        np.testing.assert_allclose(getattr(nx_log, k), getattr(csv_log, k), atol=1e-3)
    assert csv_log.start_time == nx_log.start_time
    other = tmp_path / "biologic.csv"
    other.write_text("Time (min);Ewe/V;I [mA]\n0;3.0;0\n1;3.5;1000\n2;4.0;-500\n")
    log = read_echem(str(other))
    np.testing.assert_allclose(log.time, [0, 60, 120])
    np.testing.assert_allclose(log.current, [0, 1.0, -0.5])


@pytest.mark.parametrize("header, missing", [("time/s,voltage/V", "current"), ("t,I/A", "voltage")])
def test_echem_missing_columns_are_named(tmp_path, header, missing):
    path = tmp_path / "log.csv"
    path.write_text(header + "\n" + "\n".join(",".join(["1"] * len(header.split(","))) for _ in range(3)) + "\n")
    with pytest.raises(InputError, match=rf"lacks the column\(s\) {missing}.*needs time, voltage and current"):
        read_echem(str(path))


def test_log_that_does_not_cover_the_scans_fails_before_any_work(xrdscale_cli, series, model, tmp_path):
    log = read_echem(series["echem"])
    half = log.time < 0.5 * log.time[-1]
    short = str(tmp_path / "short.csv")
    write_csv(short, EchemLog(log.time[half], log.voltage[half], log.current[half], "short", log.start_time))
    out = tmp_path / "out"
    code, _, err = xrdscale_cli("operando", "run", series["raw"], short, str(out), "--model", model,
                                "--poni", series["poni"])
    assert code == 1
    assert "covers t = 0" in err and "scans" in err and "give the log of the whole experiment" in err
    assert not out.exists()


def test_raw_file_without_timestamps_fails_with_what_to_do(xrdscale_cli, series, model, tmp_path):
    raw = tmp_path / "untimed.nxs"
    shutil.copy(series["raw"], raw)
    with h5py.File(raw, "a") as h5:
        del h5["entry/data/time"]
    out = tmp_path / "out"
    code, _, err = xrdscale_cli("operando", "run", str(raw), series["echem"], str(out), "--model", model,
                                "--poni", series["poni"])
    assert code == 1 and "/entry/data/time" in err and "acquisition time of every frame" in err
    assert not out.exists()


def test_stage_leaves_nothing_marked_complete_on_bad_input(result, series, model, tmp_path):
    from xrdscale.stages.operando import operando

    patterns = storage.join(result, "patterns.zarr")
    bad = str(tmp_path / "bad.csv")
    (tmp_path / "bad.csv").write_text("time/s,voltage/V\n0,3\n10,3.1\n20,3.2\n")
    out = str(tmp_path / "operando.zarr")
    with pytest.raises(InputError, match="current"):
        operando(model, patterns, bad, out, progress=False)
    assert not storage.exists(out) or not storage.is_complete(out)
    untimed = str(tmp_path / "untimed.zarr")
    storage.write_store(storage.open_store(patterns).drop_vars("time"), untimed, stage="patterns")
    with pytest.raises(InputError, match="no time \\(frame\\) coordinate"):
        operando(model, untimed, series["echem"], out, progress=False)
    assert not storage.exists(out) or not storage.is_complete(out)
