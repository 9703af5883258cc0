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
    from xrdscale.stages.reconstruct import reconstruct

    with _progress():
        reconstruct(sinogram, out, algorithm=algorithm, iterations=iterations, filter=filter, engine=engine,
                    device=device, channels_per_chunk=channels_per_chunk)
    typer.echo(out)


def absorption_cmd(
    sinogram: str = typer.Argument(..., help="URL of the sinogram store to correct."),
    out: str = typer.Argument(..., help="URL of the corrected sinogram store to write."),
    mu_map: str = typer.Option(None, help="μ map in 1/mm on the reconstruction grid: a .npy file or a store "
                                          "with a 'mu' (y, x) variable."),
    maps: str = typer.Option(None, help="maps store whose phase fractions give μ (with xraylib)."),
    basis: str = typer.Option("volume", help="volume: the 'scale' maps are volume fractions; weight: use "
                                             "'weight_fraction' maps with --packing."),
    packing: float = typer.Option(1.0, help="Volume fraction of solid per voxel (weight basis)."),
    energy_kev: float = typer.Option(95.0, help="Beam energy in keV."),
    min_transmission: float = typer.Option(1e-3, help="Floor of the transmission a ray is divided by."),
) -> None:
    """Zero-order self-absorption correction: divide every ray by its transmission exp(-∫μ dl)."""
    from xrdscale.stages.absorption import correct_absorption

    with _progress():
        correct_absorption(sinogram, out, mu_map=mu_map, maps_url=maps, energy_kev=energy_kev, basis=basis,
                           packing=packing, min_transmission=min_transmission)
    typer.echo(out)


def denoise_cmd(
    sinogram: str = typer.Argument(..., help="URL of the sinogram store the volume was reconstructed from."),
    volume: str = typer.Argument(..., help="URL of its volume store (grid, q channels and FBP filter)."),
    out: str = typer.Argument(..., help="URL of the denoised volume store to write."),
    splits: int = typer.Option(4, help="Number of projection subsets K: the network maps K-1 subsets to 1."),
    realizations: int = typer.Option(4, help="Random angular splits per channel (training pairs × K)."),
    pretrain_channels: int = typer.Option(8, help="Channels sampled for pre-training."),
    pretrain_epochs: int = typer.Option(20, help="Pre-training epochs."),
    finetune_epochs: int = typer.Option(2, help="Fine-tuning epochs per chunk of channels."),
    batch_size: int = typer.Option(8, help="Training batch size."),
    lr: float = typer.Option(1e-3, help="Adam learning rate."),
    features: int = typer.Option(16, help="U-Net channels at the top level."),
    seed: int = typer.Option(0, help="Random seed."),
    engine: str = typer.Option("auto", help="Reconstruction engine of the split FBPs: astra, batched or auto."),
    device: str = typer.Option("auto", help="cpu, cuda or auto (GPU for training and FBP when usable)."),
    channels_per_chunk: int = typer.Option(None, help="q channels per fine-tuning task."),
) -> None:
    """Noise2Inverse denoising: train a U-Net on X:1 splits of the projections, apply it to every channel."""
    from xrdscale.stages.denoise import N2IConfig, denoise

    config = N2IConfig(splits=splits, realizations=realizations, pretrain_channels=pretrain_channels,
                       pretrain_epochs=pretrain_epochs, finetune_epochs=finetune_epochs, batch_size=batch_size,
                       lr=lr, features=features, seed=seed)
    with _progress():
        denoise(sinogram, volume, out, config=config, engine=engine, device=device,
                channels_per_chunk=channels_per_chunk)
    typer.echo(out)


def register(app: typer.Typer) -> None:
    """Add the reconstruct, absorption and denoise commands to ``app``."""
    app.command("reconstruct")(reconstruct_cmd)
    app.command("absorption")(absorption_cmd)
    app.command("denoise")(denoise_cmd)
