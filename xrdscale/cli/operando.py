"""``xrdscale operando …``: point and line scans over time, with the cell's electrochemistry.

``simulate`` writes a series with its truth (two 1C cycles of the paper's Figure 3);
``run`` takes a raw file of timed scans and the echem log to a report (integrate → PQ-Net →
weight fractions → figures); ``analyse`` is the stage alone (a patterns store to an
``operando`` store, every option a field of :class:`xrdscale.stages.operando.OperandoConfig`);
``report`` redraws the figures of operando stores; ``watch`` analyses each scan file as it
lands and rewrites the report after each one (:mod:`xrdscale.stages.operando_live`).
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
    files: int = typer.Option(1, "--files", help="Split the scans into this many raw files "
                              "(OUT/raw/operando-001.nxs …), as a beamline writes one file per N scans."),
    live: bool = typer.Option(False, "--live", help="Live demo: land the files one at a time in OUT/live/ (with "
                              "the echem log growing beside them) while `operando watch` analyses each one into "
                              "OUT/work-live/; needs --model."),
    model: Optional[str] = typer.Option(None, "--model", help="PQ-Net model of the live demo (4LiCx)."),
) -> None:
    """Simulate a cycling cell's scans: OUT/raw/operando*.nxs, OUT/echem/cell.csv, OUT/truth/operando.zarr, calib."""
    from xrdscale.simulate.cycling import Protocol
    from xrdscale.simulate.operando import simulate_operando

    if live and model is None:
        raise typer.BadParameter("the live demo needs a trained 4LiCx model (see examples/operando.sh)",
                                 param_hint="--model")
    urls = simulate_operando(out, protocol=Protocol(cycles=cycles), scan_interval_s=interval, points=points,
                             seed=seed, files=files, progress=True)
    for raw in urls["raw_files"]:
        typer.echo(f"raw: {raw}")
    for key in ("echem", "truth", "poni", "mask"):
        typer.echo(f"{key}: {urls[key]}")
    if live and model is not None:
        _live_demo(urls, out, model)


def _live_demo(urls: dict, out: str, model: str) -> None:
    """Land the simulated files one at a time in OUT/live/ while watching them into OUT/work-live/."""
    import threading

    from xrdscale.campaign.spec import WatchConfig
    from xrdscale.cli.demo import land_files
    from xrdscale.io import echem, storage
    from xrdscale.simulate.operando import log_until
    from xrdscale.stages.operando import raw_times
    from xrdscale.stages.operando_live import OperandoSettings

    drop, work = storage.join(out, "live"), storage.join(out, "work-live")
    log, log_url = echem.read_echem(urls["echem"]), storage.join(drop, "cell.csv")
    processed, stopping = threading.Semaphore(0), threading.Event()

    def after(i: int) -> bool:
        # the log reaches each file's last scan just before the file lands (the potentiostat runs ahead)
        while i > 0 and not processed.acquire(timeout=1.0):
            if stopping.is_set():
                return False
        if not stopping.is_set():
            echem.write_csv(log_url, log_until(log, float(raw_times(urls["raw_files"][i])[0][-1])))
        return not stopping.is_set()

    writer = threading.Thread(target=land_files, args=(urls["raw_files"], drop), kwargs={"after": after},
                              daemon=True, name="xrdscale-operando-live")
    typer.echo(f"live demo: {len(urls['raw_files'])} file(s) land one at a time in {storage.redact(drop)}; "
               f"report: {storage.redact(storage.join(work, 'report', 'report.html'))}")
    writer.start()
    config = WatchConfig(pattern=storage.join(drop, "operando-{id}.nxs"), stable_seconds=1.0, refresh=5)
    try:
        watch_and_print(config, work, OperandoSettings(model=model, poni=urls["poni"], mask=urls["mask"],
                                                       truth=urls["truth"]),
                        echem=log_url, poll=1.0, max_files=len(urls["raw_files"]),
                        on_file=lambda *_: processed.release())
    finally:
        stopping.set()


def watch_and_print(config, out: str, settings, *, echem: str | None, poll: float, max_files: int | None = None,
                    on_file=None) -> None:
    """Watch with a line per file (its latency from landing to the report); exit 130 on Ctrl-C, 1 if a file failed."""
    from xrdscale.io import storage
    from xrdscale.stages.operando_live import watch_operando

    def landed(did: str, latency: float, report: str) -> None:
        typer.echo(f"{did}: in the report {latency:.1f} s after its file landed ({storage.redact(report)})")
        if on_file is not None:
            on_file(did, latency, report)

    try:
        result = watch_operando(config, out, settings, echem=echem, poll=poll, max_files=max_files, on_file=landed)
    except KeyboardInterrupt:
        typer.echo("stopped (Ctrl-C); the file being analysed is not marked complete, and the same command "
                   "redoes it", err=True)
        raise typer.Exit(130) from None
    for did in result.skipped:
        typer.echo(f"{did}: analysed before (skipped)")
    for url, why in result.refused.items():
        typer.echo(f"not analysed {storage.redact(url)}: {why}", err=True)
    for did, why in result.waiting.items():
        typer.echo(f"still waiting for the echem log: {did}: {why}", err=True)
    if result.latency:
        values = sorted(result.latency.values())
        typer.echo(f"{len(values)} file(s); landing to report: median {values[len(values) // 2]:.1f} s, "
                   f"max {values[-1]:.1f} s")
    if result.report:
        typer.echo(f"report: {result.report}")
    if result.failed:
        for did, why in result.failed.items():
            typer.echo(f"failed {did}: {why}", err=True)
        raise typer.Exit(1)


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
    from xrdscale.stages.operando import check_inputs, run_series

    check_inputs(raw, echem)
    store = run_series(raw, echem, out, model=model, poni=poni, mask=mask, npt=npt, margin=margin, ensemble=ensemble)
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


@app.command("watch")
def watch_cmd(
    pattern: str = typer.Argument(..., help="Scan files to pick up: a glob (local or URL); {id} names each file "
                                  "(else its stem), e.g. 'raw/scans-{id}.nxs' or 'raw/*.nxs'."),
    out: str = typer.Argument(..., help="Output folder: files/<id>/operando.zarr, report/."),
    model: str = typer.Option(..., "--model", help="PQ-Net model registry entry (e.g. trained on licx4.yaml)."),
    poni: str = typer.Option(..., "--poni", help="pyFAI PONI file of the detector."),
    echem: Optional[str] = typer.Option(None, "--echem", help="The growing echem log (CSV, or FILE.nxs::/group), "
                                        "read again at every poll; default: each scan file's /entry/echem."),
    mask: Optional[str] = typer.Option(None, "--mask", help="Detector mask (nonzero = masked)."),
    npt: int = typer.Option(500, "--npt", help="q bins of the integration."),
    margin: float = typer.Option(0.05, "--margin", help="Integrate this far [1/Å] beyond the model's q range."),
    ensemble: Optional[int] = typer.Option(None, "--ensemble", help="Use the first N members (default: all)."),
    truth: Optional[str] = typer.Option(None, "--truth", help="Truth store of a simulated series (MAE in the report)."),
    poll: float = typer.Option(5.0, "--poll", help="Seconds between listings."),
    complete: str = typer.Option("stable", "--complete", help="stable: unchanged for --stable-seconds and readable; "
                                 "marker: a sidecar FILE<marker> exists."),
    stable_seconds: float = typer.Option(10.0, "--stable-seconds", help="Seconds a file must stay unchanged."),
    marker: str = typer.Option(".done", "--marker", help="Suffix of the sidecar marker (--complete marker)."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Seconds after which a file that never completes (or "
                                  "that the log does not yet cover) is reported."),
    warn_every: float = typer.Option(300.0, "--warn-every", help="Seconds between warnings that nothing matches."),
    refresh: int = typer.Option(30, "--refresh", help="Seconds between reloads of the report in a browser."),
    max_files: Optional[int] = typer.Option(None, "--max-files", help="Stop after this many files (default: "
                                            "watch until Ctrl-C)."),
) -> None:
    """Analyse each scan file as it lands and rewrite the report after each one; Ctrl-C stops."""
    import os

    from xrdscale.campaign.spec import WatchConfig
    from xrdscale.exceptions import ConfigError
    from xrdscale.io import storage
    from xrdscale.stages.operando_live import OperandoSettings

    if not storage.is_remote(pattern):
        pattern = os.path.abspath(pattern)
    try:
        config = WatchConfig(pattern=pattern, complete=complete, stable_seconds=stable_seconds, marker=marker,
                             timeout=timeout, warn_every=warn_every, refresh=refresh)
    except ValueError as exc:
        raise ConfigError(f"operando watch: {exc}") from exc
    settings = OperandoSettings(model=model, poni=poni, mask=mask, npt=npt, margin=margin, ensemble=ensemble,
                                truth=truth)
    watch_and_print(config, out, settings, echem=echem, poll=poll, max_files=max_files)


register_group(app, "operando")


def register(root: typer.Typer) -> None:
    """Add ``xrdscale operando`` to the root command."""
    root.add_typer(app, name="operando")
