"""Figures of the campaign report (matplotlib, Agg backend): PNG bytes, never a window."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

logger = logging.getLogger(__name__)

DPI = 80


def to_png(fig: Figure) -> bytes:
    """Render ``fig`` as PNG bytes and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def _grid(n: int, ncols: int = 4, size: float = 2.8) -> tuple[Figure, np.ndarray]:
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols + 0.8, size * nrows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def map_grid(da: xr.DataArray, *, title: str, units: str, cmap: str = "viridis",
             robust: bool = True) -> bytes:
    """One image per phase of a (phase, y, x) map, each with a colour bar labelled in ``units``.

    Parameters
    ----------
    da : xarray.DataArray
        Map (phase, y, x) with coordinates in mm.
    title : str
        Figure title.
    units : str
        Colour-bar label.
    cmap : str
        Matplotlib colour map.
    robust : bool
        Colour limits from the 1st/99th percentiles instead of min/max.
    """
    phases = [str(p) for p in da["phase"].values]
    fig, axes = _grid(len(phases))
    y, x = da["y"].values, da["x"].values
    extent = (float(x[0]), float(x[-1]), float(y[-1]), float(y[0]))
    for ax, ph in zip(axes, phases):
        img = np.asarray(da.sel(phase=ph).transpose("y", "x").values, dtype=float)
        finite = img[np.isfinite(img)]
        lo, hi = (np.percentile(finite, [1, 99]) if robust else (finite.min(), finite.max())) \
            if finite.size else (0.0, 1.0)
        im = ax.imshow(img, extent=extent, cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1e-12)
        ax.set_title(ph, fontsize=9)
        ax.set_xticks([])  # axis ticks cost most of the rendering time; the extent is in the title
        ax.set_yticks([])
        _colorbar(fig, im, ax, units)
    fig.suptitle(f"{title}  (x {x[0]:.1f}…{x[-1]:.1f} mm, y {y[0]:.1f}…{y[-1]:.1f} mm)", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.93, bottom=0.03, top=0.88, wspace=0.45, hspace=0.25)
    return to_png(fig)


def _colorbar(fig: Figure, im, ax, units: str) -> None:
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.locator = matplotlib.ticker.MaxNLocator(4)
    cb.update_ticks()
    cb.set_label(units, fontsize=7)
    cb.ax.tick_params(labelsize=6)


def unrolled_grid(da: xr.DataArray, *, title: str, units: str, cmap: str = "viridis") -> bytes:
    """One radius × angle image per phase of an unrolled map (phase, radius, angle)."""
    phases = [str(p) for p in da["phase"].values]
    fig, axes = _grid(len(phases), ncols=2, size=3.2)
    r, ang = da["radius"].values, da["angle"].values
    for ax, ph in zip(axes, phases):
        img = np.asarray(da.sel(phase=ph).transpose("radius", "angle").values, dtype=float)
        finite = img[np.isfinite(img)]
        lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
        im = ax.imshow(img, aspect="auto", origin="lower", cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1e-12,
                       extent=(float(ang[0]), float(ang[-1]), float(r[0]), float(r[-1])))
        ax.set_title(ph, fontsize=9)
        ax.set_xlabel("angle (deg)", fontsize=7)
        ax.set_ylabel("radius along spiral (mm)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.locator_params(nbins=4)
        _colorbar(fig, im, ax, units)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.93, bottom=0.06, top=0.9, wspace=0.5, hspace=0.45)
    return to_png(fig)


def series_plot(table: pd.DataFrame, *, value: str, error: str | None, group: str, ylabel: str,
                title: str, panels: str | None = None) -> bytes:
    """Lines of ``value`` vs ``voltage``, one per ``group``, with error bars, optionally one panel per ``panels``.

    Parameters
    ----------
    table : pandas.DataFrame
        Needs columns ``voltage``, ``value``, ``group`` (and ``error``, ``panels``).
    """
    keys = list(dict.fromkeys(table[panels])) if panels else [None]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        sub = table if key is None else table[table[panels] == key]
        for name, g in sub.groupby(group, sort=False):
            g = g.sort_values("voltage")
            ax.errorbar(g["voltage"], g[value], yerr=g[error] if error else None, marker="o", ms=3,
                        capsize=2, label=str(name))
        ax.set_xlabel("voltage (V)", fontsize=8)
        ax.set_ylabel(ylabel if key is None else f"{key} ({ylabel})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return to_png(fig)


def region_map(region: xr.DataArray, names: Mapping[int, str], *, title: str) -> bytes:
    """A categorical map of lithiation regions with a labelled colour bar."""
    codes: Sequence[int] = sorted(names)
    cmap = matplotlib.colors.ListedColormap(["#f0f0f0", "#2b8cbe", "#fdae61", "#d7191c"][: len(codes) + 1])
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    y, x = region["y"].values, region["x"].values
    im = ax.imshow(region.transpose("y", "x").values, cmap=cmap, vmin=-1.5, vmax=len(codes) - 0.5,
                   extent=(float(x[0]), float(x[-1]), float(y[-1]), float(y[0])), interpolation="nearest")
    cb = fig.colorbar(im, ax=ax, ticks=[-1, *codes])
    cb.ax.set_yticklabels(["outside", *[names[c] for c in codes]], fontsize=7)
    ax.set_xlabel("x (mm)", fontsize=8)
    ax.set_ylabel("y (mm)", fontsize=8)
    ax.set_title(title, fontsize=10)
    return to_png(fig)


#: Colours of the ``ood`` bit mask's eight values (0: in distribution).
OOD_COLOURS = ("#f0f0f0", "#d7191c", "#2b8cbe", "#7b3294", "#fdae61", "#a6611a", "#1a9641", "#000000")


def quality_maps(rwp: xr.DataArray, ood: xr.DataArray | None, *, title: str,
                 bits: Mapping[int, str] | None = None) -> bytes:
    """The ``rwp`` map (y, x) and the ``ood`` bit-mask map beside it, with labelled colour bars.

    Parameters
    ----------
    rwp : xarray.DataArray
        Weighted profile R factor per pixel (y, x), coordinates in mm.
    ood : xarray.DataArray, optional
        Out-of-distribution bit mask per pixel (y, x).
    title : str
        Figure title.
    bits : mapping, optional
        Bit → meaning, for the colour bar of ``ood`` (default: ``1, 2, 4``).
    """
    n = 1 + (ood is not None)
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 3.6), squeeze=False)
    y, x = rwp["y"].values, rwp["x"].values
    extent = (float(x[0]), float(x[-1]), float(y[-1]), float(y[0]))
    img = np.asarray(rwp.transpose("y", "x").values, dtype=float)
    finite = img[np.isfinite(img)]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    ax = axes[0, 0]
    im = ax.imshow(img, extent=extent, cmap="magma", vmin=lo, vmax=hi if hi > lo else lo + 1e-12)
    ax.set_title("rwp of the implied pattern", fontsize=9)
    _colorbar(fig, im, ax, "rwp")
    if ood is not None:
        names = dict(bits or {1: "residual", 2: "ensemble_spread", 4: "range_edge"})
        cmap = matplotlib.colors.ListedColormap(list(OOD_COLOURS))
        ax = axes[0, 1]
        im = ax.imshow(np.asarray(ood.transpose("y", "x").values, dtype=float), extent=extent, cmap=cmap,
                       vmin=-0.5, vmax=7.5, interpolation="nearest")
        ax.set_title("ood bit mask", fontsize=9)
        cb = fig.colorbar(im, ax=ax, ticks=range(8), fraction=0.046, pad=0.04)
        labels = ["none"] + ["+".join(names.get(b, str(b)) for b in sorted(names) if v & b) for v in range(1, 8)]
        cb.ax.set_yticklabels(labels, fontsize=6)
    for ax in axes.ravel():
        ax.set_xlabel("x (mm)", fontsize=7)
        ax.set_ylabel("y (mm)", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return to_png(fig)
