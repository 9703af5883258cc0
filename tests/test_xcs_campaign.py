"""A campaign of a Compton-imaging cell with CT: EMR and x maps, roughness, the report, resume, bad specs."""

from __future__ import annotations

import os

import pytest
import yaml

from xrdscale.exceptions import ConfigError
from xrdscale.io import contracts, storage


def test_a_campaign_runs_an_xcs_cell_with_ct_and_reports_it(tmp_path):
    from xrdscale.campaign.runner import run_campaign
    from xrdscale.campaign.spec import load_spec
    from xrdscale.xcs.phantom import write_phantom
    from xrdscale.xcs.simulate import write_cell

    sim = tmp_path / "sim"
    write_cell(str(sim), states=(1.0, 0.4), labels=("pristine", "charged"), shape=(6, 6), counts_per_pixel=2e4,
               seed=1)
    write_phantom(str(sim / "ct-pristine.h5"), shape=(32, 48, 48), n_angles=90, seed=2)
    spec_path = tmp_path / "xcs.yaml"
    spec_path.write_text(yaml.safe_dump({
        "version": 1, "campaign": "sslmb", "workspace": str(tmp_path / "ws"),
        "pipeline": {"xcs": {"alpha": 0.3, "beta": 0.2}, "roughness": {"roi": [10, 38, 10, 38]}},
        "xcs": [{"id": "cell-1", "calibration": "sim/references.csv", "states": [
            {"label": "pristine", "voltage": 3.0, "data": "sim/pristine.h5", "ct": "sim/ct-pristine.h5"},
            {"label": "charged", "voltage": 4.3, "data": "sim/charged.h5"}]}],
    }))
    spec = load_spec(str(spec_path))
    result = run_campaign(spec, retry_delay=0.0)
    assert result.ok, result.failed
    store = result.series["cell-1"]
    assert contracts.check(store) == ("xcs", [])
    ds = storage.open_store(store, stage="xcs")
    x = ds["region_x_li"].values
    assert x[0] > x[1]  # the pristine cathode holds more Li than the charged one
    rough = str(tmp_path / "ws" / "ct" / "cell-1" / "pristine.zarr")
    assert contracts.check(rough) == ("ct-roughness", [])
    html = (tmp_path / "ws" / "report" / "report.html").read_text()
    assert "Compton imaging" in html and "CT interface roughness" in html
    events: list[tuple[str, str, str]] = []
    again = run_campaign(spec, retry_delay=0.0, on_event=lambda d, s, st: events.append((d, s, st)))
    assert again.ok
    assert ("cell-1", "xcs", "skipped") in events and ("cell-1", "ct", "skipped") in events


def test_xcs_cells_are_checked_when_the_spec_is_loaded():
    from xrdscale.campaign.spec import validate_spec

    base = {"version": 1, "campaign": "x", "workspace": "w"}
    with pytest.raises(ConfigError, match="unique"):
        validate_spec({**base, "xcs": [{"id": "c", "states": [{"label": "a", "data": "a.h5"},
                                                              {"label": "a", "data": "b.h5"}]}]})
    with pytest.raises(ConfigError, match="alpha and beta"):
        validate_spec({**base, "pipeline": {"xcs": {"separation": "three-plane"}},
                       "xcs": [{"id": "c", "states": [{"label": "a", "data": "a.h5"}]}]})
    with pytest.raises(ConfigError, match="beam_planes"):
        validate_spec({**base, "pipeline": {"roughness": {"beam_planes": {"R1": [0, 4]}}},
                       "xcs": [{"id": "c", "states": [{"label": "a", "data": "a.h5"}]}]})


def test_the_example_xcs_campaign_spec_is_valid():
    from xrdscale.campaign.spec import validate_spec

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "jobs", "xcs-example.yaml")) as f:
        spec = validate_spec(yaml.safe_load(f))
    assert [s.label for s in spec.xcs[0].states] == ["pristine", "end-of-charge", "end-of-discharge"]
    assert spec.pipeline.xcs.alpha == 0.3 and not spec.cycles
