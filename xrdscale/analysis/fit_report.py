"""The report section of full-profile fits against PQ-Net: one table over the datasets that were fitted.

Per dataset and output (phase and parameter): how many pixels both gave a value, the bias and
mean absolute difference of PQ-Net from the fit, and the fraction of pixels where they disagree
beyond their combined uncertainties (``xrdscale fit compare``), with the fraction of fitted
pixels that converged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from xrdscale.io import storage

logger = logging.getLogger(__name__)


def comparison_table(compares: Mapping[str, str]) -> pd.DataFrame:
    """One row per dataset, phase and parameter from the ``compare.csv`` of each ``fit-compare`` store."""
    from xrdscale.stages.fit import read_compare

    frames = []
    for did, url in compares.items():
        table = read_compare(url)
        table.insert(0, "dataset", did)
        frames.append(table)
    if not frames:
        return pd.DataFrame(columns=["dataset", "phase", "parameter", "n", "bias", "mae", "frac_outside"])
    return pd.concat(frames, ignore_index=True)


def converged_fraction(compare_url: str) -> float:
    """The fraction of fitted pixels that converged, from the fit store the comparison names."""
    ds = storage.open_store(compare_url, stage="fit-compare")
    fit = storage.open_store(str(ds.attrs.get("maps_a")), stage="maps")
    if "converged" not in fit or "rwp" not in fit:
        return float("nan")
    fitted = np.isfinite(np.asarray(fit["rwp"].values))
    return float(np.asarray(fit["converged"].values)[fitted].mean()) if fitted.any() else float("nan")


def add_section(doc: Any, compares: Mapping[str, str]) -> pd.DataFrame:
    """Append the fit-versus-PQ-Net section for ``compares`` (dataset id → fit-compare store)."""
    table = comparison_table(compares)
    doc.h(2, "Full-profile fit against PQ-Net")
    conv = {did: converged_fraction(url) for did, url in compares.items()}
    doc.p("A Levenberg–Marquardt full-profile fit (the conventional reference), started from PQ-Net, of "
          + ", ".join(f"{did} ({100 * c:.0f} % of the fitted pixels converged)" for did, c in conv.items())
          + ". Bias and MAE are of the fit minus PQ-Net; 'beyond σ' is the fraction of pixels where they differ by "
            "more than the comparison's σ times their combined standard deviations.")
    shown = table.rename(columns={"bias": "bias (fit − PQ-Net)", "frac_outside": "beyond σ"})
    doc.table(shown, "Fit against PQ-Net, per dataset and output")
    return table
