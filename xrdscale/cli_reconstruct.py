"""``xrdscale reconstruct``, ``xrdscale absorption`` and ``xrdscale denoise``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import typer

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _progress() -> Iterator[None]:
    """A progress bar over the Dask tasks of a stage (local scheduler; a distributed
    client shows its own dashboard)."""
    from dask.diagnostics import ProgressBar

    with ProgressBar(minimum=1.0):
        yield


def reconstruct_cmd(
    sinogram: str = typer.Argument(..., help="URL of the sinogram store (angle, translation, q)."),
    out: str = typer.Argument(..., help="URL of the volume store to write (y, x, q)."),
    algorithm: str = typer.Option("fbp", help="fbp (filtered back projection) or sirt."),
    iterations: int = typer.Option(100, help="SIRT iterations (ignored by fbp)."),
    filter: str = typer.Option("ram-lak", "--filter", help="FBP filter: ram-lak, shepp-logan or hann."),
    engine: str = typer.Option("auto", help="astra (ASTRA per channel), batched (one sparse operator for "
                                            "many channels) or auto (batched)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto; cuda falls back to cpu when no GPU is usable."),
    channels_per_chunk: int = typer.Option(None, help="q channels per task (default: ~64 MiB per task)."),
) -> None:
    """Reconstruct every q channel of a sinogram store into a volume store."""
    from xrdscale.reconstruct import reconstruct

    with _progress():
        reconstruct(sinogram, out, algorithm=algorithm, iterations=iterations, filter=filter, engine=engine,
                    device=device, channels_per_chunk=channels_per_chunk)
    typer.echo(out)


def register(app: typer.Typer) -> None:
    """Add the reconstruct, absorption and denoise commands to ``app``."""
    app.command("reconstruct")(reconstruct_cmd)
