"""The Bragg CDI section of the HTML report: one block per ``cdi-series`` store.

Per series: central slices of amplitude, phase and strain of every state (the slice
through the crystal's centre, normal to the first axis), the PCA plot (Ω_i per state,
the paper's Fig. 3b), the principal component ψ₁, and Table 1 (χ², mean phase
difference, mean relative displacement and strain, Ω).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from xrdscale.analysis import plots
from xrdscale.io import storage

logger = logging.getLogger(__name__)

#: (variable, colour-bar label, colour map, symmetric) of the slice figure's columns
SLICES = (("amplitude", "amplitude |ρ|", "gray", False), ("phase", "phase φ (rad)", "twilight", True),
          ("strain", "strain along Q", "coolwarm", True))
#: Table 1 columns as the report names them
TABLE_NAMES = {"chi2": "χ² (Eq. 1)", "dphi_mean_deg": "mean Δφ (deg)",
               "displacement_mean_angstrom": "mean relative displacement (Å)",
               "strain_mean": "mean relative strain", "omega": "Ω (Eq. 3)"}


def series_table(ds: xr.Dataset) -> pd.DataFrame:
    """Table 1 of a ``cdi-series`` store, one row per state."""
    rows: dict[str, Any] = {"state": [str(s) for s in ds["state"].values]}
    for var, name in TABLE_NAMES.items():
        if var in ds:
            rows[name] = np.asarray(ds[var].values, dtype=float)
    return pd.DataFrame(rows)


def slices_figure(ds: xr.Dataset, *, title: str) -> bytes:
    """States as rows, amplitude / phase / strain as columns, the central slice of the first axis."""
    import matplotlib.pyplot as plt

    states = [str(s) for s in ds["state"].values]
    z0 = ds.sizes["z"] // 2
    fig, axes = plt.subplots(len(states), len(SLICES), figsize=(3.0 * len(SLICES) + 0.8, 2.6 * len(states)),
                             squeeze=False)
    for col, (var, label, cmap, symmetric) in enumerate(SLICES):
        data = np.asarray(ds[var].isel(z=z0).values, dtype=float)
        finite = data[np.isfinite(data)]
        if symmetric:
            lim = float(np.nanpercentile(np.abs(finite), 99)) if finite.size else 1.0
            vmin, vmax = -(lim or 1.0), lim or 1.0
        else:
            vmin, vmax = 0.0, float(finite.max()) if finite.size else 1.0
        for row, state in enumerate(states):
            ax = axes[row, col]
            im = ax.imshow(data[row], cmap=cmap, vmin=vmin, vmax=vmax, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=9)
            if col == 0:
                ax.set_ylabel(state, fontsize=9)
        fig.colorbar(im, ax=axes[:, col].tolist(), shrink=0.6)
    fig.suptitle(title, fontsize=10)
    return plots.to_png(fig)


def pca_figure(ds: xr.Dataset, *, title: str) -> bytes:
    """Ω_i per state (Eq. 3), the order parameter along the principal component."""
    import matplotlib.pyplot as plt

    states = [str(s) for s in ds["state"].values]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(range(len(states)), np.asarray(ds["omega"].values, dtype=float), "o-")
    ax.set_xticks(range(len(states)), states, rotation=30, fontsize=8)
    ax.set_ylabel("Ω = ψ₁ · Δφ (rad)")
    explained = ds.attrs.get("pca_explained")
    ax.set_title(title + (f" (ψ₁: {100 * float(explained):.1f} % of the variation)" if explained else ""),
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return plots.to_png(fig)


def add_section(doc: Any, url: str) -> pd.DataFrame:
    """Append the section of the series store ``url`` to the report ``doc``; returns its Table 1."""
    ds = storage.open_store(url, stage="cdi-series").load()
    name = storage.redact(url)
    doc.h(2, f"Bragg CDI series {name}")
    voxel = ds.attrs.get("voxel_size_nm")
    doc.p(f"{ds.sizes['state']} states of {ds.sizes['z']}×{ds.sizes['y']}×{ds.sizes['x']} voxels"
          + (f" of {' × '.join(f'{v:.1f}' for v in voxel)} nm" if voxel else "")
          + (f"; |Q| = {float(ds.attrs['q_norm']):.4g} m⁻¹" if "q_norm" in ds.attrs else "")
          + f"; {int(np.asarray(ds['support'].values).sum())} voxels in the common support.")
    doc.figure(slices_figure(ds, title=f"{name}: central slices"), f"cdi_{name}_slices",
               "Amplitude, phase and strain along Q of every state (central slice; phase and strain inside each "
               "state's support)")
    doc.figure(pca_figure(ds, title="PCA of the phase differences to the first state"), f"cdi_{name}_pca",
               "Order parameter Ω_i of every state (Eq. 3)")
    table = series_table(ds)
    doc.table(table, "Table 1: per-state metrics (relative to the first state, along Q)")
    return table
