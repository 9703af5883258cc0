"""The campaign report, rendered in a real headless Chromium."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from _builders import spiral_maps
from xrdscale.io import storage
from xrdscale.analysis.regions import CHARGE_ORDER
from xrdscale.analysis.report import DatasetEntry, write_report
from xrdscale.exceptions import InputError

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
VOLTS = (2.65, 3.85, 4.2)


def campaign_maps(rng, voltage: float, k: int) -> xr.Dataset:
    """Spiral cell maps with an anode whose LixC stage advances along the series."""
    base = spiral_maps(n=64, px=0.3, r0=2.0, turns=2.0, r_case=8.5, rng=None)
    scale = base["scale"].drop_sel(phase="LiC6")
    anode = base["scale"].sel(phase="LiC6").values
    stage = (0, 3, 5)[k]
    lix = np.zeros((len(CHARGE_ORDER),) + anode.shape)
    lix[stage] = anode
    lix_da = xr.DataArray(lix, dims=("phase", "y", "x"), coords={"phase": list(CHARGE_ORDER), "y": base.y, "x": base.x})
    scale = xr.concat([scale, lix_da], dim="phase")
    scale = scale + rng.normal(0, 0.01, scale.shape) ** 2
    phases = [str(p) for p in scale["phase"].values]
    nca = phases.index("NCA")
    a = np.full(scale.shape, np.nan)
    c = np.full(scale.shape, np.nan)
    a[nca] = 2.860 - 0.04 * k / 2 + rng.normal(0, 0.001, anode.shape)
    c[nca] = 14.235 + 0.25 * k / 2 + rng.normal(0, 0.002, anode.shape)
    ds = xr.Dataset({"scale": scale, "scale_std": 0.05 * scale + 0.001,
                     "a": (("phase", "y", "x"), a), "a_std": (("phase", "y", "x"), np.where(np.isnan(a), np.nan, 0.002)),
                     "c": (("phase", "y", "x"), c),
                     "size": (("phase", "y", "x"), np.full(scale.shape, 300.0))})
    # quality maps: the first k + 1 rows out of distribution (residual), the rest clean
    ood = np.zeros(anode.shape, np.uint8)
    ood[:k + 1] = 1
    ds["rwp"] = (("y", "x"), 0.05 + 0.5 * ood)
    ds["ood"] = (("y", "x"), ood)
    ds["ood"].attrs.update(flag_masks=[1, 2, 4], flag_meanings="residual ensemble_spread range_edge")
    return ds.chunk({"phase": 4})


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    rng = np.random.default_rng(7)
    tmp_path = tmp_path_factory.mktemp("campaign")
    entries = []
    for k, v in enumerate(VOLTS):
        url = str(tmp_path / "work" / f"c7-{v}V" / "maps.zarr")
        storage.write_store(campaign_maps(rng, v, k), url, stage="maps", config={"ensemble": 10})
        entries.append(DatasetEntry(id=f"c7-{v}V", maps_url=url, cycle=7, state="charging", voltage=v,
                                    raw_url=f"s3://beamtime/raw/c7_{v}.nxs", hashes={"raw": f"sha256:{k:064d}"}))
    return entries


@pytest.fixture(scope="module")
def report(campaign, tmp_path_factory):
    """The report of the campaign, written once for the tests of this module."""
    out = str(tmp_path_factory.mktemp("report"))
    url = write_report(campaign, out, title="nca-18650 demo", model={"id": "abc123", "url": "models/abc123"},
                       pitch=1.99, progress=False)
    return out, url


def test_report_contents(report):
    out, url = report
    with open(url, encoding="utf-8") as f:
        text = f.read()
    figs = os.listdir(os.path.join(out, "figures"))
    assert text.count("data:image/png;base64,") == len(figs) >= 3 * 9
    for name in ("c7-2.65V_scale.png", "c7-4.2V_weight_fraction_std.png", "c7-3.85V_unrolled.png",
                 "cycle7_fractions.png", "cycle7_nca_lattice.png", "cycle7_regions.png", "c7-4.2V_quality.png"):
        assert name in figs
    assert "Out-of-distribution pixels" in text
    table = pd.read_html(io.StringIO(text[text.index("Out-of-distribution pixels"):]))[0]
    np.testing.assert_allclose(table["flagged"], [1 / 64, 2 / 64, 3 / 64], rtol=1e-3)
    np.testing.assert_allclose(table["median rwp"], 0.05)
    for needle in ("Provenance", "s3://beamtime/raw/c7_2.65.nxs", "abc123", "sha256:", "NCA next to Al tab", "xarray"):
        assert needle in text
    csv = pd.read_csv(os.path.join(out, "roi_table.csv"))
    assert set(csv.dataset) == {f"c7-{v}V" for v in VOLTS}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does it)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    out, url = report
    # a copy with a probe that records, after load, how many images decoded and how many tables exist
    probe = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
             "document.body.setAttribute('data-probe',JSON.stringify({n:im.length,"
             "ok:im.filter(i=>i.complete&&i.naturalWidth>0).length,tables:document.querySelectorAll('table').length,"
             "rows:document.querySelectorAll('tr').length}));});</script>")
    probed = tmp_path / "probed.html"
    with open(url, encoding="utf-8") as f:
        probed.write_text(f.read().replace("</body>", probe + "</body>"), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Uncaught" not in dom.stderr
    m = re.search(r"data-probe=\"([^\"]+)\"", dom.stdout)
    assert m, dom.stdout[:500]
    import html as _html
    import json

    probe_res = json.loads(_html.unescape(m.group(1)))
    n_png = len(os.listdir(os.path.join(out, "figures")))
    assert probe_res["n"] == n_png and probe_res["ok"] == n_png
    assert probe_res["tables"] >= 5 and probe_res["rows"] > 20
    shot = tmp_path / "report.png"
    res = subprocess.run([CHROMIUM, *flags, "--window-size=1400,4000", f"--screenshot={shot}", url if url.startswith("file:")
                          else f"file://{url}"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.exists() and shot.stat().st_size > 50_000, res.stderr[-2000:]
    if os.environ.get("XRDSCALE_REPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["XRDSCALE_REPORT_SCREENSHOT"])


def test_bad_report_inputs(tmp_path, campaign):
    with pytest.raises(InputError, match="at least one dataset"):
        write_report([], str(tmp_path / "r"))
    with pytest.raises(InputError, match="unique"):
        write_report([campaign[0], campaign[0]], str(tmp_path / "r"))
    with pytest.raises(InputError, match="maps_url"):
        write_report([{"id": "x"}], str(tmp_path / "r"))
