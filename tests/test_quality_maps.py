"""Quality maps of PQ-Net results: residual of the implied pattern (rwp, chi2) and the out-of-distribution flag."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import xarray as xr

from _builders import NCA_AL_YAML
from xrdscale.io import contracts, storage
from xrdscale.physics.crystal import builtin_phase
from xrdscale.physics.pattern import add_background_and_noise, simulate_patterns
from xrdscale.physics.phaselib import PhaseLibrary
from xrdscale.pqnet import quality
from xrdscale.pqnet.model import ModelSpec

# NCA (scale, a, c) and Al at demo noise, as the accuracy tests of test_pqnet_train.
YAML = NCA_AL_YAML
ROUTES = (("NCA", "scale"), ("NCA", "a"), ("NCA", "c"), ("Al", "scale"))
SMALL = {"pattern_channels": 8, "phase_channels": 8, "hidden": 32}


def fake_entry(text: str = YAML) -> SimpleNamespace:
    """What :mod:`xrdscale.pqnet.quality` reads of a registry entry (no network needed)."""
    lib = PhaseLibrary.from_text(YAML)
    spec = ModelSpec(phases=("NCA", "Al"), routes=ROUTES, npt=lib.q.size, target_mean=(0.5, 2.84, 14.3, 0.1),
                     target_std=(0.3, 0.02, 0.1, 0.06))
    return SimpleNamespace(id="pqnet-test", phases_yaml=text, spec=spec, q=lib.q)


def interior_labels(lib: PhaseLibrary, n: int, rng: np.random.Generator) -> dict:
    """Labels inside the central 60 % of every library range (a library is made wider than the data)."""
    labels = lib.sample(n, rng)
    for name, p in lib.spec.phases.items():
        for key in ("scale", "a", "c"):
            r = getattr(p, key)
            if r is not None:
                lo, hi = r
                labels[name][key] = rng.uniform(lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo), n)
    return labels


def with_missing_phase(lib: PhaseLibrary, labels: dict, extra_scale: np.ndarray, rng: np.random.Generator):
    """Library patterns plus LiC6 (a phase the library lacks) at ``extra_scale``, with the library's noise."""
    clean = lib.simulate(labels, rng, noise=False)
    extra = simulate_patterns(lib.q, [builtin_phase("LiC6")], {"LiC6": {"scale": extra_scale}},
                              lib.instrument_model())
    counts = np.exp(rng.uniform(*np.log(lib.spec.noise.counts), len(extra_scale)))
    return add_background_and_noise(clean + extra, lib.q, None, counts, rng)


def test_true_parameters_give_chi2_one_and_a_missing_phase_raises_the_residual(rng, monkeypatch):
    """The weights from the pattern's own noise floor are right: chi2 ≈ 1 and rwp ≈ R_exp at the truth."""
    qm, lib = quality.build(fake_entry())
    labels = lib.sample(200, rng)
    x = lib.simulate(labels, rng)
    truth = np.stack([labels[p][k] for p, k in ROUTES], axis=1)
    rwp, chi2, rexp = qm.statistics(x, truth)
    assert 0.9 < np.median(chi2) < 1.15, np.median(chi2)
    np.testing.assert_allclose(np.median(rwp / rexp), 1.0, atol=0.08)
    dirty = with_missing_phase(lib, labels, rng.uniform(1.0, 3.0, 200), rng)
    rwp_d, chi2_d, _ = qm.statistics(dirty, truth)
    assert np.median(rwp_d) > 5 * np.median(rwp) and np.median(chi2_d) > 20
    whole = qm.assess(dirty, truth, np.zeros_like(truth))
    monkeypatch.setattr(quality, "BLOCK", 64)  # evaluated in blocks: the same numbers
    np.testing.assert_array_equal(qm.assess(dirty, truth, np.zeros_like(truth)), whole)
    # an empty pattern has no residual and no flag
    out = qm.assess(np.zeros((1, lib.q.size), np.float32), truth[:1], np.zeros((1, len(ROUTES))))
    assert np.isnan(out[0, :2]).all() and out[0, 2] == 0


def test_range_edge_flags_lattice_outputs_of_present_phases_only(rng):
    qm, lib = quality.build(fake_entry())
    x = lib.simulate(interior_labels(lib, 4, rng), rng)
    norm = x.mean(axis=1)
    mean = np.stack([0.5 * norm, np.full(4, 2.84), np.full(4, 14.3), 0.1 * norm], axis=1)  # scale in absolute units
    mean[1, 1] = 2.8105    # within 1 % of the range [2.810, 2.875] of its lower bound
    mean[2, 2] = 14.60     # outside
    mean[3, 2] = 14.60
    mean[3, 0] = 0.0       # ... of a phase that is absent: not tested
    edge = qm._at_edge(x, mean)
    assert edge.tolist() == [False, True, True, False]


def test_the_library_of_a_model_takes_unbuildable_structures_from_the_given_phases(caplog):
    text = YAML.replace("NCA: {builtin: NCA,", "NCA: {cif: gone/NCA.cif,")
    with caplog.at_level(logging.WARNING, logger="xrdscale.pqnet.quality"):
        assert quality.build(fake_entry(text)) is None
    assert "no residual or ood maps for model pqnet-test" in caplog.text
    qm, lib = quality.build(fake_entry(text), phases={"NCA": builtin_phase("NCA")})
    assert [p.name for p in qm.phases] == ["NCA", "Al"] and qm.bg_order == 2
    assert set(qm.ranges) == {1, 2} and qm.fixed == {"NCA": {}, "Al": {}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from xrdscale.pqnet.library import make_library
    from xrdscale.pqnet.train import train_ensemble

    root = tmp_path_factory.mktemp("quality")
    (root / "lib.yaml").write_text(YAML)
    lib_url = make_library(str(root / "lib.yaml"), str(root / "lib.zarr"), n=3000, block=1000)
    model_url = str(root / "model")
    train_ensemble(lib_url, model_url, ensemble=3, epochs=10, batch=64, lr=2e-3, parallel=False, model_options=SMALL)
    return root, model_url


@pytest.mark.slow
def test_a_phase_missing_from_the_library_is_flagged_in_the_analyse_maps(ray_local, trained, tmp_path):
    """LiC6 (not in the model's library) where it is strong: residual up, ood on ≥ 90 %; clean pixels ≤ 5 %."""
    from xrdscale.stages.analyse import analyse

    root, model_url = trained
    lib = PhaseLibrary.load(str(root / "lib.yaml"))
    rng = np.random.default_rng(11)
    ny, nx = 16, 16
    labels = interior_labels(lib, ny * nx, rng)
    dirty = (np.arange(ny * nx) % nx) >= nx // 2                     # the right half holds LiC6
    extra = np.where(dirty, rng.uniform(1.0, 3.0, ny * nx), 0.0)       # ~20 % of the intensity and more
    patterns = with_missing_phase(lib, labels, extra, rng).reshape(ny, nx, -1)
    vol = xr.Dataset({"intensity": (("y", "x", "q"), patterns)},
                     coords={"y": np.arange(ny) * 0.03, "x": np.arange(nx) * 0.03, "q": lib.q})
    vol_url = storage.write_store(vol.chunk({"y": 8}), str(tmp_path / "volume.zarr"), stage="volume")
    out = analyse(model_url, vol_url, str(tmp_path / "maps.zarr"), progress=False)
    assert contracts.check_store(out, "maps") == []
    maps = storage.open_store(out, stage="maps")
    assert (maps["scale"].values >= 0).all()
    rwp, ood = maps["rwp"].values.ravel(), maps["ood"].values.ravel()
    hit, false = (ood[dirty] > 0).mean(), (ood[~dirty] > 0).mean()
    assert hit >= 0.9, (hit, np.bincount(ood[dirty]))
    assert false <= 0.05, (false, np.bincount(ood[~dirty]))
    assert np.median(rwp[dirty]) > 3 * np.median(rwp[~dirty])
    assert maps.attrs["ood_residual_factor"] == 2.0 and maps.attrs["quality_reference_n"] == 512
    from xrdscale.pqnet.identifiability import weakly_determined
    from xrdscale.pqnet.registry import open_entry

    assert maps.attrs["weakly_determined"] == weakly_determined(open_entry(model_url))
    # the analyse settings switch the maps off
    off = analyse(model_url, vol_url, str(tmp_path / "maps-off.zarr"), progress=False, quality=False)
    assert "ood" not in storage.open_store(off, stage="maps")


def test_a_library_with_relative_paths_is_used_when_given_loaded(tmp_path):
    """A model's phases.yaml naming files relative to its folder renders only from the loaded library."""
    import shutil

    from xrdscale.exceptions import XrdscaleError

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "cif").mkdir()
    shutil.copy(os.path.join(root, "xrdscale", "data", "cif", "NCA.cif"), tmp_path / "cif" / "NCA.cif")
    text = YAML.replace("NCA: {builtin: NCA,", "NCA: {cif: cif/NCA.cif,")
    (tmp_path / "lib.yaml").write_text(text)
    lib = PhaseLibrary.load(str(tmp_path / "lib.yaml"))
    entry = SimpleNamespace(id="m", phases_yaml=lib.text)
    assert quality.model_library(entry, None, lib) is lib
    with pytest.raises(XrdscaleError):
        quality.model_library(entry, None, None).phases  # noqa: B018 - the CIF path does not resolve from text


def test_reconstruction_artefacts_raise_the_residual_floor_not_the_flag():
    """Negative dips (FBP artefacts) enter R_art: a pattern that has them is judged against them."""
    from xrdscale.physics.pattern import Instrument
    from xrdscale.pqnet.quality import OOD_RESIDUAL, QualityModel

    q = np.linspace(1.2, 2.8, 400)
    qm = QualityModel(q=q, phases=(), instrument=Instrument(0.130509, W=4e-4), routes=(("none", "scale"),),
                      fixed={}, ranges={}, present={}, bg_order=0)   # no phase: the implied pattern is 0
    flat = np.full(q.size, 100.0) + np.random.default_rng(0).normal(0, 3, q.size)   # explained: the background
    dips = -2e3 * np.exp(-0.5 * ((q[None, :] - np.array([[1.5], [2.5]])) / 0.01) ** 2).sum(axis=0)
    clean, bumps, artefacts = flat, flat + np.abs(dips), flat + dips     # peaks no phase explains, or dips
    rwp, _, _, rart = qm.statistics(np.stack([clean, bumps, artefacts]), np.zeros((3, 1)), artefacts=True)
    assert rart[0] == 0 and rart[1] == 0 and rart[2] > 0.1
    ood = qm.assess(np.stack([bumps, artefacts]), np.zeros((2, 1)), np.zeros((2, 1)))[:, 2].astype(int)
    assert ood[0] & OOD_RESIDUAL and not ood[1] & OOD_RESIDUAL, (rwp, rart)
