"""Campaign spec validation: every problem at once, with its YAML path."""

from __future__ import annotations

import os

import pytest
import yaml

from xrdscale.campaign.spec import load_spec, validate_spec
from xrdscale.exceptions import ConfigError


def _raw(**over):
    spec = {
        "version": 1,
        "campaign": "test",
        "workspace": "./work",
        "geometry": {"poni": "calib/det.poni"},
        "phases": "phases/lib.yaml",
        "cycles": [
            {"cycle": 1, "datasets": [
                {"id": "c1-charged", "state": "charged", "voltage": 4.2, "raw": "raw/a.nxs"},
                {"id": "c1-discharged", "state": "discharged", "voltage": 2.65, "raw": "raw/b.nxs"},
            ]},
        ],
    }
    spec.update(over)
    return spec


def test_valid_spec_resolves_paths_relative_to_yaml(tmp_path):
    p = tmp_path / "sub" / "spec.yaml"
    p.parent.mkdir()
    p.write_text(yaml.safe_dump(_raw(geometry={"poni": "calib/det.poni", "mask": "s3://bucket/mask.edf"})))
    spec = load_spec(str(p))
    assert spec.workspace == os.path.join(str(p.parent), "work")
    assert spec.geometry.poni == os.path.join(str(p.parent), "calib", "det.poni")
    assert spec.geometry.mask == "s3://bucket/mask.edf"
    assert [d.raw for d in spec.datasets()] == [os.path.join(str(p.parent), "raw", n) for n in ("a.nxs", "b.nxs")]
    assert spec.cluster.kind == "local" and spec.pipeline.integrate.npt == 1000


def test_workspace_override(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(_raw()))
    assert load_spec(str(p), workspace="s3://b/ws").workspace == "s3://b/ws"


def test_every_problem_reported_at_once_with_yaml_path():
    raw = _raw(pipline={"integrate": {}}, cluster={"kind": "address"})
    raw["pipeline"] = {"integrate": {"npt": "many"}}
    raw["cycles"][0]["datasets"][1]["id"] = "../escape"
    raw["cycles"][0]["datasets"].append({"id": "c1-charged", "state": "x", "voltage": 3.0, "raw": "r.nxs"})
    raw["cycles"][0]["datasets"][0]["voltag"] = 4.2
    with pytest.raises(ConfigError) as err:
        validate_spec(raw, "spec.yaml")
    msg = str(err.value)
    assert "pipline: unknown key" in msg
    assert "pipeline.integrate.npt:" in msg
    assert "cycles[0].datasets[1].id:" in msg and "'..'" in msg
    assert "cycles[0].datasets[2].id: duplicate dataset id 'c1-charged'" in msg
    assert "cycles[0].datasets[0].voltag: unknown key" in msg
    assert "cluster.dask: Field required" in msg
    assert "6 problem(s)" in msg


@pytest.mark.parametrize("bad", ["a/b", "..", "a..b", "", " x"])
def test_bad_dataset_ids(bad):
    raw = _raw()
    raw["cycles"][0]["datasets"][0]["id"] = bad
    with pytest.raises(ConfigError, match=r"cycles\[0\]\.datasets\[0\]\.id"):
        validate_spec(raw)


def test_unsupported_version_and_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="version 7 is not supported"):
        validate_spec(_raw(version=7))
    p = tmp_path / "s.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="YAML mapping"):
        load_spec(str(p))
    p.write_text("version: 1\n  bad: [indent\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(str(p))


@pytest.mark.s3
def test_spec_from_s3_resolves_against_its_prefix(s3_bucket):
    from xrdscale.io import storage

    url = f"{s3_bucket}/beamtime/spec.yaml"
    storage.write_bytes(url, yaml.safe_dump(_raw(workspace="work")).encode())
    spec = load_spec(url)
    assert spec.workspace == f"{s3_bucket}/beamtime/work"
    assert spec.datasets()[0].raw == f"{s3_bucket}/beamtime/raw/a.nxs"

