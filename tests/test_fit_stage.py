"""The batched full-profile fit: torch model == numpy model, LM recovers known parameters, the stage and compare."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from _builders import tiny_spec, write_random_entry
from xrdscale.exceptions import ConfigError, InputError
from xrdscale.fitting.batch import fit_batch, noise_weights
from xrdscale.fitting.torch_model import PatternModel
from xrdscale.io import contracts, storage
from xrdscale.physics.pattern import simulate_patterns
from xrdscale.physics.phaselib import PhaseLibrary
from xrdscale.stages.fit import fit_maps, read_compare

#: Two phases of the packaged NCA library (xrdscale/data/phases/nca.yaml), on a coarser grid.
LIBRARY = """version: 1
wavelength: 0.130509
q_grid: {min: 1.16, max: 2.84, npt: 400}
instrument: {U: 0.0, V: 0.0, W: 4.0e-4, X: 0.0}
background: {chebyshev_order: 2, amplitude: [0.0, 0.05]}
phases:
  NCA: {builtin: NCA, scale: [0.05, 1], a: [2.810, 2.875], c: [14.15, 14.55], size_nm: [60, 1000]}
  Al: {builtin: Al, scale: [0, 1], a: [4.03, 4.07], size_nm: [60, 1000]}
"""
#: Scale factor that makes the patterns counts of ~10⁴ at the strongest peak (Poisson noise in counts).
COUNTS = 0.05


def counts_patterns(lib: PhaseLibrary, n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict, np.ndarray]:
    labels = lib.sample(n, rng)
    for d in labels.values():
        d["scale"] = d["scale"] * COUNTS
    bg = np.c_[rng.uniform(50, 200, n), rng.uniform(-20, 20, n), rng.uniform(-10, 10, n)]
    clean = simulate_patterns(lib.q, lib.phases, labels, lib.instrument_model(), background=bg).astype(float)
    return rng.poisson(np.clip(clean, 0, None)).astype(np.float32), labels, bg


def write_patterns(url: str, q: np.ndarray, y: np.ndarray) -> str:
    n = y.shape[0]
    ds = xr.Dataset({"intensity": (("frame", "q"), y.astype(np.float32))},
                    coords={"q": ("q", q, {"units": "1/angstrom"}),
                            "angle": ("frame", np.linspace(0, 180, n, endpoint=False), {"units": "deg"}),
                            "translation": ("frame", np.linspace(-1, 1, n), {"units": "mm"})})
    return storage.write_store(ds, url, stage="patterns")


def test_torch_model_matches_numpy(rng):
    lib = PhaseLibrary.load("xrdscale/data/phases/nca.yaml")
    model = PatternModel(lib)
    labels = lib.sample(12, rng)
    bg = np.c_[rng.uniform(0, 2e3, 12), rng.uniform(-200, 200, (12, 2))]
    ref = simulate_patterns(lib.q, lib.phases, labels, lib.instrument_model(), background=bg).astype(float)
    got = model(torch.as_tensor(model.pack(labels, bg))).numpy()
    err = np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert err.max() < 1e-4


def test_lm_recovers_known_parameters(rng):
    lib = PhaseLibrary.from_text(LIBRARY)
    model = PatternModel(lib)
    y, labels, bg = counts_patterns(lib, 24, rng)
    res = fit_batch(model, y, max_iterations=100)
    ok = res.converged
    assert ok.mean() > 0.9                                       # 24 of 24 at the time of writing
    assert np.median(res.iterations) < 20                        # 6
    assert np.all(res.params[:, [model.index(p, "scale") for p in lib.phase_names]] >= 0)
    assert abs(np.median(res.chi2[ok]) - 1) < 0.1
    assert np.median(res.rwp) < 0.1
    for phase, key in (("NCA", "a"), ("NCA", "c"), ("Al", "a")):
        j = model.index(phase, key)
        assert j is not None
        err = res.params[ok, j] - labels[phase][key][ok]
        z = err / res.std[ok, j]
        lo, hi = getattr(lib.spec.phases[phase], key)
        assert np.sqrt(np.mean(z**2)) < 1.5, (phase, key)          # errors as the std errors say
        assert np.mean(np.abs(z) < 3) > 0.9, (phase, key)
        assert np.median(np.abs(err)) < 0.01 * (hi - lo), (phase, key)   # and inside 1 % of the range
    for phase in lib.phase_names:                                # sizes (fitted as 1/size) as their std errors say
        j = model.index(phase, "size_nm")
        assert j is not None
        z = (res.params[ok, j] - labels[phase]["size_nm"][ok]) / res.std[ok, j]
        assert np.all(np.isfinite(z)), phase                     # determined: a size in nm is no "zero column"
        assert np.sqrt(np.mean(z**2)) < 2.0, phase
        assert np.mean(np.abs(z) < 3) > 0.85, phase


def test_fit_stage_writes_maps(tmp_path, rng, dask_client, xrdscale_cli):
    lib_path = tmp_path / "lib.yaml"
    lib_path.write_text(LIBRARY)
    lib = PhaseLibrary.load(str(lib_path))
    y, labels, _ = counts_patterns(lib, 10, rng)
    y[3] = 0.0                                            # one empty pixel
    data = write_patterns(str(tmp_path / "patterns.zarr"), lib.q, y)
    out = str(tmp_path / "maps.zarr")
    code, stdout, err = xrdscale_cli("fit", "run", str(lib_path), data, out, "--max-iterations", "40",
                                     "--batch", "4")
    assert code == 0, err
    assert contracts.check(out) == ("maps", [])
    maps = storage.open_store(out).load()
    assert maps["scale"].dims == ("phase", "frame")
    assert maps["converged"].dtype == bool and not bool(maps["converged"][3])
    assert np.isnan(maps["scale"].values[:, 3]).all() and int(maps["iterations"][3]) == 0
    scale = maps["scale"].values[:, [i for i in range(10) if i != 3]]
    assert np.all(scale >= 0)
    assert np.isnan(maps["c"].sel(phase="Al")).all()       # Al has no c
    a_err = maps["a"].sel(phase="NCA").values - labels["NCA"]["a"]
    keep = np.arange(10) != 3
    assert np.nanmedian(np.abs(a_err[keep])) < 0.01 * (2.875 - 2.810)

    # the same through the function with a client, and a comparison of the two (offset 0)
    other = fit_maps(str(lib_path), data, str(tmp_path / "maps2.zarr"), client=dask_client, progress=False,
                     max_iterations=40, batch=5)
    cmp = str(tmp_path / "cmp.zarr")
    code, _, err = xrdscale_cli("fit", "compare", out, other, cmp)
    assert code == 0, err
    table = read_compare(cmp)
    row = table[(table.phase == "NCA") & (table.parameter == "a")].iloc[0]
    assert row["n"] == 9 and row["mae"] < 1e-3


def test_fit_compare_known_offset(tmp_path, rng, xrdscale_cli):
    n = 20
    base = {"phase": ["A", "B"]}
    std = np.full((2, n), 0.01)

    def maps(offset: float) -> xr.Dataset:
        data = {}
        for var in ("scale", "a", "c", "size"):
            vals = rng.normal(1.0, 0.1, (2, n)) * 0 + 1.0 + offset
            data[var] = (("phase", "frame"), vals.astype(np.float32))
            data[f"{var}_std"] = (("phase", "frame"), std.astype(np.float32))
        return xr.Dataset(data, coords=base)

    a = storage.write_store(maps(0.05), str(tmp_path / "a.zarr"), stage="maps")
    b = storage.write_store(maps(0.0), str(tmp_path / "b.zarr"), stage="maps")
    out = str(tmp_path / "cmp.zarr")
    code, _, err = xrdscale_cli("fit", "compare", a, b, out)
    assert code == 0, err
    table = read_compare(out)
    assert len(table) == 8
    assert np.allclose(table["bias"], 0.05, atol=1e-6) and np.allclose(table["mae"], 0.05, atol=1e-6)
    assert np.allclose(table["frac_outside"], 1.0)        # 0.05 > 2·sqrt(2)·0.01
    ds = storage.open_store(out)
    assert ds["a_diff"].dims == ("phase", "frame")


def test_fit_rejects_bad_input(tmp_path, rng):
    lib_path = tmp_path / "lib.yaml"
    lib_path.write_text(LIBRARY)
    lib = PhaseLibrary.load(str(lib_path))
    out = str(tmp_path / "maps.zarr")
    nan = write_patterns(str(tmp_path / "nan.zarr"), lib.q, np.full((4, lib.q.size), np.nan))
    with pytest.raises(InputError, match="empty"):
        fit_maps(str(lib_path), nan, out, progress=False)
    assert not storage.is_complete(out)
    narrow = write_patterns(str(tmp_path / "narrow.zarr"), lib.q[50:], np.ones((4, lib.q.size - 50)))
    with pytest.raises(InputError, match="not covered"):
        fit_maps(str(lib_path), narrow, out, progress=False)
    assert not storage.is_complete(out)
    spec = tiny_spec(64)
    model = str(tmp_path / "model")
    write_random_entry(model, spec, np.linspace(1.2, 2.8, 64))   # phases NCA, Al
    other = tmp_path / "other.yaml"
    other.write_text(LIBRARY.replace("  Al:", "  Cu:").replace("builtin: Al", "builtin: Cu"))
    data = write_patterns(str(tmp_path / "ok.zarr"), lib.q, np.ones((4, lib.q.size)))
    with pytest.raises(InputError, match="predicts phases"):
        fit_maps(model, data, out, phases=str(other), progress=False)
    assert not storage.is_complete(out)
    with pytest.raises(ConfigError, match="min_scale"):   # an ROI by PQ-Net's scales needs PQ-Net
        fit_maps(str(lib_path), data, out, min_scale={"NCA": 0.3}, progress=False)
    with pytest.raises(ConfigError, match="min_scale"):
        fit_maps(model, data, out, phases=str(lib_path), min_scale={"Fe": 0.3}, progress=False)
    assert not storage.is_complete(out)


def test_noise_weights_measure_white_noise_under_smooth_peaks(rng):
    """One weight per pattern, 1/σ², from the pattern itself: peaks barely bias it, the unit cancels."""
    q = np.linspace(1, 3, 800)
    peaks = 50 * np.exp(-0.5 * ((q[None, :] - np.array([[1.5], [2.2]])) / 0.02) ** 2).sum(axis=0)
    sigma = np.array([0.5, 2.0, 8.0])
    y = peaks[None, :] - 3.0 + sigma[:, None] * rng.standard_normal((3, q.size))   # negative values, like FBP
    y[1, :10] = np.nan
    w = noise_weights(y)
    est = 1 / np.sqrt(w[:, 20])
    assert est == pytest.approx(sigma, rel=0.1)
    assert (w[1, :10] == 0).all() and np.ptp(w[0]) == 0
    assert noise_weights(1000 * y)[:, 20] == pytest.approx(w[:, 20] / 1e6, rel=1e-9)


def test_screened_starts_escape_the_wrong_minimum_of_a_far_lattice_start(rng):
    """Started on the far side of the box, LM alone fits peaks onto their neighbours; screening does not."""
    lib = PhaseLibrary.from_text(LIBRARY)
    y, labels, _ = counts_patterns(lib, 24, np.random.default_rng(4))
    model = PatternModel(lib, lib.q)
    start = np.full((24, model.n_params), np.nan)
    for key in ("a", "c"):
        j = model.index("NCA", key)
        lo, hi = model.params[j].lower, model.params[j].upper
        start[:, j] = np.where(labels["NCA"][key] > (lo + hi) / 2, lo, hi)
    ja = model.index("NCA", "a")
    wrong = {}
    for starts in (1, 8):
        res = fit_batch(model, y, start, starts=starts)
        z = np.abs(res.params[:, ja] - labels["NCA"]["a"]) / res.std[:, ja]
        wrong[starts] = float(np.mean(~(z < 5)))
    assert wrong[1] >= 0.1 and wrong[8] == 0.0, wrong


def test_counts_weights_are_poisson_in_any_unit(rng):
    """Estimated intensity per count: the same weights (up to one factor) for counts and for counts / 10⁴."""
    from xrdscale.fitting.batch import counting_weights

    lib = PhaseLibrary.from_text(LIBRARY)
    y, _, _ = counts_patterns(lib, 4, rng)
    w1, w2 = counting_weights(y), counting_weights(y / 1e4)
    ratio = w2 / w1
    assert np.allclose(ratio, ratio[:, :1], rtol=1e-6) and ratio[0, 0] == pytest.approx(1e8, rel=1e-6)
    g = 1 / (w1 * np.maximum(y, 1))                   # the gain of counts: about one (curvature inflates it)
    assert np.all((np.median(g, axis=1) > 0.8) & (np.median(g, axis=1) < 1.6))
