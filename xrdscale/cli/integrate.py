"""``xrdscale integrate`` and ``xrdscale sinogram``: raw frames → patterns → sinograms."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Optional

import typer

from xrdscale.runtime.cluster import worker_environ
from xrdscale.exceptions import ConfigError

logger = logging.getLogger(__name__)





@contextlib.contextmanager
def dask_client(workers: int | None, scheduler: str | None) -> Iterator:
    """Yield a distributed client for ``--workers``/``--scheduler``, or None (local threads)."""
    if workers is not None and scheduler is not None:
        raise ConfigError("give either --workers (a local cluster) or --scheduler (an existing one), not both")
    if workers is None and scheduler is None:
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler is not None:
        with Client(scheduler) as client:
            yield client
        return
    if workers < 1:
        raise ConfigError(f"--workers {workers}: expected at least 1")
    with worker_environ(), \
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


def _integrate(
    raw: str = typer.Argument(..., help="Raw NeXus/HDF5 file, or a folder/glob of CBF/EDF frames (any fsspec URL)."),
    out: str = typer.Argument(..., help="Output patterns store (zarr; local path or s3://…)."),
    poni: str = typer.Option(..., "--poni", help="pyFAI PONI file of the detector geometry."),
    mask: Optional[str] = typer.Option(None, "--mask", help="Mask image (EDF/TIFF/CBF/NPY, nonzero = masked)."),
    npt: int = typer.Option(1000, "--npt", help="Number of q bins."),
    q_range: Optional[tuple[float, float]] = typer.Option(
        None, "--q-range", help="q range LOW HIGH in 1/Å (default: what the unmasked pixels cover)."),
    method: str = typer.Option("trimmed_mean", "--method", help="trimmed_mean | mean | sigma_clip."),
    percentile: tuple[float, float] = typer.Option((10.0, 90.0), "--percentile",
                                                   help="Percentiles kept by trimmed_mean."),
    polarization: float = typer.Option(0.99, "--polarization", help="pyFAI polarisation factor."),
    sigma_clip_threshold: float = typer.Option(5.0, "--sigma-threshold", help="Clipping threshold of sigma_clip."),
    positioners: Optional[str] = typer.Option(
        None, "--positioners", help="CSV positioner table (angle, translation, monitor[, file]) of a frame series."),
    frames_per_chunk: int = typer.Option(64, "--frames-per-chunk", help="Frames per Dask task and zarr chunk."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Start a local Dask cluster with N workers."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Address of a running Dask scheduler."),
) -> None:
    """Azimuthally integrate every frame of a raw dataset into a patterns store (frame, q), divided by I0."""
    from xrdscale.stages.integrate import integrate

    q = tuple(q_range) if q_range is not None and None not in q_range else None
    with dask_client(workers, scheduler) as client:
        integrate(raw, out, poni=poni, mask=mask, npt=npt, q_range=q, method=method, percentile=percentile,
                  polarization_factor=polarization, sigma_clip_threshold=sigma_clip_threshold,
                  positioners=positioners, frames_per_chunk=frames_per_chunk, client=client)
    typer.echo(out)


def _sinogram(
    patterns: str = typer.Argument(..., help="Input patterns store (from `xrdscale integrate`)."),
    out: str = typer.Argument(..., help="Output sinogram store (zarr; local path or s3://…)."),
    center: str = typer.Option("auto", "--center",
                               help="Rotation axis position in translation units (mm), or 'auto' to find it."),
    air_columns: int = typer.Option(5, "--air-columns",
                                    help="Sample-free translation positions at each edge used to estimate air "
                                         "scatter (0: no subtraction)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Start a local Dask cluster with N workers."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Address of a running Dask scheduler."),
) -> None:
    """Place patterns by their positioners into sinograms (angle, translation, q), centred, air subtracted."""
    from xrdscale.stages.sinogram import build_sinogram

    if center != "auto":
        try:
            centre: str | float = float(center)
        except ValueError as exc:
            raise ConfigError(f"--center {center!r}: expected 'auto' or a number (mm)") from exc
    else:
        centre = "auto"
    with dask_client(workers, scheduler) as client:
        build_sinogram(patterns, out, center=centre, air_columns=air_columns, client=client)
    typer.echo(out)


def register(app: typer.Typer) -> None:
    """Add the ``integrate`` and ``sinogram`` commands to ``app``."""
    app.command("integrate")(_integrate)
    app.command("sinogram")(_sinogram)
