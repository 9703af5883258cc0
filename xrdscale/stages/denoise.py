"""The ``denoise`` stage: Noise2Inverse self-supervised denoising of reconstructions.

Noise2Inverse (Hendriksen et al., 2020; used X:1 with 3:1 splits in the XRD-CT paper):
the projections are split into ``K`` interleaved subsets; the FBP of ``K − 1`` subsets is
the network's input and the FBP of the remaining one its target, so the noise of input
and target is independent and a U-Net trained with an L1 (MAE) loss learns the clean
image. Random angular offsets — each run of ``K`` consecutive angles is dealt to the
``K`` subsets in a random order — give many different training pairs per sinogram.
FBP is linear, so the split reconstructions are ``FBP(sinogram · mask)``, rescaled for the
number of angles, from the same (cached) engine as the reconstruct stage.

Training: pre-train on a sample of channels (Adam, lr 1e-3), then fine-tune briefly on
each chunk of channels in its Dask task and apply the network to the FBP of all the
projections of those channels (recomputed from the sinogram rather than read from the
per-pixel-chunked volume store, which would read the whole volume once per chunk).
Images are divided by their channel's standard deviation on the way in and multiplied
back on the way out, so the output keeps the volume's absolute units. Defaults are sized
for a CPU demo; the paper used 100 pre-training epochs, 10 per sinogram and batch 1.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import numpy as np
from pydantic import Field

from xrdscale.config import one_of
from xrdscale.exceptions import InputError
from xrdscale.io import storage
from xrdscale.recon.filters import FILTERS, check_filter
from xrdscale.recon.geometry import Geometry
from xrdscale.recon.registry import DEVICES, ENGINE_NAMES, Engine, Impl, get_engine
from xrdscale.runtime.devices import resolve_device
from xrdscale.stages.base import StageConfig, guarded, runtime_field
from xrdscale.stages.reconstruct import channel_volumes, open_sinogram, write_volume

if TYPE_CHECKING:
    import torch

    from xrdscale.recon.unet import UNet

logger = logging.getLogger(__name__)


Filter = Annotated[str, one_of(FILTERS, "FBP filter")]
EngineName = Annotated[str, one_of(("auto", *ENGINE_NAMES), "reconstruction engine")]
Device = Annotated[str, one_of(DEVICES, "device")]


class DenoiseConfig(StageConfig):
    """Settings of the ``denoise`` stage (``pipeline.denoise`` of a campaign): Noise2Inverse."""

    stage: ClassVar[str] = "denoise"

    enabled: bool = runtime_field(False, "run the stage in a campaign (the functions ignore it)")
    splits: int = Field(4, ge=2, description="K: projections split into K subsets, trained K-1:1")
    realizations: int = Field(4, ge=1, description="random splits per sinogram")
    pretrain_channels: int = Field(8, ge=1, description="channels sampled for pre-training")
    pretrain_epochs: int = Field(20, ge=0, description="pre-training epochs")
    finetune_epochs: int = Field(2, ge=0, description="fine-tuning epochs per chunk of channels")
    batch_size: int = Field(8, ge=1, description="training batch size")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    features: int = Field(16, ge=1, description="U-Net features of the first level")
    seed: int = Field(0, description="seed of the splits and of the network")
    filter: Filter | None = Field(
        None, description="FBP filter of the split reconstructions (default: the volume's)")
    engine: EngineName = Field("auto", description="as reconstruct")
    device: Device = Field("auto", description="as reconstruct; the network trains on CUDA "
                                                                   "when torch sees a GPU and device allows it")
    channels_per_chunk: int | None = runtime_field(None, "channels per fine-tuning task", ge=1)


#: the former name of :class:`DenoiseConfig`
N2IConfig = DenoiseConfig


def split_pairs(sino: np.ndarray, geometry: Geometry, engine: Engine, filter_name: str, splits: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random K-split of every channel: ``(inputs, targets, full)``.

    Returns
    -------
    inputs, targets : numpy.ndarray
        ``(splits, channel, y, x)``: FBP of the other ``K − 1`` subsets / of subset ``j``.
    full : numpy.ndarray
        ``(channel, y, x)`` FBP of all projections.
    """
    n_angles = geometry.n_angles
    if n_angles < 2 * splits:
        raise InputError(f"{n_angles} projections cannot be split {splits - 1}:1 into {splits} subsets; "
                         "use fewer splits")
    offsets = np.concatenate([rng.permutation(splits) for _ in range(-(-n_angles // splits))])[:n_angles]
    masks = np.stack([(offsets == j).astype(np.float32) for j in range(splits)])  # (K, A)
    weighted = np.concatenate([sino * m[:, None, None] for m in masks], axis=2)  # (A, T, K*c)
    parts = engine.fbp(geometry, weighted, filter_name)  # (y, x, K*c)
    n_c = sino.shape[2]
    parts = parts.reshape(parts.shape[0], parts.shape[1], splits, n_c).transpose(2, 3, 0, 1)
    full = parts.sum(axis=0)
    counts = masks.sum(axis=1)[:, None, None, None]
    targets = parts * (n_angles / counts)
    inputs = (full[None] - parts) * (n_angles / (n_angles - counts))
    return inputs.astype(np.float32), targets.astype(np.float32), full.astype(np.float32)


def training_set(sino: np.ndarray, geometry: Geometry, engine: Engine, filter_name: str, config: DenoiseConfig,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Normalised training pairs ``(x, y)`` of shape ``(n, 1, h, w)``, the full FBP and the scales."""
    import torch

    xs, ys = [], []
    full = scale = np.zeros(0)
    for _ in range(config.realizations):
        inputs, targets, full = split_pairs(sino, geometry, engine, filter_name, config.splits, rng)
        scale = np.maximum(full.std(axis=(1, 2)), 1e-12)[None, :, None, None]
        xs.append((inputs / scale).reshape(-1, 1, *inputs.shape[2:]))
        ys.append((targets / scale).reshape(-1, 1, *targets.shape[2:]))
    return (torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), full,
            scale.reshape(-1))


def train(net: UNet, x: torch.Tensor, y: torch.Tensor, *, epochs: int, config: DenoiseConfig, device: str,
          seed: int) -> UNet:
    """Train ``net`` on pairs ``(x, y)`` with the L1 loss and Adam; returns it in eval mode."""
    import torch

    net = net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), config.batch_size):
            idx = order[i:i + config.batch_size]
            xb, yb = x[idx].to(device), y[idx].to(device)
            opt.zero_grad()
            loss = torch.nn.functional.l1_loss(net(xb), yb)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        logger.debug("N2I epoch %d: MAE %.4g", epoch, total / len(x))
    return net.eval()


def apply(net: UNet, images: np.ndarray, scale: np.ndarray, device: str) -> np.ndarray:
    """Denoise ``(channel, y, x)`` images (normalised by ``scale``) → ``(y, x, channel)``."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy((images / scale[:, None, None])[:, None].astype(np.float32)).to(device)
        out = net(x)[:, 0].cpu().numpy() * scale[:, None, None]
    return out.transpose(1, 2, 0).astype(np.float32)


def denoise_block(block: np.ndarray, *, geometry: Geometry, q: np.ndarray, engine: Engine, filter_name: str,
                  config: DenoiseConfig, state: dict, device: str, source: str) -> np.ndarray:
    """Fine-tune the pre-trained network on one chunk of channels and denoise them."""
    from xrdscale.recon.unet import UNet

    if not np.isfinite(block).all():
        raise InputError(f"{source} has NaN or infinite values near q = {np.round(q[:3], 4).tolist()}; "
                         "mask or interpolate them in the sinogram stage")
    seed = config.seed + int(round(float(q[0]) * 1e4))
    rng = np.random.default_rng(seed)
    net = UNet(config.features)
    net.load_state_dict(copy.deepcopy(state))
    x, y, full, scale = training_set(block, geometry, engine, filter_name, config, rng)
    net = train(net, x, y, epochs=config.finetune_epochs, config=config, device=device, seed=seed)
    return apply(net, full, scale, device)


def denoise(sinogram_url: str, volume_url: str, out_url: str, *, config: DenoiseConfig | None = None,
            client: Any = None, progress: bool = True, **settings: Any) -> str:
    """Noise2Inverse-denoise every channel of a reconstruction into a new volume store.

    Parameters
    ----------
    sinogram_url : str
        The ``sinogram`` store the volume was reconstructed from.
    volume_url : str
        Its ``volume`` store (checked for the same grid and q channels; its FBP filter
        is used unless the config names one).
    out_url : str
        Destination ``volume`` store.
    config : DenoiseConfig, optional
        Training settings (splits, realizations, epochs, …), filter, engine, device and
        channels per task; keyword ``settings`` of the same names override it.
    client : distributed.Client, optional
        Dask client to run on.
    progress : bool
        Show progress.

    Returns
    -------
    str
        ``out_url``.

    Examples
    --------
    >>> denoise("c1/sinogram.zarr", "c1/volume.zarr", "c1/volume-n2i.zarr", splits=4)  # doctest: +SKIP
    """
    config = DenoiseConfig.build(config, **settings)
    return guarded(out_url, lambda: _denoise(sinogram_url, volume_url, out_url, config, client, progress))


def _denoise(sinogram_url: str, volume_url: str, out_url: str, config: DenoiseConfig, client: Any,
             progress: bool) -> str:
    import torch

    from xrdscale.recon.unet import UNet

    intensity, geometry = open_sinogram(sinogram_url, dask=False)
    volume = storage.open_store(volume_url, stage="volume")
    if volume["intensity"].shape != (geometry.n_det, geometry.n_det, intensity.sizes["q"]):
        raise InputError(f"volume {storage.redact(volume_url)} has shape {volume['intensity'].shape} but "
                         f"sinogram {storage.redact(sinogram_url)} reconstructs to "
                         f"({geometry.n_det}, {geometry.n_det}, {intensity.sizes['q']}); give the matching pair")
    import json

    filter = config.filter or json.loads(volume.attrs.get("config", "{}")).get("filter") or "ram-lak"
    check_filter(filter)
    recon_engine = get_engine(Impl(config.engine, config.device))
    torch_device = resolve_device(config.device, what="denoise (U-Net)")
    rng = np.random.default_rng(config.seed)
    n_q = intensity.sizes["q"]
    sample = np.unique(np.linspace(0, n_q - 1, min(config.pretrain_channels, n_q)).round().astype(int))
    logger.info("Noise2Inverse: pre-training on %d channels (%d:1 splits, %d realizations, %d epochs) on %s",
                sample.size, config.splits - 1, config.realizations, config.pretrain_epochs, torch_device)
    pre = intensity.isel(q=sample).values.astype(np.float32)
    if not np.isfinite(pre).all():
        raise InputError(f"sinogram {storage.redact(sinogram_url)} has NaN or infinite values; "
                         "mask or interpolate them in the sinogram stage")
    x, y, _, _ = training_set(pre, geometry, recon_engine, filter, config, rng)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights; the caller's RNG is left as it was
        torch.manual_seed(config.seed)
        net0 = UNet(config.features)
    net = train(net0, x, y, epochs=config.pretrain_epochs, config=config, device=torch_device, seed=config.seed)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    denoised = channel_volumes(intensity, geometry, denoise_block, chunk=config.channels_per_chunk,
                               engine=recon_engine, filter_name=filter, config=config, state=state,
                               device=torch_device, source=f"sinogram {storage.redact(sinogram_url)}")
    run_config = {**config.record(), "filter": filter, "engine": recon_engine.name,
                  "device": torch_device, "source": storage.redact(sinogram_url),
                  "volume": storage.redact(volume_url), "method": "noise2inverse"}
    return write_volume(denoised, geometry, intensity["q"], out_url, stage="volume", config=run_config,
                        client=client, progress=progress, label="denoise")
