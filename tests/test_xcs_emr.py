"""EMR, Compton peaks and profiles, the EMR → x calibration and the three-plane separation."""

from __future__ import annotations

import numpy as np
import pytest

from xrdscale.exceptions import InputError
from xrdscale.xcs import calibration, emr, physics, separation

ENERGY = np.linspace(5.0, 120.0, 4000)


def _compton_like(energy: np.ndarray, width: float = 1.6, amplitude: float = 50.0) -> np.ndarray:
    pz = physics.pz_au(115.0, energy, 90.0)
    return amplitude * (np.exp(-0.5 * (pz / width) ** 2) + 0.3 * np.exp(-0.5 * (pz / (3 * width)) ** 2))


def test_emr_equals_the_window_sum_definition(rng):
    counts = rng.poisson(_compton_like(ENERGY)[None, None] * rng.uniform(0.5, 2.0, (4, 3, 1))).astype(float)
    ratio, std = emr.emr(counts, ENERGY)
    pz = physics.pz_au(115.0, ENERGY, 90.0)  # the definition: bins whose centre lies in the window
    low = counts[..., np.abs(pz) < 1].sum(-1)
    high = counts[..., (np.abs(pz) > 1) & (np.abs(pz) < 5)].sum(-1)
    np.testing.assert_allclose(ratio, low / high, rtol=0.03)
    assert np.all(std > 0) and np.all(std < 0.1 * ratio)


def test_window_weights_split_edge_bins_by_their_pz_overlap():
    win = emr.windows(ENERGY)
    width = np.diff(win.pz_edges)
    # the weighted p_z spans are the windows' lengths exactly: 2 a.u. and 8 a.u.
    assert (win.low * width).sum() == pytest.approx(2.0, rel=1e-9)
    assert (win.high * width).sum() == pytest.approx(8.0, rel=1e-9)
    assert np.all((win.low >= 0) & (win.low <= 1)) and np.all(win.low + win.high <= 1 + 1e-12)


def test_bins_that_miss_the_compton_window_are_refused():
    with pytest.raises(InputError, match="do not cover the Compton window"):
        emr.windows(np.linspace(5.0, 90.0, 500))
    with pytest.raises(InputError, match="strictly increasing"):
        emr.windows(ENERGY[::-1])


def test_poisson_std_matches_the_scatter_of_repeats(rng):
    expected = _compton_like(ENERGY, amplitude=20.0)
    repeats = rng.poisson(np.broadcast_to(expected, (400, ENERGY.size))).astype(float)
    ratio, std = emr.emr(repeats, ENERGY)
    assert np.std(ratio) == pytest.approx(np.mean(std), rel=0.15)


def test_separated_variances_propagate_into_the_emr_std(rng):
    e = ENERGY
    c, s, a = _compton_like(e, 1.4, 30.0), _compton_like(e, 1.9, 20.0), _compton_like(e, 2.4, 25.0)
    alpha, beta = 0.4, 0.25
    planes = [c + s + beta * a, s + alpha * a, a]
    draws = [rng.poisson(np.broadcast_to(p, (300, e.size))).astype(float) for p in planes]
    comps, var = separation.separate(*draws, alpha=alpha, beta=beta)
    ratio, std = emr.emr(comps[0], e, variance=var[0])
    assert np.std(ratio) == pytest.approx(np.mean(std), rel=0.15)


def test_peak_position_and_implied_angle():
    centre = physics.compton_energy(115.0, 90.0)
    spectrum = 1e3 * np.exp(-0.5 * ((ENERGY - centre) / 0.9) ** 2)
    peak = emr.peak_position(spectrum, ENERGY)
    assert peak == pytest.approx(centre, abs=0.01)
    assert emr.implied_angle(np.array([peak]), 115.0)[0] == pytest.approx(90.0, abs=0.1)
    shifted = 1e3 * np.exp(-0.5 * ((ENERGY - physics.compton_energy(115.0, 88.0)) / 0.9) ** 2)
    assert emr.implied_angle(np.array([emr.peak_position(shifted, ENERGY)]), 115.0)[0] == pytest.approx(88.0, abs=0.1)
    assert np.isnan(emr.implied_angle(np.array([120.0]), 115.0)[0])


def test_profile_recovers_the_compound_compton_profile():
    comp = physics.nmc622(1.0)
    spectrum = physics.compton_spectrum(comp, ENERGY, 115.0, 90.0)
    win = emr.windows(ENERGY)
    grid = np.linspace(-4, 4, 9)
    j = emr.profile(spectrum, win, grid)
    truth = physics.compound_profile(comp, grid)
    shape = j / j[4]
    # the spectrum may carry a smooth cross-section factor; the profile's shape is J's within a few %
    np.testing.assert_allclose(shape, truth / truth[4], rtol=0.05)


# -- calibration ---------------------------------------------------------------------------

def test_the_papers_table1_is_linear():
    e, x = np.array(calibration.PAPER_TABLE1).T
    cal = calibration.fit(e, x)
    assert cal.r2 >= 0.99
    assert cal.slope > 0 and cal.slope_std > 0
    pred, sd = cal.predict(e)
    assert np.max(np.abs(pred - x)) < 0.03 and np.all(sd > 0)


def test_a_held_out_table1_state_is_recovered_within_0_03():
    pairs = np.array(calibration.PAPER_TABLE1)
    for i in range(len(pairs)):
        rest = np.delete(pairs, i, axis=0)
        cal = calibration.fit(rest[:, 0], rest[:, 1])
        assert cal.predict(pairs[i, 0])[0] == pytest.approx(pairs[i, 1], abs=0.03)


def test_calibration_refuses_too_few_or_singular_points():
    with pytest.raises(InputError, match="at least two"):
        calibration.fit([1.0], [0.9])
    with pytest.raises(InputError, match="singular"):
        calibration.fit([1.1, 1.1, 1.1], [0.9, 0.8, 0.7])
    with pytest.raises(InputError, match="NaN"):
        calibration.fit([1.1, np.nan], [0.9, 0.8])


def test_two_points_take_their_uncertainty_from_the_emr_std():
    cal = calibration.fit([0.5, 1.0], [0.4, 0.8], emr_std=[0.01, 0.01])
    assert cal.slope == pytest.approx(0.8) and cal.intercept == pytest.approx(0.0, abs=1e-12)
    assert cal.slope_std > 0
    x, sd = cal.predict(0.75, 0.02)
    assert x == pytest.approx(0.6) and sd > 0.8 * 0.02


def test_calibration_table_round_trip(tmp_path):
    table = tmp_path / "table1.csv"
    table.write_text("State,EMR,x\n" + "\n".join(f"s{i},{e},{x}" for i, (e, x) in
                                                 enumerate(calibration.PAPER_TABLE1)))
    cal = calibration.fit_table(str(table))
    path = calibration.save(cal, str(tmp_path / "cal.json"))
    back = calibration.load(path)
    assert back.slope == pytest.approx(cal.slope) and back.r2 == pytest.approx(cal.r2)
    np.testing.assert_allclose(back.covariance, cal.covariance)
    assert back.labels == tuple(f"s{i}" for i in range(7))
    (tmp_path / "bad.csv").write_text("emr,y\n1,2\n")
    with pytest.raises(InputError, match="lacks the column"):
        calibration.fit_table(str(tmp_path / "bad.csv"))
    with pytest.raises(InputError, match="no calibration"):
        calibration.load(str(tmp_path / "missing.json"))


# -- separation ------------------------------------------------------------------------------

def test_separation_with_known_alpha_beta_is_exact(rng):
    c, s, a = (rng.uniform(0, 100, (5, 4, 300)) for _ in range(3))
    alpha, beta = 0.35, 0.15
    comps, var = separation.separate(c + s + beta * a, s + alpha * a, a, alpha=alpha, beta=beta)
    np.testing.assert_allclose(comps[0], c, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(comps[1], s, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(comps[2], a)
    assert var.shape == comps.shape and np.all(var >= 0)
    with pytest.raises(InputError, match="≥ 0"):
        separation.separate(c, s, a, alpha=-0.1, beta=0.2)


def test_alpha_beta_from_ct_plane_fractions():
    labels = np.zeros((30, 4, 4), np.int8)
    labels[:10] = 1                 # anode in slices 0-9
    labels[10:12, :2] = 1           # a little anode reaches up into 10-11
    vol = separation.plane_fractions(labels, [(8, 14), (4, 10), (0, 6)])
    alpha, beta = separation.alpha_beta_from_fractions(*vol)
    assert alpha == pytest.approx(1.0)
    assert beta == pytest.approx((2 * 16 + 2 * 8) / (6 * 16))
    with pytest.raises(InputError, match="outside"):
        separation.plane_fractions(labels, [(25, 35)])
    with pytest.raises(InputError, match="no anode"):
        separation.alpha_beta_from_fractions(1.0, 1.0, 0.0)
