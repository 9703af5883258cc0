"""``xrdscale xcs …``: X-ray Compton scattering imaging of Li in working cells.

``emr`` and ``lithium`` are stage commands built from :mod:`xrdscale.stages.xcs` (every
option is a config field); ``simulate`` writes test cells with their truth, ``calibrate``
fits the EMR → Li stoichiometry line of a table of reference states.
"""

from __future__ import annotations

from typing import Optional

import typer

from xrdscale.cli.stages import register_group

app = typer.Typer(help="X-ray Compton scattering imaging: EMR maps, calibration, Li stoichiometry maps.",
                  no_args_is_help=True)


@app.command("simulate")
def simulate_cmd(
    out: str = typer.Argument(..., help="Output folder (local path or fsspec URL)."),
    x: list[str] = typer.Option(["1.0", "0.6"], "--x", help="Li stoichiometry x of each state (repeat the option), "
                                                            "or 'gradient' for a lateral gradient 0.3 → 1.0."),
    size: int = typer.Option(16, "--size", help="Detector pixels per side (the HEXITEC has 80)."),
    bins: int = typer.Option(4000, "--bins", help="Energy bins from ~5 to 120 keV."),
    counts: float = typer.Option(2e4, "--counts", help="Mean counts per pixel and plane."),
    alpha: float = typer.Option(0.3, "--alpha", help="Anode volume of R2 relative to R3."),
    beta: float = typer.Option(0.2, "--beta", help="Anode volume of R1 relative to R3."),
    hxt: bool = typer.Option(False, "--hxt/--no-hxt", help="Also write every plane as a HEXITEC .hxt file."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise and the lateral structure."),
) -> None:
    """Simulate a solid-state cell in three beam planes: OUT/<state>.h5 cubes and OUT/truth.h5."""
    from xrdscale.xcs.simulate import write_cell

    states = [v if v == "gradient" else float(v) for v in x]
    for p in write_cell(out, states=states, shape=(size, size), bins=bins, counts_per_pixel=counts, alpha=alpha,
                        beta=beta, hxt=hxt, seed=seed):
        typer.echo(p)


@app.command("calibrate")
def calibrate_cmd(
    table: str = typer.Argument(..., help="CSV with columns emr, x (optional: state, emr_std)."),
    out: Optional[str] = typer.Option(None, "--out", help="Calibration JSON to write (default: TABLE with .json)."),
) -> None:
    """Fit x = a + b · EMR (least squares, with uncertainties and R²); print it and save it as JSON."""
    import posixpath

    from xrdscale.xcs import calibration

    cal = calibration.fit_table(table)
    typer.echo(cal.summary())
    target = out or posixpath.splitext(table)[0] + ".json"
    typer.echo(calibration.save(cal, target))


register_group(app, "xcs")


def register(root: typer.Typer) -> None:
    """Add ``xrdscale xcs`` to the root command."""
    root.add_typer(app, name="xcs")
