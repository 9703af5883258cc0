"""Predicting chemical maps: a ``volume`` (or ``patterns``) store through PQ-Net actors to ``maps``.

Dask reads pixel chunks of the input store (full q per chunk), each task interpolates its
patterns onto the model's q grid, checks them, sends them in batches to the Ray actors of
a :class:`~xrdscale.pqnet.serve.ServerPool` and returns mean and standard deviation. The
``maps`` store (shared/DESIGN.md) gets ``scale``, ``a``, ``c``, ``size`` with ``<name>_std``
over (phase, y, x) — or (phase, frame) for a ``patterns`` store — NaN where the model does
not predict a parameter for a phase. No pattern passes through the driver.

The same tasks compute the quality maps of :mod:`xrdscale.pqnet.quality` over the pixel dims:
``rwp`` and ``chi2`` of the pattern implied by each pixel's ensemble-mean parameters, and the
``ood`` bit mask (1 residual, 2 ensemble spread, 4 range edge; documented in its attrs). Their
reference levels come from a few hundred held-out library patterns sent through the same
actors before the maps are computed. A model whose phase library cannot be rebuilt gets no
quality maps (one warning).
"""

from __future__ import annotations

import logging
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from xrdscale.exceptions import InputError
from xrdscale.io import storage
from xrdscale.pqnet import quality as quality_
from xrdscale.pqnet.registry import open_entry
from xrdscale.pqnet.serve import ServerPool, actor_handles, predict_batches, serving

logger = logging.getLogger(__name__)

#: Map variable of each predicted parameter.
MAP_VARS = {"scale": "scale", "a": "a", "c": "c", "size_nm": "size"}
#: Patterns per actor call. ONNX Runtime's CPU arena keeps the activations of the largest batch
#: it saw: at 4,096 a 13-phase actor held 8.0 GB (1,167 patterns/s on one core), at 256 0.76 GB
#: (1,404 patterns/s). GPUs may want more (``batch=``).
DEFAULT_BATCH = 256
#: Target number of floats of one input chunk (bounds each task's memory).
CHUNK_FLOATS = 4_000_000


def interpolation(q_data: np.ndarray, q_model: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights mapping patterns on ``q_data`` linearly onto ``q_model``.

    Raises
    ------
    InputError
        The model's q range is not inside the data's (half a data step of slack).
    """
    q_data = np.asarray(q_data, dtype=np.float64)
    # the data's bins reach half a step beyond their centres; 1e-6 of a step absorbs rounding
    # (a model grid from edge to edge of the same q range as the integration must pass)
    tol = (0.5 + 1e-6) * float(np.median(np.diff(q_data))) if q_data.size > 1 else 0.0
    if q_model[0] < q_data[0] - tol or q_model[-1] > q_data[-1] + tol:
        raise InputError(
            f"the model's q grid [{q_model[0]:.4g}, {q_model[-1]:.4g}] 1/Å is not covered by the q range "
            f"[{q_data[0]:.4g}, {q_data[-1]:.4g}] 1/Å of {what}; integrate the data over a wider q range or use a "
            "model trained on a q range inside the data's")
    qm = np.clip(q_model, q_data[0], q_data[-1])
    hi = np.clip(np.searchsorted(q_data, qm), 1, q_data.size - 1)
    w = (qm - q_data[hi - 1]) / (q_data[hi] - q_data[hi - 1])
    return hi, w.astype(np.float32)


def _predict_block(block: np.ndarray, hi: np.ndarray, w: np.ndarray, names: list[str], address: str | None,
                   batch: int, what: str, quality: quality_.QualityModel | None = None, timeout: float | None = None,
                   block_info=None) -> np.ndarray:
    loc = block_info[0]["array-location"] if block_info else [(0, 0)] * block.ndim
    pix_shape = block.shape[:-1]
    x = np.asarray(block, dtype=np.float32).reshape(-1, block.shape[-1])
    x = x[:, hi - 1] * (1 - w) + x[:, hi] * w
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        idx = np.unravel_index(int(np.flatnonzero(bad)[0]), pix_shape)
        where = ", ".join(f"{d}={i + lo}" for d, i, (lo, _) in zip(("y", "x") if len(pix_shape) == 2 else ("frame",),
                                                                    idx, loc, strict=False))
        raise InputError(f"{what}: the pattern at {where} contains NaN or infinite intensities "
                         f"({int(bad.sum())} bad pattern(s) in this chunk); mask or repair them before predicting")
    handles = actor_handles(names, address)
    mean, std = predict_batches(handles, x, batch=batch, offset=int(loc[0][0]), timeout=timeout)
    parts = [mean, std]
    if quality is not None:
        parts.append(quality.assess(x, mean, std))
    out = np.concatenate(parts, axis=1).astype(np.float32)
    return out.reshape(*pix_shape, out.shape[1])


def predict(model_url: str, in_url: str, out_url: str, *, actors: int = 1, batch: int = DEFAULT_BATCH,
            engine: str = "onnx", device: str = "auto", threads: int = 1, members: int | None = None,
            pool: ServerPool | None = None, client=None, progress: bool = False,
            quality: quality_.QualitySettings | None = None) -> str:
    """Predict the ``maps`` store of a ``volume`` or ``patterns`` store with a PQ-Net ensemble.

    Parameters
    ----------
    model_url : str
        Registry entry (from :func:`xrdscale.pqnet.train.train_ensemble`).
    in_url : str
        A complete ``volume`` store (intensity (y, x, q)) or ``patterns`` store (intensity (frame, q)).
    out_url : str
        Destination ``maps`` store.
    actors : int
        Ray actors to start, each holding the whole ensemble (ignored when ``pool`` is given).
    batch : int
        Patterns per actor call.
    engine : {"onnx", "torch"}
        Inference engine of the actors.
    device : {"auto", "cpu", "cuda"}
        Actor device (``auto``: one GPU per actor when Ray has GPUs).
    threads : int
        CPU threads per actor.
    members : int, optional
        Use the first ``members`` members of the ensemble (default: all; ignored with ``pool``).
    pool : ServerPool, optional
        Already running actors for this model (they are left running).
    client : distributed.Client, optional
        Dask client; the current/default scheduler otherwise.
    progress : bool
        Show progress (a bar in a terminal, else a log line every few seconds).
    quality : QualitySettings, optional
        Thresholds of the ``ood`` flag (defaults of :class:`~xrdscale.pqnet.quality.QualitySettings`).

    Returns
    -------
    str
        ``out_url``.

    Examples
    --------
    >>> predict("models/nca", "work/c1/volume.zarr", "work/c1/maps.zarr", actors=2)  # doctest: +SKIP
    """
    from xrdscale.stages.base import guarded, write_output

    entry = open_entry(model_url)
    options = {"actors": actors, "engine": engine, "device": device, "threads": threads, "members": members}

    def body() -> str:
        ds = storage.open_store(in_url)
        with serving(model_url, pool, **options) as served:
            maps = predict_maps(ds, entry, served, batch=batch, what=storage.redact(in_url), quality=quality)
            maps.attrs.update(model=storage.redact(model_url), source=storage.redact(in_url))
            config = {"model": storage.redact(model_url), "model_id": entry.id, "input": storage.redact(in_url),
                      "actors": len(served.names), "batch": batch, "engine": engine, "device": served.device,
                      "ensemble": served.members}
            return write_output(maps, out_url, kind="maps", config=config, client=client, progress=progress,
                                label="predict", marker={"model_id": entry.id})

    return guarded(out_url, body)


def predict_maps(ds: xr.Dataset, entry, pool: ServerPool, *, batch: int = DEFAULT_BATCH, what: str = "input",
                 quality: quality_.QualitySettings | bool | None = None, phases=None, library=None) -> xr.Dataset:
    """The lazy ``maps`` Dataset of a ``volume`` or ``patterns`` Dataset, from the actors of ``pool``.

    Compute it while ``pool`` runs. ``attrs`` name the model and the ensemble size used.

    Parameters
    ----------
    ds : xarray.Dataset
        A ``volume`` or ``patterns`` Dataset.
    entry : ModelEntry
        The registry entry ``pool`` serves.
    pool : ServerPool
        Running actors.
    batch : int
        Patterns per actor call.
    what : str
        The input, as named in error messages.
    quality : QualitySettings or bool, optional
        Thresholds of the ``ood`` flag (None or True: the defaults); False: no quality maps.
    phases : mapping, optional
        Phase objects for structures the entry's phase library cannot build from its text.
    library : PhaseLibrary, optional
        The model's phase library loaded from its own folder (its relative paths resolve).

    Raises
    ------
    InputError
        No ``intensity(…, q)``, other dims, or a q range that does not cover the model's.
    """
    stage = ds.attrs.get("stage")
    if "intensity" not in ds or "q" not in ds.coords:
        raise InputError(f"{what} ({stage!r} store) has no intensity(…, q); give a volume "
                         "(y, x, q) or patterns (frame, q) store")
    inten = ds["intensity"]
    pix_dims = inten.dims[:-1]
    if inten.dims[-1] != "q" or pix_dims not in (("y", "x"), ("frame",)):
        raise InputError(f"{what}: intensity has dims {inten.dims}; expected (y, x, q) or (frame, q)")
    what = f"{stage or 'input'} store {what}"
    hi, w = interpolation(ds["q"].values, entry.q, what)
    arr = inten.data
    nq = arr.shape[-1]
    per = max(1, CHUNK_FLOATS // nq)
    if len(pix_dims) == 2:
        rows = max(1, per // arr.shape[1])
        arr = arr.rechunk((min(rows, arr.shape[0]), arr.shape[1] if rows > 1 else min(per, arr.shape[1]), nq))
    else:
        arr = arr.rechunk((min(per, arr.shape[0]), nq))
    routes = entry.spec.routes
    qm = None
    timeout = getattr(pool, "timeout", None)
    if quality is not False:
        settings = quality if isinstance(quality, quality_.QualitySettings) else None
        handles = actor_handles(pool.names, pool.address)
        qm = quality_.calibrate(entry, lambda x: predict_batches(handles, x, batch=batch, timeout=timeout),
                                phases=phases,
                                library=library,
                                settings=settings)
    n_out = 2 * len(routes) + (len(quality_.CHANNELS) if qm is not None else 0)
    pred = da.map_blocks(_predict_block, arr, hi, w, pool.names, pool.address, batch, what, qm, timeout,
                         dtype=np.float32, chunks=(*arr.chunks[:-1], (n_out,)))
    maps = _assemble(pred, routes, entry.spec.phases, pix_dims, ds)
    if qm is not None:
        maps = _with_quality(maps, pred[..., 2 * len(routes):], pix_dims, qm)
    maps.attrs.update(model_id=entry.id, source_stage=stage or "", ensemble=int(pool.members))
    _mark_weak(maps, entry)
    return maps


def _mark_weak(maps: xr.Dataset, entry: Any) -> None:
    """``weakly_determined`` attrs: the model's outputs whose bound is below 0.9, and per variable their phases."""
    from xrdscale.pqnet.identifiability import weakly_determined

    weak = weakly_determined(entry)
    maps.attrs["weakly_determined"] = weak
    for output in weak:
        phase, _, param = output.rpartition(".")
        var = "size" if param == "size_nm" else param
        for name in (var, f"{var}_std"):
            if name in maps.data_vars:
                maps[name].attrs["weakly_determined"] = [*maps[name].attrs.get("weakly_determined", []), phase]


def _with_quality(maps: xr.Dataset, q: da.Array, pix_dims, qm: quality_.QualityModel) -> xr.Dataset:
    """Add ``rwp``, ``chi2`` and ``ood`` (pixel dims) from the quality channels of the prediction array."""
    maps = maps.assign(rwp=(pix_dims, q[..., 0]), chi2=(pix_dims, q[..., 1]),
                       ood=(pix_dims, q[..., 2].astype(np.uint8)))
    maps["rwp"].attrs.update(long_name="weighted profile R factor of the implied pattern",
                             description="sqrt(sum w (y - yhat)^2 / sum w y^2), yhat the pattern model at the "
                                         "ensemble-mean parameters plus a least-squares Chebyshev background")
    maps["chi2"].attrs.update(long_name="reduced chi-squared of the implied pattern",
                              description="sum w (y - yhat)^2 / (N - P), P = outputs + background terms")
    bits = sorted(quality_.OOD_BITS)
    maps["ood"].attrs.update(long_name="out-of-distribution bit mask", flag_masks=bits,
                             flag_meanings=" ".join(quality_.OOD_BITS[b] for b in bits),
                             description="1: rwp above k sqrt(R_exp^2 + R_model^2 + R_art^2); 2: ensemble std "
                                         "above its held-out level; 4: a lattice parameter or size at or beyond the "
                                         "edge of its training range (see xrdscale.pqnet.quality)")
    maps.attrs.update(qm.attrs())
    return maps


def _assemble(pred, routes, phases, pix_dims, ds) -> xr.Dataset:
    """Turn the (…, 2R) prediction array into the maps variables (phase, …)."""
    n_routes = len(routes)
    index = {r: j for j, r in enumerate(routes)}
    nan = da.full(pred.shape[:-1], np.nan, dtype=np.float32, chunks=pred.chunks[:-1])
    data = {}
    for param, var in MAP_VARS.items():
        for suffix, off in (("", 0), ("_std", n_routes)):
            layers = [pred[..., index[(p, param)] + off] if (p, param) in index else nan for p in phases]
            data[var + suffix] = (("phase", *pix_dims), da.stack(layers, axis=0))
    coords = {"phase": list(phases)}
    for name, c in ds.coords.items():
        if name != "q" and set(c.dims) <= set(pix_dims):
            coords[name] = c
    return xr.Dataset(data, coords=coords)
