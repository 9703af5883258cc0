"""``xrdscale cdi …``: Bragg coherent diffraction imaging.

``reconstruct`` and ``series`` are stage commands built from
:class:`xrdscale.stages.cdi.CdiConfig` (every option is a config field); ``simulate``
writes test crystals with their truth, ``train-cnn`` pre-trains the network of
``--init cnn``.
"""

from __future__ import annotations

import typer

from xrdscale.cli.stages import register_group

app = typer.Typer(help="Bragg CDI: phase retrieval, strain, and PCA across charge states.", no_args_is_help=True)


@app.command("simulate")
def simulate_cmd(
    out: str = typer.Argument(..., help="Output folder (local path or fsspec URL)."),
    size: int = typer.Option(64, "--size", help="Array side (voxels); 32 for tests, 128 and more for real work."),
    states: int = typer.Option(1, "--states", help="Charge states of one crystal (1: a single pattern)."),
    photons: float = typer.Option(1e7, "--photons", help="Total photons per pattern (Poisson noise)."),
    crystal: float = typer.Option(0.35, "--crystal", help="Crystal extent as a fraction of the array (≤ 0.5)."),
    facets: str = typer.Option("hexagonal", "--facets", help="hexagonal, box, or a number of random facets."),
    phase: list[str] = typer.Option(["domains"], "--phase", help="Displacement fields: domains, vortex, shell, "
                                                                  "none (repeat the option to combine)."),
    amplitude: float = typer.Option(1.0, "--amplitude", help="Peak phase of the domains/shell (rad)."),
    scans: int = typer.Option(0, "--scans", help="Also write each state as this many NeXus rocking-curve scans "
                                                 "(0: CXI intensities only)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the crystal, its phase and the noise."),
) -> None:
    """Simulate faceted crystals: OUT/state_NN.cxi (intensity), OUT/truth.h5 (objects, supports, coefficients)."""
    from xrdscale.cdi.simulate import write_simulation

    paths = write_simulation(out, size=size, states=states, photons=photons, crystal=crystal,
                             facets=int(facets) if facets.isdigit() else facets, phase=tuple(phase),
                             amplitude=amplitude, scans=scans, seed=seed)
    for p in paths:
        typer.echo(p)


@app.command("train-cnn")
def train_cnn_cmd(
    out: str = typer.Argument(..., help="Registry entry to write (folder; local path or fsspec URL)."),
    n: int = typer.Option(2000, "--n", help="Simulated Fourier pairs (the paper: 30,000)."),
    size: int = typer.Option(32, "--size", help="Input side (a power of two); the object is half of it."),
    epochs: int = typer.Option(30, "--epochs", help="Most epochs (early stopping on a held-out split)."),
    width: int = typer.Option(8, "--width", help="Channels of the first encoder layer."),
    seed: int = typer.Option(0, "--seed", help="Seed of the pairs and the weights."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when it works), cpu, cuda, cuda:N."),
) -> None:
    """Pre-train the CDI CNN (encoder, amplitude and phase decoders) on simulated hexagonal prisms."""
    from xrdscale.cdi.cnn import pretrain

    typer.echo(pretrain(out, n=n, size=size, epochs=epochs, width=width, seed=seed, device=device))


register_group(app, "cdi")


def register(root: typer.Typer) -> None:
    """Add ``xrdscale cdi`` to the root command."""
    root.add_typer(app, name="cdi")
