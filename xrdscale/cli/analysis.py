"""``xrdscale analyse fractions|unroll|roi|regions`` and ``xrdscale report``: battery analysis of maps stores."""

from __future__ import annotations

import logging
import os

import numpy as np
import typer
import yaml
from rich.console import Console

from xrdscale.exceptions import ConfigError, InputError
from xrdscale.io import storage

logger = logging.getLogger(__name__)

analyse_app = typer.Typer(help="Weight fractions, unrolled jelly rolls, ROI tables and lithiation regions of maps.",
                          no_args_is_help=True)

MAPS_ARG = typer.Argument(..., help="maps store URL(s) (path or s3://…).")
PHASES_OPT = typer.Option(None, "--phases", help="Phase library YAML for phases that are not built in.")
ROIS_OPT = typer.Option(None, "--rois", help="ROI YAML {name: {threshold|polygon|mask: …}}; default: NCA next to "
                                             "the Al tab and elsewhere.")
CENTRE_OPT = typer.Option(None, "--centre", help="Cell centre 'Y,X' in mm; default: fitted to the Fe casing.")
VOLTAGE_OPT = typer.Option(None, "--voltage", "-V", help="Voltage of each maps store, in the same order "
                                                         "(repeat); default: the store's 'voltage' attribute.")


def _phases(path: str | None) -> dict | None:
    if path is None:
        return None
    from xrdscale.physics.phaselib import PhaseLibrary

    lib = PhaseLibrary.load(path)
    return dict(zip(lib.phase_names, lib.phases))


def _open(url: str):
    ds = storage.open_store(url, stage="maps")
    ds.attrs["source_url"] = storage.redact(url)
    return ds


def _centre(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        y, x = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"--centre {text!r} is not 'Y,X' in mm (e.g. --centre 0.1,-0.2)") from exc
    return y, x


def _rois(path: str | None) -> tuple[dict | None, dict]:
    """ROI spec from YAML; ``mask:`` entries name .npy files relative to the YAML."""
    if path is None:
        return None, {}
    try:
        spec = yaml.safe_load(storage.read_bytes(path)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"ROI file {path} is not valid YAML: {exc}") from exc
    spec = spec.get("rois", spec) if isinstance(spec, dict) else spec
    if not isinstance(spec, dict):
        raise ConfigError(f"ROI file {path} must map ROI names to definitions; got {type(spec).__name__}")
    masks = {}
    for name, entry in spec.items():
        if isinstance(entry, dict) and "mask" in entry:
            import io

            mask_url = storage.resolve(str(entry["mask"]), os.path.dirname(path))
            masks[str(entry["mask"])] = np.load(io.BytesIO(storage.read_bytes(mask_url)))
    return spec, masks


def _voltages(maps: list, urls: list[str], given: list[float] | None) -> list[float]:
    if given:
        if len(given) != len(urls):
            raise ConfigError(f"{len(given)} --voltage value(s) for {len(urls)} maps stores; give one per store")
        return list(given)
    out = []
    for ds, url in zip(maps, urls):
        if "voltage" not in ds.attrs:
            raise InputError(f"maps store {storage.redact(url)} has no 'voltage' attribute; give --voltage for "
                             "each store")
        out.append(float(ds.attrs["voltage"]))
    return out


def _ids(urls: list[str]) -> list[str]:
    """Dataset ids from store paths: the store's folder name, or its name without .zarr."""
    out = []
    for url in urls:
        parts = [p for p in url.rstrip("/").replace("\\", "/").split("/") if p]
        name = parts[-1].removesuffix(".zarr")
        out.append(parts[-2] if name == "maps" and len(parts) > 1 else name)
    return out


@analyse_app.command("fractions")
def fractions_cmd(maps_url: str = typer.Argument(..., help="maps store URL."),
                  out: str = typer.Argument(..., help="Output maps store URL with weight_fraction(_std)."),
                  phases: str | None = PHASES_OPT) -> None:
    """Weight fractions from scale factors (Hill & Howard) with first-order uncertainty."""
    from xrdscale.analysis.fractions import with_weight_fractions

    if os.path.normpath(out) == os.path.normpath(maps_url):
        raise ConfigError(f"output {out} is the input store; write the weight fractions to a new URL")
    ds = with_weight_fractions(_open(maps_url), _phases(phases))
    storage.write_store(ds, out, stage="maps", config={"input": storage.redact(maps_url), "analysis": "fractions"})
    typer.echo(out)


@analyse_app.command("unroll")
def unroll_cmd(maps_url: str = typer.Argument(..., help="maps store URL."),
               out: str = typer.Argument(..., help="Output 'unrolled' store URL (phase, radius, angle)."),
               variable: list[str] = typer.Option(["scale"], "--variable", help="Map(s) to unroll (repeat)."),
               centre: str | None = CENTRE_OPT,
               pitch: str = typer.Option("0", "--pitch",
                                         help="Spiral pitch in mm/turn, or 'auto' (from the NCA scale)."),
               n_angles: int = typer.Option(720, "--angles", min=8, help="Angular samples over 360°.")) -> None:
    """Unroll maps into radius × angle images about the cell centre, following the spiral."""
    import xarray as xr

    from xrdscale.analysis.unroll import estimate_pitch, find_centre, unroll

    ds = _open(maps_url)
    missing = [v for v in variable if v not in ds.data_vars]
    if missing:
        raise InputError(f"maps store {storage.redact(maps_url)} has no {missing}; it has {sorted(ds.data_vars)}")
    yc, xc = _centre(centre) or find_centre(ds)[:2]
    if pitch == "auto":
        step = float(abs(ds["x"].values[1] - ds["x"].values[0]))
        p = estimate_pitch(ds["scale"].sel(phase="NCA"), (yc, xc), p_max=16 * step)
    else:
        try:
            p = float(pitch)
        except ValueError as exc:
            raise ConfigError(f"--pitch {pitch!r} is neither a number (mm/turn) nor 'auto'") from exc
    res = xr.Dataset({v: unroll(ds[v], (yc, xc), pitch=p, n_angles=n_angles) for v in variable})
    storage.write_store(res, out, stage="unrolled", config={"input": storage.redact(maps_url), "centre": [yc, xc],
                                                            "pitch": p, "angles": n_angles})
    typer.echo(f"{out} (centre {yc:.3f}, {xc:.3f} mm; pitch {p:.4f} mm/turn)")


@analyse_app.command("roi")
def roi_cmd(maps_urls: list[str] = MAPS_ARG, rois: str | None = ROIS_OPT,
            csv: str | None = typer.Option(None, "--csv", help="Write the table as CSV here (path or URL).")) -> None:
    """Per-ROI mean ± std of every map per dataset (the paper's Table S5)."""
    from xrdscale.analysis.roi import build_rois, default_rois, roi_table

    spec, masks = _rois(rois)
    maps = {i: _open(u) for i, u in zip(_ids(maps_urls), maps_urls)}
    roi_sets = {}
    for ds_id, ds in maps.items():
        this = spec if spec is not None else default_rois(ds)
        if not this:
            raise InputError(f"no ROIs for {ds_id}: the maps lack NCA/Al for the default ROIs; give --rois")
        roi_sets[ds_id] = build_rois(ds, this, masks)
    table = roi_table(maps, roi_sets)
    if csv:
        storage.write_bytes(csv, table.to_csv(index=False).encode())
    Console().print(table.to_string(index=False, float_format=lambda v: f"{v:.5g}"))


@analyse_app.command("regions")
def regions_cmd(maps_urls: list[str] = MAPS_ARG,
                out: str = typer.Option(..., "--out", "-o", help="Output 'regions' store URL (region, stage_index)."),
                voltage: list[float] | None = VOLTAGE_OPT, phases: str | None = PHASES_OPT) -> None:
    """Classify anode pixels as HL/DL/IN lithiation from a voltage series of one cycle."""
    from xrdscale.analysis.regions import REGION_NAMES, classify_regions

    maps = [_open(u) for u in maps_urls]
    volts = _voltages(maps, maps_urls, voltage)
    res = classify_regions(list(zip(volts, maps)), ids=_ids(maps_urls), phases=_phases(phases))
    storage.write_store(res, out, stage="regions", config={"inputs": [storage.redact(u) for u in maps_urls],
                                                           "voltages": volts})
    counts = {REGION_NAMES[c]: int((res["region"].values == c).sum()) for c in REGION_NAMES}
    typer.echo(f"{out}: " + ", ".join(f"{k} {v} px" for k, v in counts.items()))


def report_cmd(maps_urls: list[str] | None = typer.Argument(None, help="maps store URL(s) (path or s3://…); none "
                                                                      "for a report of CDI, xcs or ct-roughness "
                                                                      "stores only."),
               out: str = typer.Argument(..., help="Output folder for report.html, figures/ and roi_table.csv."),
               voltage: list[float] | None = VOLTAGE_OPT,
               cycle: int | None = typer.Option(None, "--cycle", help="Cycle number of all the given stores."),
               rois: str | None = ROIS_OPT, centre: str | None = CENTRE_OPT,
               pitch: float = typer.Option(0.0, "--pitch", help="Spiral pitch for the unrolled views, mm per turn."),
               title: str = typer.Option("xrdscale report", "--title", help="Report title."),
               phases: str | None = PHASES_OPT,
               cdi: list[str] | None = typer.Option(None, "--cdi", help="A Bragg CDI series store (from `xrdscale "
                                                                       "cdi series`) to add; repeatable."),
               xcs: list[str] | None = typer.Option(None, "--xcs", help="A Compton-imaging xcs store (from `xrdscale "
                                                                       "xcs emr` or `lithium`) to add; repeatable."),
               roughness: list[str] | None = typer.Option(None, "--roughness", help="A ct-roughness store (from "
                                                          "`xrdscale ct roughness`), one per state; repeatable.")
               ) -> None:
    """Write a self-contained HTML report (maps, unrolled views, ROI tables, voltage series, CDI, XCS, CT roughness)."""
    from xrdscale.analysis.report import DatasetEntry

    maps_urls = list(maps_urls or [])
    if out.endswith(".zarr") or out in maps_urls:
        raise ConfigError(f"the last argument is the report folder; {out!r} looks like a maps store")
    maps = [_open(u) for u in maps_urls]
    volts = _voltages(maps, maps_urls, voltage) if voltage or all("voltage" in m.attrs for m in maps) \
        else [None] * len(maps)
    entries = [DatasetEntry(id=i, maps_url=u, cycle=cycle, voltage=v, state=m.attrs.get("state"))
               for i, u, v, m in zip(_ids(maps_urls), maps_urls, volts, maps)]
    from xrdscale.stages.report import report

    spec, _ = _rois(rois)
    centre_yx = _centre(centre)
    report(entries, out, title=title, rois=spec, centre=tuple(centre_yx) if centre_yx is not None else None,
           pitch=pitch or None, phases=_phases(phases), cdi=list(cdi or []),
           xcs=list(xcs or []), roughness=list(roughness or []))
    typer.echo(storage.join(out, "report.html"))


def register(app: typer.Typer) -> None:
    """Add ``analyse …`` and ``report`` to the ``xrdscale`` app."""
    app.add_typer(analyse_app, name="analyse")
    app.command("report")(report_cmd)
