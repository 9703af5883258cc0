"""Absolute units end to end: a user's own patterns store, written to the contract, gives PQ-Net scale
factors in the same units.

shared/DESIGN.md ("Pattern model"): I_hkl = scale · m|F|² · LP / V² with unit-area profiles, and
"a pattern that is k times stronger gives k times the scale factors". The user's store is built
here with plain numpy from that formula (reflections, multiplicities and |F|² from the
structure; LP, the Gaussian profile and its mapping onto q written out below), with Poisson
noise at realistic counts and a background, and saved with plain xarray — no xrdscale writer.
A small PQ-Net trained quickly on a two-phase library (NCA + Al) must recover the known scale
factors, and scale linearly with the pattern.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from xrdscale.io import storage
from xrdscale.physics.crystal import builtin_phase
from xrdscale.physics.pattern import Instrument, simulate_patterns
from xrdscale.pqnet.library import make_library
from xrdscale.pqnet.predict import predict
from xrdscale.pqnet.train import train_ensemble

ray = pytest.importorskip("ray")

WAVELENGTH = 0.130509
W = 4.0e-4                       # deg², Gaussian FWHM² (U = V = X = 0, no size broadening)
Q = (1.16, 2.84)
YAML = f"""\
version: 1
wavelength: {WAVELENGTH}
q_grid: {{min: {Q[0]}, max: {Q[1]}, npt: 192}}
instrument: {{U: 0.0, V: 0.0, W: {W}, X: 0.0}}
background: {{chebyshev_order: 2, amplitude: [0.0, 0.05]}}
noise: {{counts: [1.0e5, 1.0e7]}}
phases:
  NCA: {{builtin: NCA, scale: [0.1, 1]}}
  Al: {{builtin: Al, scale: [0, 0.3]}}
"""
N_USER = 300
COUNTS = 1.0e6                    # total counts per pattern of the user's measurement


def contract_patterns(q: np.ndarray, scales: dict[str, np.ndarray]) -> np.ndarray:
    """I(q) = Σ scale · m|F|² · LP / V² · G(2θ − 2θ_hkl) · d2θ/dq, G a unit-area Gaussian in 2θ [deg]."""
    out = np.zeros((len(next(iter(scales.values()))), q.size))
    tth = np.degrees(2 * np.arcsin(q * WAVELENGTH / (4 * np.pi)))
    dtth_dq = np.degrees(WAVELENGTH / (2 * np.pi * np.cos(np.radians(tth / 2))))
    fwhm = np.sqrt(W)
    sigma = fwhm / (2 * np.sqrt(2 * np.log(2)))
    for name, scale in scales.items():
        phase = builtin_phase(name)
        refl = phase.reflections(WAVELENGTH, q_max=q[-1] + 0.05, q_min=max(q[0] - 0.05, 0.01))
        theta = np.arcsin(refl.q * WAVELENGTH / (4 * np.pi))
        lp = (1 + np.cos(2 * theta) ** 2) / (np.sin(theta) ** 2 * np.cos(theta))
        intensity = refl.multiplicity * refl.f2 / phase.volume() ** 2 * lp            # per unit scale
        g = np.exp(-0.5 * ((tth[None, :] - np.degrees(2 * theta)[:, None]) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
        out += scale[:, None] * (intensity @ (g * dtth_dq[None, :]))[None, :]
    return out


def poisson(clean: np.ndarray, counts: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson noise at ``counts`` total counts per pattern, back in the pattern's absolute units."""
    factor = counts / clean.sum(axis=1, keepdims=True)
    return rng.poisson(clean * factor) / factor


def write_user_store(url: str, intensity: np.ndarray, q: np.ndarray) -> str:
    """A ``patterns`` store as a user's own tool writes it: plain xarray, no xrdscale provenance."""
    n = intensity.shape[0]
    ds = xr.Dataset({"intensity": (("frame", "q"), intensity.astype(np.float32))},
                    coords={"angle": ("frame", np.zeros(n)), "translation": ("frame", np.linspace(-1, 1, n)),
                            "q": ("q", q)})
    ds["q"].attrs["units"] = "1/angstrom"
    ds.chunk({"frame": 100}).to_zarr(url, mode="w", consolidated=False)
    return url


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("units")
    (root / "lib.yaml").write_text(YAML)
    lib_url = make_library(str(root / "lib.yaml"), str(root / "lib.zarr"), n=4000, block=1000, seed=3)
    model_url = str(root / "model")
    train_ensemble(lib_url, model_url, ensemble=2, epochs=15, batch=64, lr=2e-3, parallel=False, seed=0,
                   model_options={"pattern_channels": 8, "phase_channels": 8, "hidden": 32})
    return root, model_url


@pytest.fixture(scope="module")
def user_data():
    """Known scale factors and the user's patterns on their own (finer, wider) q grid."""
    rng = np.random.default_rng(2024)
    q = np.linspace(1.10, 2.90, 720)
    truth = {"NCA": rng.uniform(0.2, 0.9, N_USER), "Al": rng.uniform(0.05, 0.25, N_USER)}
    clean = contract_patterns(q, truth)
    # a flat-ish background of ~2 % of the strongest peak, as an integrated measurement has
    x = (q - q.mean()) / np.ptp(q)
    background = clean.max(axis=1, keepdims=True) * (0.02 + 0.005 * x[None, :] * rng.uniform(-1, 1, (N_USER, 1)))
    noisy = poisson(clean + background, COUNTS, rng)
    return q, truth, clean, noisy


def test_the_contract_formula_is_the_pattern_model(user_data):
    """The plain-numpy contract patterns and simulate_patterns agree: the pattern model has K = 1."""
    q, truth, clean, _ = user_data
    model = simulate_patterns(q, [builtin_phase("NCA"), builtin_phase("Al")],
                              {p: {"scale": s} for p, s in truth.items()}, Instrument(WAVELENGTH, W=W))
    err = np.abs(model - clean).max(axis=1) / clean.max(axis=1)
    assert err.max() < 2e-3, err.max()
    # integrated intensity: the same to 0.1 %
    np.testing.assert_allclose(np.trapezoid(model, q, axis=1), np.trapezoid(clean, q, axis=1), rtol=1e-3)


def _scales(maps_url: str) -> dict[str, np.ndarray]:
    maps = storage.open_store(maps_url, stage="maps")
    assert maps["scale"].dims == ("phase", "frame")
    return {p: maps["scale"].sel(phase=p).values.astype(float) for p in ("NCA", "Al")}


def test_user_patterns_give_scale_factors_in_the_same_units(trained, user_data, ray_local, tmp_path):
    from xrdscale.pqnet.serve import ServerPool

    _, model_url = trained
    q, truth, _, noisy = user_data
    stores = {k: write_user_store(str(tmp_path / f"user-x{k:g}.zarr"), k * noisy, q) for k in (1.0, 100.0, 0.01)}
    pool = ServerPool(model_url, actors=1, engine="onnx", device="cpu")
    try:
        got = {k: _scales(predict(model_url, url, str(tmp_path / f"maps-x{k:g}.zarr"), pool=pool))
               for k, url in stores.items()}
    finally:
        pool.close()
    for phase, limits in (("NCA", (0.02, 0.02)), ("Al", (0.05, 0.05))):
        t, p = truth[phase], got[1.0][phase]
        rel = (p - t) / t
        slope = float(p @ t / (t @ t))                  # least-squares gain through the origin
        print(f"{phase}: gain {slope:.4f}, median |rel err| {np.median(np.abs(rel)):.4f}, "
              f"mean rel err {rel.mean():+.4f}, 90th pct |rel err| {np.percentile(np.abs(rel), 90):.4f}")
        assert abs(slope - 1) < limits[0], (phase, slope)
        assert np.median(np.abs(rel)) < limits[1], (phase, np.median(np.abs(rel)))
        # linear: k times the pattern, k times the scale (a store at K = 1e-2 would read 100 times too low)
        for k in (100.0, 0.01):
            np.testing.assert_allclose(got[k][phase], k * p, rtol=1e-3, atol=1e-6 * k)
