"""Virtual unrolling of a jelly roll: cartesian maps → radius × angle images.

The cell centre is found from the steel casing (a circle fitted by least squares to the
pixels where the casing phase is strong) or given. Each map is resampled on a polar grid
with bilinear interpolation (:func:`scipy.ndimage.map_coordinates`, ``order=1``).
With a spiral pitch ``p`` (mm per turn), the radial coordinate becomes
``ρ = r − p·θ/2π``: a spiral layer ``r(θ) = r₀ + p·θ/2π`` then lies at constant ρ = r₀, so
successive jelly-roll layers line up as horizontal bands. Angles θ are counter-clockwise
from +x in [0, 360)°.
"""

from __future__ import annotations

import logging

import numpy as np
import xarray as xr
from scipy import ndimage

from xrdscale.exceptions import InputError

logger = logging.getLogger(__name__)


def _grid(coord: xr.DataArray, name: str) -> tuple[float, float]:
    """Origin and step [mm] of a uniform coordinate; InputError otherwise."""
    v = np.asarray(coord.values, dtype=float)
    if v.size < 2:
        raise InputError(f"coordinate {name!r} has {v.size} value(s); unrolling needs a 2D map")
    step = np.diff(v)
    if not np.allclose(step, step[0], rtol=1e-3, atol=1e-9):
        raise InputError(f"coordinate {name!r} is not uniformly spaced; resample the map onto a regular grid first")
    return float(v[0]), float(step[0])


def fit_circle(y: np.ndarray, x: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float, float]:
    """Least-squares (Kåsa) circle through points: returns ``(yc, xc, radius)``.

    Parameters
    ----------
    y, x : ndarray
        Point coordinates.
    weights : ndarray, optional
        Non-negative weight per point.
    """
    w = np.ones_like(x, dtype=float) if weights is None else np.asarray(weights, dtype=float)
    sw = np.sqrt(w)
    # x² + y² = 2 xc x + 2 yc y + (r² − xc² − yc²)
    A = np.stack([2 * x, 2 * y, np.ones_like(x)], axis=1) * sw[:, None]
    b = (x**2 + y**2) * sw
    (xc, yc, c0), *_ = np.linalg.lstsq(A, b, rcond=None)
    return float(yc), float(xc), float(np.sqrt(max(c0 + xc**2 + yc**2, 0.0)))


def find_centre(maps: xr.Dataset, *, phase: str = "Fe", variable: str = "scale",
                threshold: float = 0.5) -> tuple[float, float, float]:
    """Find the cell centre from the casing: fit a circle to the casing ring.

    Parameters
    ----------
    maps : xarray.Dataset
        A ``maps`` store with ``variable`` (phase, y, x).
    phase : str
        The casing phase (steel: ``Fe``).
    variable : str
        Map to threshold.
    threshold : float
        Fraction of the 99.5th percentile of the casing map above which a pixel is casing.

    Returns
    -------
    (yc, xc, radius) : tuple of float
        Centre and casing radius in the map's units (mm).

    Raises
    ------
    InputError
        No such phase/variable, or too few casing pixels to fit a circle.
    """
    if variable not in maps.data_vars or phase not in [str(p) for p in maps["phase"].values]:
        raise InputError(f"finding the cell centre needs the {variable!r} map of phase {phase!r} (the casing), "
                         "missing from the maps; give the centre explicitly (--centre Y,X)")
    img = np.nan_to_num(np.asarray(maps[variable].sel(phase=phase).transpose("y", "x").values, dtype=float))
    top = np.percentile(img, 99.5)
    mask = img > threshold * top if top > 0 else np.zeros_like(img, dtype=bool)
    if mask.sum() < 8:
        raise InputError(f"only {int(mask.sum())} casing pixels found in the {phase!r} {variable} map; "
                         "the map shows no casing ring: give the centre explicitly (--centre Y,X)")
    iy, ix = np.nonzero(mask)
    yc, xc, r = fit_circle(maps["y"].values[iy], maps["x"].values[ix], img[iy, ix])
    logger.info("cell centre from the %s casing: y=%.3f x=%.3f mm, radius %.3f mm", phase, yc, xc, r)
    return yc, xc, r


def polar_grid(r_max: float, dr: float, n_angles: int) -> tuple[np.ndarray, np.ndarray]:
    """Radii [mm] from 0 to ``r_max`` in steps ``dr`` and angles [deg] in [0, 360)."""
    return np.arange(0.0, r_max + dr / 2, dr), np.arange(n_angles) * (360.0 / n_angles)


def _unroll_2d(img: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
    out = ndimage.map_coordinates(np.asarray(img, dtype=float), [iy.ravel(), ix.ravel()], order=1,
                                  mode="constant", cval=np.nan, prefilter=False)
    return out.reshape(iy.shape)


def unroll(da: xr.DataArray, centre: tuple[float, float], *, pitch: float = 0.0, r_max: float | None = None,
           dr: float | None = None, n_angles: int = 720) -> xr.DataArray:
    """Resample a map (…, y, x) onto (…, radius, angle) about ``centre``.

    Parameters
    ----------
    da : xarray.DataArray
        Map with dims ``y``, ``x`` (mm coordinates, uniform) and any leading dims
        (``phase``); dask-backed arrays are unrolled block by block.
    centre : (yc, xc)
        Cell centre [mm].
    pitch : float
        Spiral pitch [mm per turn]; the radial coordinate is ``r − pitch·θ/2π``
        (0: plain polar transform). The sign follows the winding sense.
    r_max : float, optional
        Largest radius [mm]; default: to the farthest map corner.
    dr : float, optional
        Radial step [mm]; default: the pixel size.
    n_angles : int
        Angular samples over 360°.

    Returns
    -------
    xarray.DataArray
        Dims (…, ``radius``, ``angle``): ``radius`` in mm (the spiral-following ρ when
        ``pitch`` ≠ 0), ``angle`` in degrees; NaN outside the map.
    """
    if "y" not in da.dims or "x" not in da.dims:
        raise InputError(f"unrolling needs a map with dims y, x; got {da.dims}")
    y0, sy = _grid(da["y"], "y")
    x0, sx = _grid(da["x"], "x")
    yc, xc = map(float, centre)
    if r_max is None:
        ys, xs = da["y"].values, da["x"].values
        r_max = float(max(np.hypot(ys[[0, -1]] - yc, xs[[0, -1], None] - xc).ravel()))
    dr = float(dr or min(abs(sy), abs(sx)))
    radius, angle = polar_grid(r_max, dr, n_angles)
    theta = np.deg2rad(angle)
    r = radius[:, None] + pitch * theta[None, :] / (2 * np.pi)
    iy = (yc + r * np.sin(theta)[None, :] - y0) / sy
    ix = (xc + r * np.cos(theta)[None, :] - x0) / sx
    iy = np.where(r >= 0, iy, -1e9)
    src = da.transpose(..., "y", "x")
    if src.chunks is not None:  # one (y, x) image per block; leading dims (phase) stay chunked
        src = src.chunk({"y": -1, "x": -1})
    out = xr.apply_ufunc(
        _unroll_2d, src, kwargs={"iy": iy, "ix": ix},
        input_core_dims=[["y", "x"]], output_core_dims=[["radius", "angle"]], vectorize=True,
        dask="parallelized", output_dtypes=[float],
        dask_gufunc_kwargs={"output_sizes": {"radius": radius.size, "angle": angle.size}},
    )
    out = out.assign_coords(radius=("radius", radius, {"units": "mm"}), angle=("angle", angle, {"units": "deg"}))
    out.attrs.update(da.attrs)
    out.attrs.update(centre_y=yc, centre_x=xc, pitch=float(pitch))
    return out


def radial_profile(unrolled: xr.DataArray) -> xr.DataArray:
    """Mean over angle of an unrolled map (NaN outside the map ignored)."""
    return unrolled.mean("angle", skipna=True)


def estimate_pitch(da: xr.DataArray, centre: tuple[float, float], *, p_max: float, n: int = 121,
                   n_angles: int = 360) -> float:
    """Spiral pitch [mm/turn] that makes the unrolled layers sharpest.

    Scans signed pitches in ``[−p_max, p_max]`` and keeps the one whose angle-mean radial
    profile has the largest variance (aligned layers do not blur when averaged over angle).

    Parameters
    ----------
    da : xarray.DataArray
        One 2D map (y, x) with a clear layer structure (e.g. the Cu or Al scale).
    centre : (yc, xc)
        Cell centre [mm].
    p_max : float
        Largest pitch to try [mm/turn] (about one layer repeat).
    n : int
        Number of pitches tried.
    """
    img = da.transpose("y", "x").load()

    def scan(pitches: np.ndarray) -> float:
        scores = [np.nanvar(radial_profile(unroll(img, centre, pitch=float(p), n_angles=n_angles)).values)
                  for p in pitches]
        return float(pitches[int(np.nanargmax(scores))])

    coarse = np.linspace(-p_max, p_max, n)
    step = coarse[1] - coarse[0]
    best = scan(coarse)
    best = scan(np.linspace(best - step, best + step, 21))  # refine around the coarse optimum
    logger.info("spiral pitch %.4f mm/turn", best)
    return best
