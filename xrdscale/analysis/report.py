"""The campaign report: one self-contained HTML file (PNGs embedded as base64 and written beside it).

Sections: datasets; per dataset the maps of every phase (scale, its ensemble std, weight
fraction and its std, lattice parameters, crystallite size) with colour bars and units,
the quality maps (``rwp`` of the pattern implied by the prediction and the ``ood`` bit mask,
:mod:`xrdscale.pqnet.quality`), the unrolled jelly roll and the ROI table; a table of the
fraction of out-of-distribution pixels of every dataset; per cycle the voltage series of mean weight
fractions (the paper's Fig. 3), of NCA lattice parameters per ROI (Fig. 7) and the
lithiation regions; Bragg CDI series (:mod:`xrdscale.analysis.cdi_report`); Compton
imaging (``xcs``) stores and CT interface roughness (``ct-roughness``) stores
(:mod:`xrdscale.analysis.xcs_report`); provenance (raw URLs, hashes, model, store configs,
versions).
"""

from __future__ import annotations

import base64
import functools
import html
import importlib.metadata
import logging
import platform
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from rich.progress import Progress

from xrdscale import __version__
from xrdscale.analysis import plots
from xrdscale.analysis.fractions import with_weight_fractions
from xrdscale.analysis.regions import REGION_NAMES, classify_regions
from xrdscale.analysis.roi import build_rois, default_rois, roi_table
from xrdscale.analysis.unroll import find_centre, unroll
from xrdscale.exceptions import InputError
from xrdscale.io import storage

logger = logging.getLogger(__name__)

#: (variable, units, colour map) of the map figures.
MAP_FIGURES = (("scale", "scale factor (abs. units)", "viridis"), ("scale_std", "ensemble std (abs. units)", "magma"),
               ("weight_fraction", "weight fraction", "viridis"),
               ("weight_fraction_std", "weight fraction std", "magma"),
               ("a", "a (Å)", "coolwarm"), ("a_std", "a std (Å)", "magma"), ("c", "c (Å)", "coolwarm"),
               ("c_std", "c std (Å)", "magma"), ("size", "crystallite size (nm)", "cividis"))
VERSIONED = ("numpy", "xarray", "zarr", "dask", "matplotlib", "pandas", "torch", "pyFAI", "astra-toolbox", "gemmi")


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of a campaign, as the report needs it.

    Attributes
    ----------
    id : str
        Dataset id.
    maps_url : str
        URL of its ``maps`` store.
    cycle : int, optional
        Cycle number (voltage series are grouped by cycle).
    state : str, optional
        E.g. ``charged``.
    voltage : float, optional
        Cell voltage [V].
    raw_url : str, optional
        The raw dataset.
    hashes : mapping
        Content/config hashes to list under provenance.
    """

    id: str
    maps_url: str
    cycle: int | None = None
    state: str | None = None
    voltage: float | None = None
    raw_url: str | None = None
    hashes: Mapping[str, str] = field(default_factory=dict)


def _entry(e: DatasetEntry | Mapping[str, Any]) -> DatasetEntry:
    if isinstance(e, DatasetEntry):
        return e
    try:
        return DatasetEntry(**{k: v for k, v in dict(e).items() if k in DatasetEntry.__dataclass_fields__})
    except TypeError as exc:
        raise InputError(f"report dataset entry {e!r} is incomplete ({exc}); it needs at least id and "
                         "maps_url") from exc


class _Doc:
    """Accumulates HTML sections and figure files."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.parts: list[str] = []
        self.n_figures = 0

    def h(self, level: int, text: str) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def p(self, text: str, cls: str = "") -> None:
        self.parts.append(f"<p class='{cls}'>{html.escape(text)}</p>")

    def rst(self, text: str) -> None:
        """Docstring text as HTML: paragraphs, numbered or bulleted lists, **bold** and literals."""
        blocks: list[tuple[str, list[str]]] = []  # (kind, pieces): "p", "ol" or "ul"
        for line in text.strip().splitlines():
            stripped = line.strip()
            item = re.match(r"^(\d+\.|[-*])\s+(.*)", stripped)
            if item:
                kind = "ol" if item.group(1)[0].isdigit() else "ul"
                if not blocks or blocks[-1][0] != kind:
                    blocks.append((kind, []))
                blocks[-1][1].append(item.group(2))
            elif not stripped:
                blocks.append(("p", []))
            elif blocks and blocks[-1][1] and (blocks[-1][0] != "p" or line[:1] != " "):
                blocks[-1][1][-1] += " " + stripped
            else:
                blocks.append(("p", [stripped]))
        out = []
        for kind, pieces in blocks:
            if not pieces:
                continue
            if kind == "p":
                out.append(f"<p>{_inline(' '.join(pieces))}</p>")
            else:
                out.append(f"<{kind}>" + "".join(f"<li>{_inline(x)}</li>" for x in pieces) + f"</{kind}>")
        self.parts.append("".join(out))

    def table(self, df: pd.DataFrame, caption: str) -> None:
        body = df.to_html(index=False, float_format=lambda v: f"{v:.5g}", na_rep="–", border=0, classes="data")
        self.parts.append(f"<figure class='table'><figcaption>{html.escape(caption)}</figcaption>{body}</figure>")

    def figure(self, png: bytes, name: str, caption: str) -> None:
        fname = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png"
        storage.write_bytes(storage.join(self.out_dir, "figures", fname), png)
        b64 = base64.b64encode(png).decode("ascii")
        self.parts.append(f"<figure><img src='data:image/png;base64,{b64}' alt='{html.escape(caption)}' "
                          f"data-file='figures/{fname}'><figcaption>{html.escape(caption)}</figcaption></figure>")
        self.n_figures += 1

    def render(self, title: str, refresh: int | None = None) -> str:
        style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}img{max-width:100%}"
                 "table.data{border-collapse:collapse;font-size:12px}table.data td,table.data th{border:1px solid #ccc;"
                 "padding:2px 6px}figure{margin:1em 0}figcaption{font-size:13px;color:#444}.note{color:#a60}")
        reload = f"<meta http-equiv='refresh' content='{int(refresh)}'>" if refresh else ""
        return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{reload}"
                f"<title>{html.escape(title)}</title><style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(self.parts)}</body></html>")


def _inline(text: str) -> str:
    """Escape ``text`` and render its reStructuredText inline markup (bold, literals, emphasis)."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"``(.+?)``", r"<code>\1</code>", out)
    out = re.sub(r"(?<![*\w])\*(?!\s)(.+?)(?<!\s)\*(?![*\w])", r"<em>\1</em>", out)
    return out


def _roi_tables(doc: _Doc, table: pd.DataFrame, dataset: str) -> None:
    """One table per ROI: phases as rows, map variables as columns, cells ``mean ± std``."""
    for roi, sub in table.groupby("roi", sort=False):
        cells = sub.assign(cell=[f"{m:.4g} ± {s:.2g}" if np.isfinite(m) else "–"
                                 for m, s in zip(sub["mean"], sub["std"])])
        wide = cells.pivot_table(index="phase", columns="variable", values="cell", aggfunc="first", sort=False)
        wide = wide.reset_index().rename_axis(columns=None)
        n = int(sub["n_pixels"].iloc[0]) if "n_pixels" in sub else None
        doc.table(wide, f"{dataset}, ROI {roi}" + (f" ({n} pixels)" if n is not None else "")
                  + ": mean ± std over the ROI's pixels")


def _present(maps: xr.Dataset, var: str) -> xr.DataArray | None:
    """The map of ``var`` restricted to the phases where it has values (None if none)."""
    if var not in maps.data_vars:
        return None
    finite = maps[var].notnull().any(("y", "x")).compute()
    keep = [str(p) for p, ok in zip(maps["phase"].values, finite.values) if ok]
    return maps[var].sel(phase=keep).load() if keep else None


def _dataset_section(doc: _Doc, e: DatasetEntry, maps: xr.Dataset, *, centre, pitch, rois_spec) -> pd.DataFrame:
    where = f" — cycle {e.cycle}, {e.state or ''} {e.voltage} V" if e.voltage is not None else ""
    doc.h(2, f"Dataset {e.id}{where}")
    for var, units, cmap in MAP_FIGURES:
        da = _present(maps, var)
        if da is not None:
            doc.figure(plots.map_grid(da, title=f"{e.id}: {var}", units=units, cmap=cmap), f"{e.id}_{var}",
                       f"{e.id}: {var} maps of every phase ({units})")
    weak = list(maps.attrs.get("weakly_determined") or [])
    if weak:
        doc.p(f"Weakly determined by the data (the model's Cramér–Rao R² bound below 0.9, see Provenance): "
              f"{', '.join(weak)}. Read these maps as the model's best guess, not a measurement.", "note")
    _quality_figure(doc, e, maps)
    try:
        yc, xc = centre if centre is not None else find_centre(maps)[:2]
        wf = _present(maps, "weight_fraction")
        un = unroll(wf if wf is not None else maps["scale"].load(), (yc, xc), pitch=pitch or 0.0, n_angles=360)
        title = f"{e.id}: unrolled about ({yc:.2f}, {xc:.2f}) mm, pitch {pitch or 0:g} mm"
        doc.figure(plots.unrolled_grid(un, title=title,
                                       units="weight fraction" if wf is not None else "scale"),
                   f"{e.id}_unrolled", f"{e.id}: virtually unrolled maps (radius × angle)")
    except InputError as exc:
        doc.p(f"No unrolled view: {exc}", "note")
    spec = rois_spec if rois_spec is not None else default_rois(maps)
    if not spec:
        doc.p("No ROI table: no ROIs given and the maps lack NCA/Al for the default cathode ROIs.", "note")
        return pd.DataFrame()
    roi_set = build_rois(maps, spec)
    if rois_spec is None:
        # The default ROIs are a guess about the cell; one that finds no pixel is reported, not fatal.
        counts = roi_set.sum(("y", "x")).values
        empty = [str(r) for r, n in zip(roi_set["roi"].values, counts) if n == 0]
        if empty:
            doc.p(f"Default ROI(s) {', '.join(empty)} hold no pixel in {e.id} and are left out of its table.", "note")
            roi_set = roi_set.isel(roi=np.flatnonzero(counts > 0))
        if roi_set.sizes["roi"] == 0:
            return pd.DataFrame()
    table = roi_table({e.id: maps}, roi_set)
    _roi_tables(doc, table, e.id)
    return table


def _quality_figure(doc: _Doc, e: DatasetEntry, maps: xr.Dataset) -> None:
    """The rwp and ood maps of a dataset, when its maps store has them."""
    if "rwp" not in maps.data_vars or tuple(maps["rwp"].dims) != ("y", "x"):
        return
    ood = maps["ood"].load() if "ood" in maps.data_vars else None
    bits = None
    if ood is not None and "flag_masks" in ood.attrs and "flag_meanings" in ood.attrs:
        bits = dict(zip((int(b) for b in ood.attrs["flag_masks"]), str(ood.attrs["flag_meanings"]).split()))
    doc.figure(plots.quality_maps(maps["rwp"].load(), ood, title=f"{e.id}: quality of the prediction", bits=bits),
               f"{e.id}_quality", f"{e.id}: rwp of the pattern implied by each pixel's prediction"
               + (" and the out-of-distribution bit mask" if ood is not None else ""))


#: A pixel is in the sample when its summed scale factors reach this fraction of their 99th percentile.
SAMPLE_LEVEL = 0.05


def _sample_pixels(maps: xr.Dataset) -> np.ndarray | None:
    """Flat mask of the pixels holding sample (not air): summed scales ≥ SAMPLE_LEVEL of their 99th percentile.

    Air pixels of a reconstructed volume are noise that no phase explains, so their residual
    flag says nothing about the model; the in-sample fraction is the one to read.
    """
    if "scale" not in maps.data_vars:
        return None
    total = np.asarray(maps["scale"].sum("phase", skipna=True).values, dtype=float).ravel()
    finite = total[np.isfinite(total)]
    if not finite.size:
        return None
    top = float(np.percentile(finite, 99))
    return np.isfinite(total) & (total >= SAMPLE_LEVEL * top) if top > 0 else None


def _quality_row(e: DatasetEntry, maps: xr.Dataset) -> dict[str, Any] | None:
    """Fraction of flagged pixels (any bit, and per bit) and the median rwp of one dataset."""
    if "ood" not in maps.data_vars:
        return None
    ood = np.asarray(maps["ood"].values).astype(np.int64).ravel()
    attrs = maps["ood"].attrs
    masks = [int(b) for b in attrs.get("flag_masks", (1, 2, 4))]
    meanings = str(attrs.get("flag_meanings", "residual ensemble_spread range_edge")).split()
    row: dict[str, Any] = {"dataset": e.id, "pixels": int(ood.size),
                           "flagged": float((ood > 0).mean()) if ood.size else float("nan")}
    for b, name in zip(masks, meanings):
        row[name] = float(((ood & b) > 0).mean()) if ood.size else float("nan")
    inside = _sample_pixels(maps)
    if inside is not None:
        row["sample pixels"] = int(inside.sum())
        row["flagged in sample"] = float((ood[inside] > 0).mean()) if inside.any() else float("nan")
    if "rwp" in maps.data_vars:
        rwp = np.asarray(maps["rwp"].values, dtype=float)
        row["median rwp"] = float(np.nanmedian(rwp)) if np.isfinite(rwp).any() else float("nan")
    return row


def _cycle_section(doc: _Doc, cycle: Any, entries: Sequence[DatasetEntry], maps: Mapping[str, xr.Dataset],
                   rois: pd.DataFrame) -> None:
    doc.h(2, f"Cycle {cycle}: voltage series")
    rows = []
    for e in entries:
        wf = maps[e.id]["weight_fraction"].mean(("y", "x")).compute()
        for ph, v in zip(wf["phase"].values, wf.values):
            if np.isfinite(v):
                rows.append({"voltage": e.voltage, "phase": str(ph), "value": float(v)})
    if rows:
        doc.figure(plots.series_plot(pd.DataFrame(rows), value="value", error=None, group="phase",
                                     ylabel="mean weight fraction", title=f"cycle {cycle}: phase fractions vs voltage"),
                   f"cycle{cycle}_fractions", f"Cycle {cycle}: mean weight fraction of each phase vs voltage")
    if not rois.empty:
        sub = rois[(rois.phase == "NCA") & rois.variable.isin(["a", "c"])].copy()
        volt = {e.id: e.voltage for e in entries}
        sub["voltage"] = sub["dataset"].map(volt)
        sub = sub.dropna(subset=["voltage"])
        if not sub.empty:
            doc.figure(plots.series_plot(sub, value="mean", error="ensemble_std", group="roi", panels="variable",
                                         ylabel="Å", title=f"cycle {cycle}: NCA lattice parameters per ROI"),
                       f"cycle{cycle}_nca_lattice", f"Cycle {cycle}: mean NCA a and c per ROI vs voltage "
                       "(error bars: mean ensemble std)")
    try:
        reg = classify_regions([(float(e.voltage or 0.0), maps[e.id]) for e in entries], ids=[e.id for e in entries])
        doc.figure(plots.region_map(reg["region"], REGION_NAMES, title=f"cycle {cycle}: lithiation regions"),
                   f"cycle{cycle}_regions", f"Cycle {cycle}: anode lithiation regions (HL/DL/IN)")
        counts = {REGION_NAMES[c]: int((reg["region"].values == c).sum()) for c in REGION_NAMES}
        doc.table(pd.DataFrame([counts]), f"Cycle {cycle}: anode pixels per region")
        doc.h(3, "Region criteria")
        doc.rst(reg.attrs["criteria"])
    except InputError as exc:
        doc.p(f"No lithiation regions for cycle {cycle}: {exc}", "note")


def _provenance(doc: _Doc, entries: Sequence[DatasetEntry], maps: Mapping[str, xr.Dataset],
                model: Mapping[str, Any] | None) -> None:
    doc.h(2, "Provenance")
    rows = [{"dataset": e.id, "raw": storage.redact(e.raw_url or "–"), "maps": storage.redact(e.maps_url),
             "maps stage config": maps[e.id].attrs.get("config", "–"),
             "maps written by xrdscale": maps[e.id].attrs.get("xrdscale_version", "–"),
             **{f"hash {k}": v for k, v in dict(e.hashes).items()}} for e in entries]
    doc.table(pd.DataFrame(rows), "Inputs of every dataset")
    info = dict(model or {"model": "not given"})
    metrics = info.pop("metrics", None)
    doc.table(pd.DataFrame([{"key": k, "value": str(v)} for k, v in info.items()]), "Model")
    if metrics:
        from xrdscale.pqnet.identifiability import bounds_table

        doc.table(bounds_table(metrics), "Held-out accuracy of every output beside its Cramér–Rao bound (the best an "
                  "unbiased estimator can reach at the library's noise); weakly determined: bound below 0.9")
    versions = [{"package": "xrdscale", "version": __version__},
                {"package": "python", "version": platform.python_version()}]
    for pkg in VERSIONED:
        try:
            versions.append({"package": pkg, "version": importlib.metadata.version(pkg)})
        except importlib.metadata.PackageNotFoundError:
            continue
    doc.table(pd.DataFrame(versions), "Software versions")


def _threaded_dask(func: Callable[..., str]) -> Callable[..., str]:
    """Run ``func`` with dask's threaded scheduler of this process.

    A report reads maps, which are small next to the frames, in many small chunks. On a
    distributed client every one of them travelled through the scheduler: on a 160² dataset,
    81 s for the report against 27 s threaded.
    """
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> str:
        import dask

        with dask.config.set(scheduler="threads"):
            return func(*args, **kwargs)

    return wrapper


@_threaded_dask
def write_report(datasets: Sequence[DatasetEntry | Mapping[str, Any]], out_dir: str, *, title: str = "xrdscale report",
                 model: Mapping[str, Any] | None = None, rois: Mapping[str, Mapping[str, Any]] | None = None,
                 centre: tuple[float, float] | None = None, pitch: float | None = None,
                 phases: Mapping[str, object] | None = None, progress: bool = True,
                 cdi: Sequence[str] = (), xcs: Sequence[str] = (), roughness: Sequence[str] = (),
                 fits: Mapping[str, str] | None = None, refresh: int | None = None) -> str:
    """Write the campaign report ``report.html`` (+ ``figures/*.png``, ``roi_table.csv``) to ``out_dir``.

    Parameters
    ----------
    datasets : sequence of DatasetEntry or mappings
        Every dataset: id, maps URL, cycle, state, voltage, raw URL, hashes.
    out_dir : str
        Output folder (local path or fsspec URL).
    title : str
        Report title (e.g. the campaign name).
    model : mapping, optional
        Model information for the provenance section (id, URL, training metrics …).
    rois : mapping, optional
        ROI spec (see :func:`xrdscale.analysis.roi.build_rois`); default: NCA next to
        the Al tab and elsewhere, when the maps have NCA and Al.
    centre : (yc, xc), optional
        Cell centre [mm] for unrolling; default: fitted to the Fe casing.
    pitch : float, optional
        Spiral pitch [mm/turn] for unrolling; default 0 (plain polar transform).
    phases : mapping, optional
        Phase objects for names that are not built-in (weight fractions).
    progress : bool
        Show a progress bar on stderr.
    cdi : sequence of str
        ``cdi-series`` stores (Bragg CDI) to add a section for each
        (:mod:`xrdscale.analysis.cdi_report`).
    xcs : sequence of str
        ``xcs`` stores (Compton imaging) to add a section for each: EMR (and x) maps,
        Compton profiles, Table 1 and the per-region table
        (:func:`xrdscale.analysis.xcs_report.add_section`).
    roughness : sequence of str
        ``ct-roughness`` stores, one per state, for one section of height maps and Table 2
        (:func:`xrdscale.analysis.xcs_report.add_roughness_section`). With exactly one
        ``xcs`` store, Table 2 gets its EMR of every state whose label matches.
    fits : mapping, optional
        Dataset id → its ``fit-compare`` store (``xrdscale fit compare`` of the full-profile
        fit against PQ-Net), one section together (:mod:`xrdscale.analysis.fit_report`).
    refresh : int, optional
        Seconds after which a browser reloads the page (live mode); none by default.

    Returns
    -------
    str
        URL of ``report.html``.

    Raises
    ------
    InputError
        No datasets, CDI series, xcs or ct-roughness stores; repeated ids; or a maps store
        without a ``scale`` map.
    """
    entries = [_entry(e) for e in datasets]
    if not entries and not cdi and not xcs and not roughness:
        raise InputError("the report needs at least one dataset (a maps store), a Bragg CDI series, an xcs store or "
                         "a ct-roughness store; none was given")
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise InputError(f"dataset ids must be unique in a report; got {ids}")
    doc = _Doc(out_dir)
    if entries:
        summary = pd.DataFrame([{"id": e.id, "cycle": e.cycle, "state": e.state, "voltage (V)": e.voltage,
                                 "maps": storage.redact(e.maps_url)} for e in entries])
        doc.h(2, "Datasets")
        doc.table(summary, "Datasets of the campaign")
    maps: dict[str, xr.Dataset] = {}
    tables = []
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("report", total=len(entries) + len(cdi) + len(xcs) + bool(roughness) + 1)
        for e in entries:
            ds = storage.open_store(e.maps_url, stage="maps")
            ds.attrs["source_url"] = storage.redact(e.maps_url)
            maps[e.id] = with_weight_fractions(ds, phases)
            tables.append(_dataset_section(doc, e, maps[e.id], centre=centre, pitch=pitch, rois_spec=rois))
            bar.advance(task)
        rois_all = pd.concat(tables, ignore_index=True) if any(not t.empty for t in tables) else pd.DataFrame()
        quality_rows = [r for r in (_quality_row(e, maps[e.id]) for e in entries) if r is not None]
        if quality_rows:
            doc.h(2, "Out-of-distribution pixels")
            doc.table(pd.DataFrame(quality_rows), "Fraction of the pixels of every dataset flagged out of distribution "
                      "(any bit, and per bit of the ood mask) and their median rwp; 'flagged in sample' counts "
                      f"only the pixels holding sample (summed scales ≥ {SAMPLE_LEVEL:.0%} of their 99th percentile: "
                      "air is noise no phase explains)")
        cycles: dict[Any, list[DatasetEntry]] = {}
        for e in entries:
            if e.voltage is not None:
                cycles.setdefault(e.cycle, []).append(e)
        for cycle, group in cycles.items():
            if len(group) >= 2:
                _cycle_section(doc, cycle, sorted(group, key=lambda e: float(e.voltage or 0.0)), maps, rois_all)
        if fits:
            from xrdscale.analysis import fit_report

            fit_report.add_section(doc, fits)
        for url in cdi:
            from xrdscale.analysis.cdi_report import add_section

            add_section(doc, url)
            bar.advance(task)
        if xcs or roughness:
            from xrdscale.analysis import xcs_report

            emr_tables = []
            for url in xcs:
                emr_tables.append(xcs_report.add_section(doc, url))
                bar.advance(task)
            if roughness:
                emr_by_state = ({str(s): float(v) for s, v in zip(emr_tables[0]["state"], emr_tables[0]["emr"],
                                                                  strict=True)}
                                if len(emr_tables) == 1 else None)
                xcs_report.add_roughness_section(doc, roughness, emr_by_state)
                bar.advance(task)
        _provenance(doc, entries, maps, model)
        bar.advance(task)
    if not rois_all.empty:
        storage.write_bytes(storage.join(out_dir, "roi_table.csv"), rois_all.to_csv(index=False).encode())
    url = storage.join(out_dir, "report.html")
    storage.write_bytes(url, doc.render(title, refresh).encode("utf-8"))
    logger.info("report with %d figures: %s", doc.n_figures, storage.redact(url))
    return url
