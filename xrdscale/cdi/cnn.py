"""A 3D encoder–decoder that predicts a Bragg CDI object from its diffraction amplitude, refined per pattern.

The route of the paper (after Wu et al.): the measured amplitude ``√I`` of a ``S³`` pattern is
encoded into a feature space that two decoders turn into the **amplitude** and the **phase** of
the object on the central ``(S/2)³`` of the real-space array (the object fits there because the
pattern is oversampled at least twice). The network is

1. **pre-trained** (:func:`pretrain`) on simulated pairs (:func:`training_pairs`): random
   hexagonal prisms of random aspect and orientation with a Gaussian-correlated random phase,
   their ``|F|²`` with Poisson noise at a random photon count; the loss compares amplitudes and
   (weighted by the true amplitude) phases, invariant to the phase's global offset and to the
   twin image (which gives the same intensity); the weights go into a registry entry;
2. **refined on each measured pattern** (:func:`refine`, "transfer learning"): the weights are
   trained further so that the Fourier modulus of the predicted object matches the measured
   ``√I`` (masked voxels left out). Its result starts the iterative phase retrieval
   (``--init cnn``).

FFT convention of the package (:mod:`xrdscale.cdi.fourier`): the object's origin is at index
``n // 2`` of each axis, ``F = fftshift(fftn(ifftshift(obj), norm="ortho"))`` over the last
three axes, ``I = |F|²`` with the Bragg peak at the array centre.

Layout of a registry entry (``MODEL_URL``, any fsspec URL)::

    model.json              kind "cdi-cnn", size, width, training config, held-out losses,
                            sha256 of the weights, xrdscale version, content id
    weights.pt              torch state dict of the network
    .xrdscale-complete      written last (storage.mark_complete), names the id
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import time
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from xrdscale import __version__
from xrdscale.cdi.fourier import DIMS, backward, forward
from xrdscale.cdi.simulate import crystal_support
from xrdscale.exceptions import IncompleteStoreError, InputError, StorageError
from xrdscale.io import storage
from xrdscale.runtime.devices import resolve_device
from xrdscale.stages.base import guarded

logger = logging.getLogger(__name__)

#: ``kind`` (and ``stage``) of a registry entry of this network
KIND = "cdi-cnn"
#: Version of the entry layout
FORMAT = 1
#: File of the weights in an entry
WEIGHTS = "weights.pt"
#: Range of the total photon count of the noisy training patterns (drawn log-uniformly)
PHOTONS = (1e5, 1e8)
#: Largest peak |phase| [rad] of the training objects
MAX_PHASE = math.pi / 2
_TRAIN_HINT = "train one with `xrdscale cdi train-cnn OUT`"


# --- array helpers --------------------------------------------------------

def resize_centred(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop or zero-pad the last ``len(shape)`` axes of ``a`` to ``shape``, index ``n // 2`` kept at ``m // 2``.

    Parameters
    ----------
    a : numpy.ndarray
        Any array.
    shape : tuple of int
        New sizes of the trailing axes.

    Returns
    -------
    numpy.ndarray
        A new array of ``a``'s dtype (zeros, or ``False``, where padded).

    Examples
    --------
    >>> resize_centred(np.arange(5), (3,)).tolist(), resize_centred(np.arange(3), (6,)).tolist()
    ([1, 2, 3], [0, 0, 0, 1, 2, 0])
    """
    lead = a.ndim - len(shape)
    src: list[slice] = [slice(None)] * lead
    dst: list[slice] = [slice(None)] * lead
    for n, m in zip(a.shape[lead:], shape, strict=True):
        if m <= n:
            start = n // 2 - m // 2
            src.append(slice(start, start + m))
            dst.append(slice(0, m))
        else:
            start = m // 2 - n // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out = np.zeros(a.shape[:lead] + tuple(shape), dtype=a.dtype)
    out[tuple(dst)] = a[tuple(src)]
    return out


def _pad_half(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last three axes of a real tensor from ``H`` to ``2H`` (centred, origin kept)."""
    q = x.shape[-1] // 2
    return nn.functional.pad(x, [q, q] * 3)


def check_size(size: Any) -> int:
    """The network's input size ``S`` (a power of two ≥ 16), or :class:`InputError`."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16 or size & (size - 1):
        raise InputError(f"the CDI CNN's input size must be a power of two of at least 16 (16, 32, 64, ...), "
                         f"got {size!r}")
    return int(size)


# --- training data ---------------------------------------------------------------------------

def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3×3 rotation matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _random_phase(support: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian-correlated random phase on ``support``: zero mean there, peak ``|φ|`` ≤ :data:`MAX_PHASE`."""
    sigma = rng.uniform(1.5, 0.25 * support.shape[0])
    field = ndimage.gaussian_filter(rng.standard_normal(support.shape), sigma, mode="wrap")
    field -= field[support].mean()
    peak = np.abs(field[support]).max()
    phase = field * (rng.uniform(0.0, MAX_PHASE) / peak) if peak > 0 else field
    return np.where(support, phase, 0.0)


def training_pairs(n: int, size: int = 32, *, rng: np.random.Generator,
                   photons: tuple[float, float] | None = PHOTONS) -> tuple[np.ndarray, np.ndarray]:
    """Simulated (diffraction amplitude, object) pairs for pre-training.

    Every object is a hexagonal prism (:func:`xrdscale.cdi.simulate.crystal_support` on the
    ``S³`` grid, longest extent 25–42 % of ``S``, random aspect 0.5–1 along each axis, uniformly
    random orientation), cut to the central ``(S/2)³``, of amplitude 1 inside and a
    Gaussian-correlated random phase (white noise smoothed with a Gaussian of σ = 1.5 to ``S/8``
    voxels, zero mean on the crystal, scaled to a peak ``|φ|`` drawn uniformly in [0, π/2]).
    The object zero-padded to ``S³`` gives ``I = |forward(obj)|²``; with ``photons``, ``I`` is
    scaled to a total drawn log-uniformly in that range and replaced by Poisson counts. The input
    is ``√I / max √I``.

    Parameters
    ----------
    n : int
        Number of pairs (≥ 1).
    size : int
        ``S``, the input size: a power of two ≥ 16.
    rng : numpy.random.Generator
        Source of every random choice.
    photons : (float, float) or None
        Range of the total photon count of the noisy patterns; None: noise-free.

    Returns
    -------
    amplitudes : numpy.ndarray
        float32 ``(n, 1, S, S, S)``, the normalised ``√I`` (maximum 1).
    objects : numpy.ndarray
        float32 ``(n, 2, S/2, S/2, S/2)``: amplitude (0 or 1) and phase [rad] (0 outside).

    Raises
    ------
    InputError
        A bad ``n``, ``size`` or ``photons``.
    """
    s = check_size(size)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"n must be a positive number of training pairs, got {n!r}")
    if photons is not None and not (len(photons) == 2 and 0 < photons[0] <= photons[1] < math.inf):
        raise InputError(f"photons must be a range (low, high) with 0 < low <= high, or None, got {photons!r}")
    h = s // 2
    amplitudes = np.empty((n, 1, s, s, s), dtype=np.float32)
    objects = np.empty((n, 2, h, h, h), dtype=np.float32)
    for i in range(n):
        support = crystal_support((s, s, s), size=float(rng.uniform(0.25, 0.42)),
                                  aspect=tuple(rng.uniform(0.5, 1.0, 3)), facets="hexagonal",
                                  rotation=_rotation(rng), rng=rng)
        support = resize_centred(support, (h, h, h))
        phase = _random_phase(support, rng)
        objects[i, 0] = support
        objects[i, 1] = phase
        obj = resize_centred(support * np.exp(1j * phase), (s, s, s))
        intensity = np.abs(forward(torch.from_numpy(obj)).numpy()) ** 2
        if photons is not None:
            total = 10 ** rng.uniform(math.log10(photons[0]), math.log10(photons[1]))
            intensity = rng.poisson(intensity * (total / intensity.sum())).astype(np.float64)
        amp = np.sqrt(intensity)
        amplitudes[i, 0] = amp / amp.max()
    return amplitudes, objects


# --- the network ------------------------------------------------------------------------------

def _block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3×3×3 convolutions, each with group norm and leaky ReLU."""
    groups = math.gcd(c_out, 4)
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.LeakyReLU(0.1),
        nn.Conv3d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.LeakyReLU(0.1),
    )


def _decoder(chans: list[int]) -> nn.Sequential:
    """From the 4³ bottleneck up to ``S/2``: transposed-convolution upsampling and a block per level."""
    layers: list[nn.Module] = []
    for k in range(len(chans) - 1, 1, -1):
        layers += [nn.ConvTranspose3d(chans[k], chans[k - 1], 2, stride=2), nn.LeakyReLU(0.1),
                   _block(chans[k - 1], chans[k - 1])]
    layers.append(nn.Conv3d(chans[1], 1, 1))
    return nn.Sequential(*layers)


class CdiNet(nn.Module):
    """3D encoder with two decoders: diffraction amplitude ``(B, 1, S, S, S)`` → object amplitude and phase.

    The encoder halves the grid ``log2(S) - 2`` times down to 4³ (channels ``width``, ``2·width``,
    ... at most ``8·width``); each decoder doubles it back up to ``S/2``. The amplitude decoder
    ends in a sigmoid (amplitude in (0, 1)), the phase decoder in ``π·tanh``. Every input is
    divided by its maximum first, so any scale of ``√I`` may be given.

    Parameters
    ----------
    size : int
        ``S``, the input size: a power of two ≥ 16.
    width : int
        Channels of the first level (≥ 1).

    Raises
    ------
    InputError
        A bad ``size`` or ``width``.

    Examples
    --------
    >>> net = CdiNet(16, width=2)
    >>> amp, phase = net(torch.ones(1, 1, 16, 16, 16))
    >>> tuple(amp.shape), tuple(phase.shape)
    ((1, 8, 8, 8), (1, 8, 8, 8))
    """

    def __init__(self, size: int = 32, width: int = 8) -> None:
        super().__init__()
        self.size = check_size(size)
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
            raise InputError(f"width must be a positive number of channels, got {width!r}")
        self.width = int(width)
        depth = int(math.log2(self.size)) - 2
        chans = [min(self.width * 2 ** k, 8 * self.width) for k in range(depth + 1)]
        layers: list[nn.Module] = [_block(1, chans[0])]
        for k in range(1, depth + 1):
            layers += [nn.MaxPool3d(2), _block(chans[k - 1], chans[k])]
        self.encoder = nn.Sequential(*layers)
        self.amplitude = _decoder(chans)
        self.phase = _decoder(chans)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Amplitude in (0, 1) and phase in (-π, π), each ``(B, S/2, S/2, S/2)``."""
        s = self.size
        if x.ndim != 5 or tuple(x.shape[1:]) != (1, s, s, s):
            raise InputError(f"the CDI CNN takes amplitudes of shape (batch, 1, {s}, {s}, {s}), "
                             f"got {tuple(x.shape)}")
        peak = x.flatten(1).amax(dim=1).clamp_min(1e-12)
        features = self.encoder(x / peak.view(-1, 1, 1, 1, 1))
        amp = torch.sigmoid(self.amplitude(features))[:, 0]
        phase = math.pi * torch.tanh(self.phase(features))[:, 0]
        return amp, phase


# --- pre-training -------------------------------------------------------------------------------

def _twin(objects: torch.Tensor) -> torch.Tensor:
    """The twin of ``(B, 2, H, H, H)`` objects, ``conj(obj(-r))``: same intensity (origin at ``H // 2``)."""
    flipped = torch.roll(torch.flip(objects, dims=DIMS), shifts=(1, 1, 1), dims=DIMS)
    return torch.stack([flipped[:, 0], -flipped[:, 1]], dim=1)


def _pair_loss(amp: torch.Tensor, phase: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample loss: amplitude MSE + ``1 - |Σ w·exp(i(φ - φ_true))| / Σ w``, with ``w`` the true amplitude.

    The phase term is the least mean ``|exp(iφ) - exp(i(φ_true + c))|² / 2`` over a global
    offset ``c``: it does not change with the phase's offset.
    """
    true_amp, true_phase = target[:, 0], target[:, 1]
    l_amp = ((amp - true_amp) ** 2).flatten(1).mean(dim=1)
    d = phase - true_phase
    w = true_amp.flatten(1)
    re = (w * torch.cos(d).flatten(1)).sum(dim=1)
    im = (w * torch.sin(d).flatten(1)).sum(dim=1)
    coherence = torch.sqrt(re ** 2 + im ** 2 + 1e-12) / w.sum(dim=1).clamp_min(1e-12)
    return l_amp + (1.0 - coherence)


def pair_loss(amp: torch.Tensor, phase: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The pre-training loss of a batch: mean over samples of the lesser loss against the object and its twin.

    Parameters
    ----------
    amp, phase : torch.Tensor
        The network's outputs, ``(B, H, H, H)``.
    target : torch.Tensor
        True objects ``(B, 2, H, H, H)`` (amplitude, phase).

    Returns
    -------
    torch.Tensor
        A scalar: amplitude MSE plus the offset-invariant, amplitude-weighted phase misfit.
    """
    both = torch.stack([_pair_loss(amp, phase, target), _pair_loss(amp, phase, _twin(target))])
    return both.amin(dim=0).mean()


def _split(n: int) -> tuple[slice, slice, slice]:
    """Training (80 %), validation (10 %, early stopping) and held-out test (10 %) ranges."""
    n_hold = max(1, n // 10)
    n_train = n - 2 * n_hold
    if n_train < 1:
        raise InputError(f"n={n} training pairs are too few to split into training, validation and test; "
                         "use at least 3 (thousands for a useful model)")
    return slice(0, n_train), slice(n_train, n_train + n_hold), slice(n_train + n_hold, n)


def _mean_loss(model: CdiNet, x: torch.Tensor, y: torch.Tensor, batch: int, device: str) -> float:
    model.eval()
    total = 0.0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            amp, phase = model(x[i:i + batch].to(device))
            total += float(pair_loss(amp, phase, y[i:i + batch].to(device))) * len(x[i:i + batch])
    return total / len(x)


def _weights_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def _content_id(size: int, width: int, weights_sha: str) -> str:
    h = hashlib.sha256(json.dumps({"kind": KIND, "size": size, "width": width}, sort_keys=True).encode())
    h.update(weights_sha.encode())
    return "cdicnn-" + h.hexdigest()[:16]


def pretrain(out_url: str, *, n: int = 2000, size: int = 32, epochs: int = 30, batch: int = 16, lr: float = 1e-3,
             width: int = 8, seed: int = 0, patience: int = 5, device: str = "auto") -> str:
    """Pre-train a :class:`CdiNet` on simulated pairs and write its registry entry at ``out_url``.

    ``n`` pairs (:func:`training_pairs`, noisy) are split into training (80 %), validation
    (10 %: early stopping, the best epoch's weights are kept) and held-out test (10 %). Adam
    with learning rate ``lr`` minimises :func:`pair_loss`; one INFO line per epoch gives the
    epoch, the training and validation loss and its seconds. Whatever was at ``out_url`` is
    removed first; a failed run leaves nothing there.

    Parameters
    ----------
    out_url : str
        Destination folder (any fsspec URL).
    n : int
        Simulated pairs in all.
    size : int
        Input size ``S`` (a power of two ≥ 16); the object grid is ``S/2``.
    epochs, batch, lr : int, int, float
        Maximum epochs, batch size, Adam learning rate.
    width : int
        Channels of the network's first level.
    seed : int
        Seed of the pairs, the initial weights and the batch order.
    patience : int
        Stop after this many epochs without a better validation loss.
    device : {"auto", "cpu", "cuda", "cuda:N"}
        CUDA where it works, else the CPU (:func:`xrdscale.runtime.devices.resolve_device`).

    Returns
    -------
    str
        The entry's content id.

    Raises
    ------
    InputError
        A bad size, width, n, epochs, batch, lr or patience.
    """
    check_size(size)
    for name, value in (("epochs", epochs), ("batch", batch), ("patience", patience)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
        raise InputError(f"lr must be a positive learning rate, got {lr!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise InputError(f"n must be a number of training pairs, got {n!r}")
    train_sl, val_sl, test_sl = _split(int(n))
    dev = resolve_device(device, what="cdi train-cnn")

    def body() -> str:
        return _pretrain(out_url, n=int(n), size=int(size), epochs=int(epochs), batch=int(batch), lr=float(lr),
                         width=int(width), seed=int(seed), patience=int(patience), device=dev,
                         splits=(train_sl, val_sl, test_sl))

    return guarded(out_url, body)


def _pretrain(out_url: str, *, n: int, size: int, epochs: int, batch: int, lr: float, width: int, seed: int,
              patience: int, device: str, splits: tuple[slice, slice, slice]) -> str:
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    x_all, y_all = training_pairs(n, size, rng=rng)
    logger.info("simulated %d training pairs of %d³ in %.1f s", n, size, time.perf_counter() - t0)
    x, y = torch.from_numpy(x_all), torch.from_numpy(y_all)
    train_sl, val_sl, test_sl = splits
    xt, yt = x[train_sl], y[train_sl]
    cuda = [] if device == "cpu" else [torch.device(device).index or torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        model = CdiNet(size, width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state, bad = math.inf, None, 0
    curves: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "epoch_seconds": []}
    logger.info("training a CDI CNN (size %d, width %d, %d parameters) on %s: %d training, %d validation pairs",
                size, width, sum(p.numel() for p in model.parameters()), device, len(xt), val_sl.stop - val_sl.start)
    for epoch in range(epochs):
        t0 = time.perf_counter()
        model.train()
        total = 0.0
        order = torch.from_numpy(rng.permutation(len(xt)))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            amp, phase = model(xt[idx].to(device))
            loss = pair_loss(amp, phase, yt[idx].to(device))
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        val = _mean_loss(model, x[val_sl], y[val_sl], batch, device)
        seconds = time.perf_counter() - t0
        curves["train_loss"].append(total / len(xt))
        curves["val_loss"].append(val)
        curves["epoch_seconds"].append(seconds)
        if val < best - 1e-6:
            best, bad = val, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        stop = bad >= patience and epoch + 1 < epochs
        logger.info("cdi cnn: epoch %d/%d, loss %.4f, val %.4f, %.1f s%s", epoch + 1, epochs, total / len(xt), val,
                    seconds, f"; stopped early (no better val in {patience} epochs)" if stop else "")
        if stop:
            break
    model = model.cpu()
    if best_state is not None:
        model.load_state_dict(best_state)
    test = _mean_loss(model, x[test_sl], y[test_sl], batch, "cpu")
    config = {"n": n, "size": size, "epochs": epochs, "batch": batch, "lr": lr, "width": width, "seed": seed,
              "patience": patience, "device": device, "photons": list(PHOTONS), "max_phase": MAX_PHASE,
              "split": [train_sl.stop, val_sl.stop, test_sl.stop]}
    metrics = {"val_loss": best, "test_loss": test, "epochs_run": len(curves["val_loss"]), "curves": curves}
    return _write_entry(out_url, model, config=config, metrics=metrics)


def _write_entry(url: str, model: CdiNet, *, config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Write weights, ``model.json`` and the completion marker (last) at ``url``; return the id."""
    weights = _weights_bytes(model)
    sha = hashlib.sha256(weights).hexdigest()
    entry_id = _content_id(model.size, model.width, sha)
    storage.write_bytes(storage.join(url, WEIGHTS), weights)
    doc = {"format": FORMAT, "kind": KIND, "stage": KIND, "id": entry_id, "size": model.size, "width": model.width,
           "weights": WEIGHTS, "weights_sha256": sha, "config": config, "metrics": metrics,
           "xrdscale_version": __version__, "provenance": storage.provenance(KIND, config)}
    storage.write_bytes(storage.join(url, "model.json"), json.dumps(doc, indent=1, default=float).encode())
    storage.mark_complete(url, {"stage": KIND, "id": entry_id})
    logger.info("wrote CDI CNN %s (held-out loss %.4f) to %s", entry_id, metrics["test_loss"], storage.redact(url))
    return entry_id


def load_model(url: str) -> tuple[CdiNet, dict[str, Any]]:
    """The network of the registry entry at ``url`` (on the CPU, eval mode) and its ``model.json``.

    Raises
    ------
    StorageError
        Nothing at ``url``.
    IncompleteStoreError
        The entry has no completion marker (its training was interrupted or failed).
    InputError
        Not a CDI CNN entry, or its weights are missing, do not match their sha256 or do not load.
    """
    name = storage.redact(url)
    if not storage.exists(url):
        raise StorageError(f"no CDI CNN at {name}; check the URL or {_TRAIN_HINT}")
    if not storage.is_complete(url):
        raise IncompleteStoreError(f"CDI CNN {name} is a partial registry entry (no {storage.MARKER} marker): its "
                                   f"training was interrupted or failed; {_TRAIN_HINT}")
    try:
        doc = json.loads(storage.read_bytes(storage.join(url, "model.json")))
        if not isinstance(doc, dict):
            raise ValueError("model.json is not a JSON object")
        if doc.get("kind") != KIND or doc.get("format") != FORMAT:
            raise ValueError(f"kind {doc.get('kind', doc.get('stage'))!r}, format {doc.get('format')!r}; expected "
                             f"kind {KIND!r}, format {FORMAT}")
        size, width, rel, sha = int(doc["size"]), int(doc["width"]), str(doc["weights"]), str(doc["weights_sha256"])
    except (StorageError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{name} is not a CDI CNN entry ({exc}): {_TRAIN_HINT}") from exc
    try:
        data = storage.read_bytes(storage.join(url, rel))
    except StorageError as exc:
        raise InputError(f"CDI CNN {name} is corrupt: its weights file {rel} is missing ({exc}); "
                         f"copy the entry again or {_TRAIN_HINT}") from exc
    if hashlib.sha256(data).hexdigest() != sha:
        raise InputError(f"CDI CNN {name} is corrupt: {rel} does not match its sha256 in model.json; "
                         f"copy the entry again or {_TRAIN_HINT}")
    model = CdiNet(size, width)
    try:
        model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    except Exception as exc:  # torch raises RuntimeError/UnpicklingError/KeyError for bad files
        raise InputError(f"CDI CNN {name}: {rel} cannot be loaded ({exc}); {_TRAIN_HINT}") from exc
    return model.eval(), {**doc, "url": name}


# --- per-pattern refinement ---------------------------------------------------------------------

def _check_pattern(intensity: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """The intensity (float64, 3D, ≥ 0) and the measured-voxel map (True where measured)."""
    data = np.asarray(intensity)
    if data.ndim != 3 or not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise InputError(f"the intensity must be a real 3D array, got {data.dtype} of shape {data.shape}")
    data = data.astype(np.float64)
    measured = np.ones(data.shape, dtype=bool)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != data.shape:
            raise InputError(f"the mask has shape {m.shape} but the intensity {data.shape}; give a mask of the "
                             "intensity's shape (True where a voxel is not measured)")
        measured &= ~m.astype(bool)
    finite = np.isfinite(data)
    if np.any(finite & (data < 0) & measured):
        raise InputError("the intensity has negative values; subtract the background with clipping at 0, or mask them")
    measured &= finite
    if not np.any(data[measured] > 0):
        raise InputError("the intensity is zero (or masked) everywhere: there is nothing to phase")
    return np.where(measured, data, 0.0), measured


def _modulus_loss(mod: torch.Tensor, amplitude: torch.Tensor, measured: torch.Tensor) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """Normalised misfit ``Σ_m (a·mod - A)² / Σ_m A²`` with the best scale ``a``; returns (loss, a)."""
    w = measured.to(mod.dtype)
    scale = (w * mod * amplitude).sum() / (w * mod ** 2).sum().clamp_min(1e-30)
    loss = (w * (scale * mod - amplitude) ** 2).sum() / (w * amplitude ** 2).sum()
    return loss, scale


def modulus_error(obj: np.ndarray, intensity: np.ndarray, *, mask: np.ndarray | None = None) -> float:
    """The Fourier-modulus misfit of an object on the data grid: ``Σ_m (a|F| - √I)² / Σ_m I``.

    ``F = forward(obj)``; the sums run over the measured voxels (``mask`` False), ``a`` is the
    scale that fits best (so the misfit does not depend on the object's scale). 0 is a perfect
    fit; an object of zero Fourier modulus has misfit 1.

    Parameters
    ----------
    obj : numpy.ndarray
        Complex object of the intensity's shape.
    intensity : numpy.ndarray
        Measured intensity (3D).
    mask : numpy.ndarray, optional
        True where a voxel is not measured.

    Returns
    -------
    float
    """
    data, measured = _check_pattern(intensity, mask)
    o = np.asarray(obj)
    if o.shape != data.shape:
        raise InputError(f"the object has shape {o.shape} but the intensity {data.shape}")
    f = forward(torch.from_numpy(o.astype(np.complex128)))
    loss, _ = _modulus_loss(f.abs(), torch.from_numpy(np.sqrt(data)), torch.from_numpy(measured))
    return float(loss)


def refine(model: CdiNet, intensity: np.ndarray, *, mask: np.ndarray | None = None, epochs: int = 200,
           lr: float = 1e-3, device: str = "auto") -> np.ndarray:
    """Refine the network on one pattern (transfer learning) and return its object on the data's grid.

    **Resampling.** The network takes ``S³`` (``S = model.size``). The central ``S³`` of the
    intensity (around index ``n // 2``, the Bragg peak of the package's convention) is cut out;
    along an axis shorter than ``S`` it is zero-padded and the padding counts as not measured.
    Cutting Fourier space keeps the oversampling (the object still fits in the central
    ``(S/2)³``) and gives a lower-resolution view: real-space voxels ``n/S`` times larger.
    Non-finite voxels count as not measured.

    **Refinement.** A copy of the network (``model`` itself is not changed) is trained with Adam
    for ``epochs`` steps on this one pattern, minimising the Fourier-modulus misfit
    ``Σ_m (a|forward(obj)| - √I)² / Σ_m I`` over the measured voxels ``m`` of the ``S³`` cut,
    where ``obj`` is the predicted object zero-padded from ``(S/2)³`` to ``S³`` and ``a`` the
    best-fitting scale. The object of the lowest misfit is kept (``epochs=0``: the pre-trained
    network's prediction). The misfit at the start and at the end is logged.

    **Back to the data grid.** ``F = a·forward(obj)`` (``S³``, in the intensity's units) is
    zero-padded (or cut, along axes shorter than ``S``) to the intensity's shape around its
    centre and transformed back: the returned object is the band-limited (sinc) interpolation of
    the prediction onto the data's voxels, and ``forward(object)`` equals ``a·forward(obj)`` on
    the central ``S³`` (≈ ``√I`` there) and 0 outside, ready to start phase retrieval on the
    full pattern.

    Parameters
    ----------
    model : CdiNet
        A pre-trained network (:func:`load_model`).
    intensity : numpy.ndarray
        Measured 3D intensity, Bragg peak at the array centre.
    mask : numpy.ndarray, optional
        Boolean, True where a voxel is not measured (left out of the misfit).
    epochs : int
        Refinement steps (≥ 0).
    lr : float
        Adam learning rate of the refinement. 1e-3 by default: on simulated 32³ crystals at 1e7
        photons (network pre-trained at 32³), 200 epochs at 1e-3 reach the noise floor (χ² ≈ 1e-3,
        phase error ≈ 0.02 rad) where 1e-4 stays at χ² ≈ 5e-3 (0.07–0.27 rad).
    device : {"auto", "cpu", "cuda", "cuda:N"}
        CUDA where it works, else the CPU.

    Returns
    -------
    numpy.ndarray
        complex64 object of the intensity's shape.

    Raises
    ------
    InputError
        An intensity that is not 3D, negative or zero everywhere; a mask of another shape; bad
        ``epochs`` or ``lr``.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise InputError(f"epochs must be a non-negative integer, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
        raise InputError(f"lr must be a positive learning rate, got {lr!r}")
    data, measured = _check_pattern(intensity, mask)
    s = model.size
    cube = (s, s, s)
    amp = resize_centred(np.sqrt(data), cube)
    seen = resize_centred(measured, cube)
    peak = float(amp[seen].max()) if seen.any() else 0.0
    if peak <= 0:
        raise InputError(f"the central {s}³ of the intensity is zero (or masked) everywhere; crop the pattern "
                         "around its Bragg peak")
    dev = resolve_device(device, what="cdi cnn refine")
    x = torch.from_numpy((amp * seen / peak).astype(np.float32)).to(dev)
    m = torch.from_numpy(seen).to(dev)
    net = copy.deepcopy(model).to(dev)

    def predict() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, ph = net(x[None, None])
        a, ph = _pad_half(a[0]), _pad_half(ph[0])
        f = forward(torch.complex(a * torch.cos(ph), a * torch.sin(ph)))
        # |F| with a floor under the square root: its gradient stays finite where F = 0
        loss, scale = _modulus_loss(torch.sqrt(f.real ** 2 + f.imag ** 2 + 1e-20), x, m)
        return loss, scale, f

    t0 = time.perf_counter()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    best_loss, best_f, start = math.inf, None, math.nan
    for step in range(epochs + 1):
        if step < epochs:
            opt.zero_grad()
            loss, scale, f = predict()
        else:
            with torch.no_grad():
                loss, scale, f = predict()
        value = float(loss.detach())
        if step == 0:
            start = value
        if value < best_loss:
            best_loss, best_f = value, (scale * f).detach()
        if step < epochs:
            loss.backward()
            opt.step()
    assert best_f is not None
    logger.info("cdi cnn refine (%d³ of a %s pattern): Fourier-modulus misfit %.4f at the start, %.4f after %d "
                "epochs, %.1f s", s, "×".join(map(str, data.shape)), start, best_loss, epochs,
                time.perf_counter() - t0)
    field = resize_centred((best_f * peak).cpu().numpy().astype(np.complex128), data.shape)
    return backward(torch.from_numpy(field)).numpy().astype(np.complex64)


def cnn_guess(intensity: np.ndarray, model_url: str, *, mask: np.ndarray | None = None, epochs: int = 200,
              lr: float = 1e-3, device: str = "auto") -> np.ndarray:
    """The refined CNN prediction for one pattern: :func:`load_model` then :func:`refine`.

    Parameters
    ----------
    intensity : numpy.ndarray
        Measured 3D intensity, Bragg peak at the array centre.
    model_url : str
        A CDI CNN registry entry (``xrdscale cdi train-cnn``).
    mask : numpy.ndarray, optional
        True where a voxel is not measured.
    epochs : int
        Refinement steps.
    lr : float
        Adam learning rate of the refinement.
    device : {"auto", "cpu", "cuda", "cuda:N"}
        CUDA where it works, else the CPU.

    Returns
    -------
    numpy.ndarray
        complex64 object of the intensity's shape (see :func:`refine`).
    """
    model, _ = load_model(model_url)
    return refine(model, intensity, mask=mask, epochs=epochs, lr=lr, device=device)
