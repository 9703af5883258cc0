"""The Compton-imaging (xcs) and CT-roughness sections of the HTML report, through write_report and the CLI."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from xrdscale.analysis.report import _Doc, write_report
from xrdscale.analysis.xcs_report import add_roughness_section, add_section
from xrdscale.io import storage

STATES = ("pristine", "charged")
REGIONS = ("cathode", "spe", "anode")
INTERFACES = ("anode/spe", "cathode/spe")
COMPONENTS = ("anode", "spe", "cathode")
CAL = {"model": "x = intercept + slope * emr", "slope": -2.5, "intercept": 2.0, "slope_std": 0.05,
       "intercept_std": 0.02, "r2": 0.99871, "points": [{"emr": 0.4, "x": 1.0, "label": "LiCoO2"},
                                                        {"emr": 0.8, "x": 0.0, "label": "CoO2"}]}


def xcs_dataset(rng: np.random.Generator, *, calibrated: bool) -> xr.Dataset:
    """2 states, 3 regions, 6×5 pixels, 41 p_z points; pixel (0, 0) masked in every state."""
    ns, nr, ny, nx = len(STATES), len(REGIONS), 6, 5
    base = np.array([0.52, 0.61])[:, None, None]
    emr = (base + 0.01 * rng.standard_normal((ns, ny, nx))).astype(np.float32)
    emr[:, 0, 0] = np.nan
    emr_std = np.full((ns, ny, nx), 0.004, np.float32)
    emr_std[:, 0, 0] = np.nan
    emr_region = (base[:, :, None] + np.array([0.0, 0.1, 0.2])[None, :, None, None]
                  + 0.01 * rng.standard_normal((ns, nr, ny, nx))).astype(np.float32)
    pz = np.round(np.linspace(-4.0, 4.0, 41), 10)
    width = np.array([1.0, 1.3])[:, None, None]
    profile = (1000 * np.exp(-(pz[None, None, :] ** 2) / (2 * width ** 2)) * (1 + 0.1 * np.arange(nr))[None, :, None])
    region_emr = np.array([[0.5213, 0.6102, 0.7150], [0.6087, 0.7011, 0.8123]])
    peak = np.array([[171.25, 171.5, 171.75], [171.3, 171.55, 171.8]])
    ds = xr.Dataset(
        {"emr": (("state", "y", "x"), emr), "emr_std": (("state", "y", "x"), emr_std),
         "emr_region": (("state", "region", "y", "x"), emr_region),
         "emr_region_std": (("state", "region", "y", "x"), np.full_like(emr_region, 0.004)),
         "peak_kev": (("state", "region", "y", "x"), np.broadcast_to(peak[:, :, None, None], emr_region.shape)
                      .astype(np.float32)),
         "profile": (("state", "region", "pz"), profile.astype(np.float32), {"units": "counts per a.u."}),
         "region_emr": (("state", "region"), region_emr),
         "region_emr_std": (("state", "region"), np.full((ns, nr), 0.0012)),
         "region_peak_kev": (("state", "region"), peak),
         "region_angle_deg": (("state", "region"), np.array([[89.8, 89.5, 89.1], [89.7, 89.4, 89.0]]))},
        coords={"state": np.asarray(STATES, dtype=object), "region": np.asarray(REGIONS, dtype=object),
                "y": np.arange(ny), "x": np.arange(nx), "pz": pz})
    ds["pz"].attrs["units"] = "a.u."
    ds.attrs.update({"incident_kev": 250.0, "angle_deg": 90.0, "compton_kev": 169.6, "target": "cathode",
                     "separated": True, "alpha": 0.25, "beta": 0.5})
    if calibrated:
        x = CAL["intercept"] + CAL["slope"] * emr
        ds["x_li"] = (("state", "y", "x"), x.astype(np.float32))
        ds["x_li_std"] = (("state", "y", "x"), np.abs(CAL["slope"] * emr_std).astype(np.float32))
        ds["region_x_li"] = ("state", CAL["intercept"] + CAL["slope"] * region_emr[:, 0])
        ds["region_x_li_std"] = ("state", np.array([0.0071, 0.0073]))
        ds.attrs["calibration"] = CAL
    return ds


def roughness_dataset(rng: np.random.Generator, state: str | None, ra: tuple[float, float]) -> xr.Dataset:
    height = np.stack([100 + rng.standard_normal((6, 5)), 160 + 2 * rng.standard_normal((6, 5))]).astype(np.float32)
    ds = xr.Dataset(
        {"height": (("interface", "y", "x"), height, {"units": "um"}),
         "ra": ("interface", np.array(ra), {"units": "um"}),
         "rq": ("interface", 1.25 * np.array(ra), {"units": "um"}),
         "fraction": ("component", np.array([0.31, 0.22, 0.47]))},
        coords={"interface": np.asarray(INTERFACES, dtype=object), "component": np.asarray(COMPONENTS, dtype=object),
                "y": np.arange(6) * 2.0, "x": np.arange(5) * 2.0})
    ds.attrs.update({"voxel_um": 2.0, "alpha": 0.25, "beta": 0.5})
    if state is not None:
        ds.attrs["state"] = state
    return ds


def _write(ds: xr.Dataset, url: str, stage: str, *, complete: bool = True) -> str:
    storage.create_store(ds, url, stage=stage, config={})
    if complete:
        storage.mark_complete(url, {"stage": stage})
    return url


@pytest.fixture
def stores(tmp_path, rng):
    xcs = _write(xcs_dataset(rng, calibrated=True), str(tmp_path / "cell_x.zarr"), "xcs")
    plain = _write(xcs_dataset(rng, calibrated=False), str(tmp_path / "cell_emr.zarr"), "xcs")
    rough = [_write(roughness_dataset(rng, "pristine", (1.234, 2.345)), str(tmp_path / "ct_a.zarr"), "ct-roughness"),
             _write(roughness_dataset(rng, None, (1.5, 2.5)), str(tmp_path / "charged.zarr"), "ct-roughness")]
    return {"xcs": xcs, "plain": plain, "roughness": rough}


def _html(url: str) -> str:
    with open(url, encoding="utf-8") as f:
        return f.read()


def _tables(text: str) -> list[pd.DataFrame]:
    return pd.read_html(io.StringIO(text))


def test_report_with_xcs_and_roughness(stores, tmp_path):
    out = str(tmp_path / "report")
    url = write_report([], out, xcs=[stores["xcs"]], roughness=stores["roughness"], progress=False)
    text = _html(url)
    assert f"Compton imaging {stores['xcs']}" in text and "CT interface roughness" in text
    figs = sorted(os.listdir(os.path.join(out, "figures")))
    assert len(figs) == 4 and text.count("data:image/png;base64,") == 4  # maps, profiles, 2 × heights
    for f in figs:
        with open(os.path.join(out, "figures", f), "rb") as png:
            assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "E₁ = 250 keV" in text and "θ = 90°" in text and "α = 0.25, β = 0.5" in text
    assert "Calibration: x = (2.0000 ± 0.0200) + (-2.5000 ± 0.0500) · EMR, R² = 0.99871" in text

    tables = _tables(text)
    table1 = next(t for t in tables if "EMR (cathode)" in t.columns)
    assert list(table1["state"]) == list(STATES)
    assert table1.loc[0, "EMR (cathode)"] == "0.5213 ± 0.0012"
    x0 = 2.0 - 2.5 * 0.5213
    assert table1.loc[0, "x (cathode)"] == f"{x0:.4f} ± 0.0071"
    regions = next(t for t in tables if "implied angle (deg)" in t.columns)
    assert len(regions) == len(STATES) * len(REGIONS)
    row = regions[(regions["region"] == "anode") & (regions["state"] == "charged")].iloc[0]
    assert row["EMR"] == "0.8123 ± 0.0012" and row["peak (keV)"] == pytest.approx(171.8)
    assert row["implied angle (deg)"] == pytest.approx(89.0)

    table2 = next(t for t in tables if "R_a anode/spe (µm)" in t.columns)
    assert list(table2["state"]) == ["pristine", "charged"]  # attrs["state"], else the store name
    assert table2.loc[0, "R_a anode/spe (µm)"] == pytest.approx(1.234)
    assert table2.loc[1, "R_q cathode/spe (µm)"] == pytest.approx(3.125)
    assert table2.loc[0, "fraction cathode"] == pytest.approx(0.47)
    assert list(table2["EMR"]) == pytest.approx([0.5213, 0.6087])  # joined from the one xcs store


def test_xcs_store_without_x(stores, tmp_path):
    doc = _Doc(str(tmp_path / "r"))
    table = add_section(doc, stores["plain"])
    assert list(table.columns) == ["state", "emr", "emr_std"]
    assert table["emr"].tolist() == pytest.approx([0.5213, 0.6087])
    text = "".join(doc.parts)
    table1 = next(t for t in _tables(text) if "EMR (cathode)" in t.columns)
    assert list(table1.columns) == ["state", "EMR (cathode)"] and "Calibration" not in text
    assert doc.n_figures == 2


def test_roughness_table_emr_join_by_label(stores, tmp_path):
    doc = _Doc(str(tmp_path / "r"))
    table = add_roughness_section(doc, stores["roughness"], {"charged": 0.7})
    assert table["EMR"].tolist()[1] == pytest.approx(0.7) and np.isnan(table["EMR"].tolist()[0])
    table = add_roughness_section(_Doc(str(tmp_path / "r2")), stores["roughness"], {"other": 0.7})
    assert "EMR" not in table.columns


def test_cli_report_xcs(stores, tmp_path, xrdscale_cli):
    out = str(tmp_path / "cli_report")
    code, stdout, stderr = xrdscale_cli("report", out, "--xcs", stores["xcs"], "--xcs", stores["plain"],
                                        "--roughness", stores["roughness"][0])
    assert code == 0, stderr
    assert "report.html" in stdout
    text = _html(os.path.join(out, "report.html"))
    assert text.count("Compton imaging ") == 2 and "CT interface roughness" in text
    assert storage.is_complete(out)  # the report stage marks its folder complete


def test_cli_report_incomplete_store(tmp_path, rng, xrdscale_cli):
    url = _write(xcs_dataset(rng, calibrated=False), str(tmp_path / "half.zarr"), "xcs", complete=False)
    code, _, stderr = xrdscale_cli("report", str(tmp_path / "r"), "--xcs", url)
    assert code != 0
    assert "half.zarr" in stderr and "incomplete" in stderr
