"""``xrdscale pqnet …``: training libraries, deep-ensemble training and inference on Ray."""

from __future__ import annotations

import json
import logging
from typing import Optional

import typer

logger = logging.getLogger(__name__)

pqnet_app = typer.Typer(help="PQ-Net: simulated training libraries, deep ensembles, maps from Ray actors.",
                        no_args_is_help=True)


@pqnet_app.command("library")
def library_cmd(
    phases: str = typer.Argument(..., help="Phase-library YAML (path or URL), e.g. xrdscale/data/phases/nca.yaml."),
    out: str = typer.Argument(..., help="Output library store URL (zarr)."),
    n: int = typer.Option(200_000, "--n", help="Number of patterns."),
    q_range: Optional[tuple[float, float]] = typer.Option(None, "--q-range", help="Override the q range: LO HI [1/Å]."),
    npt: Optional[int] = typer.Option(None, "--npt", help="Override the number of q points."),
    seed: int = typer.Option(0, "--seed", help="Seed of the library."),
) -> None:
    """Simulate a training library of patterns with their labels (in parallel on Dask)."""
    from dask.diagnostics import ProgressBar

    from xrdscale.pqnet.library import make_library

    with ProgressBar():
        make_library(phases, out, n=n, q_range=q_range, npt=npt, seed=seed)
    typer.echo(f"wrote library {out}")


@pqnet_app.command("train")
def train_cmd(
    library: str = typer.Argument(..., help="Library store from 'xrdscale pqnet library'."),
    model: str = typer.Argument(..., help="Model registry entry to write (folder URL)."),
    ensemble: int = typer.Option(10, "--ensemble", help="Members of the deep ensemble."),
    epochs: int = typer.Option(35, "--epochs", help="Maximum epochs per member (early stopping, patience 5)."),
    batch: int = typer.Option(32, "--batch", help="Batch size."),
    lr: float = typer.Option(5e-4, "--lr", help="Adam learning rate."),
    outputs: Optional[str] = typer.Option(None, "--outputs",
                                          help="Comma-separated outputs: scale, a, c, size_nm or PHASE.PARAM "
                                               "(default: every label of the library)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    sequential: bool = typer.Option(False, "--sequential", help="Train members one after the other in this "
                                                                "process instead of as parallel Ray tasks."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first member (member i uses seed+i)."),
) -> None:
    """Train a PQ-Net deep ensemble and write its model registry entry."""
    from xrdscale.pqnet.registry import open_entry
    from xrdscale.pqnet.train import train_ensemble

    entry_id = train_ensemble(library, model, ensemble=ensemble, epochs=epochs, batch=batch, lr=lr,
                              outputs=[o.strip() for o in outputs.split(",")] if outputs else None,
                              device=device, parallel=not sequential, seed=seed)
    metrics = open_entry(model).metrics
    typer.echo(f"wrote model {entry_id} to {model}; held-out test metrics:")
    typer.echo(json.dumps(metrics["outputs"], indent=1))


@pqnet_app.command("predict")
def predict_cmd(
    model: str = typer.Argument(..., help="Model registry entry."),
    data: str = typer.Argument(..., help="A volume store (y, x, q) or a patterns store (frame, q)."),
    out: str = typer.Argument(..., help="Output maps store URL."),
    actors: int = typer.Option(1, "--actors", help="Ray actors, each holding the whole ensemble."),
    batch: int = typer.Option(4096, "--batch", help="Patterns per actor call."),
    engine: str = typer.Option("onnx", "--engine", help="Inference engine: onnx or torch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (one GPU per actor)."),
) -> None:
    """Predict maps (scale, a, c, size and their ensemble std per phase) from a volume or patterns store."""
    from xrdscale.pqnet.predict import predict

    predict(model, data, out, actors=actors, batch=batch, engine=engine, device=device, progress=True)
    typer.echo(f"wrote maps {out}")


def register(app: typer.Typer) -> None:
    """Add the ``pqnet`` sub-app to the ``xrdscale`` command line."""
    app.add_typer(pqnet_app, name="pqnet")
