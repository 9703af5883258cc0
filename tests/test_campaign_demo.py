"""The demo campaign: the shipped jobs/demo.yaml and the spec `xrdscale demo` writes agree and validate."""

from __future__ import annotations

import os

import pytest
import yaml

from xrdscale.campaign.spec import load_spec, validate_spec
from xrdscale.cli.demo import DEMO_PIPELINE, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shipped_demo_spec_is_valid_and_uses_the_demo_settings():
    with open(os.path.join(ROOT, "jobs", "demo.yaml")) as f:
        raw = yaml.safe_load(f)
    spec = validate_spec(raw, "jobs/demo.yaml")
    assert raw["pipeline"] == DEMO_PIPELINE
    assert spec.model is None and spec.phases.startswith("../demo-beamtime/")
    assert all(d.raw.startswith("../demo-beamtime/raw/") for d in spec.datasets())


@pytest.mark.slow
def test_demo_prepare_simulates_once_and_writes_the_same_campaign(tmp_path):
    out = str(tmp_path / "bt")
    url = prepare(out)
    spec = load_spec(url)
    with open(os.path.join(ROOT, "jobs", "demo.yaml")) as f:
        shipped = yaml.safe_load(f)
    with open(url) as f:
        written = yaml.safe_load(f)
    assert written["pipeline"] == shipped["pipeline"] and written["cycles"] == [
        {**c, "datasets": [{**d, "raw": d["raw"].replace("../demo-beamtime/", "../")} for d in c["datasets"]]}
        for c in shipped["cycles"]]
    assert all(os.path.exists(d.raw) for d in spec.datasets()) and os.path.exists(spec.geometry.poni)
    mtime = os.path.getmtime(spec.datasets()[0].raw)
    prepare(out)  # reuses the simulated beamtime
    assert os.path.getmtime(spec.datasets()[0].raw) == mtime
