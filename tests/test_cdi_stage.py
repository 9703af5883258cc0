"""The Bragg CDI stages: ``xrdscale cdi reconstruct`` / ``series``, the series analysis (PCA,
Table 1), the series store's contract, the report section, a CDI campaign, and bad input."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pandas as pd
import pytest

from xrdscale.cdi import series as analysis
from xrdscale.cdi.simulate import simulate_crystal, simulate_series
from xrdscale.exceptions import ConfigError, InputError
from xrdscale.io import contracts, storage
from xrdscale.stages.cdi import CdiConfig
from xrdscale.stages.cdi import series as run_series

#: fewer random starts than the default for 32³ tests (the defaults' accuracy is tested in test_cdi_phasing)
QUICK = {"starts": 2}


class _Result:
    def __init__(self, code: int, output: str) -> None:
        self.exit_code, self.output = code, output


@pytest.fixture
def cli(xrdscale_cli):
    """``xrdscale ARGS…`` with stdout and stderr as one line of output."""
    def run(*args: str) -> _Result:
        code, out, err = xrdscale_cli(*args)
        return _Result(code, " ".join((out + err).split()))

    return run


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    """Three states of one 32³ crystal as .npy patterns, and the simulation."""
    root = tmp_path_factory.mktemp("cdi")
    sim = simulate_series(3, (32, 32, 32), photons=1e7, seed=3, coefficients=(0.0, 0.6, 1.2))
    paths = []
    for i, st in enumerate(sim.states):
        p = root / f"state_{i}.npy"
        np.save(p, st.intensity)
        paths.append(str(p))
    return sim, paths


def test_pca_recovers_the_coefficients_of_a_synthetic_series(rng):
    pattern = rng.normal(size=20000)
    a = np.array([0.0, 0.3, 0.9, 1.4, 0.8, 0.2])
    dphi = a[:, None] * pattern[None, :] + rng.normal(scale=0.3, size=(a.size, pattern.size))
    result = analysis.pca(dphi)
    assert np.corrcoef(result.omega, a)[0, 1] >= 0.99
    assert result.omega.sum() > 0 and np.isclose(np.linalg.norm(result.component), 1.0)
    assert np.allclose(result.phi, dphi - result.component[None, :])
    assert result.eigenvalues[0] == result.eigenvalues.max() and 0.5 < result.explained <= 1.0
    flipped = analysis.pca(-dphi)  # the sign convention (Σ Ω ≥ 0) fixes Ω; ψ₁ takes the sign of the data
    assert np.allclose(flipped.omega, result.omega) and np.allclose(flipped.component, -result.component)


def test_pca_never_forms_the_voxel_by_voxel_covariance(rng):
    # 3 million voxels: a 3e6 × 3e6 covariance would need 72 TB; the SVD of the 4 × 3e6 matrix needs 100 MB
    dphi = rng.normal(size=(4, 3_000_000)).astype(np.float32)
    result = analysis.pca(dphi)
    assert result.component.shape == (3_000_000,) and result.eigenvalues.shape == (4,)


def test_phase_differences_are_wrapped_products(rng):
    support = np.zeros((4, 4, 4), bool)
    support[1:3, 1:3, 1:3] = True
    phase0 = rng.uniform(-np.pi, np.pi, support.shape)
    objs = [np.exp(1j * phase0), np.exp(1j * (phase0 + 3.0)), np.exp(1j * (phase0 - 3.5))]
    d = analysis.phase_differences(objs, support)
    assert d.shape == (3, 8)
    assert np.allclose(d[0], 0) and np.allclose(d[1], 3.0) and np.allclose(d[2], 2 * np.pi - 3.5)


def test_series_analysis_refuses_what_cannot_be_compared():
    with pytest.raises(InputError, match="different shapes"):
        analysis.common_support([np.ones((4, 4, 4), bool), np.ones((4, 4, 5), bool)])
    with pytest.raises(InputError, match="no voxel in common"):
        a, b = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
        a[0], b[-1] = True, True
        analysis.common_support([a, b], fraction=1.0)
    with pytest.raises(InputError, match="do not differ"):
        analysis.pca(np.zeros((3, 10)))


def test_table_1_columns_and_units():
    dphi = np.array([[0.0, 0.0], [np.pi / 2, np.pi / 2]])
    t = analysis.table(labels=["2.5V", "3V"], chi2=[0.2, 0.3], dphi=dphi, q_norm=3.4e10,
                       strain=np.array([[0.0, 0.0], [1e-3, 3e-3]]), omega=np.array([0.0, 2.2]))
    assert list(t.columns) == list(analysis.TABLE_COLUMNS)
    assert t["dphi_mean_deg"].tolist() == pytest.approx([0.0, 90.0])
    assert t["displacement_mean_angstrom"][1] == pytest.approx(np.pi / 2 / 3.4e10 * 1e10)
    assert t["strain_mean"].tolist() == pytest.approx([0.0, 2e-3])


def test_reconstruct_command_writes_a_cxi_that_meets_the_contract(cli, tmp_path):
    sim = simulate_crystal((32, 32, 32), size=0.35, photons=1e7, seed=1)
    data = tmp_path / "pattern.npy"
    np.save(data, sim.intensity)
    out = tmp_path / "obj.cxi"
    res = cli("cdi", "reconstruct", str(data), str(out), "--iterations", "150", "--final-er", "30",
               "--starts", "2", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert contracts.check(str(out)) == ("cxi", [])
    with h5py.File(out) as f:
        obj = f["entry_1/image_1/data"][()]
        support = f["entry_1/image_1/support"][()].astype(bool)
        chi2 = float(f["entry_1/image_1/chi2"][()])
        assert obj.shape == (32, 32, 32) and np.iscomplexobj(obj)
        assert f["entry_1/data_1/data"].shape == (32, 32, 32)
    assert 0 <= chi2 < 0.2
    import json

    from xrdscale.cdi.io import read_cxi
    from xrdscale.cdi.post import dice

    attrs = read_cxi(str(out))["attrs"]
    assert attrs["stage"] == "cdi" and json.loads(attrs["config"])["iterations"] == 150 and attrs["xrdscale_version"]

    assert dice(support, sim.support) > 0.7


def test_series_stage_writes_the_store_table_and_report(cli, states, tmp_path):
    sim, paths = states
    out = str(tmp_path / "series.zarr")
    run_series(paths, out, labels=["2.5V", "3V", "3.5V"], progress=False, device="cpu", **QUICK)
    assert contracts.check(out) == ("cdi-series", [])
    ds = storage.open_store(out, stage="cdi-series")
    assert ds["phase"].dims == ("state", "z", "y", "x") and list(ds["state"].values) == ["2.5V", "3V", "3.5V"]
    assert ds.attrs["stage"] == "cdi-series" and "iterations" in ds.attrs["config"]
    omega = ds["omega"].values
    assert omega[0] == pytest.approx(0.0, abs=1e-6) and np.all(np.abs(omega[1:]) > 0)
    table = pd.read_csv(storage.join(out, "table1.csv"))
    assert list(table["state"]) == ["2.5V", "3V", "3.5V"] and (table["chi2"] < 0.05).all()
    assert table["omega"].tolist() == pytest.approx(omega.tolist())
    assert table["displacement_mean_angstrom"].tolist() == pytest.approx(
        (np.radians(table["dphi_mean_deg"]) / ds.attrs["q_norm"] * 1e10).tolist())
    support = ds["support"].values
    strain = ds["strain"].values
    assert np.isnan(strain[:, ~support]).all() and np.isfinite(strain[:, support]).mean() > 0.9
    assert np.isfinite(ds["dphi"].values[:, support]).all() and np.isnan(ds["dphi"].values[:, ~support]).all()

    res = cli("report", "--cdi", out, str(tmp_path / "report"))
    assert res.exit_code == 0, res.output
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Bragg CDI series" in html and "Table 1" in html and "Ω (Eq. 3)" in html
    assert len(list((tmp_path / "report" / "figures").glob("cdi_*.png"))) == 2


def test_a_campaign_runs_cdi_series_and_reports_them(states, tmp_path):
    import yaml

    from xrdscale.campaign.runner import run_campaign
    from xrdscale.campaign.spec import load_spec

    _, paths = states
    spec_path = tmp_path / "cdi.yaml"
    spec_path.write_text(yaml.safe_dump({
        "version": 1, "campaign": "lco", "workspace": str(tmp_path / "ws"),
        "pipeline": {"cdi": {"starts": 1, "iterations": 300, "device": "cpu"}},
        "cdi": [{"id": "lco-1", "states": [{"label": f"s{i}", "data": p} for i, p in enumerate(paths[:2])]}],
    }))
    spec = load_spec(str(spec_path))
    result = run_campaign(spec, retry_delay=0.0)
    assert result.ok, result.failed
    assert contracts.check(result.series["lco-1"]) == ("cdi-series", [])
    assert "Bragg CDI series" in (tmp_path / "ws" / "report" / "report.html").read_text()
    events: list[tuple[str, str, str]] = []
    again = run_campaign(spec, retry_delay=0.0, on_event=lambda d, s, st: events.append((d, s, st)))
    assert again.ok and ("lco-1", "cdi", "skipped") in events


def test_a_campaign_spec_needs_cycles_or_cdi():
    from xrdscale.campaign.spec import validate_spec

    with pytest.raises(ConfigError, match=r"needs cycles .*cdi .*xcs .* or watch .*it has none"):
        validate_spec({"version": 1, "campaign": "x", "workspace": "w"})
    with pytest.raises(ConfigError, match="at least 2"):
        validate_spec({"version": 1, "campaign": "x", "workspace": "w",
                       "cdi": [{"id": "a", "states": [{"label": "s", "data": "d.npy"}]}]})


def test_config_refuses_inconsistent_settings():
    with pytest.raises(ConfigError, match="final_er .* exceeds iterations"):
        CdiConfig.build(iterations=10, final_er=20)
    with pytest.raises(ConfigError, match="unknown phase-retrieval algorithm 'gs'; expected one of hio, raar, er"):
        CdiConfig.build(algorithm="gs")
    with pytest.raises(ConfigError, match="init: cnn needs cnn_model"):
        CdiConfig.build(init="cnn")


@pytest.mark.parametrize("case", ["2d", "negative", "nan", "mask", "support"])
def test_bad_input_is_a_clear_error_and_writes_nothing(cli, case, tmp_path):
    sim = simulate_crystal((16, 16, 16), size=0.3, photons=1e6, seed=0)
    data = sim.intensity.copy()
    extra: list[str] = []
    expect = {"2d": "needs a rocking series", "negative": "negative", "nan": "NaN", "mask": "mask",
              "support": "support"}[case]
    if case == "2d":
        data = data[0]
    elif case == "negative":
        data[3, 4, 5] = -1
    elif case == "nan":
        data[1, 1, 1] = np.nan
    elif case == "mask":
        np.save(tmp_path / "mask.npy", np.zeros((5, 7), bool))
        extra = ["--mask", str(tmp_path / "mask.npy")]
    else:
        np.save(tmp_path / "support.npy", np.ones((24, 24, 24), bool))
        extra = ["--support", str(tmp_path / "support.npy")]
    np.save(tmp_path / "data.npy", data)
    out = tmp_path / "out.cxi"
    res = cli("cdi", "reconstruct", str(tmp_path / "data.npy"), str(out), "--iterations", "20", "--final-er", "5",
               "--starts", "1", "--device", "cpu", *extra)
    assert res.exit_code == 1, res.output
    assert expect.lower() in res.output.lower() and "Traceback" not in res.output
    assert not out.exists()


def test_a_series_of_different_shapes_is_refused_before_any_work(cli, tmp_path):
    a = simulate_crystal((16, 16, 16), size=0.3, photons=1e6, seed=0).intensity
    b = simulate_crystal((20, 20, 20), size=0.3, photons=1e6, seed=0).intensity
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    out = tmp_path / "s.zarr"
    res = cli("cdi", "series", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), str(out))
    assert res.exit_code == 1 and "one shape" in res.output and "(16, 16, 16)" in res.output
    assert not os.path.exists(out)


@pytest.mark.slow
def test_series_follows_the_simulated_domain_growth(tmp_path):
    """48³, three states a = 0, 0.6, 1.2 of one surface domain: Ω and the mean phase change grow with a.

    The whole series shares one twin, which the data cannot tell (a twinned series has
    Δφ(r) → −Δφ(−r)), so the sign of the mean phase difference is the series', not the truth's.
    """
    sim = simulate_series(3, (48, 48, 48), photons=1e7, seed=3, coefficients=(0.0, 0.6, 1.2))
    paths = []
    for i, st in enumerate(sim.states):
        np.save(tmp_path / f"s{i}.npy", st.intensity)
        paths.append(str(tmp_path / f"s{i}.npy"))
    out = str(tmp_path / "series.zarr")
    run_series(paths, out, progress=False, device="cpu", starts=4)
    ds = storage.open_store(out, stage="cdi-series")
    omega, mean = ds["omega"].values, ds["dphi_mean_deg"].values
    assert omega[2] > omega[1] > 0
    assert abs(mean[2]) > abs(mean[1]) > 0 and np.sign(mean[1]) == np.sign(mean[2])


def test_the_example_cdi_campaign_spec_is_valid():
    import yaml

    from xrdscale.campaign.spec import validate_spec

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "jobs", "cdi-example.yaml")) as f:
        spec = validate_spec(yaml.safe_load(f))
    assert [s.label for s in spec.cdi[0].states][0] == "2.5V-charge" and len(spec.cdi[0].states) == 6
    assert not spec.cycles and spec.geometry is None


@pytest.mark.slow
def test_reconstruct_from_the_cnn_guess(cli, tmp_path):
    """``--init cnn``: a (tiny) pre-trained CNN's refined guess starts the iterative algorithm."""
    model = str(tmp_path / "cnn")
    res = cli("cdi", "train-cnn", model, "--n", "48", "--size", "16", "--epochs", "2", "--width", "4",
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    sim = simulate_crystal((32, 32, 32), size=0.35, photons=1e7, seed=5)
    np.save(tmp_path / "p.npy", sim.intensity)
    out = tmp_path / "obj.cxi"
    res = cli("cdi", "reconstruct", str(tmp_path / "p.npy"), str(out), "--init", "cnn", "--cnn-model", model,
              "--cnn-epochs", "5", "--starts", "2", "--iterations", "200", "--final-er", "40", "--device", "cpu")
    assert res.exit_code == 0, res.output
    import json

    from xrdscale.cdi.io import read_cxi

    result = read_cxi(str(out))
    assert result["chi2"] < 0.1 and json.loads(result["attrs"]["config"])["init"] == "cnn"


@pytest.mark.gpu(library="torch")
def test_phase_retrieval_on_cuda_matches_the_cpu_targets():
    """The same default retrieval on CUDA: the device is used, and the object is as good as on the CPU."""
    from xrdscale.cdi import phasing, post

    sim = simulate_crystal((64, 64, 64), size=0.35, photons=1e6, seed=0)
    gpu = phasing.phase_retrieval(sim.intensity, device="cuda")
    assert gpu.device.startswith("cuda")
    obj, support = post.align(gpu.obj, support=gpu.support)
    assert post.phase_rms_error(obj, sim.obj, sim.support) <= 0.2 and post.dice(support, sim.support) >= 0.9
