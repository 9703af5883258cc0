"""The shared physics package: its dependencies, constants, attenuation, Hill & Howard, error messages."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from xrdscale.exceptions import ConfigError, InputError
from xrdscale.physics import attenuation, constants, quant
from xrdscale.physics.crystal import builtin_phase
from xrdscale.physics.pattern import Instrument, simulate_patterns
from xrdscale.physics.phaselib import PhaseLibrary

PHYSICS = ("crystal", "pattern", "phaselib", "attenuation", "quant", "constants")

LIBRARY = """\
version: 1
wavelength: 0.130509
q_grid: {min: 1.16, max: 3.82, npt: 400}
instrument: {W: 4.0e-4}
phases:
  Al: {builtin: Al}
  LiC6: {builtin: LiC6, composition: {density: 2.0}}
  film: {peak: {q: [1.50, 1.55], fwhm: [0.02, 0.04]}, composition: {elements: {C: 2, H: 4}, density: 0.94}}
  glass: {peak: {q: [1.9, 2.0], fwhm: [0.1, 0.2]}, composition: {formula: SiO2, density: 2.2}}
"""


def test_physics_imports_nothing_above_it():
    """physics/ sits below simulate, stages, campaign and the runtime: importing it loads none of them."""
    code = ("import json, sys\n"
            + "".join(f"import xrdscale.physics.{m}\n" for m in PHYSICS)
            + "print(json.dumps(sorted(m for m in sys.modules if m.startswith('xrdscale'))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(f"xrdscale.physics.{m}" in loaded for m in PHYSICS)
    above = [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in (
        "simulate", "stages", "campaign", "runtime", "cli", "pqnet", "analysis", "recon", "cluster")]
    assert above == [], above


def test_hc_and_the_separator_have_one_definition():
    assert constants.energy_kev(constants.DEFAULT_WAVELENGTH) == pytest.approx(95.0, abs=0.01)
    assert constants.wavelength_angstrom(constants.energy_kev(0.2)) == pytest.approx(0.2)
    sep = builtin_phase("separator")
    assert (sep.q, sep.fwhm) == (constants.SEPARATOR.q, constants.SEPARATOR.fwhm) == (1.525, 0.03)
    assert attenuation.phase_composition("separator") == constants.SEPARATOR.composition
    from xrdscale.stages.absorption import AMORPHOUS_COMPOSITION, DEFAULT_ENERGY_KEV, phase_composition

    assert DEFAULT_ENERGY_KEV == constants.DEFAULT_ENERGY_KEV and phase_composition is attenuation.phase_composition
    assert AMORPHOUS_COMPOSITION is attenuation.AMORPHOUS_COMPOSITION


def test_separator_attenuates_like_polyethylene():
    # H at 95 keV is outside Kissel's photoionisation tables: xraylib's CS_Total takes over.
    import xraylib

    mf, rho = attenuation.phase_composition("separator")
    mu_rho = attenuation.mass_attenuation(mf, 95.0)
    ref = sum(w * xraylib.CS_Total(xraylib.SymbolToAtomicNumber(el), 95.0) for el, w in mf.items())
    assert mu_rho == pytest.approx(ref, rel=0.01) and rho == 0.94
    mu = attenuation.mu_from_fractions({"separator": np.ones((2, 2))}, energy_kev=95.0)
    assert np.allclose(mu, rho * mu_rho / 10.0)


def test_phase_library_compositions_give_user_phases_a_mu():
    lib = PhaseLibrary.from_text(LIBRARY)
    phases = dict(zip(lib.phase_names, lib.phases))
    film = attenuation.phase_composition(phases["film"])
    assert film.density == 0.94
    assert film.mass_fractions["C"] == pytest.approx(attenuation.AMORPHOUS_COMPOSITION["separator"][0]["C"], rel=1e-3)
    glass = attenuation.phase_composition(phases["glass"])
    assert set(glass.mass_fractions) == {"Si", "O"} and glass.mass_fractions["O"] == pytest.approx(0.5326, rel=1e-3)
    # a crystalline phase keeps its structure's make-up and takes the given density
    lic6 = attenuation.phase_composition(phases["LiC6"])
    assert lic6.density == 2.0
    assert lic6.mass_fractions == pytest.approx(builtin_phase("LiC6").mass_fractions)
    assert attenuation.phase_composition(phases["Al"]).density == pytest.approx(2.70, rel=0.01)
    mu = attenuation.mu_from_fractions({n: np.full((1, 1), 0.25) for n in lib.phase_names}, energy_kev=95.0,
                                       phases=phases)
    assert np.isfinite(mu).all() and mu.min() > 0
    # the composition does not change the diffraction
    q = lib.q
    p = simulate_patterns(q, [phases["film"], builtin_phase("separator")],
                          {"film": {"scale": np.array([1.0]), "q": np.array([1.525]), "fwhm": np.array([0.03])},
                           "separator": {"scale": np.array([1.0])}}, lib.instrument_model())
    assert p.shape == (1, q.size)


def test_a_peak_without_composition_or_with_a_bad_one_is_a_clear_error():
    lib = PhaseLibrary.from_text(LIBRARY.replace(", composition: {elements: {C: 2, H: 4}, density: 0.94}", ""))
    with pytest.raises(InputError, match="composition: .*elements"):
        attenuation.phase_composition(lib.phase("film"))
    with pytest.raises(InputError, match="not a built-in phase"):
        attenuation.phase_composition("film")
    bad = LIBRARY.replace("{C: 2, H: 4}, density: 0.94", "{C: 2, Hx: 4}, density: 0.94").replace(
        "formula: SiO2, density: 2.2", "formula: SiO2")
    with pytest.raises(ConfigError) as err:
        PhaseLibrary.from_text(bad, source="lib.yaml")
    text = str(err.value)
    assert text.startswith("lib.yaml has 2 problem(s)")
    assert "phases.film.composition: unknown element 'Hx'" in text
    assert "phases.glass: a peak component has no structure" in text and "density" in text


def test_phase_library_errors_name_the_file(tmp_path):
    path = tmp_path / "phases" / "mine.yaml"
    path.parent.mkdir()
    path.write_text(LIBRARY.replace("Al: {builtin: Al}", "Al: {cif: cif/nothere.cif}"))
    with pytest.raises(ConfigError) as err:
        PhaseLibrary.load(str(path))
    assert str(err.value).startswith(f"{path} has 1 problem(s)")
    assert "phases.Al:" in str(err.value) and "nothere.cif" in str(err.value)
    path.write_text(LIBRARY.replace("npt: 400", "npt: 4"))
    with pytest.raises(ConfigError, match=f"(?s)^{path} has 1 problem.*q_grid.npt: .*got 4"):
        PhaseLibrary.load(str(path))


def test_mass_factor_is_zmv_over_v2_at_any_lattice():
    nca = builtin_phase("NCA")
    assert quant.mass_factor(nca) == pytest.approx(nca.zmv() / nca.volume() ** 2, rel=1e-12)
    a, c = np.array([2.81, 2.84, 2.87]), np.array([14.2, 14.3, 14.5])
    k = quant.mass_factor(nca, a=a, c=c)
    ref = [nca.zmv(a=x, c=y) / nca.volume(a=x, c=y) ** 2 for x, y in zip(a, c)]
    np.testing.assert_allclose(k, ref, rtol=1e-12)
    # ZMV/V² is N_A times the density [g/cm³ → g/mol/Å³]
    assert quant.mass_factor(nca) == pytest.approx(nca.density() * constants.AVOGADRO * 1e-24, rel=1e-12)
    assert quant.lattice_exponents(nca) == {"a": 2.0, "c": 1.0}
    assert not quant.is_crystalline(builtin_phase("separator"))
    with pytest.raises(ValueError, match="not crystalline"):
        quant.mass_factor(builtin_phase("separator"))


def test_intensity_is_the_contract_formula_with_no_extra_constant():
    """I_hkl = scale · m|F|² · LP / V² is the integrated intensity over q of each peak (K = 1)."""
    q = np.linspace(2.0, 3.3, 6000)
    al = builtin_phase("Al")
    scale = 0.37
    p = simulate_patterns(q, [al], {"Al": {"scale": np.array([scale])}}, Instrument(0.130509, W=4e-4))[0]
    refl = al.reflections(0.130509, 3.3, 2.0)
    theta = np.arcsin(refl.q * 0.130509 / (4 * np.pi))
    lp = (1 + np.cos(2 * theta) ** 2) / (np.sin(theta) ** 2 * np.cos(theta))
    expected = scale * refl.multiplicity * refl.f2 / al.volume() ** 2 * lp
    mid = 0.5 * (refl.q[0] + refl.q[1])
    areas = [np.trapezoid(p[q < mid], q[q < mid]), np.trapezoid(p[q >= mid], q[q >= mid])]
    np.testing.assert_allclose(areas, expected[:2], rtol=2e-3)


@pytest.mark.parametrize("q, words", [
    (np.array([1.0, 2.0, 2.0, 3.0]), "stop increasing at index 2 .q.1. = 2, q.2. = 2"),
    (np.ones((2, 3)), "shape \\(2, 3\\)"),
    (np.array([1.5]), "got 1 point"),
    (np.array([1.0, np.nan, 3.0]), "1 NaN/infinite value.* index 1"),
])
def test_bad_q_grids_say_what_they_got(q, words):
    with pytest.raises(InputError, match=words):
        simulate_patterns(q, [builtin_phase("Al")], {"Al": {"scale": np.ones(1)}}, Instrument(0.130509))


def test_phases_pickle_through_their_cif_text():
    """Dask workers get phases by pickle (gemmi structures do not pickle themselves)."""
    import pickle

    from xrdscale.physics.crystal import builtin_phase

    for name in ("NCA", "graphite"):
        phase = builtin_phase(name)
        back = pickle.loads(pickle.dumps(phase))
        a, b = phase.reflections(0.130509, 6.0), back.reflections(0.130509, 6.0)
        assert back.name == phase.name and back.system == phase.system
        np.testing.assert_allclose(b.q, a.q)
        np.testing.assert_allclose(b.f2, a.f2, rtol=1e-6)
