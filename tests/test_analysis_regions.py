"""Lithiation regions (HL/DL/IN) from a voltage series with known regions."""

from __future__ import annotations

import pytest
from scipy import ndimage

from _builders import VOLTS, series_with_truth
from xrdscale.analysis.regions import OUTSIDE, classify_regions
from xrdscale.exceptions import InputError


def test_regions_agree_with_truth(rng):
    series, truth = series_with_truth(rng)
    shuffled = [series[i] for i in (3, 0, 5, 1, 4, 2)]  # order must not matter
    res = classify_regions(shuffled)
    region = res["region"].values
    anode = truth != OUTSIDE
    assert (region[anode] == truth[anode]).mean() >= 0.9
    far = ~ndimage.binary_dilation(anode, iterations=2)  # the smoothing may claim the pixels right next to it
    assert (region[far] == OUTSIDE).all()
    assert list(res["stage_index"]["voltage"].values) == list(VOLTS)
    assert "IN" in res.attrs["criteria"]


def test_one_dataset_or_missing_phases_is_a_clear_error(rng):
    series, _ = series_with_truth(rng)
    with pytest.raises(InputError, match=r"at least 2 datasets.*got 1 \(c7-4.2V\)"):
        classify_regions(series[:1], ids=["c7-4.2V"])
    broken = [(v, m.drop_sel(phase="LiC18")) for v, m in series]
    with pytest.raises(InputError, match=r"dataset c7-a \(2.65 V\).*LiC18"):
        classify_regions(broken, ids=[f"c7-{c}" for c in "abcdef"])
