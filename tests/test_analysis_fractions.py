"""Weight fractions (Hill & Howard) against simulated mixtures of known composition."""

from __future__ import annotations

import gemmi
import numpy as np
import pytest
import xarray as xr
from scipy.optimize import nnls

from xrdscale.analysis.fractions import weight_fractions, with_weight_fractions
from xrdscale.exceptions import InputError
from xrdscale.physics.crystal import builtin_cif, builtin_phase
from xrdscale.physics.pattern import Instrument, simulate_patterns

WAVELENGTH = 0.130509
AVOGADRO = 6.02214076e23


def gemmi_density(name: str, **lattice: float) -> float:
    """Density [g/cm³] straight from gemmi: unit-cell contents over the cell volume."""
    st = gemmi.read_small_structure(builtin_cif(name))
    mass = sum(site.element.weight * site.occ for site in st.get_all_unit_cell_sites())
    c = st.cell
    if lattice:  # the cell at other lattice parameters, keeping its angles (cubic: a = b = c)
        a = lattice.get("a", c.a)
        cc = lattice.get("c", a if c.c == c.a else c.c)
        c = gemmi.UnitCell(a, a, cc, c.alpha, c.beta, c.gamma)
    return mass / AVOGADRO / (c.volume * 1e-24)


def mixture(names, weights, lattices, q, rng, total_counts=3e7):
    """Patterns of mixtures: each phase's diffracting volume ∝ its mass / density (physics, not our code)."""
    phases = [builtin_phase(n) for n in names]
    n_pix = len(weights)
    params = {n: {"scale": np.zeros(n_pix)} for n in names}
    for k, (w, lat) in enumerate(zip(weights, lattices)):
        vol = np.array([w[i] / gemmi_density(n, **lat.get(n, {})) for i, n in enumerate(names)])
        for i, n in enumerate(names):
            params[n]["scale"][k] = vol[i] / vol.sum()
            for key, v in lat.get(n, {}).items():
                params[n].setdefault(key, np.full(n_pix, phases[i].lattice[key]))[k] = v
    inst = Instrument(WAVELENGTH, U=0.0, V=0.0, W=2e-5)
    pats = simulate_patterns(q, phases, params, inst, counts=np.full(n_pix, total_counts), rng=rng)
    return phases, params, inst, pats


def fit_scales(q, phases, params, inst, pats):
    """Bare non-negative least squares of each pattern on the phases' unit patterns (lattice known)."""
    out = np.zeros((len(pats), len(phases)))
    for k, pat in enumerate(pats):
        basis = []
        for ph in phases:
            p = {ph.name: {"scale": np.ones(1), **{key: v[k:k + 1] for key, v in params[ph.name].items()
                                                     if key != "scale"}}}
            basis.append(simulate_patterns(q, [ph], p, inst)[0])
        out[k], _ = nnls(np.stack(basis, axis=1).astype(float), pat.astype(float))
    return out


def test_known_mixture_weight_fractions_within_2_percent(rng):
    names = ["NCA", "Al", "Cu", "Fe", "graphite"]
    weights = np.array([[0.40, 0.10, 0.20, 0.05, 0.25],
                        [0.10, 0.45, 0.05, 0.30, 0.10],
                        [0.25, 0.25, 0.25, 0.15, 0.10]])
    lattices = [{"NCA": {"a": 2.82, "c": 14.48}}, {"NCA": {"a": 2.86, "c": 14.24}}, {}]
    q = np.linspace(1.16, 3.82, 1200)
    phases, params, inst, pats = mixture(names, weights, lattices, q, rng)
    scales = fit_scales(q, phases, params, inst, pats)
    a = np.full((len(names), 1, 3), np.nan)
    c = np.full((len(names), 1, 3), np.nan)
    for i, n in enumerate(names):
        if "a" in params[n]:
            a[i, 0] = params[n]["a"]
        if "c" in params[n]:
            c[i, 0] = params[n]["c"]
    maps = xr.Dataset({"scale": (("phase", "y", "x"), scales.T[:, None, :]),
                       "a": (("phase", "y", "x"), a), "c": (("phase", "y", "x"), c)},
                      coords={"phase": names, "y": [0.0], "x": [0.0, 0.03, 0.06]})
    wf = weight_fractions(maps.chunk({"x": 1}))["weight_fraction"].compute()
    got = wf.values[:, 0, :].T
    assert np.abs(got - weights).max() < 0.02
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-9)


def test_lattice_changes_the_mass_factor_like_the_density():
    maps = xr.Dataset({"scale": (("phase", "y", "x"), np.ones((2, 1, 2))),
                       "a": (("phase", "y", "x"), np.array([[[2.82, 2.86]], [[np.nan, np.nan]]])),
                       "c": (("phase", "y", "x"), np.array([[[14.48, 14.24]], [[np.nan, np.nan]]]))},
                      coords={"phase": ["NCA", "Al"], "y": [0.0], "x": [0.0, 1.0]})
    wf = weight_fractions(maps)["weight_fraction"].values[:, 0, :]
    for j, lat in enumerate([{"a": 2.82, "c": 14.48}, {"a": 2.86, "c": 14.24}]):
        rho = np.array([gemmi_density("NCA", **lat), gemmi_density("Al")])
        np.testing.assert_allclose(wf[:, j], rho / rho.sum(), rtol=1e-6)


def test_first_order_std_matches_monte_carlo(rng):
    names = ["NCA", "Al", "Cu"]
    s = np.array([0.5, 0.3, 0.2])
    s_std = np.array([0.02, 0.015, 0.01])
    a_std = np.array([0.004, 0.001, 0.001])
    base = {"scale": s, "a": np.array([2.84, 4.05, 3.615]), "c": np.array([14.3, np.nan, np.nan])}
    maps = xr.Dataset({k: (("phase", "y", "x"), v[:, None, None]) for k, v in base.items()},
                      coords={"phase": names, "y": [0.0], "x": [0.0]})
    maps["scale_std"] = (("phase", "y", "x"), s_std[:, None, None])
    maps["a_std"] = (("phase", "y", "x"), a_std[:, None, None])
    res = weight_fractions(maps)
    n = 20000
    draw = {"scale": s + rng.normal(size=(n, 3)) * s_std, "a": base["a"] + rng.normal(size=(n, 3)) * a_std,
            "c": np.broadcast_to(base["c"], (n, 3))}
    mc = xr.Dataset({k: (("x", "phase", "y"), v[:, :, None]) for k, v in draw.items()},
                    coords={"phase": names, "y": [0.0], "x": np.arange(n)})
    w_mc = weight_fractions(mc)["weight_fraction"].transpose("x", "phase", "y").values
    np.testing.assert_allclose(res["weight_fraction_std"].values[:, 0, 0], w_mc.std(axis=0)[:, 0], rtol=0.08)


def test_separator_excluded_with_note():
    maps = xr.Dataset({"scale": (("phase", "y", "x"), np.ones((3, 1, 1)))},
                      coords={"phase": ["Al", "separator", "Cu"], "y": [0.0], "x": [0.0]})
    out = with_weight_fractions(maps)
    wf = out["weight_fraction"].values[:, 0, 0]
    assert np.isnan(wf[1]) and abs(np.nansum(wf) - 1) < 1e-12
    assert "separator" in out["weight_fraction"].attrs["note"]


def test_missing_scale_or_unknown_phase_is_a_clear_error():
    maps = xr.Dataset({"a": (("phase", "y", "x"), np.ones((1, 1, 1)))},
                      coords={"phase": ["Al"], "y": [0.0], "x": [0.0]})
    with pytest.raises(InputError, match=r"weight fractions need.*\['scale'\]"):
        weight_fractions(maps)
    maps = xr.Dataset({"scale": (("phase", "y", "x"), np.ones((1, 1, 1)))},
                      coords={"phase": ["unobtainium"], "y": [0.0], "x": [0.0]})
    with pytest.raises(InputError, match="unobtainium.*--phases"):
        weight_fractions(maps)
