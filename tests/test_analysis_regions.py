"""Lithiation regions (HL/DL/IN) from a voltage series with known regions."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy import ndimage

from xrdscale.analysis.regions import CHARGE_ORDER, DL, HL, IN, OUTSIDE, classify_regions
from xrdscale.exceptions import InputError

VOLTS = (2.65, 3.7, 3.79, 3.85, 3.95, 4.2)
HL_STAGE = (0, 1, 2, 3, 4, 5)        # graphite → LiC30+ → LiC30 → LiC18 → LiC12 → LiC6
DL_STAGE = (0, 0, 1, 2, 3, 5)        # one stage late, caught up at the top
IN_STAGE = (0, 1, 1, 2, 2, 2)        # never beyond LiC30


def series_with_truth(rng, n=32):
    truth = np.full((n, n), OUTSIDE, dtype=int)
    truth[4:28, 4:28] = HL
    truth[8:16, 6:20] = DL
    truth[20:26, 14:26] = IN
    out = []
    for k, v in enumerate(VOLTS):
        scale = np.zeros((len(CHARGE_ORDER), n, n))
        for code, stages in ((HL, HL_STAGE), (DL, DL_STAGE), (IN, IN_STAGE)):
            scale[stages[k]][truth == code] = 1.0
        scale = np.clip(scale + rng.normal(0, 0.08, scale.shape), 0, None)
        maps = xr.Dataset({"scale": (("phase", "y", "x"), scale)},
                          coords={"phase": list(CHARGE_ORDER), "y": np.arange(n) * 0.1, "x": np.arange(n) * 0.1})
        out.append((v, maps.chunk({"y": 16})))
    return out, truth


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
