"""``xrdscale pqnet …``: training libraries, deep-ensemble training and inference on Ray."""

from __future__ import annotations

import json
import logging
from typing import Optional

import typer

from xrdscale.cli.stages import config_from_options, config_parameters

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
    from xrdscale.pqnet.library import make_library
    from xrdscale.runtime.progress import track_local

    with track_local("library"):
        make_library(phases, out, n=n, q_range=q_range, npt=npt, seed=seed)
    typer.echo(f"wrote library {out}")


def train_cmd(library: str, model: str, **options) -> None:
    """Train a PQ-Net deep ensemble and write its model registry entry."""
    from xrdscale.pqnet.identifiability import bounds_table, format_table
    from xrdscale.pqnet.registry import open_entry
    from xrdscale.stages.train import TrainConfig, train

    config = config_from_options(TrainConfig, options, _TRAIN_YAML)
    entry_id = train(library, model, config)
    entry = open_entry(model)
    metrics = entry.metrics
    typer.echo(f"wrote model {entry_id} to {model}; held-out test metrics:")
    typer.echo(json.dumps(metrics["outputs"], indent=1))
    bounds = metrics.get("bounds")
    where = (f"Cramér–Rao bounds on {bounds['n']} held-out patterns ({bounds['source']})" if bounds
             else "no Cramér–Rao bounds (--bounds 0)")
    typer.echo(f"\nheld-out R² and MAE against the best the library's noise allows; {where}:")
    typer.echo(format_table(bounds_table(entry)))


def _train_signature() -> dict[str, bool]:
    """``train_cmd`` takes the library and model URLs and every training field of TrainConfig."""
    import inspect

    from xrdscale.stages.train import LIBRARY_FIELDS, TrainConfig

    fields, yaml_fields = config_parameters(TrainConfig, frozenset(LIBRARY_FIELDS - {"seed"}))
    args = [inspect.Parameter("library", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
                              default=typer.Argument(..., help="Library store from 'xrdscale pqnet library'.")),
            inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
                              default=typer.Argument(..., help="Model registry entry to write (folder URL)."))]
    params = [*args, *fields]
    train_cmd.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    train_cmd.__annotations__ = {p.name: p.annotation for p in params}
    return yaml_fields


_TRAIN_YAML = _train_signature()
pqnet_app.command("train")(train_cmd)


@pqnet_app.command("predict")
def predict_cmd(
    model: str = typer.Argument(..., help="Model registry entry."),
    data: str = typer.Argument(..., help="A volume store (y, x, q) or a patterns store (frame, q)."),
    out: str = typer.Argument(..., help="Output maps store URL."),
    actors: int = typer.Option(1, "--actors", help="Ray actors, each holding the whole ensemble."),
    batch: int = typer.Option(256, "--batch", help="Patterns per actor call (an actor keeps the activations of its "
                                                     "largest batch: 4096 held 8 GB on the CPU)."),
    engine: str = typer.Option("onnx", "--engine", help="Inference engine: onnx or torch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (one GPU per actor)."),
    ensemble: Optional[int] = typer.Option(None, "--ensemble", help="Use the first N members (default: all)."),
) -> None:
    """Predict maps (scale, a, c, size and their ensemble std per phase) from a volume or patterns store."""
    from xrdscale.pqnet.predict import predict

    predict(model, data, out, actors=actors, batch=batch, engine=engine, device=device, members=ensemble,
            progress=True)
    typer.echo(f"wrote maps {out}")


def register(app: typer.Typer) -> None:
    """Add the ``pqnet`` sub-app to the ``xrdscale`` command line."""
    app.add_typer(pqnet_app, name="pqnet")
