"""The operando report: weight fractions over time with the voltage curve (the paper's Figure 3).

From one or more ``operando`` stores (:mod:`xrdscale.stages.operando`; several are joined in
time order, as a live series grows file by file):

- fractions (wt %) of every phase against time, bands ± the first-order std from the
  ensemble's spread, the voltage curve of the whole log on a twin axis;
- per cycle, fractions against voltage, charge solid and discharge dashed, same bands;
- a table per cycle and step (charge, rest, discharge) of the mean fractions, and, given the
  truth of a simulated series, the MAE of every phase against it.

:func:`write_operando_report` writes ``report.html`` (figures inline, and as
``figures/*.png``) and ``fractions.csv`` (one row per frame).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from xrdscale.analysis import plots
from xrdscale.exceptions import InputError
from xrdscale.io import storage

logger = logging.getLogger(__name__)

STEP_NAMES = {1: "charge", -1: "discharge", 0: "rest"}


def open_series(urls: str | Sequence[str]) -> xr.Dataset:
    """The frames of one or more ``operando`` stores in time order, loaded (phase, frame)."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise InputError("the operando report needs at least one operando store; none was given")
    parts, logs = [], []
    for url in urls:
        ds = storage.open_store(url, stage="operando").load()
        logs.append(ds[["echem_time", "echem_voltage", "echem_current"]])
        parts.append(ds.drop_vars(["echem_time", "echem_voltage", "echem_current"]))
    frames = xr.concat(parts, dim="frame") if len(parts) > 1 else parts[0]
    frames = frames.isel(frame=np.argsort(frames["time"].values, kind="stable"))
    log = max(logs, key=lambda d: d.sizes["echem"])  # a growing log: the longest is the latest
    return frames.assign(log.variables).assign_attrs(parts[-1].attrs)


def frame_table(ds: xr.Dataset, truth: xr.Dataset | None = None) -> pd.DataFrame:
    """One row per frame: time, voltage, current, cycle, step and wt % ± std of every phase (and truth)."""
    table = pd.DataFrame({"time_s": ds["time"].values, "voltage_V": ds["voltage"].values,
                          "current_A": ds["current"].values, "cycle": ds["cycle"].values,
                          "step": [STEP_NAMES.get(int(s), "rest") for s in ds["step"].values]})
    for p in map(str, ds["phase"].values):
        table[f"{p}_wt%"] = 100 * ds["weight_fraction"].sel(phase=p).values
        table[f"{p}_std_wt%"] = 100 * ds["weight_fraction_std"].sel(phase=p).values
        if truth is not None:
            table[f"{p}_truth_wt%"] = 100 * _truth_at(truth, ds)["weight_fraction"].sel(phase=p).values
    return table


def _truth_at(truth: xr.Dataset, ds: xr.Dataset) -> xr.Dataset:
    """The truth at the frames of ``ds``, matched by time."""
    t = truth["time"].values
    idx = np.clip(np.searchsorted(t, ds["time"].values), 0, t.size - 1)
    prev = np.clip(idx - 1, 0, t.size - 1)
    idx = np.where(np.abs(t[prev] - ds["time"].values) < np.abs(t[idx] - ds["time"].values), prev, idx)
    return truth.isel(frame=idx)


def mae_table(ds: xr.Dataset, truth: xr.Dataset) -> pd.DataFrame:
    """MAE and largest error (wt %) of every phase against the truth of a simulated series."""
    matched = _truth_at(truth, ds)
    rows = []
    for p in map(str, ds["phase"].values):
        err = 100 * (ds["weight_fraction"].sel(phase=p).values - matched["weight_fraction"].sel(phase=p).values)
        std = 100 * ds["weight_fraction_std"].sel(phase=p).values
        rows.append({"phase": p, "MAE (wt %)": float(np.nanmean(np.abs(err))), "max |error| (wt %)":
                     float(np.nanmax(np.abs(err))), "bias (wt %)": float(np.nanmean(err)),
                     "mean std (wt %)": float(np.nanmean(std))})
    return pd.DataFrame(rows)


def cycle_table(ds: xr.Dataset) -> pd.DataFrame:
    """Mean wt % of every phase per cycle and step, with the step's voltage range."""
    table = frame_table(ds)
    phases = [f"{p}_wt%" for p in map(str, ds["phase"].values)]
    grouped = table.groupby(["cycle", "step"], sort=False)
    out = grouped[phases].mean()
    out.insert(0, "frames", grouped.size())
    out.insert(1, "V min", grouped["voltage_V"].min())
    out.insert(2, "V max", grouped["voltage_V"].max())
    return out.reset_index()


def _colours(n: int) -> list:
    import matplotlib.pyplot as plt

    return [plt.get_cmap("tab10")(i) for i in range(n)]


def time_figure(ds: xr.Dataset, truth: xr.Dataset | None = None) -> bytes:
    """Weight % against time (h), bands ± std, with the voltage curve on a twin axis."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.2))
    hours = ds["time"].values / 3600
    phases = list(map(str, ds["phase"].values))
    for p, colour in zip(phases, _colours(len(phases)), strict=True):
        w = 100 * ds["weight_fraction"].sel(phase=p).values
        s = 100 * ds["weight_fraction_std"].sel(phase=p).values
        ax.plot(hours, w, color=colour, lw=1.4, label=p)
        ax.fill_between(hours, w - s, w + s, color=colour, alpha=0.25, lw=0)
        if truth is not None:
            ax.plot(truth["time"].values / 3600, 100 * truth["weight_fraction"].sel(phase=p).values, color=colour,
                    lw=0.8, ls=":")
    ax.set_xlabel("time (h)")
    ax.set_ylabel("weight %")
    ax.set_ylim(-5, 105)
    volt = ax.twinx()
    volt.plot(ds["echem_time"].values / 3600, ds["echem_voltage"].values, color="#1f3fbf", lw=1.0, alpha=0.8)
    volt.set_ylabel("voltage (V)", color="#1f3fbf")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(volt.get_lines()[0])
    labels.append("voltage")
    if truth is not None:
        handles.append(plt.Line2D([], [], color="k", ls=":", lw=0.8))
        labels.append("truth")
    ax.legend(handles, labels, loc="upper left", fontsize=8, ncol=len(labels), frameon=False)
    ax.set_title("Anode phases over time (bands: ± std from the ensemble spread) and the cell voltage")
    fig.tight_layout()
    return plots.to_png(fig)


def cycle_figure(ds: xr.Dataset) -> bytes:
    """Per cycle: weight % against voltage, charge solid, discharge dashed, bands ± std."""
    import matplotlib.pyplot as plt

    cycles = sorted({int(c) for c in ds["cycle"].values})
    fig, axes = plt.subplots(1, len(cycles), figsize=(5.2 * len(cycles), 3.8), squeeze=False, sharey=True)
    phases = list(map(str, ds["phase"].values))
    step = ds["step"].values
    for ax, cyc in zip(axes[0], cycles, strict=True):
        for direction, ls in ((1, "-"), (-1, "--")):
            sel = (ds["cycle"].values == cyc) & (step == direction)
            if not sel.any():
                continue
            v = ds["voltage"].values[sel]
            for p, colour in zip(phases, _colours(len(phases)), strict=True):
                w = 100 * ds["weight_fraction"].sel(phase=p).values[sel]
                s = 100 * ds["weight_fraction_std"].sel(phase=p).values[sel]
                ax.plot(v, w, color=colour, ls=ls, lw=1.3, label=f"{p} {STEP_NAMES[direction]}")
                ax.fill_between(v, w - s, w + s, color=colour, alpha=0.2, lw=0)
        ax.set_title(f"cycle {cyc}")
        ax.set_xlabel("voltage (V)")
        ax.set_ylim(-5, 105)
    axes[0][0].set_ylabel("weight %")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", fontsize=7, frameon=False, ncol=len(phases))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return plots.to_png(fig)


def add_section(doc, ds: xr.Dataset, truth: xr.Dataset | None = None) -> pd.DataFrame:
    """Add the operando section to a report document; returns the per-frame table."""
    doc.h(2, "Operando series")
    doc.p(f"{ds.sizes['frame']} frames over {ds['time'].values.max() / 3600:.2f} h, "
          f"{len(set(ds['cycle'].values.tolist()))} cycle(s); model {ds.attrs.get('model', '?')}, "
          f"echem log {ds.attrs.get('echem', '?')}.")
    doc.figure(time_figure(ds, truth), "operando_time", "Weight fractions against time with the voltage curve")
    doc.figure(cycle_figure(ds), "operando_cycles", "Weight fractions against voltage, per cycle (solid: charge, "
               "dashed: discharge)")
    doc.table(cycle_table(ds), "Mean weight % per cycle and step")
    if truth is not None:
        doc.table(mae_table(ds, truth), "Recovered weight fractions against the simulation's truth")
    return frame_table(ds, truth)


def write_operando_report(urls: str | Sequence[str], out_dir: str, *, truth_url: str | None = None,
                          title: str = "xrdscale operando report", refresh: int | None = None) -> str:
    """Write ``report.html`` (+ ``figures/*.png`` and ``fractions.csv``) of operando stores to ``out_dir``.

    Parameters
    ----------
    urls : str or sequence of str
        ``operando`` stores (joined in time order).
    out_dir : str
        Output folder (local path or fsspec URL).
    truth_url : str, optional
        The ``truth`` store of a simulated series: its fractions are drawn dotted and the MAE tabulated.
    title : str
        Report title.
    refresh : int, optional
        Seconds after which a browser reloads the page (live mode).

    Returns
    -------
    str
        URL of ``report.html``.
    """
    from xrdscale.analysis.report import _Doc

    ds = open_series(urls)
    truth = storage.open_store(truth_url, stage="truth").load() if truth_url else None
    doc = _Doc(out_dir)
    table = add_section(doc, ds, truth)
    storage.write_bytes(storage.join(out_dir, "fractions.csv"), table.to_csv(index=False).encode())
    url = storage.join(out_dir, "report.html")
    storage.write_bytes(url, doc.render(title, refresh).encode("utf-8"))
    logger.info("operando report: %s", storage.redact(url))
    return url
