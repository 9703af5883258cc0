"""The CDI CNN: training pairs, the network, pre-training into a registry entry, per-pattern refinement."""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch

from xrdscale.cdi import cnn
from xrdscale.cdi.simulate import simulate_crystal
from xrdscale.exceptions import IncompleteStoreError, InputError, StorageError
from xrdscale.io import storage


def _far_field(obj: np.ndarray) -> np.ndarray:
    """The package's FFT convention, written out here independently of the module."""
    axes = (-3, -2, -1)
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(obj, axes=axes), axes=axes, norm="ortho"), axes=axes)


@pytest.fixture(scope="module")
def entry(tmp_path_factory) -> str:
    """A tiny pre-trained entry: 64 pairs of 16³, 3 epochs, width 4."""
    url = str(tmp_path_factory.mktemp("cdi-cnn") / "model")
    cnn.pretrain(url, n=64, size=16, epochs=3, batch=8, width=4, seed=3, device="cpu")
    return url


@pytest.fixture(scope="module")
def pattern() -> np.ndarray:
    """A noise-free 16³ Bragg pattern of a hexagonal prism with smooth domains."""
    return simulate_crystal((16, 16, 16), size=0.45, photons=None, seed=7, phase_amplitude=1.0).intensity


def test_training_pairs_shapes_and_noise_free_consistency(rng):
    amps, objs = cnn.training_pairs(4, 16, rng=rng, photons=None)
    assert amps.shape == (4, 1, 16, 16, 16) and objs.shape == (4, 2, 8, 8, 8)
    assert amps.dtype == np.float32 and objs.dtype == np.float32
    np.testing.assert_allclose(amps.reshape(4, -1).max(axis=1), 1.0)
    support, phase = objs[:, 0], objs[:, 1]
    assert set(np.unique(support)) == {0.0, 1.0}
    assert np.all(phase[support == 0] == 0)
    assert np.abs(phase).max() <= math.pi / 2 + 1e-6
    for i in range(4):
        inside = support[i] > 0
        assert 20 < inside.sum() < 8 ** 3 / 2  # a crystal, oversampled
        assert abs(phase[i][inside].mean()) < 1e-5  # zero mean phase on the crystal
        padded = np.zeros((16, 16, 16), dtype=np.complex128)
        padded[4:12, 4:12, 4:12] = support[i] * np.exp(1j * phase[i])
        modulus = np.abs(_far_field(padded))
        np.testing.assert_allclose(modulus / modulus.max(), amps[i, 0], atol=2e-6)
    # shapes differ from pair to pair (random size, aspect and rotation)
    assert len({int(s.sum()) for s in support}) > 1


def test_training_pairs_noisy_and_seeded():
    a1, o1 = cnn.training_pairs(3, 16, rng=np.random.default_rng(1))
    a2, o2 = cnn.training_pairs(3, 16, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(o1, o2)
    clean, _ = cnn.training_pairs(3, 16, rng=np.random.default_rng(1), photons=None)
    # Poisson counts: the squared amplitudes are proportional to integers, and differ from the clean pattern
    counts = a1[0, 0].astype(np.float64) ** 2
    counts /= counts[counts > 0].min()
    assert np.abs(counts - np.round(counts)).max() < 1e-2 * counts.max()
    assert not np.allclose(a1, clean)


def test_sizes_must_be_powers_of_two():
    for bad in (24, 8, 0, 16.0, True):
        with pytest.raises(InputError, match="power of two"):
            cnn.CdiNet(bad)
    with pytest.raises(InputError, match="power of two"):
        cnn.training_pairs(2, 20, rng=np.random.default_rng(0))
    with pytest.raises(InputError, match="power of two"):
        cnn.pretrain("memory://cdi-cnn-never", n=16, size=48, epochs=1, device="cpu")
    assert not storage.exists("memory://cdi-cnn-never")
    with pytest.raises(InputError, match="width"):
        cnn.CdiNet(16, width=0)


def test_network_shapes_ranges_and_scale_invariance():
    torch.manual_seed(0)
    for size, half in ((16, 8), (32, 16)):
        net = cnn.CdiNet(size, width=2).eval()
        x = torch.rand(2, 1, size, size, size)
        with torch.no_grad():
            amp, phase = net(x)
            amp5, phase5 = net(5 * x)
        assert amp.shape == phase.shape == (2, half, half, half)
        assert float(amp.min()) > 0 and float(amp.max()) < 1
        assert float(phase.abs().max()) <= math.pi
        torch.testing.assert_close(amp, amp5, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(phase, phase5, atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match=r"\(batch, 1, 16, 16, 16\)"):
        cnn.CdiNet(16, width=2)(torch.rand(1, 1, 32, 32, 32))


def test_pair_loss_ignores_phase_offset_and_twin(rng):
    _, objs = cnn.training_pairs(3, 16, rng=rng, photons=None)
    target = torch.from_numpy(objs)
    amp, phase = target[:, 0], target[:, 1]
    assert float(cnn.pair_loss(amp, phase, target)) < 1e-6
    assert float(cnn.pair_loss(amp, phase + 0.7, target)) < 1e-6  # a global phase offset costs nothing
    twin = cnn._twin(target)
    assert not torch.allclose(twin, target)
    assert float(cnn.pair_loss(twin[:, 0], twin[:, 1], target)) < 1e-6  # nor does the twin (same intensity)
    # the twin's intensity is the object's
    obj = objs[0, 0] * np.exp(1j * objs[0, 1])
    tw = twin[0, 0].numpy() * np.exp(1j * twin[0, 1].numpy())
    np.testing.assert_allclose(np.abs(_far_field(tw)), np.abs(_far_field(obj)), atol=1e-5)
    # a wrong phase or amplitude does cost
    assert float(cnn.pair_loss(amp, phase + torch.randn_like(phase), target)) > 0.05
    assert float(cnn.pair_loss(0.5 * amp, phase, target)) > 0.01


def test_pretrain_writes_a_complete_entry_that_loads_back(entry):
    assert storage.is_complete(entry)
    doc = json.loads(storage.read_bytes(storage.join(entry, "model.json")))
    assert doc["kind"] == "cdi-cnn" and doc["size"] == 16 and doc["width"] == 4
    assert doc["id"].startswith("cdicnn-") and storage.read_marker(entry)["id"] == doc["id"]
    assert doc["config"]["n"] == 64 and doc["config"]["epochs"] == 3 and doc["xrdscale_version"]
    metrics = doc["metrics"]
    assert metrics["epochs_run"] == 3 and len(metrics["curves"]["val_loss"]) == 3
    assert metrics["curves"]["train_loss"][-1] < metrics["curves"]["train_loss"][0]
    assert metrics["val_loss"] == min(metrics["curves"]["val_loss"])

    model, info = cnn.load_model(entry)
    assert isinstance(model, cnn.CdiNet) and not model.training and info["id"] == doc["id"]
    # the loaded network is the trained one: it reproduces the held-out loss on the same (seeded) pairs
    amps, objs = cnn.training_pairs(64, 16, rng=np.random.default_rng(3))
    test = slice(*doc["config"]["split"][1:])
    with torch.no_grad():
        amp, phase = model(torch.from_numpy(amps[test]))
        loss = float(cnn.pair_loss(amp, phase, torch.from_numpy(objs[test])))
    assert loss == pytest.approx(metrics["test_loss"], rel=1e-5)
    again, _ = cnn.load_model(entry)
    with torch.no_grad():
        torch.testing.assert_close(again(torch.from_numpy(amps[:2])), model(torch.from_numpy(amps[:2])),
                                   rtol=0, atol=0)


def test_pretrain_logs_every_epoch_and_stops_early(tmp_path, caplog):
    url = str(tmp_path / "m")
    with caplog.at_level(logging.INFO, logger="xrdscale.cdi.cnn"):
        cnn.pretrain(url, n=16, size=16, epochs=4, batch=8, lr=1e-9, width=2, patience=1, device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cdi cnn: epoch")]
    # lr 1e-9: the validation loss cannot improve after the first epoch, patience 1 stops after the second
    assert [line.split(",")[0] for line in lines] == ["cdi cnn: epoch 1/4", "cdi cnn: epoch 2/4"]
    assert all(" loss " in line and " val " in line and line.split(", ")[3].endswith(" s")
               for line in lines[:1])
    assert "stopped early" in lines[-1]
    assert json.loads(storage.read_bytes(storage.join(url, "model.json")))["metrics"]["epochs_run"] == 2


def test_load_model_refuses_bad_entries(entry, tmp_path):
    with pytest.raises(StorageError, match="train-cnn"):
        cnn.load_model(str(tmp_path / "nothing"))

    corrupt = str(tmp_path / "corrupt")
    shutil.copytree(entry, corrupt)
    weights = pathlib.Path(corrupt, "weights.pt")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"corrupt: weights\.pt does not match its sha256"):
        cnn.load_model(corrupt)
    weights.unlink()
    with pytest.raises(InputError, match=r"weights file weights\.pt is missing"):
        cnn.load_model(corrupt)

    partial = str(tmp_path / "partial")
    shutil.copytree(entry, partial)
    os.remove(os.path.join(partial, storage.MARKER))
    with pytest.raises(IncompleteStoreError, match="partial registry entry"):
        cnn.load_model(partial)

    other = str(tmp_path / "other")
    storage.write_bytes(os.path.join(other, "model.json"), json.dumps({"format": 1, "stage": "pqnet-model"}).encode())
    storage.mark_complete(other)
    with pytest.raises(InputError, match=r"not a CDI CNN entry .*'pqnet-model'.*`xrdscale cdi train-cnn OUT`"):
        cnn.load_model(other)


def test_refinement_lowers_the_fourier_modulus_misfit(entry, pattern):
    model, _ = cnn.load_model(entry)
    before_params = [p.detach().clone() for p in model.parameters()]
    start = cnn.refine(model, pattern, epochs=0, device="cpu")
    refined = cnn.refine(model, pattern, epochs=40, lr=1e-3, device="cpu")
    e0, e1 = cnn.modulus_error(start, pattern), cnn.modulus_error(refined, pattern)
    assert e1 < 0.7 * e0
    # the caller's network is left as it was
    assert all(torch.equal(a, b) for a, b in zip(before_params, model.parameters(), strict=True))
    # the returned object has the data's scale: forward(object) fits √I with a scale of 1
    f = np.abs(_far_field(refined))
    amp = np.sqrt(pattern)
    assert (f * amp).sum() / (f ** 2).sum() == pytest.approx(1.0, abs=1e-3)
    # an object of the pattern's own modulus and phase fits perfectly; a zero object not at all
    truth = simulate_crystal((16, 16, 16), size=0.45, photons=None, seed=7).obj
    assert cnn.modulus_error(truth, pattern) < 1e-10
    assert cnn.modulus_error(np.zeros_like(truth), pattern) == pytest.approx(1.0)


def test_refine_logs_the_misfit_at_start_and_end(entry, pattern, caplog):
    model, _ = cnn.load_model(entry)
    with caplog.at_level(logging.INFO, logger="xrdscale.cdi.cnn"):
        cnn.refine(model, pattern, epochs=2, device="cpu")
    (line,) = [r.getMessage() for r in caplog.records if "refine" in r.getMessage()]
    assert "at the start" in line and "after 2 epochs" in line


def test_larger_patterns_are_cut_and_the_object_comes_back_on_the_full_grid(entry):
    model, _ = cnn.load_model(entry)
    intensity = simulate_crystal((32, 32, 32), size=0.45, photons=None, seed=2).intensity
    full = cnn.refine(model, intensity, epochs=0, device="cpu")
    assert full.shape == (32, 32, 32) and full.dtype == np.complex64
    # the network saw the central 16³ of the pattern: the same prediction as from that cut alone
    central = cnn.resize_centred(intensity, (16, 16, 16))
    small = cnn.refine(model, central, epochs=0, device="cpu")
    f_full, f_small = _far_field(full), _far_field(small)
    np.testing.assert_allclose(f_full[8:24, 8:24, 8:24], f_small, atol=1e-4 * np.abs(f_small).max())
    outside = np.ones(f_full.shape, dtype=bool)
    outside[8:24, 8:24, 8:24] = False
    assert np.abs(f_full[outside]).max() < 1e-4 * np.abs(f_small).max()


def test_masked_voxels_are_left_out(entry, pattern):
    model, _ = cnn.load_model(entry)
    mask = np.zeros(pattern.shape, dtype=bool)
    mask[8, 8, 5:11] = True  # a detector gap through the peak
    spoiled = pattern.copy()
    spoiled[mask] = 1e9
    spoiled[0, 0, 0] = np.nan  # non-finite voxels count as not measured
    mask_nan = mask.copy()
    mask_nan[0, 0, 0] = True
    a = cnn.refine(model, pattern, mask=mask_nan, epochs=3, lr=1e-3, device="cpu")
    b = cnn.refine(model, spoiled, mask=mask, epochs=3, lr=1e-3, device="cpu")
    np.testing.assert_allclose(a, b, atol=1e-6 * np.abs(a).max())
    assert cnn.modulus_error(a, spoiled, mask=mask_nan) == pytest.approx(cnn.modulus_error(a, pattern, mask=mask_nan))


def test_cnn_guess_returns_the_data_shape(entry):
    intensity = simulate_crystal((24, 20, 16), size=0.4, photons=1e6, seed=4).intensity
    intensity = intensity[:, :, 2:14]  # one side shorter than the network's input: zero-padded, not measured
    guess = cnn.cnn_guess(intensity, entry, epochs=2, device="cpu")
    assert guess.shape == (24, 20, 12) and guess.dtype == np.complex64
    assert np.isfinite(guess).all() and np.abs(guess).max() > 0


def test_bad_patterns_are_refused(entry):
    model, _ = cnn.load_model(entry)
    good = np.ones((16, 16, 16))
    with pytest.raises(InputError, match="3D"):
        cnn.refine(model, np.ones((16, 16)), device="cpu")
    with pytest.raises(InputError, match="negative"):
        cnn.refine(model, -good, device="cpu")
    with pytest.raises(InputError, match="zero"):
        cnn.refine(model, 0 * good, device="cpu")
    with pytest.raises(InputError, match="mask has shape"):
        cnn.refine(model, good, mask=np.zeros((8, 8, 8), dtype=bool), device="cpu")
    with pytest.raises(InputError, match="epochs"):
        cnn.refine(model, good, epochs=-1, device="cpu")
