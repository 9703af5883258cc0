"""FBP ramp filters applied along the detector axis, batched over channels.

The ramp is the band-limited spatial-domain Ram-Lak kernel (``h[0] = 1/4``,
``h[n odd] = -1/(π n)²``, Kak & Slaney eq. 3.61) taken to the frequency domain, which
keeps the correct DC term; ``shepp-logan`` multiplies it by ``sinc(f)`` and ``hann`` by
``(1 + cos 2πf) / 2`` (``f`` in cycles per detector bin, Nyquist 0.5). The detector axis
is zero-padded to the next power of two of twice the detector count, as ASTRA's CPU
FBP does. They operate on arrays whose detector axis is
the second one, so a whole chunk of channels ``(angle, translation, channel)`` is
filtered by one FFT call.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from xrdscale.exceptions import ConfigError

logger = logging.getLogger(__name__)

FILTERS: tuple[str, ...] = ("ram-lak", "shepp-logan", "hann")


def check_filter(name: str) -> str:
    """Return ``name`` if it is a known filter, else raise :class:`ConfigError`."""
    if name not in FILTERS:
        raise ConfigError(f"unknown FBP filter {name!r}; expected one of {', '.join(FILTERS)}")
    return name


def padded_length(n_det: int) -> int:
    """Length of the zero-padded detector axis: the next power of two ≥ 2 ``n_det``."""
    return int(2 ** int(np.ceil(np.log2(max(2 * n_det, 2)))))


def frequency_response(name: str, n_det: int) -> np.ndarray:
    """Frequency response of filter ``name`` on the ``rfft`` grid of the padded detector.

    Parameters
    ----------
    name : str
        ``ram-lak``, ``shepp-logan`` or ``hann``.
    n_det : int
        Number of detector bins (translation steps).

    Returns
    -------
    numpy.ndarray
        ``(padded_length(n_det) // 2 + 1,)`` float64 response.
    """
    check_filter(name)
    n_pad = padded_length(n_det)
    f = np.fft.rfftfreq(n_pad)  # cycles per bin, 0 … 0.5
    k = np.arange(n_pad)
    k = np.minimum(k, n_pad - k)  # circular distance to bin 0
    kernel = np.where(k % 2 == 1, -1.0 / (np.pi * np.maximum(k, 1)) ** 2, 0.0)
    kernel[0] = 0.25
    response = np.real(np.fft.rfft(kernel))
    if name == "shepp-logan":
        response = response * np.sinc(f)
    elif name == "hann":
        response = response * 0.5 * (1.0 + np.cos(2.0 * np.pi * f))
    return response


def filter_sinograms(sino: torch.Tensor, name: str) -> torch.Tensor:
    """Ramp-filter sinograms along their detector axis (axis 1), all channels at once.

    Parameters
    ----------
    sino : torch.Tensor
        ``(angle, detector, channel)`` real tensor.
    name : str
        Filter name.

    Returns
    -------
    torch.Tensor
        Filtered sinograms, same shape and dtype, scaled by ``π / n_angles`` so that a
        plain back projection of them is the FBP reconstruction.
    """
    n_angles, n_det = sino.shape[0], sino.shape[1]
    n_pad = padded_length(n_det)
    response = torch.as_tensor(frequency_response(name, n_det) * (np.pi / n_angles),
                               dtype=sino.dtype, device=sino.device)
    spectrum = torch.fft.rfft(sino, n=n_pad, dim=1)
    spectrum *= response[None, :, None]
    return torch.fft.irfft(spectrum, n=n_pad, dim=1)[:, :n_det, :].contiguous()
