"""Virtual unrolling: centre from the casing, spiral-following unrolling, pitch estimate."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from _builders import LAYERS, PITCH, layer_at, spiral_maps
from xrdscale.analysis.unroll import estimate_pitch, find_centre, radial_profile, unroll
from xrdscale.exceptions import InputError


def test_find_centre_from_casing(rng):
    maps = spiral_maps(rng=rng)
    yc, xc, radius = find_centre(maps)
    assert abs(yc - 0.31) < 0.05 and abs(xc + 0.22) < 0.05
    assert 9.0 < radius < 9.4


def test_unrolled_layers_follow_the_spiral_sequence(rng):
    maps = spiral_maps(rng=rng).chunk({"phase": 2})
    un = unroll(maps["scale"], (0.31, -0.22), pitch=PITCH, dr=0.05)
    assert un.dims == ("phase", "radius", "angle") and un.chunks is not None
    prof = radial_profile(un).compute()
    roll = [p for p, _ in LAYERS]
    sel = prof.sel(phase=roll, radius=slice(1.5 + 0.1, 1.5 + 2.5 * PITCH))
    found = np.asarray(roll)[sel.argmax("phase").values]
    expected = np.asarray(roll)[layer_at(sel["radius"].values - 1.5)]
    # layer boundaries blur over one pixel; away from them the sequence must match
    assert np.mean(found == expected) > 0.85
    # without spiral-following the layers smear out: the profile is much flatter
    flat = radial_profile(unroll(maps["scale"], (0.31, -0.22), pitch=0.0, dr=0.05)).compute()
    rr = slice(1.6, 1.5 + 2.5 * PITCH)
    assert float(prof.sel(phase="NCA", radius=rr).var()) > 3 * float(flat.sel(phase="NCA", radius=rr).var())


def test_unroll_is_exact_for_a_linear_map():
    """Bilinear interpolation reproduces a linear field exactly: compare with the analytic value."""
    ax = (np.arange(48) - 23.5) * 0.1
    img = xr.DataArray(2.0 * ax[:, None] - 3.0 * ax[None, :] + 1.0, dims=("y", "x"), coords={"y": ax, "x": ax})
    centre, pitch = (0.2, -0.1), 0.4
    un = unroll(img, centre, pitch=pitch, r_max=2.0, dr=0.05, n_angles=90)
    theta = np.deg2rad(un["angle"].values)[None, :]
    r = un["radius"].values[:, None] + pitch * theta / (2 * np.pi)
    expected = 2.0 * (centre[0] + r * np.sin(theta)) - 3.0 * (centre[1] + r * np.cos(theta)) + 1.0
    np.testing.assert_allclose(un.values, expected, atol=1e-9)
    far = unroll(img, centre, r_max=5.0, n_angles=8)
    assert np.isnan(far.isel(radius=-1)).all()  # outside the map → NaN


def test_pitch_estimate_recovers_the_spiral():
    maps = spiral_maps()
    p = estimate_pitch(maps["scale"].sel(phase="Cu"), (0.31, -0.22), p_max=1.5 * PITCH, n=61, n_angles=180)
    assert abs(p - PITCH) < 0.1


def test_no_casing_is_a_clear_error():
    maps = spiral_maps()
    with pytest.raises(InputError, match="casing|centre"):
        find_centre(maps.drop_sel(phase="Fe"))
    maps["scale"].loc[{"phase": "Fe"}] = 0.0
    with pytest.raises(InputError, match="casing pixels"):
        find_centre(maps)
