"""``xrdscale operando …``: point and line scans over time, with the cell's electrochemistry.

``simulate`` writes a series with its truth (two 1C cycles of the paper's Figure 3);
``run`` takes a raw file of timed scans and the echem log to a report (integrate → PQ-Net →
weight fractions → figures); ``analyse`` is the stage alone (a patterns store to an
``operando`` store, every option a field of :class:`xrdscale.stages.operando.OperandoConfig`);
``report`` redraws the figures of operando stores.
"""

from __future__ import annotations

import logging
from typing import Optional

import typer

from xrdscale.cli.stages import register_group

logger = logging.getLogger(__name__)

app = typer.Typer(help="Operando point/line scans: weight fractions over time against the voltage curve.",
                  no_args_is_help=True)


@app.command("simulate")
def simulate_cmd(
    out: str = typer.Argument(..., help="Output folder (local path or fsspec URL)."),
    interval: float = typer.Option(60.0, "--interval", help="Seconds between two scans."),
    points: int = typer.Option(1, "--points", help="Positions per scan (1: point scans; more: line scans)."),
    cycles: int = typer.Option(2, "--cycles", help="Full 1C cycles (2.65–4.2 V)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the counting and I0 noise."),
) -> None:
    """Simulate a cycling cell's scans: OUT/raw/operando.nxs, OUT/echem/cell.csv, OUT/truth/operando.zarr, OUT/calib."""
    from xrdscale.simulate.cycling import Protocol
    from xrdscale.simulate.operando import simulate_operando

    urls = simulate_operando(out, protocol=Protocol(cycles=cycles), scan_interval_s=interval, points=points,
                             seed=seed, progress=True)
    for key in ("raw", "echem", "truth", "poni", "mask"):
        typer.echo(f"{key}: {urls[key]}")


def check_inputs(raw: str, echem: str) -> None:
    """Fail before any work when the raw file has no frame times or the log does not span them.

    Raises
    ------
    InputError
        The raw file records no time per frame, or the log is unreadable, lacks a column or
        does not cover the frames.
    """
    from xrdscale.exceptions import InputError
    from xrdscale.io import storage
    from xrdscale.io.echem import read_echem
    from xrdscale.io.frames import TIME, open_raw

    scan = open_raw(raw)
    if scan.time is None:
        raise InputError(f"raw file {storage.redact(raw)} has no /{TIME}: an operando series needs the acquisition "
                         "time of every frame (seconds, one per frame); write it at acquisition or add it from the "
                         "scan log, then run again")
    read_echem(echem).shifted_to(scan.start_time).check_covers(scan.time, f"raw file {storage.redact(raw)}")


@app.command("run")
def run_cmd(
    raw: str = typer.Argument(..., help="Raw NeXus file of timed scans (/entry/data/time)."),
    echem: str = typer.Argument(..., help="Echem log: CSV (time, voltage, current) or FILE.nxs::/entry/echem."),
    out: str = typer.Argument(..., help="Output folder: patterns.zarr, operando.zarr, report/."),
    model: str = typer.Option(..., "--model", help="PQ-Net model registry entry (e.g. trained on licx4.yaml)."),
    poni: str = typer.Option(..., "--poni", help="pyFAI PONI file of the detector."),
    mask: Optional[str] = typer.Option(None, "--mask", help="Detector mask (nonzero = masked)."),
    npt: int = typer.Option(500, "--npt", help="q bins of the integration."),
    margin: float = typer.Option(0.05, "--margin", help="Integrate this far [1/Å] beyond the model's q range."),
    truth: Optional[str] = typer.Option(None, "--truth", help="Truth store of a simulated series (MAE in the report)."),
    ensemble: Optional[int] = typer.Option(None, "--ensemble", help="Use the first N members (default: all)."),
) -> None:
    """Integrate the scans, predict weight fractions with their std, and write the report."""
    from xrdscale.analysis.operando_report import write_operando_report
    from xrdscale.io import storage
    from xrdscale.pqnet.registry import open_entry
    from xrdscale.stages.integrate import integrate
    from xrdscale.stages.operando import operando

    check_inputs(raw, echem)
    q = open_entry(model).q
    patterns = storage.join(out, "patterns.zarr")
    integrate(raw, patterns, poni=poni, mask=mask, npt=npt, q_range=(max(0.0, float(q[0]) - margin),
                                                                     float(q[-1]) + margin))
    store = operando(model, patterns, echem, storage.join(out, "operando.zarr"), ensemble=ensemble)
    typer.echo(f"operando store: {store}")
    typer.echo(f"report: {write_operando_report(store, storage.join(out, 'report'), truth_url=truth)}")


@app.command("report")
def report_cmd(
    stores: list[str] = typer.Argument(..., help="Operando store(s), joined in time order."),
    out: str = typer.Option(..., "--out", help="Report folder (report.html, figures/, fractions.csv)."),
    truth: Optional[str] = typer.Option(None, "--truth", help="Truth store of a simulated series."),
) -> None:
    """Figures of operando stores: fractions vs time with the voltage curve, per cycle vs voltage."""
    from xrdscale.analysis.operando_report import write_operando_report

    typer.echo(write_operando_report(stores, out, truth_url=truth))


register_group(app, "operando")


def register(root: typer.Typer) -> None:
    """Add ``xrdscale operando`` to the root command."""
    root.add_typer(app, name="operando")
