"""The Fourier convention of Bragg CDI in xrdscale, and the goodness of fit χ² (Eq. 1).

Convention (the package's only one)
-----------------------------------
- The object's origin is at index ``n // 2`` of each of its three axes (the array centre).
- The far field is ``F = fftshift(fftn(ifftshift(obj), norm="ortho"))`` over the last three
  axes, so the Bragg peak (q = 0) is also at index ``n // 2`` of each axis, and
  ``Σ|obj|² = Σ|F|²`` (Parseval, orthonormal scaling).
- The measured intensity is ``I = |F|²`` (photons per voxel).
- Batched arrays are ``(starts, Z, Y, X)``: every function acts on the last three axes only.

:func:`forward` and :func:`backward` take torch tensors (the phasing runs on them on the
CPU or a GPU); :func:`forward_np` and :func:`backward_np` are the same transforms of numpy
arrays. :func:`twin` is the point reflection (through the array centre) and complex
conjugate of an object: it has the same far-field modulus, as have the object times a
global phase and the object shifted by whole voxels (circularly); :func:`chi2` is therefore
blind to all three. :func:`fourier_shift` moves an object by a sub-voxel amount.

Examples
--------
>>> import numpy as np
>>> obj = np.zeros((8, 8, 8), np.complex64); obj[4, 4, 4] = 1
>>> f = forward_np(obj)
>>> bool(np.allclose(np.abs(f), 8 ** -1.5))    # a point at the origin: a flat far field
True
>>> bool(np.allclose(backward_np(f), obj, atol=1e-6))
True
>>> round(float(chi2(np.abs(f) ** 2, obj)), 6)
0.0
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from xrdscale.exceptions import InputError

logger = logging.getLogger(__name__)

#: the axes every transform acts on (batched arrays are (starts, Z, Y, X))
DIMS: tuple[int, int, int] = (-3, -2, -1)


def forward(x: torch.Tensor) -> torch.Tensor:
    """The far field of a (batch of) object(s): ``fftshift(fftn(ifftshift(x), norm="ortho"))`` on dims -3, -2, -1."""
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=DIMS), dim=DIMS, norm="ortho"), dim=DIMS)


def backward(f: torch.Tensor) -> torch.Tensor:
    """The object of a (batch of) far field(s): the inverse of :func:`forward`."""
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(f, dim=DIMS), dim=DIMS, norm="ortho"), dim=DIMS)


def forward_np(x: np.ndarray) -> np.ndarray:
    """:func:`forward` of a numpy array (complex128 for float64/complex128 input, else complex64)."""
    out = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x, axes=DIMS), axes=DIMS, norm="ortho"), axes=DIMS)
    return _keep_precision(out, x)


def backward_np(f: np.ndarray) -> np.ndarray:
    """:func:`backward` of a numpy array (complex128 for float64/complex128 input, else complex64)."""
    out = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(f, axes=DIMS), axes=DIMS, norm="ortho"), axes=DIMS)
    return _keep_precision(out, f)


def _keep_precision(out: np.ndarray, like: np.ndarray) -> np.ndarray:
    if np.asarray(like).dtype in (np.float64, np.complex128):
        return out.astype(np.complex128, copy=False)
    return out.astype(np.complex64, copy=False)


def twin(obj: np.ndarray) -> np.ndarray:
    """The twin of an object: ``conj`` of its point reflection through the array centre (index ``n // 2``).

    The far field of the twin is the complex conjugate of the object's, so both fit the same
    intensity. For even ``n`` the reflection ``i → n - i`` is ``obj[::-1]`` rolled by one voxel;
    for odd ``n`` it is ``obj[::-1]``. Batched input reflects each of the last three axes.
    """
    out = np.conj(np.asarray(obj)[..., ::-1, ::-1, ::-1])
    rolls = tuple((n + 1) % 2 for n in out.shape[-3:])
    return np.roll(out, rolls, axis=DIMS)


def frequencies(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Broadcastable spatial frequencies (cycles per voxel) of ``np.fft.fftn`` along each axis of ``shape``."""
    grids = []
    for axis, n in enumerate(shape):
        view = [1] * len(shape)
        view[axis] = n
        grids.append(np.fft.fftfreq(n).reshape(view))
    return grids


def fourier_shift(x: np.ndarray, shift: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """``x`` moved by ``shift`` voxels (any real amount, circularly) with the Fourier shift theorem.

    Parameters
    ----------
    x : numpy.ndarray
        A real or complex array (3D).
    shift : sequence of float
        The displacement along each axis, in voxels: ``out[i + shift] = x[i]``.

    Returns
    -------
    numpy.ndarray
        Complex (complex64 unless ``x`` is double precision); take ``.real`` of a real input.
    """
    x = np.asarray(x)
    s = np.asarray(shift, dtype=float)
    if np.allclose(s, np.round(s)):
        return _keep_precision(np.roll(x, tuple(int(v) for v in np.round(s)), axis=tuple(range(x.ndim))), x)
    phase = np.zeros(x.shape, dtype=float)
    for f, si in zip(frequencies(x.shape), s, strict=True):
        phase = phase + f * si
    out = np.fft.ifftn(np.fft.fftn(x) * np.exp(-2j * np.pi * phase))
    return _keep_precision(out, x)


def chi2(intensity: Any, obj_or_modulus: Any, mask: Any = None, *, modulus: bool | None = None) -> Any:
    """Eq. 1: ``χ² = Σ(√D − |F|)² / Σ|F|²`` over the measured voxels.

    ``D`` is the measured intensity and ``F = forward(obj)`` the far field of the
    reconstruction. Global phase, whole-voxel (circular) shifts and the twin of ``obj`` leave
    ``|F|`` and hence χ² unchanged.

    Parameters
    ----------
    intensity : numpy.ndarray or torch.Tensor
        Measured intensity ``D``, (Z, Y, X).
    obj_or_modulus : numpy.ndarray or torch.Tensor
        The reconstructed object(s), (Z, Y, X) or (starts, Z, Y, X); or their far-field
        modulus ``|F|`` (see ``modulus``).
    mask : array of bool, optional
        True where a voxel is *not* measured (detector gaps, bad pixels): left out of both
        sums. Default: every voxel is measured.
    modulus : bool, optional
        Whether ``obj_or_modulus`` is ``|F|``; by default it is when it is real, and an
        object when it is complex (pass ``modulus=False`` for a real-valued object).

    Returns
    -------
    float or numpy.ndarray or torch.Tensor
        A float for one object, one value per start (numpy, or torch for torch input) for a batch.

    Raises
    ------
    InputError
        The shapes of ``intensity``, ``obj_or_modulus`` and ``mask`` do not match.
    """
    as_torch = isinstance(obj_or_modulus, torch.Tensor)
    x = obj_or_modulus if as_torch else torch.from_numpy(np.ascontiguousarray(obj_or_modulus))
    d = intensity if isinstance(intensity, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(intensity))
    d = d.to(x.device)
    if x.ndim not in (3, 4) or tuple(x.shape[-3:]) != tuple(d.shape):
        raise InputError(f"chi2: the reconstruction's shape {tuple(x.shape)} does not match the intensity's "
                         f"{tuple(d.shape)}; pass (Z, Y, X) or (starts, Z, Y, X) arrays of the data's shape")
    is_modulus = (not x.is_complex()) if modulus is None else modulus
    if is_modulus:
        mod = x.real if x.is_complex() else x
    else:
        xc = x if x.is_complex() else x.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)
        mod = forward(xc).abs()
    mod = mod.to(torch.float64)
    amp = d.to(torch.float64).clamp_min(0).sqrt()
    if mask is not None:
        m = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))
        if tuple(m.shape) != tuple(d.shape):
            raise InputError(f"chi2: the mask's shape {tuple(m.shape)} does not match the intensity's "
                             f"{tuple(d.shape)}; pass a boolean mask of the data's shape")
        measured = ~m.to(device=x.device, dtype=torch.bool)
        num = torch.where(measured, (amp - mod) ** 2, 0.0).sum(dim=DIMS)
        den = torch.where(measured, mod ** 2, 0.0).sum(dim=DIMS)
    else:
        num = ((amp - mod) ** 2).sum(dim=DIMS)
        den = (mod ** 2).sum(dim=DIMS)
    value = num / den.clamp_min(torch.finfo(torch.float64).tiny)
    if as_torch:
        return value
    if value.ndim == 0:
        return float(value)
    return value.cpu().numpy()
