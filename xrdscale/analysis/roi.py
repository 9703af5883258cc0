"""Named regions of interest and per-ROI statistics of every map (the paper's Table S5).

An ROI is a boolean mask (y, x). It is built from a mask array, a threshold on a map
(``scale`` of ``Al`` above a value, grown by 1 mm: "next to the Al tab"), a polygon in mm
(:class:`matplotlib.path.Path`), and combined with ``within``
(intersection) and ``exclude`` (difference). :func:`roi_table` gives, per dataset, ROI,
variable and phase, the mean and standard deviation over the ROI's pixels, the mean
ensemble standard deviation (``<variable>_std``) and the pixel count, as a pandas table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.path import Path
from scipy import ndimage

from xrdscale.analysis.fractions import require
from xrdscale.exceptions import ConfigError, InputError

logger = logging.getLogger(__name__)

#: Map variables summarised per ROI (when present), each with its ``_std``.
MAP_VARIABLES = ("scale", "a", "c", "size", "weight_fraction")


def _template(maps: xr.Dataset) -> xr.DataArray:
    if "y" not in maps.dims or "x" not in maps.dims:
        raise InputError(f"ROIs need maps with dims y, x; got {dict(maps.sizes)}")
    return xr.DataArray(np.zeros((maps.sizes["y"], maps.sizes["x"]), dtype=bool), dims=("y", "x"),
                        coords={"y": maps["y"], "x": maps["x"]})


def roi_from_mask(maps: xr.Dataset, mask: np.ndarray) -> xr.DataArray:
    """An ROI from a boolean array shaped like the maps' (y, x)."""
    tpl = _template(maps)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != tpl.shape:
        raise InputError(f"ROI mask has shape {mask.shape}, the maps are {tpl.shape} (y, x); "
                         "make the mask on the same grid")
    return tpl.copy(data=mask)


def roi_from_threshold(maps: xr.Dataset, *, phase: str, variable: str = "scale", above: float | None = None,
                       below: float | None = None, relative: bool = True, dilate_mm: float = 0.0) -> xr.DataArray:
    """An ROI where a map lies above/below a threshold, optionally dilated.

    Parameters
    ----------
    maps : xarray.Dataset
        A ``maps`` store.
    phase, variable : str
        The map (e.g. ``phase="Al", variable="scale"``).
    above, below : float, optional
        Bounds; with ``relative`` they are fractions of the map's 99.5th percentile.
    relative : bool
        Interpret the bounds relative to the map's 99.5th percentile.
    dilate_mm : float
        Grow the ROI by this distance [mm] (every pixel within ``dilate_mm`` of it joins).
    """
    require(maps, [variable], [phase], what=f"an ROI on {phase} {variable}")
    if above is None and below is None:
        raise ConfigError(f"threshold ROI on {phase} {variable} needs 'above' or 'below'")
    img = np.asarray(maps[variable].sel(phase=phase).transpose("y", "x").values, dtype=float)
    ref = float(np.nanpercentile(img, 99.5)) if relative and np.isfinite(img).any() else 1.0
    mask = np.isfinite(img)
    if above is not None:
        mask &= img > above * ref
    if below is not None:
        mask &= img < below * ref
    if dilate_mm > 0 and mask.any():
        step = (abs(float(np.diff(maps["y"].values[:2])[0])), abs(float(np.diff(maps["x"].values[:2])[0])))
        mask = ndimage.distance_transform_edt(~mask, sampling=step) <= dilate_mm
    return _template(maps).copy(data=mask)


def roi_from_polygon(maps: xr.Dataset, vertices: Sequence[Sequence[float]]) -> xr.DataArray:
    """An ROI inside a polygon given as ``[(x, y), …]`` vertices in mm."""
    verts = np.asarray(vertices, dtype=float)
    if verts.ndim != 2 or verts.shape[1] != 2 or len(verts) < 3:
        raise ConfigError(f"a polygon ROI needs at least 3 (x, y) vertices in mm; got {vertices!r}")
    xx, yy = np.meshgrid(maps["x"].values, maps["y"].values)
    inside = Path(verts).contains_points(np.stack([xx.ravel(), yy.ravel()], axis=1))
    return _template(maps).copy(data=inside.reshape(xx.shape))


def build_rois(maps: xr.Dataset, spec: Mapping[str, Mapping[str, Any]],
               masks: Mapping[str, np.ndarray] | None = None) -> xr.DataArray:
    """Build named ROIs from a spec (as in an ROI YAML file).

    Each entry has exactly one of ``threshold: {phase, variable, above|below, relative,
    dilate_mm}``, ``polygon: [[x, y], …]`` or ``mask: <name in masks>``, and optionally
    ``within:`` (a threshold/polygon/other ROI name intersected with it) and
    ``exclude: [ROI names]`` (earlier ROIs removed from it).

    Returns
    -------
    xarray.DataArray
        Boolean (roi, y, x).
    """
    built: dict[str, xr.DataArray] = {}
    for name, entry in spec.items():
        built[name] = _one_roi(maps, name, entry, built, masks or {})
        for other in entry.get("exclude", []) or []:
            if other not in built:
                raise ConfigError(f"ROI {name!r} excludes {other!r}, which is not defined before it")
            built[name] = built[name] & ~built[other]
    if not built:
        raise ConfigError("no ROIs defined; give at least one (threshold, polygon or mask)")
    return xr.concat(list(built.values()), dim="roi").assign_coords(roi=list(built))


def _one_roi(maps: xr.Dataset, name: str, entry: Mapping[str, Any], built: Mapping[str, xr.DataArray],
             masks: Mapping[str, np.ndarray]) -> xr.DataArray:
    kinds = [k for k in ("threshold", "polygon", "mask", "roi") if k in entry]
    if len(kinds) != 1:
        raise ConfigError(f"ROI {name!r} must have exactly one of threshold, polygon, mask or roi; got {sorted(entry)}")
    kind = kinds[0]
    try:
        if kind == "threshold":
            roi = roi_from_threshold(maps, **dict(entry["threshold"]))
        elif kind == "polygon":
            roi = roi_from_polygon(maps, entry["polygon"])
        elif kind == "roi":
            roi = built[entry["roi"]].copy()
        else:
            if entry["mask"] not in masks:
                raise ConfigError(f"ROI {name!r} names mask {entry['mask']!r}; none was given with that name")
            roi = roi_from_mask(maps, masks[entry["mask"]])
    except (TypeError, KeyError) as exc:
        raise ConfigError(f"ROI {name!r}: invalid {kind} definition {entry[kind]!r} ({exc})") from exc
    if "within" in entry:
        roi = roi & _one_roi(maps, f"{name}.within", entry["within"], built, masks)
    return roi


def default_rois(maps: xr.Dataset, *, al_above: float = 0.55, dilate_mm: float = 1.0) -> dict[str, dict[str, Any]]:
    """The paper's cathode ROIs when ``NCA`` and ``Al`` maps exist: NCA next to the Al tab and elsewhere.

    "Next to the Al tab" is NCA within ``dilate_mm`` of pixels whose Al scale exceeds
    ``al_above`` (absolute units: a voxel full of Al has scale 1, so only the tab, not the
    thin Al foil, passes); "elsewhere" is the rest of the NCA (scale above 20 % of its
    99.5th percentile).
    """
    phases = [str(p) for p in maps["phase"].values]
    if not {"NCA", "Al"} <= set(phases):
        return {}
    nca = {"phase": "NCA", "variable": "scale", "above": 0.2}
    return {
        "NCA next to Al tab": {"threshold": {"phase": "Al", "variable": "scale", "above": al_above, "relative": False,
                                             "dilate_mm": dilate_mm},
                               "within": {"threshold": nca}},
        "NCA elsewhere": {"threshold": nca, "exclude": ["NCA next to Al tab"]},
    }


def roi_table(datasets: Mapping[str, xr.Dataset], rois: xr.DataArray | Mapping[str, xr.DataArray],
              *, variables: Sequence[str] = MAP_VARIABLES) -> pd.DataFrame:
    """Per-ROI mean ± std of every map, per dataset.

    Parameters
    ----------
    datasets : mapping
        Dataset id → ``maps`` Dataset (all on the ROIs' grid).
    rois : DataArray (roi, y, x) or mapping
        The ROIs (one DataArray for all datasets, or one per dataset id).
    variables : sequence of str
        Map variables to summarise (those absent are skipped).

    Returns
    -------
    pandas.DataFrame
        Columns ``dataset, roi, phase, variable, mean, std, ensemble_std, n_pixels``;
        ``std`` is the spread over the ROI's pixels, ``ensemble_std`` the mean of the
        ensemble's ``<variable>_std`` over them.

    Raises
    ------
    InputError
        An empty ROI (naming it and the dataset).
    """
    rows = []
    for ds_id, maps in datasets.items():
        roi_set = rois[ds_id] if isinstance(rois, Mapping) else rois
        names = [str(r) for r in roi_set["roi"].values]
        counts = roi_set.sum(("y", "x")).values
        for name, n in zip(names, counts):
            if n == 0:
                raise InputError(f"ROI {name!r} is empty in dataset {ds_id!r}: no pixel satisfies its "
                                 "definition; relax the threshold or check the polygon (mm coordinates)")
        mask = xr.DataArray(roi_set.values.astype(float), dims=("roi", "y", "x"), coords={"roi": names})
        stats = {}
        for var in [v for v in variables if v in maps.data_vars]:
            # masked sums as tensor contractions over (y, x): chunk-wise, no (roi, phase, y, x) temporaries
            x = maps[var].astype(float)
            valid = x.notnull().astype(float)
            x0 = x.fillna(0.0)
            # NaN (not 0) where an ROI has no valid pixel (no c for a cubic phase): those rows are
            # NaN without a 0/0 in the tasks, and are dropped below
            n = xr.dot(mask, valid, dim=("y", "x"))
            n = n.where(n > 0)
            mean = xr.dot(mask, x0, dim=("y", "x")) / n
            stats[f"{var}|mean"] = mean
            stats[f"{var}|std"] = np.sqrt((xr.dot(mask, x0**2, dim=("y", "x")) / n - mean**2).clip(min=0.0))
            if f"{var}_std" in maps.data_vars:
                e = maps[f"{var}_std"].astype(float)
                n_e = xr.dot(mask, e.notnull().astype(float), dim=("y", "x"))
                stats[f"{var}|ens"] = xr.dot(mask, e.fillna(0.0), dim=("y", "x")) / n_e.where(n_e > 0)
        done = xr.Dataset(stats).compute()
        for var in dict.fromkeys(k.split("|")[0] for k in stats):
            mean = done[f"{var}|mean"].transpose("roi", "phase")
            std = done[f"{var}|std"].transpose("roi", "phase")
            ens = done[f"{var}|ens"].transpose("roi", "phase").values if f"{var}|ens" in done else None
            for i, name in enumerate(names):
                for j, ph in enumerate(str(p) for p in mean["phase"].values):
                    if not np.isfinite(mean.values[i, j]):
                        continue
                    rows.append({"dataset": ds_id, "roi": name, "phase": ph, "variable": var,
                                 "mean": float(mean.values[i, j]), "std": float(std.values[i, j]),
                                 "ensemble_std": float(ens[i, j]) if ens is not None else np.nan,
                                 "n_pixels": int(counts[i])})
    table = pd.DataFrame(rows, columns=["dataset", "roi", "phase", "variable", "mean", "std", "ensemble_std",
                                        "n_pixels"])
    return table.sort_values(["dataset", "roi", "variable", "phase"], kind="stable").reset_index(drop=True)
