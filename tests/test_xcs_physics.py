"""Compton kinematics, p_z (Eq. 5), compositions and Compton profiles of :mod:`xrdscale.xcs.physics`."""

from __future__ import annotations

import numpy as np
import pytest
import xraylib

from xrdscale.exceptions import InputError
from xrdscale.xcs import physics

CASES = [(115.0, 90.0), (60.0, 30.0), (200.0, 150.0), (20.0, 120.0), (115.0, 179.0)]


@pytest.mark.parametrize(("e1", "angle"), CASES)
def test_compton_energy_matches_xraylib(e1, angle):
    ours = float(physics.compton_energy(e1, angle))
    theirs = xraylib.ComptonEnergy(e1, np.deg2rad(angle))
    # xraylib uses mc² = 510.998928 keV (CODATA 2010), we use 510.99895 keV (CODATA 2018)
    assert ours == pytest.approx(theirs, rel=1e-7)


@pytest.mark.parametrize(("e1", "angle"), CASES)
def test_pz_is_zero_at_the_compton_energy(e1, angle):
    assert abs(float(physics.pz_au(e1, physics.compton_energy(e1, angle), angle))) < 1e-9
    # at xraylib's Compton energy p_z is 0 up to the difference of the mc² constants (4e-8 relative)
    assert abs(float(physics.pz_au(e1, xraylib.ComptonEnergy(e1, np.deg2rad(angle)), angle))) < 1e-5


def test_paper_compton_energy():
    assert float(physics.compton_energy(115.0, 90.0)) == pytest.approx(93.87, abs=0.005)


def test_pz_sign_and_monotonic():
    e2 = np.linspace(60.0, 114.0, 200)
    pz = physics.pz_au(115.0, e2, 90.0)
    assert np.all(np.diff(pz) > 0)
    assert pz[0] < 0 < pz[-1]


def test_energy_at_pz_round_trip():
    pz = np.linspace(-60.0, 60.0, 241)
    for e1, angle in CASES:
        e2 = physics.energy_at_pz(e1, pz, angle)
        assert np.all(np.isfinite(e2))
        np.testing.assert_allclose(physics.pz_au(e1, e2, angle), pz, rtol=0, atol=1e-9)
    # broadcasting of arrays of E1, p_z and angles
    e1 = np.array([[115.0], [60.0]])
    e2 = physics.energy_at_pz(e1, np.array([-2.0, 0.0, 3.0]), np.array([90.0, 45.0, 135.0]))
    assert e2.shape == (2, 3)
    np.testing.assert_allclose(physics.pz_au(e1, e2, np.array([90.0, 45.0, 135.0])),
                               np.broadcast_to([-2.0, 0.0, 3.0], (2, 3)), atol=1e-9)


def test_dpz_de_matches_finite_difference():
    e2 = np.linspace(40.0, 113.0, 50)
    h = 1e-5
    for e1, angle in [(115.0, 90.0), (80.0, 40.0), (150.0, 170.0)]:
        num = (physics.pz_au(e1, e2 + h, angle) - physics.pz_au(e1, e2 - h, angle)) / (2 * h)
        ana = physics.dpz_de(e1, e2, angle)
        np.testing.assert_allclose(ana, num, rtol=1e-7)
        assert np.all(ana > 0)


def test_pz_window():
    lo, hi = physics.pz_window_kev(115.0, 90.0, -1.0, 1.0)
    assert lo < float(physics.compton_energy(115.0, 90.0)) < hi
    assert float(physics.pz_au(115.0, lo, 90.0)) == pytest.approx(-1.0, abs=1e-9)
    assert float(physics.pz_au(115.0, hi, 90.0)) == pytest.approx(1.0, abs=1e-9)


def test_scattering_angle_inverts_compton_energy():
    angles = np.array([10.0, 45.0, 90.0, 135.0, 179.0])
    e2 = physics.compton_energy(115.0, angles)
    np.testing.assert_allclose(physics.scattering_angle_deg(115.0, e2), angles, atol=1e-8)
    assert float(physics.scattering_angle_deg(115.0, 93.8737664815572)) == pytest.approx(90.0, abs=1e-8)


@pytest.mark.parametrize("e2", [115.0, 120.0, 60.0, -1.0])
def test_scattering_angle_rejects_impossible_energies(e2):
    # 115 keV back-scattered (180°) has 79.4 keV: anything below is impossible, as is E2 >= E1
    with pytest.raises(InputError, match="not a Compton energy"):
        physics.scattering_angle_deg(115.0, np.array([93.9, e2]))


def test_composition_parsing():
    c = physics.composition("Li0.6Ni0.6Mn0.2Co0.2O2")
    assert set(c) == {3, 8, 25, 27, 28}
    assert c[3] == pytest.approx(0.6) and c[8] == pytest.approx(2.0) and c[28] == pytest.approx(0.6)
    assert physics.composition({"Li": 1, 8: 2, "O": 1}) == {3: 1.0, 8: 3.0}
    assert physics.li_metal() == {3: 1.0}
    assert physics.composition("(C2H4O)15LiC2F6NO4S2") == pytest.approx(physics.spe_peo_litfsi(15))
    with pytest.raises(InputError, match="cannot parse"):
        physics.composition("Xx2")
    with pytest.raises(InputError, match="unknown element"):
        physics.composition({"Qq": 1})
    with pytest.raises(InputError, match=">= 0"):
        physics.composition({"Li": -1})


@pytest.mark.parametrize("x", [0.0, 0.3, 0.6, 1.0])
def test_nmc622_electrons(x):
    assert physics.electrons(physics.nmc622(x)) == pytest.approx(3 * x + 43.2)
    if x > 0:  # xraylib refuses a zero subscript
        assert physics.electrons(physics.composition(f"Li{x}Ni0.6Mn0.2Co0.2O2")) == pytest.approx(3 * x + 43.2)


def test_spe_electrons():
    # (C2H4O): 24 electrons; LiTFSI LiC2F6NO4S2: 140
    assert physics.electrons(physics.spe_peo_litfsi(15)) == pytest.approx(15 * 24 + 140)


def test_li_profile_integrates_to_three_electrons():
    pz = np.linspace(-100.0, 100.0, 40001)
    j = physics.compound_profile(physics.li_metal(), pz)
    assert np.trapezoid(j, pz) == pytest.approx(3.0, rel=0.02)
    nmc = physics.nmc622(1.0)
    assert np.trapezoid(physics.compound_profile(nmc, pz), pz) == pytest.approx(physics.electrons(nmc), rel=0.02)


def test_compound_profile_symmetric_and_exact():
    pz = np.array([0.0, 0.37, 1.0, 2.5, 7.0, 30.0])
    comp = physics.nmc622(0.7)
    j = physics.compound_profile(comp, pz)
    np.testing.assert_array_equal(physics.compound_profile(comp, -pz), j)
    direct = [sum(n * xraylib.ComptonProfile(z, float(p)) for z, n in comp.items()) for p in pz]
    np.testing.assert_allclose(j, direct, rtol=1e-12)
    assert physics.compound_profile(comp, 150.0) == 0.0
    assert j.shape == pz.shape and physics.compound_profile(comp, pz.reshape(2, 3)).shape == (2, 3)


def test_li_spectrum_peaks_at_the_compton_energy():
    e = np.linspace(80.0, 110.0, 30001)
    s = physics.compton_spectrum(physics.li_metal(), e)
    assert e[np.argmax(s)] == pytest.approx(float(physics.compton_energy(115.0, 90.0)), abs=0.02)
    assert np.all(s >= 0)
    beyond = physics.compton_spectrum(physics.li_metal(), np.array([115.0, 116.0, 200.0]))
    np.testing.assert_array_equal(beyond, 0.0)


def test_spectrum_integrates_to_electrons_without_the_kn_factor():
    e = np.linspace(1.0, 114.999, 200001)
    s = physics.compton_spectrum(physics.li_metal(), e, kn_factor=False)
    assert np.trapezoid(s, e) == pytest.approx(3.0, rel=0.02)


def test_lines():
    fl = physics.fluorescence_lines()
    assert fl["Cd Ka1"] == pytest.approx(23.17, abs=0.05) and fl["Te Kb1"] == pytest.approx(31.0, abs=0.05)
    sh = physics.shielding_lines()
    assert set(sh) == {"W Ka1", "W Kb1", "Pb Ka1", "Pb Kb1"}
    assert all(50 < v < 85 for v in sh.values())
