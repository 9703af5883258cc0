"""One config per stage: the same model for the function, the CLI, the campaign spec and the hash."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from xrdscale.campaign.spec import Pipeline, load_spec, validate_spec
from xrdscale.cli.stages import config_from_options, config_parameters
from xrdscale.exceptions import ConfigError, InputError
from xrdscale.stages import STAGES, load
from xrdscale.stages.analyse import AnalyseConfig
from xrdscale.stages.integrate import IntegrateConfig, load_poni
from xrdscale.stages.reconstruct import ReconstructConfig

BASE = {"version": 1, "campaign": "c", "workspace": "w", "geometry": {"poni": "p.poni"},
        "cycles": [{"cycle": 1, "datasets": [{"id": "d", "state": "s", "voltage": 1.0, "raw": "r.nxs"}]}]}


def _problems(pipeline: dict) -> str:
    with pytest.raises(ConfigError) as err:
        validate_spec({**BASE, "pipeline": pipeline})
    return str(err.value)


def test_pipeline_sections_are_the_stage_models():
    for name, cls in (("integrate", IntegrateConfig), ("reconstruct", ReconstructConfig), ("analyse", AnalyseConfig)):
        assert Pipeline.model_fields[name].annotation is cls
    for stage in STAGES:  # every stage command's config is a pipeline section
        cls = load(stage.config)
        assert any(f.annotation is cls for f in Pipeline.model_fields.values()), stage.name


def test_bad_values_fail_at_load_with_yaml_paths_and_choices():
    msg = _problems({"integrate": {"method": "median", "npt": "many"}, "reconstruct": {"filter": "cosine"},
                     "denoise": {"splits": 1, "bogus": 2}, "analyse": {"engine": "tensorrt"}})
    assert "6 problem(s)" in msg and "pipeline.denoise.splits: Input should be greater than or equal to 2" in msg
    assert "pipeline.integrate.method: unknown integration method 'median'; expected one of trimmed_mean, mean, " \
           "sigma_clip" in msg
    assert "pipeline.integrate.npt: Input should be a valid integer" in msg and "(got 'many')" in msg
    assert "pipeline.reconstruct.filter: unknown FBP filter 'cosine'; expected one of ram-lak, shepp-logan, hann" in msg
    assert "pipeline.denoise.bogus: unknown key; valid keys here are: batch_size, channels_per_chunk," in msg
    assert "pipeline.analyse.engine: unknown inference engine 'tensorrt'; expected one of onnx, torch" in msg
    # sigma_clip (a stage method the old spec refused) and every other documented setting load
    spec = validate_spec({**BASE, "pipeline": {"integrate": {"method": "sigma_clip"}, "sinogram": {"air_columns": 3},
                                               "reconstruct": {"engine": "astra", "device": "cpu"},
                                               "denoise": {"enabled": True, "splits": 3},
                                               "absorption": {"enabled": True, "maps": "m.zarr"},
                                               "analyse": {"ensemble": 2}}})
    assert spec.pipeline.integrate.method == "sigma_clip" and spec.pipeline.analyse.ensemble == 2


def test_hash_leaves_out_runtime_fields_only():
    a, b = AnalyseConfig(ensemble=2), AnalyseConfig(ensemble=2, actors=4, batch=16)
    assert a.hashed() == b.hashed() and a.record() != b.record()
    assert AnalyseConfig(ensemble=3).hashed() != a.hashed()
    assert "frames_per_chunk" not in IntegrateConfig().hashed() and "method" in IntegrateConfig().hashed()
    assert IntegrateConfig().hashed()["version"] == IntegrateConfig.version


def test_cli_options_are_the_model_fields():
    params, yaml_fields = config_parameters(ReconstructConfig)
    assert {p.name for p in params} == set(ReconstructConfig.model_fields)
    cfg = config_from_options(ReconstructConfig, {"filter": "hann", "iterations": None, "engine": "astra"},
                              yaml_fields)
    assert cfg == ReconstructConfig(filter="hann", engine="astra")
    with pytest.raises(ConfigError, match="unknown FBP filter 'x'"):
        config_from_options(ReconstructConfig, {"filter": "x"}, yaml_fields)
    import os

    res = subprocess.run([sys.executable, "-m", "xrdscale.cli", "reconstruct", "--help"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert res.returncode == 0 and "--channels-per-chunk" in res.stdout
    assert "ram-lak, shepp-logan, hann" in " ".join(res.stdout.split())


def _spec_file(tmp_path, q_range, q_grid):
    lib = {"version": 1, "wavelength": 0.13, "q_grid": {"min": q_grid[0], "max": q_grid[1], "npt": 1000},
           "instrument": {"W": 4e-4}, "phases": {"Al": {"builtin": "Al", "scale": [0, 1]}}}
    (tmp_path / "lib.yaml").write_text(yaml.safe_dump(lib))
    spec = {**BASE, "phases": "lib.yaml", "pipeline": {"integrate": {"npt": 1000, "q_range": list(q_range)}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return str(tmp_path / "spec.yaml")


def test_same_q_range_in_integration_and_library_loads_a_narrower_one_is_refused(tmp_path):
    assert load_spec(_spec_file(tmp_path, (1.2, 3.8), (1.2, 3.8))).pipeline.integrate.q_range == (1.2, 3.8)
    with pytest.raises(ConfigError, match=r"pipeline.integrate.q_range: \[1.25, 3.8\] 1/Å does not cover the q "
                                          r"grid \[1.2, 3.8\] 1/Å of the phase library"):
        load_spec(_spec_file(tmp_path, (1.25, 3.8), (1.2, 3.8)))


def test_model_grid_from_edge_to_edge_is_covered_by_bin_centres():
    import numpy as np

    from xrdscale.pqnet.predict import interpolation

    lo, hi, n = 1.2, 3.8, 1000
    centres = lo + (np.arange(n) + 0.5) * (hi - lo) / n  # what pyFAI returns for q_range (1.2, 3.8)
    idx, w = interpolation(centres, np.linspace(lo, hi, 1000), "volume")
    assert idx.shape == (1000,) and np.all((w >= 0) & (w <= 1))
    with pytest.raises(InputError, match="not covered"):
        interpolation(centres, np.linspace(lo - 0.01, hi, 1000), "volume")


def test_poni_without_wavelength_is_a_clear_error():
    text = "poni_version: 2\nDetector: Pilatus1M\nDistance: 0.3\nPoni1: 0.05\nPoni2: 0.05\nRot1: 0\nRot2: 0\nRot3: 0\n"
    with pytest.raises(InputError, match="has no wavelength; q needs one: add a line 'Wavelength: <metres>'"):
        load_poni(text, "calib.poni")
    with pytest.raises(InputError, match="cannot be read by pyFAI"):
        load_poni("Detector: NoSuchDetector\nDistance: x\n", "bad.poni")


def test_campaign_with_a_poni_without_wavelength_fails_before_any_stage(tmp_path):
    from xrdscale.campaign.runner import run_campaign

    (tmp_path / "p.poni").write_text("poni_version: 2\nDetector: Pilatus1M\nDistance: 0.3\nPoni1: 0.05\nPoni2: 0.05\n")
    (tmp_path / "r.nxs").write_bytes(b"")
    (tmp_path / "lib.yaml").write_text("version: 1\n")
    spec = {**BASE, "workspace": str(tmp_path / "work"), "phases": "lib.yaml"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(InputError, match=r"geometry.poni .*p.poni has no wavelength"):
        run_campaign(load_spec(str(tmp_path / "spec.yaml")))
    assert not (tmp_path / "work" / "datasets").exists()  # nothing ran
