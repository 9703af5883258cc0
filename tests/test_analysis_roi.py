"""ROIs from thresholds, polygons and masks; per-ROI statistics against numpy on the same pixels."""

from __future__ import annotations

import pandas as pd
import pytest

from _builders import cathode_maps
from xrdscale.analysis.roi import build_rois, default_rois, roi_from_polygon, roi_table
from xrdscale.exceptions import ConfigError, InputError


def test_threshold_rois_and_table_match_numpy(rng):
    maps, near = cathode_maps(rng)
    rois = build_rois(maps, default_rois(maps, dilate_mm=0.2))
    assert list(rois["roi"].values) == ["NCA next to Al tab", "NCA elsewhere"]
    next_to = rois.sel(roi="NCA next to Al tab").values
    assert (next_to == near & (maps["scale"].sel(phase="NCA").values > 0.2)).mean() > 0.99
    table = roi_table({"c1-charged": maps.chunk({"y": 10})}, rois)
    for roi in ("NCA next to Al tab", "NCA elsewhere"):
        mask = rois.sel(roi=roi).values
        for var in ("a", "c"):
            row = table[(table.roi == roi) & (table.phase == "NCA") & (table.variable == var)].iloc[0]
            vals = maps[var].sel(phase="NCA").values[mask]
            assert row["mean"] == pytest.approx(vals.mean()) and row["std"] == pytest.approx(vals.std())
            assert row["n_pixels"] == mask.sum()
    row = table[(table.roi == "NCA next to Al tab") & (table.variable == "a") & (table.phase == "NCA")].iloc[0]
    assert abs(row["mean"] - 2.851) < 0.001 and row["ensemble_std"] == pytest.approx(0.002)
    assert not ((table.variable == "c") & (table.phase == "Al")).any()  # NaN maps give no rows
    assert isinstance(table, pd.DataFrame)


def test_polygon_and_mask_rois(rng):
    maps, near = cathode_maps(rng)
    poly = roi_from_polygon(maps, [(0.95, 0.95), (2.05, 0.95), (2.05, 2.05), (0.95, 2.05)])
    assert poly.values.sum() == 11 * 11 and poly.values[10:21, 10:21].all()
    rois = build_rois(maps, {"tab": {"mask": "near"}, "box": {"polygon": [[0, 0], [1, 0], [1, 1]],
                                                                "within": {"roi": "tab"}}}, masks={"near": near})
    assert rois.sel(roi="tab").values.sum() == near.sum()


def test_empty_roi_and_bad_specs_are_clear_errors(rng):
    maps, _ = cathode_maps(rng)
    rois = build_rois(maps, {"nowhere": {"polygon": [[50, 50], [51, 50], [51, 51]]}})
    with pytest.raises(InputError, match="ROI 'nowhere' is empty in dataset 'd1'"):
        roi_table({"d1": maps}, rois)
    with pytest.raises(ConfigError, match="exactly one of"):
        build_rois(maps, {"x": {}})
    with pytest.raises(InputError, match=r"phase\(s\) \['LiC6'\]"):
        build_rois(maps, {"x": {"threshold": {"phase": "LiC6", "above": 0.5}}})
    with pytest.raises(ConfigError, match="not defined before"):
        build_rois(maps, {"x": {"threshold": {"phase": "NCA", "above": 0.5}, "exclude": ["y"]}})
