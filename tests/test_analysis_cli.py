"""``xrdscale analyse …`` and ``xrdscale report`` on stores at local paths and on a real S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from typer.testing import CliRunner

from _builders import cathode_maps, series_with_truth, spiral_maps
from xrdscale.io import storage
from xrdscale.analysis.fractions import weight_fractions
from xrdscale.cli import app
from xrdscale.exceptions import InputError

runner = CliRunner()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xrdscale.cli", *args], capture_output=True, text=True, timeout=300)


def test_fractions_and_roi_commands(tmp_path, rng):
    maps, _ = cathode_maps(rng)
    src = storage.write_store(maps, str(tmp_path / "c1" / "maps.zarr"), stage="maps")
    out = str(tmp_path / "c1-wf" / "maps.zarr")
    res = runner.invoke(app, ["analyse", "fractions", src, out])
    assert res.exit_code == 0, res.output
    got = storage.open_store(out, stage="maps")
    np.testing.assert_allclose(got["weight_fraction"].values, weight_fractions(maps)["weight_fraction"].values)
    assert storage.is_complete(out)
    csv = str(tmp_path / "rois.csv")
    res = runner.invoke(app, ["analyse", "roi", out, "--csv", csv])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(csv)
    assert set(table.roi) == {"NCA next to Al tab", "NCA elsewhere"} and set(table.dataset) == {"c1-wf"}
    roi_yaml = tmp_path / "rois.yaml"
    roi_yaml.write_text("nowhere: {polygon: [[50, 50], [51, 50], [51, 51]]}\n")
    proc = run_cli("analyse", "roi", out, "--rois", str(roi_yaml))
    assert proc.returncode == 1 and "ROI 'nowhere' is empty in dataset 'c1-wf'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unroll_command_auto_centre_and_pitch(tmp_path):
    src = storage.write_store(spiral_maps(), str(tmp_path / "maps.zarr"), stage="maps")
    out = str(tmp_path / "unrolled.zarr")
    res = runner.invoke(app, ["analyse", "unroll", src, out, "--pitch", "auto", "--angles", "180"])
    assert res.exit_code == 0, res.output
    un = storage.open_store(out, stage="unrolled")
    assert un["scale"].dims == ("phase", "radius", "angle")
    config = json.loads(un.attrs["config"])
    assert abs(config["pitch"] - 2.0) < 0.05  # the synthetic spiral's pitch
    assert abs(config["centre"][0] - 0.31) < 0.05 and abs(config["centre"][1] + 0.22) < 0.05


def test_regions_command_and_its_errors(tmp_path, rng):
    series, truth = series_with_truth(rng)
    urls, volts = [], []
    for v, m in series:
        urls.append(storage.write_store(m, str(tmp_path / f"c7-{v}V" / "maps.zarr"), stage="maps"))
        volts += ["-V", str(v)]
    out = str(tmp_path / "regions.zarr")
    res = runner.invoke(app, ["analyse", "regions", *urls, *volts, "--out", out])
    assert res.exit_code == 0, res.output
    region = storage.open_store(out, stage="regions")["region"].values
    anode = truth >= 0
    assert (region[anode] == truth[anode]).mean() >= 0.9
    proc = run_cli("analyse", "regions", urls[0], "-V", "4.2", "--out", str(tmp_path / "r1.zarr"))
    assert proc.returncode == 1 and "at least 2 datasets" in proc.stderr and "c7-2.65V" in proc.stderr
    assert not storage.exists(str(tmp_path / "r1.zarr"))
    res = runner.invoke(app, ["analyse", "regions", *urls[:2], "--out", str(tmp_path / "r2.zarr")])
    assert isinstance(res.exception, InputError) and "voltage" in str(res.exception)


def test_report_command(tmp_path, rng):
    urls = []
    for k, v in enumerate((2.65, 4.2)):
        maps, _ = cathode_maps(rng, n=24)
        maps.attrs.update(voltage=v, state="charged" if k else "discharged")
        urls.append(storage.write_store(maps, str(tmp_path / f"c1-{v}V" / "maps.zarr"), stage="maps"))
    res = runner.invoke(app, ["report", *urls, str(tmp_path / "report"), "--cycle", "1", "--centre", "1.2,1.2"])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert "c1-2.65V" in html and "Cycle 1: voltage series" in html and "<table" in html


@pytest.mark.s3
def test_fractions_on_s3(s3_bucket, rng):
    maps, _ = cathode_maps(rng, n=16)
    src = storage.write_store(maps, f"{s3_bucket}/beamtime/c1/maps.zarr", stage="maps")
    out = f"{s3_bucket}/analysis/c1/maps.zarr"
    res = runner.invoke(app, ["analyse", "fractions", src, out])
    assert res.exit_code == 0, res.output
    got = storage.open_store(out, stage="maps")
    np.testing.assert_allclose(got["weight_fraction"].values, weight_fractions(maps)["weight_fraction"].values)
    assert os.environ["XRDSCALE_S3_ENDPOINT_URL"].startswith("http://127.0.0.1")
    assert isinstance(got, xr.Dataset)
