"""Cramér–Rao bounds of PQ-Net outputs: closed form, Monte-Carlo efficiency, replay, registry and CLI."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from xrdscale.physics.pattern import add_background_and_noise, simulate_patterns
from xrdscale.physics.phaselib import PhaseLibrary
from xrdscale.pqnet import identifiability as idf
from xrdscale.pqnet.library import make_library, open_library
from xrdscale.pqnet.registry import open_entry
from xrdscale.pqnet.train import train_ensemble

HEAD = """\
version: 1
wavelength: 0.130509
q_grid: {min: 1.16, max: 2.84, npt: 192}
instrument: {U: 0.0, V: 0.0, W: 4.0e-4, X: 0.0}
"""
# only Al's scale is free: no background, fixed counts
SCALE_ONLY = HEAD + """\
background: {chebyshev_order: 0, amplitude: [0.0, 0.0]}
noise: {counts: [1.0e6, 1.0e6]}
phases:
  Al: {builtin: Al, scale: [0.2, 1.0]}
"""
# NCA scale and a, Al scale and a constant background: a small nonlinear case
TWO_PHASES = HEAD + """\
background: {chebyshev_order: 0, amplitude: [0.02, 0.05]}
noise: {counts: [2.0e5, 2.0e5]}
phases:
  NCA: {builtin: NCA, scale: [0.3, 1], a: [2.810, 2.875]}
  Al: {builtin: Al, scale: [0.05, 0.2]}
"""
# the library of tests/test_pqnet_train.py
TRAIN = HEAD + """\
background: {chebyshev_order: 2, amplitude: [0.0, 0.05]}
noise: {counts: [1.0e5, 1.0e7]}
phases:
  NCA: {builtin: NCA, scale: [0.1, 1], a: [2.810, 2.875], c: [14.15, 14.55]}
  Al: {builtin: Al, scale: [0, 0.2], absent: 0.3}
"""
SMALL = {"pattern_channels": 8, "phase_channels": 8, "hidden": 32}
KEYS = {"r2", "mae", "r2_bound", "mae_bound", "accepted", "weakly_determined"}


def test_scale_only_bound_is_scale_squared_over_the_counts():
    """μ = s·g in counts: F = Σ(g²/μ) = f Σg / s = C / s², so var(s) = s² / C exactly."""
    lib = PhaseLibrary.from_text(SCALE_ONLY)
    gen = idf.draw(lib, 20, np.random.default_rng(1))
    assert [p.key for p in idf.parameters(lib)] == ["Al.scale"]
    bounds = idf.compute_bounds(lib, gen)
    s, c = gen.params["Al"]["scale"], gen.counts
    # the Fisher information written out: counts per bin μ_c = f s g with f = C / Σ(s g), ∂μ_c/∂s = f g
    g = simulate_patterns(lib.q, lib.phases, {"Al": {"scale": np.ones(20)}}, lib.instrument_model()).astype(float)
    f = c / (s * g.sum(axis=1))
    mu_c, d_c = f[:, None] * s[:, None] * g, f[:, None] * g
    ok = mu_c > 0
    info = np.where(ok, d_c ** 2 / np.where(ok, mu_c, 1), 0).sum(axis=1)
    np.testing.assert_allclose(bounds.variance[:, 0], 1 / info, rtol=1e-9)
    np.testing.assert_allclose(bounds.variance[:, 0], s ** 2 / c, rtol=1e-9)
    assert bounds.singular == 0
    summary = bounds.summary()["Al.scale"]
    assert summary["r2_bound"] == pytest.approx(1 - np.mean(s ** 2 / c) / s.var(), rel=1e-9)
    assert summary["mae_bound"] == pytest.approx(np.mean(np.sqrt(2 / np.pi) * s / np.sqrt(c)), rel=1e-9)


def _model(lib: PhaseLibrary, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """μ(θ) and ∂μ/∂θ for θ = (NCA.scale, NCA.a, Al.scale, background c0), written out independently."""
    n = len(theta)
    ins = lib.instrument_model()
    nca, al = lib.phase("NCA"), lib.phase("Al")

    def g_nca(a: np.ndarray) -> np.ndarray:
        return simulate_patterns(lib.q, [nca], {"NCA": {"scale": np.ones(n), "a": a}}, ins).astype(float)

    g0 = g_nca(theta[:, 1])
    h = 2e-4
    dg = (g_nca(theta[:, 1] + h) - g_nca(theta[:, 1] - h)) / (2 * h)
    g_al = simulate_patterns(lib.q, [al], {"Al": {"scale": np.ones(n)}}, ins).astype(float)
    mu = theta[:, :1] * g0 + theta[:, 2:3] * g_al + theta[:, 3:4]
    jac = np.stack([g0, theta[:, :1] * dg, g_al, np.ones_like(g0)], axis=2)
    return mu, jac


def test_maximum_likelihood_estimates_reach_the_bound():
    """Poisson ML (IRLS) over many draws of the library's noise: its variance is the CRB within sampling error."""
    lib = PhaseLibrary.from_text(TWO_PHASES)
    one = idf.draw(lib, 1, np.random.default_rng(7))
    params = idf.parameters(lib)
    assert [p.key for p in params] == ["NCA.scale", "NCA.a", "Al.scale", "background.c0"]
    mu, jac, active = idf.jacobian(lib, one, params)
    var, singular = idf.crb(idf.fisher(mu, jac, one.counts), active)
    assert not singular.any()
    truth = np.array([one.params["NCA"]["scale"][0], one.params["NCA"]["a"][0], one.params["Al"]["scale"][0], 0.0])
    m = 600
    rng = np.random.default_rng(11)
    # the library's noise: the expected pattern scaled to C counts, drawn, scaled back
    y = add_background_and_noise(np.repeat(mu, m, axis=0), lib.q, None, np.repeat(one.counts, m), rng).astype(float)
    clean = _model(lib, truth[None])[0]  # background 0 so far
    truth[3] = one.amplitude[0] * clean.max()  # the library's constant background: amplitude × peak height
    np.testing.assert_allclose(_model(lib, truth[None])[0], mu, rtol=1e-5)
    theta = np.repeat(truth[None], m, axis=0)
    for _ in range(6):  # the Poisson score Σ (y − μ)/μ ∂μ = 0 solved by iteratively reweighted least squares
        mu_t, jac_t = _model(lib, theta)
        w = 1 / np.maximum(mu_t, 1e-9 * mu_t.max())
        lhs = np.einsum("nip,ni,niq->npq", jac_t, w, jac_t)
        rhs = np.einsum("nip,ni->np", jac_t, w * (y - mu_t))
        theta = theta + np.linalg.solve(lhs, rhs[..., None])[..., 0]
    ratio = theta.var(axis=0, ddof=1) / var[0]
    assert np.all((ratio > 0.85) & (ratio < 1.2)), ratio
    assert np.abs(theta.mean(axis=0) - truth).max() < 4 * np.sqrt(var[0] / m).max() + 1e-12


def test_held_out_patterns_are_replayed_and_absent_phases_leave_their_lattice_outputs(tmp_path, caplog):
    (tmp_path / "lib.yaml").write_text(TRAIN.replace("Al: {builtin: Al, scale: [0, 0.2], absent: 0.3}",
                                                     "Al: {builtin: Al, scale: [0, 0.2], absent: 0.3, "
                                                     "a: [4.04, 4.06]}"))
    url = make_library(str(tmp_path / "lib.yaml"), str(tmp_path / "lib.zarr"), n=200, block=64)
    ds, labels = open_library(url)
    idx = np.arange(100, 160)  # across blocks 1 and 2
    bounds = idf.held_out_bounds(ds, idx, labels)
    assert bounds.source == "replayed" and 0.85 < bounds.replay_chi2 < 1.15
    absent = ds["Al__scale"].values[idx] == 0
    assert absent.any()
    j = labels.index(("Al", "a"))
    assert np.isnan(bounds.variance[absent, j]).all() and np.isfinite(bounds.variance[~absent, j]).all()
    assert bounds.summary()["Al.a"]["n_bound"] == int((~absent).sum())
    assert np.isfinite(bounds.variance[:, labels.index(("Al", "scale"))]).all()
    ds.attrs["seed"] = 12345  # not the library's: the labels do not match, fresh patterns are bounded instead
    with caplog.at_level(logging.WARNING, logger="xrdscale.pqnet.identifiability"):
        other = idf.held_out_bounds(ds, idx, labels)
    assert other.source == "resimulated" and other.n == len(idx)
    assert any("cannot replay" in m for m in caplog.messages)


def test_acceptance_rule():
    assert idf.judge(0.985, 0.999) == (True, False)
    assert idf.judge(0.975, 0.999) == (False, False)
    assert idf.judge(0.61, 0.65) == (True, True)     # the separator: within 0.05 of a low bound
    assert idf.judge(0.55, 0.65) == (False, True)
    assert idf.judge(0.93, 0.95) == (True, False)
    assert idf.judge(0.99, None) == (True, None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounds")
    (root / "lib.yaml").write_text(TRAIN)
    return make_library(str(root / "lib.yaml"), str(root / "lib.zarr"), n=300, block=150), root


def test_registry_holds_achieved_and_bound_metrics(tiny):
    lib_url, root = tiny
    train_ensemble(lib_url, str(root / "model"), ensemble=1, epochs=1, batch=64, parallel=False, device="cpu",
                   model_options=SMALL, bounds=24)
    entry = open_entry(str(root / "model"))
    outputs = entry.metrics["outputs"]
    assert set(outputs) == {"NCA.scale", "NCA.a", "NCA.c", "Al.scale"}
    for key, rec in outputs.items():
        assert KEYS <= set(rec), key
        assert 0 < rec["r2_bound"] <= 1 and rec["mae_bound"] > 0
        assert rec["accepted"] == idf.judge(rec["r2"], rec["r2_bound"])[0]
        assert rec["weakly_determined"] is (rec["r2_bound"] < idf.WEAK_R2)
    info = entry.metrics["bounds"]
    assert info["n"] == 24 and info["source"] == "replayed" and info["singular"] == 0
    table = idf.bounds_table(entry)
    assert list(table.columns) == list(idf.TABLE_COLUMNS) and len(table) == 4
    assert table.set_index("output").loc["NCA.a", "r2_bound"] == pytest.approx(outputs["NCA.a"]["r2_bound"])
    doc = json.loads((root / "model" / "model.json").read_text())
    assert idf.bounds_table(doc).equals(table)  # from the model.json document too


def test_pqnet_train_prints_the_bounds(tiny, xrdscale_cli):
    lib_url, root = tiny
    code, out, err = xrdscale_cli("pqnet", "train", lib_url, str(root / "model-cli"), "--ensemble", "1", "--epochs",
                                  "1", "--batch", "64", "--no-parallel", "--device", "cpu", "--bounds", "16")
    assert code == 0, err
    assert "Cramér–Rao bounds on 16 held-out patterns (replayed)" in out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("output "))
    assert lines[head].split() == ["output", "R²", "bound", "MAE", "bound", "accepted", "weakly", "determined"]
    rows = {line.split()[0]: line.split() for line in lines[head + 1:head + 5]}
    assert set(rows) == {"NCA.scale", "NCA.a", "NCA.c", "Al.scale"}
    assert all(len(r) == 7 and r[5] in ("yes", "no") and r[6] in ("yes", "no") for r in rows.values())
    assert "r2_bound" in json.loads((root / "model-cli" / "model.json").read_text())["metrics"]["outputs"]["NCA.a"]


def test_bounds_can_be_skipped(tiny):
    lib_url, root = tiny
    train_ensemble(lib_url, str(root / "model-0"), ensemble=1, epochs=1, batch=64, parallel=False, device="cpu",
                   model_options=SMALL, bounds=0)
    entry = open_entry(str(root / "model-0"))
    assert entry.metrics["bounds"] is None
    assert all(rec["r2_bound"] is None and rec["weakly_determined"] is None and "accepted" in rec
               for rec in entry.metrics["outputs"].values())
    table = idf.bounds_table(entry)
    assert table["r2_bound"].isna().all() and "–" in idf.format_table(table)


def test_weakly_determined_outputs_are_marked_in_the_maps():
    import xarray as xr

    from xrdscale.pqnet.predict import _mark_weak

    metrics = {"outputs": {"separator.scale": {"r2": 0.61, "r2_bound": 0.65, "mae": 0.1, "mae_bound": 0.09},
                           "NCA.a": {"r2": 0.99, "r2_bound": 0.999, "mae": 1e-4, "mae_bound": 5e-5},
                           "LiC6.size_nm": {"r2": 0.2, "r2_bound": 0.3, "mae": 90.0, "mae_bound": 80.0}}}
    assert idf.weakly_determined(metrics) == ["separator.scale", "LiC6.size_nm"]
    shape = (3, 2, 2)
    maps = xr.Dataset({v: (("phase", "y", "x"), np.zeros(shape)) for v in ("scale", "scale_std", "a", "size")},
                      coords={"phase": ["NCA", "LiC6", "separator"]})
    _mark_weak(maps, metrics)
    assert maps.attrs["weakly_determined"] == ["separator.scale", "LiC6.size_nm"]
    assert maps["scale"].attrs["weakly_determined"] == ["separator"] == maps["scale_std"].attrs["weakly_determined"]
    assert maps["size"].attrs["weakly_determined"] == ["LiC6"] and "weakly_determined" not in maps["a"].attrs
    _mark_weak(maps := maps.drop_attrs(), {"outputs": {}})
    assert maps.attrs["weakly_determined"] == []
