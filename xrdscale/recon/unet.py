"""A small 2D U-Net (torch) for Noise2Inverse denoising of reconstructed slices."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with ``depth`` down/up levels and ``features`` channels at the top level.

    Inputs of any size are reflect-padded to a multiple of ``2**depth`` and cropped back,
    and the network predicts a residual added to its input.

    Parameters
    ----------
    features : int
        Channels of the first level (doubled at each level down).
    depth : int
        Number of down-sampling levels.
    """

    def __init__(self, features: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.depth = depth
        chans = [features * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList([_block(1 if i == 0 else chans[i - 1], chans[i]) for i in range(depth)])
        self.bottom = _block(chans[depth - 1], chans[depth])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2)
                                 for i in reversed(range(depth))])
        self.merge = nn.ModuleList([_block(2 * chans[i], chans[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise ``x`` of shape ``(batch, 1, height, width)``."""
        h, w = x.shape[-2:]
        m = 2 ** self.depth
        pad = (0, (-w) % m, 0, (-h) % m)
        y = F.pad(x, pad, mode="reflect") if any(pad) else x
        skips = []
        for down in self.down:
            y = down(y)
            skips.append(y)
            y = F.max_pool2d(y, 2)
        y = self.bottom(y)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips), strict=True):
            y = merge(torch.cat([up(y), skip], dim=1))
        return x + self.head(y)[..., :h, :w]
