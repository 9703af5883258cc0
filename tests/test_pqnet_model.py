"""PQ-Net network, ONNX engine, registry entries and training libraries (fast, no training)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from _builders import PQNET_YAML as YAML
from _builders import tiny_spec, write_random_entry
from xrdscale.exceptions import ConfigError, IncompleteStoreError, InputError, StorageError
from xrdscale.io import storage
from xrdscale.physics.phaselib import PhaseLibrary
from xrdscale.pqnet import registry
from xrdscale.pqnet.engine import Ensemble, export_onnx
from xrdscale.pqnet.library import label_var, make_library, open_library
from xrdscale.pqnet.model import ModelSpec, PQNet
from xrdscale.pqnet.train import _select_routes


def test_outputs_are_in_absolute_units(rng):
    torch.manual_seed(0)
    model = PQNet(tiny_spec()).eval()
    x = torch.from_numpy(rng.uniform(1, 10, (5, 64)).astype(np.float32))
    with torch.inference_mode():
        y1, y3 = model(x), model(3.0 * x)
    scale = torch.tensor(model.spec.scale_mask)
    torch.testing.assert_close(y3[:, scale], 3.0 * y1[:, scale], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y3[:, ~scale], y1[:, ~scale], rtol=1e-5, atol=1e-6)


def test_grouped_phase_blocks_equal_separate_per_phase_modules(rng):
    """The grouped convolutions compute exactly what one phase block and route per phase would."""
    torch.manual_seed(1)
    spec = tiny_spec()
    model = PQNet(spec).eval()
    x = torch.from_numpy(rng.uniform(1, 10, (3, 64)).astype(np.float32))
    xn = x / x.mean(dim=1, keepdim=True)
    c = spec.phase_channels
    with torch.inference_mode():
        got = model.raw_outputs(xn)
        shared = model.pattern_block(xn.unsqueeze(1))
        convs = [m for m in model.phase_blocks if isinstance(m, nn.Conv1d)]
        for j, (phase, _) in enumerate(spec.routes):
            p = spec.phases.index(phase)
            h = shared
            for i, conv in enumerate(convs):
                sl = slice(p * c, (p + 1) * c)
                weight = conv.weight[sl]
                h = torch.max_pool1d(torch.relu(nn.functional.conv1d(h, weight, conv.bias[sl],
                                                                     padding=conv.padding)), 2, 2)
            f = h.flatten(1)
            ref = torch.relu(f @ model.w1[j] + model.b1[j]) @ model.w2[j] + model.b2[j]
            torch.testing.assert_close(got[:, j], ref, rtol=1e-4, atol=1e-5)


def test_scale_outputs_are_a_sharp_softplus_and_never_negative(rng):
    """scale / n = softplus_β(r·std + mean) with β = 100/std; standardised() standardises it; old specs stay as were."""
    torch.manual_seed(3)
    spec = tiny_spec()
    model = PQNet(spec).eval()
    with torch.no_grad():  # push the routes' affine outputs far to both sides of zero
        model.b2.copy_(torch.tensor([-8.0, 0.3, -0.2, 4.0]))
    x = torch.from_numpy(rng.uniform(1, 10, (6, 64)).astype(np.float32))
    norm = x.mean(dim=1, keepdim=True)
    mean, std = torch.tensor(spec.target_mean), torch.tensor(spec.target_std)
    with torch.inference_mode():
        r = model.raw_outputs(x / norm)
        y, t = model(x), model.standardised(x / norm)
    z = r * std + mean
    scale = torch.tensor(spec.scale_mask)
    beta = spec.softplus_beta / std
    assert spec.softplus_beta == 100.0
    ref = torch.where(scale, (z.clamp_min(0) + torch.log1p(torch.exp(-(beta * z).abs())) / beta), z)  # softplus_β
    torch.testing.assert_close(y[:, ~scale], z[:, ~scale])
    torch.testing.assert_close(y[:, scale] / norm, ref[:, scale], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(t, (torch.where(scale, y / norm, y) - mean) / std, rtol=1e-4, atol=1e-5)
    assert (y[:, 0] >= 0).all() and (y[:, 0] < 1e-6 * norm[:, 0]).all()  # r far below -mean/std: ~0, not negative
    torch.testing.assert_close(y[:, 3] / norm[:, 0], z[:, 3])            # far above: the identity
    onnx = Ensemble([model], [export_onnx(model)], engine="onnx").predict(x.numpy())[0]
    np.testing.assert_allclose(onnx, y.numpy(), rtol=1e-4, atol=1e-6)
    assert (onnx[:, 0] >= 0).all()
    # entries written before the option keep their affine scale outputs
    old = {k: v for k, v in spec.to_dict().items() if k != "nonnegative_scale"}
    assert ModelSpec.from_dict(old).nonnegative_scale is False and ModelSpec.from_dict(spec.to_dict()) == spec
    unrecorded = {k: v for k, v in spec.to_dict().items() if k != "softplus_beta"}   # softplus, before b was kept
    assert ModelSpec.from_dict(unrecorded).softplus_beta == 10.0
    affine = PQNet(ModelSpec.from_dict(old)).eval()
    affine.load_state_dict(model.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(affine(x)[:, scale] / norm, z[:, scale])


def test_onnx_engine_agrees_with_torch(rng):
    torch.manual_seed(2)
    members = [PQNet(tiny_spec()).eval() for _ in range(2)]
    x = rng.uniform(0, 5, (17, 64)).astype(np.float32)
    onnx = Ensemble(members, [export_onnx(m) for m in members], engine="onnx")
    ref = Ensemble(members, engine="torch")
    m1, s1 = onnx.predict(x)
    m2, s2 = ref.predict(x)
    np.testing.assert_allclose(m1, m2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s1, s2, rtol=1e-3, atol=1e-5)
    with torch.inference_mode():  # the bare torch forward pass of each member
        outs = np.stack([m(torch.from_numpy(x)).numpy() for m in members])
    np.testing.assert_allclose(m2, outs.mean(0), rtol=1e-5, atol=1e-6)


def test_registry_roundtrip_and_content_id(tmp_path, rng):
    spec = tiny_spec()
    q = np.linspace(1.2, 2.8, 64)
    url = str(tmp_path / "model")
    entry_id = write_random_entry(url, spec, q)
    assert storage.is_complete(url)
    entry = registry.open_entry(url)
    assert entry.id == entry_id == storage.read_marker(url)["id"]
    assert entry.spec == spec and entry.phases_yaml == YAML
    np.testing.assert_array_equal(entry.q, q)
    torch.manual_seed(1)
    ref = PQNet(spec).eval()
    x = torch.rand(4, 64)
    with torch.inference_mode():
        torch.testing.assert_close(entry.load_member(1)(x), ref(x))
    assert write_random_entry(str(tmp_path / "again"), spec, q) == entry_id  # same content, same id
    assert write_random_entry(str(tmp_path / "three"), spec, q, n=3) != entry_id


def test_registry_refuses_missing_partial_and_corrupt_entries(tmp_path):
    spec = tiny_spec()
    url = str(tmp_path / "model")
    with pytest.raises(StorageError, match="no model"):
        registry.open_entry(url)
    write_random_entry(url, spec, np.linspace(1.2, 2.8, 64))
    member = tmp_path / "model" / "members" / "member_001.pt"
    member.write_bytes(member.read_bytes()[:-10])
    entry = registry.open_entry(url)
    with pytest.raises(InputError, match="member_001.pt does not match its sha256"):
        entry.verify()
    (tmp_path / "model" / "model.json").write_text("{not json")
    with pytest.raises(InputError, match="not a valid registry entry"):
        registry.open_entry(url)
    os.remove(tmp_path / "model" / storage.MARKER)
    with pytest.raises(IncompleteStoreError, match="partial registry entry"):
        registry.open_entry(url)


def test_entries_trained_at_the_old_intensity_unit_are_refused(tmp_path):
    """Models from before K = 1 (no intensity_unit) would give 100× the contract's scale factors."""
    url = str(tmp_path / "model")
    write_random_entry(url, tiny_spec(), np.linspace(1.2, 2.8, 64))
    assert registry.open_entry(url).spec.intensity_unit == 1.0
    doc_path = tmp_path / "model" / "model.json"
    doc = json.loads(doc_path.read_text())
    del doc["spec"]["intensity_unit"]
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="K = 1e-2.*100 times.*retrain"):
        registry.open_entry(url)
    with pytest.raises(ValueError, match="K = 0.01"):
        PQNet(ModelSpec.from_dict({**tiny_spec().to_dict(), "intensity_unit": 0.01}))


def test_library_blocks_equal_the_bare_phase_library_calls(tmp_path):
    yaml_path = tmp_path / "lib.yaml"
    yaml_path.write_text(YAML)
    url = str(tmp_path / "lib.zarr")
    make_library(str(yaml_path), url, n=250, seed=7, block=100)
    ds, labels = open_library(url)
    lib = PhaseLibrary.load(str(yaml_path))
    assert labels == lib.label_names()
    assert ds["patterns"].shape == (250, 128)
    for b, (lo, hi) in enumerate([(0, 100), (100, 200), (200, 250)]):
        rng = np.random.default_rng([7, b])
        sampled = lib.sample(hi - lo, rng)
        ref = lib.simulate(sampled, rng)
        np.testing.assert_array_equal(ds["patterns"][lo:hi].values, ref)
        for p, k in labels:
            np.testing.assert_array_equal(ds[label_var(p, k)][lo:hi].values, sampled[p][k])
    assert json.loads(ds.attrs["config"])["n"] == 250 and ds.attrs["phases_yaml"] == YAML
    assert ds.attrs["intensity_unit"] == 1.0


def test_library_q_override_and_bad_inputs(tmp_path):
    yaml_path = tmp_path / "lib.yaml"
    yaml_path.write_text(YAML)
    url = str(tmp_path / "lib.zarr")
    make_library(str(yaml_path), url, n=20, q_range=(1.3, 2.5), npt=50)
    ds, _ = open_library(url)
    np.testing.assert_allclose(ds["q"].values, np.linspace(1.3, 2.5, 50))
    assert "npt: 50" in ds.attrs["phases_yaml"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(YAML.replace("NCA: {builtin: NCA,", "Unobtainium: {builtin: Unobtainium,"))
    with pytest.raises(ConfigError, match="Unobtainium"):
        make_library(str(bad), str(tmp_path / "bad.zarr"), n=10)
    assert not storage.exists(str(tmp_path / "bad.zarr"))
    with pytest.raises(ConfigError, match="not increasing"):
        make_library(str(yaml_path), url, n=10, q_range=(2.5, 1.3))


def test_output_selection():
    labels = [("NCA", "scale"), ("NCA", "a"), ("NCA", "c"), ("Al", "scale")]
    assert _select_routes(labels, ["scale"]) == [("NCA", "scale"), ("Al", "scale")]
    assert _select_routes(labels, ["NCA.a", "Al.scale"]) == [("NCA", "a"), ("Al", "scale")]
    with pytest.raises(ConfigError, match="not a label"):
        _select_routes(labels, ["Cu.scale"])
    with pytest.raises(ConfigError, match="matches no label"):
        _select_routes(labels, ["volume"])
