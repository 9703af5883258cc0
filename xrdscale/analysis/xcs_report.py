"""The Compton-imaging (XCS) and CT-roughness sections of the HTML report.

Per ``xcs`` store (:func:`add_section`): the EMR maps of the target region for every state
(and the Li stoichiometry maps x beside them once calibrated), on one colour scale across
states with masked pixels blank; the Compton profiles J(p_z) of every region, one line
per state (the paper's Figs. 3b and 4a); Table 1 (per state the target region's EMR ± σ
and, once calibrated, x ± σ) with the calibration line x = a + b · EMR; and the per-region
table of EMR, Compton peak energy and the scattering angle it implies (Eq. 4).

Per set of ``ct-roughness`` stores, one per state (:func:`add_roughness_section`): the
interface height maps Z(x, y) of every store and Table 2 (R_a and R_q of every interface,
the volume fractions, and the state's EMR where one is known).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from xrdscale.analysis import plots
from xrdscale.io import storage

logger = logging.getLogger(__name__)


def _pm(value: float, std: float, digits: int = 4) -> str:
    """``value ± std`` with ``digits`` decimals; "–" where the value is not finite."""
    if not np.isfinite(value):
        return "–"
    if not np.isfinite(std):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {std:.{digits}f}"


def _num(value: Any) -> float:
    """A store attribute as a float (NaN when absent or not a number)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def store_label(url: str, ds: xr.Dataset) -> str:
    """A store's label in the report: ``attrs['state']`` if set, else its file name without ``.zarr``."""
    state = ds.attrs.get("state")
    if state not in (None, ""):
        return str(state)
    base = posixpath.basename(storage.redact(url).rstrip("/")) or storage.redact(url)
    return base[:-5] if base.endswith(".zarr") else base


def _target(ds: xr.Dataset) -> str:
    regions = [str(r) for r in ds["region"].values] if "region" in ds.coords else []
    return str(ds.attrs.get("target") or (regions[0] if regions else "target"))


def emr_table(ds: xr.Dataset) -> pd.DataFrame:
    """Table 1 of an ``xcs`` store, one row per state (numbers).

    Columns ``state``, ``emr``, ``emr_std`` (the target region's summed EMR; the mean of
    the EMR map where the store has no region EMRs) and, once calibrated, ``x_li`` and
    ``x_li_std``.
    """
    states = [str(s) for s in ds["state"].values]
    target = _target(ds)
    regions = [str(r) for r in ds["region"].values] if "region" in ds.coords else []
    if "region_emr" in ds and target in regions:
        t = regions.index(target)
        emr = np.asarray(ds["region_emr"].values, dtype=float)[:, t]
        std = (np.asarray(ds["region_emr_std"].values, dtype=float)[:, t] if "region_emr_std" in ds
               else np.full(len(states), np.nan))
    else:
        maps = np.asarray(ds["emr"].values, dtype=float).reshape(len(states), -1)
        emr = np.array([float(np.mean(m[np.isfinite(m)])) if np.isfinite(m).any() else np.nan for m in maps])
        sig = np.asarray(ds["emr_std"].values, dtype=float).reshape(len(states), -1)
        std = np.array([float(np.sqrt(np.sum(s[np.isfinite(s)] ** 2)) / np.isfinite(s).sum())
                        if np.isfinite(s).any() else np.nan for s in sig])
    rows: dict[str, Any] = {"state": states, "emr": emr, "emr_std": std}
    if "region_x_li" in ds:
        rows["x_li"] = np.asarray(ds["region_x_li"].values, dtype=float)
        rows["x_li_std"] = (np.asarray(ds["region_x_li_std"].values, dtype=float) if "region_x_li_std" in ds
                            else np.full(len(states), np.nan))
    return pd.DataFrame(rows)


def region_table(ds: xr.Dataset) -> pd.DataFrame:
    """Per region and state: EMR ± σ, Compton peak energy (keV) and implied scattering angle (deg)."""
    rows = []
    states = [str(s) for s in ds["state"].values]
    regions = [str(r) for r in ds["region"].values]

    def cell(var: str, s: int, r: int) -> float:
        return float(np.asarray(ds[var].values, dtype=float)[s, r]) if var in ds else float("nan")

    for r, region in enumerate(regions):
        for s, state in enumerate(states):
            rows.append({"region": region, "state": state,
                         "EMR": _pm(cell("region_emr", s, r), cell("region_emr_std", s, r)),
                         "peak (keV)": cell("region_peak_kev", s, r),
                         "implied angle (deg)": cell("region_angle_deg", s, r)})
    return pd.DataFrame(rows)


def _limits(data: np.ndarray) -> tuple[float, float]:
    """Colour range of ``data`` (1st–99th percentile of its finite values), shared across states."""
    finite = data[np.isfinite(data)]
    if not finite.size:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [1, 99]))
    if hi <= lo:  # a constant map
        pad = 0.01 * abs(lo) or 0.5
        lo, hi = lo - pad, hi + pad
    return lo, hi


def maps_figure(ds: xr.Dataset, *, title: str) -> bytes:
    """States as rows; the EMR map (and the x map once calibrated) as columns, one colour scale per column."""
    import matplotlib.pyplot as plt

    states = [str(s) for s in ds["state"].values]
    target = _target(ds)
    cols = [("emr", f"EMR of {target}", "viridis")]
    if "x_li" in ds:
        cols.append(("x_li", f"x (Li stoichiometry) of {target}", "magma"))
    fig, axes = plt.subplots(len(states), len(cols), figsize=(3.4 * len(cols) + 0.8, 2.6 * len(states)),
                             squeeze=False)
    for col, (var, label, name) in enumerate(cols):
        data = np.asarray(ds[var].values, dtype=float)
        vmin, vmax = _limits(data)
        for row, state in enumerate(states):
            ax = axes[row, col]
            # masked (NaN) pixels are drawn in the colour map's "bad" colour: transparent, i.e. blank
            im = ax.imshow(np.ma.masked_invalid(data[row]), cmap=name, vmin=vmin, vmax=vmax, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=9)
            if col == 0:
                ax.set_ylabel(state, fontsize=9)
        fig.colorbar(im, ax=axes[:, col].tolist(), shrink=0.6)
    fig.suptitle(title, fontsize=10)
    return plots.to_png(fig)


def profiles_figure(ds: xr.Dataset, *, title: str) -> bytes:
    """One panel per region: the Compton profile J(p_z) of every state."""
    import matplotlib.pyplot as plt

    states = [str(s) for s in ds["state"].values]
    regions = [str(r) for r in ds["region"].values]
    pz = np.asarray(ds["pz"].values, dtype=float)
    prof = np.asarray(ds["profile"].values, dtype=float)
    fig, axes = plt.subplots(1, len(regions), figsize=(3.6 * len(regions) + 0.4, 3.2), squeeze=False, sharey=True)
    for r, region in enumerate(regions):
        ax = axes[0, r]
        for s, state in enumerate(states):
            ax.plot(pz, prof[s, r], label=state, lw=1.2)
        ax.set_title(region, fontsize=9)
        ax.set_xlabel("p_z (a.u.)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("J(p_z) (counts per a.u.)")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return plots.to_png(fig)


def _description(ds: xr.Dataset) -> str:
    states = [str(s) for s in ds["state"].values]
    regions = [str(r) for r in ds["region"].values] if "region" in ds.coords else []
    emr = np.asarray(ds["emr"].values, dtype=float)
    masked = sorted({int(n) for n in (~np.isfinite(emr)).reshape(len(states), -1).sum(axis=1)})
    text = (f"{len(states)} states ({', '.join(states)}) of {ds.sizes['y']}×{ds.sizes['x']} pixels, "
            + (f"{masked[0]} of them masked" if len(masked) == 1 else
               f"{masked[0]}–{masked[-1]} of them masked depending on the state"))
    parts = []
    for key, fmt in (("incident_kev", "E₁ = {:.4g} keV"), ("angle_deg", "θ = {:.4g}°"),
                     ("compton_kev", "Compton energy {:.4g} keV")):
        value = _num(ds.attrs.get(key))
        if np.isfinite(value):
            parts.append(fmt.format(value))
    if parts:
        text += "; " + ", ".join(parts)
    text += f"; target region {_target(ds)}"
    if ds.attrs.get("separated"):
        alpha, beta = _num(ds.attrs.get("alpha")), _num(ds.attrs.get("beta"))
        ab = ", ".join(f"{n} = {v:.4g}" for n, v in (("α", alpha), ("β", beta)) if np.isfinite(v))
        text += f"; planes separated into {', '.join(regions)}" + (f" with {ab}" if ab else "")
    else:
        text += f"; no plane separation (regions {', '.join(regions)})"
    return text + "."


def calibration_line(cal: Mapping[str, Any]) -> str:
    """The calibration x = a + b · EMR of an ``xcs`` store's ``attrs['calibration']`` as one sentence."""
    a, b = _num(cal.get("intercept")), _num(cal.get("slope"))
    sa, sb = _num(cal.get("intercept_std")), _num(cal.get("slope_std"))
    r2 = _num(cal.get("r2"))
    points = cal.get("points") or []
    text = f"Calibration: x = ({a:.4f} ± {sa:.4f}) + ({b:.4f} ± {sb:.4f}) · EMR"
    if np.isfinite(r2):
        text += f", R² = {r2:.5f}"
    if points:
        labels = [str(p["label"]) for p in points if isinstance(p, Mapping) and p.get("label")]
        text += f", {len(points)} points" + (f" ({', '.join(labels)})" if labels else "")
    return text + "."


def add_section(doc: Any, url: str) -> pd.DataFrame:
    """Append the section of the ``xcs`` store ``url`` to the report ``doc``.

    Parameters
    ----------
    doc : report document
        The report being written (``h``, ``p``, ``figure``, ``table``).
    url : str
        An ``xcs`` store (``xrdscale xcs emr`` or ``xrdscale xcs lithium``).

    Returns
    -------
    pandas.DataFrame
        Table 1 as numbers (:func:`emr_table`): ``state``, ``emr``, ``emr_std`` and, once
        calibrated, ``x_li``, ``x_li_std``.
    """
    ds = storage.open_store(url, stage="xcs").load()
    name = storage.redact(url)
    label = store_label(url, ds)
    target = _target(ds)
    doc.h(2, f"Compton imaging {name}")
    doc.p(_description(ds))
    calibrated = "x_li" in ds
    doc.figure(maps_figure(ds, title=f"{label}: EMR" + (" and x maps" if calibrated else " maps")),
               f"xcs_{name}_maps",
               f"EMR of the {target} region" + (" and its Li stoichiometry x" if calibrated else "")
               + " for every state (one colour scale across states; masked pixels blank)")
    doc.figure(profiles_figure(ds, title=f"{label}: Compton profiles"), f"xcs_{name}_profiles",
               "Compton profile J(p_z) of every region's summed spectrum, one line per state")
    table = emr_table(ds)
    shown = pd.DataFrame({"state": table["state"],
                          f"EMR ({target})": [_pm(m, s) for m, s in zip(table["emr"], table["emr_std"], strict=True)]})
    if "x_li" in table:
        shown[f"x ({target})"] = [_pm(m, s) for m, s in zip(table["x_li"], table["x_li_std"], strict=True)]
    doc.table(shown, f"Table 1: EMR of the {target} region per state" + (" and x from the calibration"
                                                                          if "x_li" in table else ""))
    cal = ds.attrs.get("calibration")
    if calibrated and isinstance(cal, Mapping):
        doc.p(calibration_line(cal))
    if "region" in ds.coords and "region_emr" in ds:
        doc.table(region_table(ds), "EMR, Compton peak energy and the scattering angle it implies (Eq. 4) of every "
                                    "region, per state")
    logger.info("xcs section of %s: %d states", name, ds.sizes["state"])
    return table


def roughness_table(stores: Sequence[tuple[str, xr.Dataset]],
                    emr_by_state: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Table 2: one row per ``ct-roughness`` store (label, R_a and R_q per interface in µm, volume fractions).

    Parameters
    ----------
    stores : sequence of (label, Dataset)
        The stores with their labels (:func:`store_label`).
    emr_by_state : mapping, optional
        EMR per state label; adds an ``EMR`` column when a store's label is one of them.
    """
    rows = []
    for label, ds in stores:
        row: dict[str, Any] = {"state": label}
        for i, interface in enumerate(str(v) for v in ds["interface"].values):
            row[f"R_a {interface} (µm)"] = float(np.asarray(ds["ra"].values, dtype=float)[i])
            row[f"R_q {interface} (µm)"] = float(np.asarray(ds["rq"].values, dtype=float)[i])
        for i, component in enumerate(str(v) for v in ds["component"].values):
            row[f"fraction {component}"] = float(np.asarray(ds["fraction"].values, dtype=float)[i])
        rows.append(row)
    table = pd.DataFrame(rows)
    if emr_by_state and any(label in emr_by_state for label, _ in stores):
        table["EMR"] = [float(emr_by_state[label]) if label in emr_by_state else np.nan for label, _ in stores]
    return table


def heights_figure(ds: xr.Dataset, *, title: str) -> bytes:
    """One panel per interface: its height map Z(x, y) in µm (each with its own colour scale)."""
    import matplotlib.pyplot as plt

    interfaces = [str(v) for v in ds["interface"].values]
    height = np.asarray(ds["height"].values, dtype=float)
    extent = None
    if "x" in ds.coords and "y" in ds.coords and ds.sizes["x"] > 1 and ds.sizes["y"] > 1:
        x, y = np.asarray(ds["x"].values, dtype=float), np.asarray(ds["y"].values, dtype=float)
        extent = (float(x[0]), float(x[-1]), float(y[0]), float(y[-1]))
    fig, axes = plt.subplots(1, len(interfaces), figsize=(4.8 * len(interfaces), 3.6), squeeze=False,
                             layout="constrained")
    for i, interface in enumerate(interfaces):
        ax = axes[0, i]
        vmin, vmax = _limits(height[i])
        im = ax.imshow(np.ma.masked_invalid(height[i]), cmap="cividis", vmin=vmin, vmax=vmax, origin="lower",
                       extent=extent, aspect="auto")
        ax.set_title(f"{interface} interface", fontsize=9)
        if extent is not None:
            ax.set_xlabel("x (µm)", fontsize=8)
            ax.set_ylabel("y (µm)", fontsize=8)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8, label="height Z (µm)")
    fig.suptitle(title, fontsize=10)
    return plots.to_png(fig)


def add_roughness_section(doc: Any, urls: Sequence[str],
                          emr_by_state: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Append the CT interface-roughness section of the ``ct-roughness`` stores ``urls`` (one per state).

    Parameters
    ----------
    doc : report document
        The report being written (``h``, ``p``, ``figure``, ``table``).
    urls : sequence of str
        ``ct-roughness`` stores (``xrdscale ct roughness``), one per state.
    emr_by_state : mapping, optional
        EMR per state label (e.g. Table 1 of an ``xcs`` store); Table 2 gets an ``EMR``
        column when the stores' labels (``attrs['state']``, else the store name) match.

    Returns
    -------
    pandas.DataFrame
        Table 2 (:func:`roughness_table`).
    """
    stores = []
    for url in urls:
        ds = storage.open_store(url, stage="ct-roughness").load()
        stores.append((url, store_label(url, ds), ds))
    doc.h(2, "CT interface roughness")
    voxels = sorted({f"{_num(ds.attrs.get('voxel_um')):.4g}" for _, _, ds in stores
                     if np.isfinite(_num(ds.attrs.get("voxel_um")))})
    doc.p(f"{len(stores)} store(s) ({', '.join(label for _, label, _ in stores)})"
          + (f"; voxel {' / '.join(voxels)} µm" if voxels else "")
          + "; R_a per ISO 4287 (Eq. 6), R_q the RMS of the interface height.")
    for url, label, ds in stores:
        ab = ", ".join(f"{n} = {v:.4g}" for n, v in (("α", _num(ds.attrs.get("alpha"))),
                                                       ("β", _num(ds.attrs.get("beta")))) if np.isfinite(v))
        doc.figure(heights_figure(ds, title=f"{label}: interface heights"), f"ct_{storage.redact(url)}_heights",
                   f"Interface height maps Z(x, y) of {storage.redact(url)}" + (f" (beam planes: {ab})" if ab else ""))
    table = roughness_table([(label, ds) for _, label, ds in stores], emr_by_state)
    doc.table(table, "Table 2: interface roughness R_a, R_q (µm) and volume fractions per state"
              + (", with the EMR of the state" if "EMR" in table else ""))
    logger.info("ct-roughness section of %d store(s)", len(stores))
    return table
