"""Analysis against the simulated cell's truth: lithiation regions, unrolling, NCA ROIs.

The maps are the phantom's truth with ensemble-like noise added (scale σ 0.02, NCA a σ
0.003 Å, c σ 0.01 Å), recorded as ``*_std`` the way a PQ-Net ensemble reports it.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from xrdscale.analysis.regions import classify_regions
from xrdscale.analysis.roi import build_rois, default_rois, roi_table
from xrdscale.analysis.unroll import estimate_pitch, find_centre, radial_profile, unroll
from xrdscale.simulate import phantom

NOISE = {"scale": 0.02, "a": 0.003, "c": 0.01}


def predicted(truth: xr.Dataset, rng: np.random.Generator) -> xr.Dataset:
    """Truth maps with Gaussian noise and the matching ``*_std`` maps."""
    out = xr.Dataset(coords=truth.coords)
    for var, sigma in NOISE.items():
        val = truth[var] + rng.normal(0, sigma, truth[var].shape)
        out[var] = val.clip(min=0) if var == "scale" else val
        out[f"{var}_std"] = xr.full_like(truth[var], sigma).where(truth[var].notnull())
    return out


@pytest.fixture(scope="module")
def series():
    rng = np.random.default_rng(11)
    truths = [phantom.make_phantom(64, voltage=v, seed=4) for v in phantom.STAGE_VOLTAGES]
    return truths, [(v, predicted(t, rng)) for v, t in zip(phantom.STAGE_VOLTAGES, truths)]


def test_lithiation_regions_agree_with_phantom_truth(series):
    truths, maps = series
    res = classify_regions(maps[::-1])
    region, truth = res["region"].values, truths[-1]["region"].values
    anode = truth >= 0
    assert (region[anode] == truth[anode]).mean() >= 0.90
    for code in (0, 1, 2):  # every region is found, not just the majority one
        assert ((region == code) & (truth == code)).sum() >= 0.8 * (truth == code).sum()


def test_nca_roi_means_match_truth_within_ensemble_uncertainty(series):
    truths, maps = series
    for (volt, m), t in zip(maps, truths):
        table = roi_table({f"{volt}V": m}, build_rois(m, default_rois(m)))
        nca = t["scale"].sel(phase="NCA").values > 0
        truth_masks = {"NCA next to Al tab": nca & t["al_tab_roi"].values,
                       "NCA elsewhere": nca & ~t["al_tab_roi"].values}
        for roi, mask in truth_masks.items():
            for var in ("a", "c"):
                row = table[(table.roi == roi) & (table.phase == "NCA") & (table.variable == var)].iloc[0]
                true_mean = float(t[var].sel(phase="NCA").values[mask].mean())
                assert abs(row["mean"] - true_mean) <= row["ensemble_std"], (volt, roi, var, row["mean"], true_mean)
    # at the top of charge the two regions differ (ROI3 keeps its discharged lattice) and the ROIs see it
    top = table[(table.phase == "NCA") & (table.variable == "a")].set_index("roi")["mean"]
    assert top["NCA next to Al tab"] - top["NCA elsewhere"] > 0.03


def test_unrolled_phantom_layers_follow_its_layer_sequence():
    rng = np.random.default_rng(5)
    truth = phantom.make_phantom(128, voltage=3.85, seed=2)
    maps = predicted(truth, rng)
    vox = truth.attrs["voxel_size_mm"]
    yc, xc, _ = find_centre(maps)
    assert np.hypot(yc - truth.attrs["cell_center_mm"][0], xc - truth.attrs["cell_center_mm"][1]) < 0.5 * vox
    period_um = sum(w for _, w in phantom._LAYERS)
    true_pitch = max(period_um / 1000.0, 8 * vox)  # the phantom widens the winding period to 8 voxels
    pitch = estimate_pitch(maps["scale"].sel(phase="NCA"), (yc, xc), p_max=1.5 * true_pitch)
    assert abs(pitch - true_pitch) < 0.02 * true_pitch
    sc = maps["scale"]
    per_material = {"Cu": sc.sel(phase="Cu", drop=True), "anode": sc.sel(phase=list(phantom.LIXC)).sum("phase"),
                    "separator": sc.sel(phase="separator", drop=True), "cathode": sc.sel(phase="NCA", drop=True),
                    "Al": sc.sel(phase="Al", drop=True)}
    stack = xr.concat(list(per_material.values()), dim="material").assign_coords(material=list(per_material))
    prof = radial_profile(unroll(stack, (yc, xc), pitch=pitch, dr=vox / 4)).compute()
    rho = prof["radius"].values
    # expected: the phantom's layer sequence from the start of the roll (2.0 mm), box-averaged over one voxel
    bounds = np.cumsum([w for _, w in phantom._LAYERS]) / period_um * true_pitch
    fine = np.arange(0.0, 10.0, 0.002)
    names = np.array([m for m, _ in phantom._LAYERS])
    layer = names[np.minimum(np.searchsorted(bounds, np.mod(fine - 2.0, true_pitch), side="right"), len(names) - 1)]
    box = np.ones(int(round(vox / 0.002))) / int(round(vox / 0.002))
    inside = (rho > 2.3) & (rho < 2.0 + (truth.attrs["turns"] - 0.5) * true_pitch)
    for material in per_material:
        expected = np.interp(rho, fine, np.convolve((layer == material).astype(float), box, mode="same"))
        corr = np.corrcoef(expected[inside], prof.sel(material=material).values[inside])[0, 1]
        assert corr > (0.95 if material in ("anode", "cathode") else 0.85), (material, corr)
