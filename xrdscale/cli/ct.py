"""``xrdscale ct …``: absorption CT of cells, and the roughness of their buried interfaces.

``reconstruct`` and ``roughness`` are stage commands built from :mod:`xrdscale.stages.ct`;
``simulate`` writes a coin-cell phantom's projections (with ring artefacts) and its truth.
"""

from __future__ import annotations

import typer

from xrdscale.cli.stages import register_group

app = typer.Typer(help="Absorption CT: reconstruction with ring removal, interface height maps and roughness.",
                  no_args_is_help=True)


@app.command("simulate")
def simulate_cmd(
    out: str = typer.Argument(..., help="Projections file to write (NXtomo HDF5); the truth goes beside it."),
    slices: int = typer.Option(40, "--slices", help="Detector rows (slices along the rotation axis)."),
    size: int = typer.Option(64, "--size", help="Detector columns (the slices are size × size)."),
    angles: int = typer.Option(180, "--angles", help="Projections over 360°."),
    rings: float = typer.Option(0.02, "--rings", help="Relative gain error of the ring-causing columns."),
    seed: int = typer.Option(0, "--seed", help="Seed of the interfaces and the noise."),
) -> None:
    """Simulate a coin cell (Li anode, SPE, cathode with rough interfaces): OUT and OUT's truth (.truth.h5)."""
    from xrdscale.xcs.phantom import write_phantom

    for p in write_phantom(out, shape=(slices, size, size), n_angles=angles, rings=rings, seed=seed):
        typer.echo(p)


register_group(app, "ct")


def register(root: typer.Typer) -> None:
    """Add ``xrdscale ct`` to the root command."""
    root.add_typer(app, name="ct")
