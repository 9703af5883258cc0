"""Azimuthal integration of raw frames into the ``patterns`` store, chunk-wise on Dask.

The Dask graph has one task per chunk of frames (``frames_per_chunk``, default 64). A
task opens the raw file, reads its frames one at a time and integrates each with a pyFAI
``AzimuthalIntegrator`` that every worker process builds once from the PONI text (and
mask) and reuses for all its tasks (:func:`integrator`, an LRU cache keyed by the
integration settings). A worker therefore holds one frame, one integrator and one chunk
of 1D patterns, whatever the length of the dataset.

Methods (pyFAI calls, unit ``q_A^-1``, solid-angle and polarisation corrections,
``normalization_factor`` = I0 of the frame):

- ``trimmed_mean``: ``medfilt1d_ng(percentile=(10, 90))`` — the mean of the azimuthal
  values between the 10th and 90th percentiles (the 20 % trimmed mean);
- ``mean``: ``integrate1d``;
- ``sigma_clip``: ``sigma_clip_ng(error_model="azimuthal", thres=…)``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import dask
import dask.array as da
from dask.array.core import normalize_chunks
from dask.highlevelgraph import HighLevelGraph
import numpy as np
import xarray as xr

from xrdscale.io import frames as rawframes
from xrdscale.io import storage
from xrdscale.exceptions import ConfigError, InputError, StorageError, XrdscaleError

logger = logging.getLogger(__name__)

METHODS = ("trimmed_mean", "mean", "sigma_clip")
UNIT = "q_A^-1"


@dataclass(frozen=True)
class IntegratorSpec:
    """Everything a worker needs to build (and cache) its integrator and call it.

    Small and hashable: it travels with every task and keys the per-worker cache.
    """

    poni: str
    mask_url: str | None
    mask_sha256: str | None
    frame_shape: tuple[int, int]
    npt: int
    q_range: tuple[float, float]
    method: str
    percentile: tuple[float, float]
    polarization_factor: float | None
    sigma_clip_threshold: float


def _load_poni(poni_text: str):
    import pyFAI

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "geometry.poni")
        with open(path, "w") as f:
            f.write(poni_text)
        return pyFAI.load(path)


def _load_mask(url: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask image (any fabio format, or .npy) as a boolean array, True = masked."""
    import fabio

    data = storage.read_bytes(url)
    if url.lower().endswith(".npy"):
        import io

        arr = np.load(io.BytesIO(data))
    else:
        suffix = "".join(os.path.basename(url).partition(".")[1:])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "mask" + suffix)
            with open(path, "wb") as f:
                f.write(data)
            try:
                arr = np.asarray(fabio.open(path).data)
            except Exception as exc:
                raise InputError(f"mask {storage.redact(url)} cannot be read by fabio ({exc}); give an EDF/TIFF/"
                                 "CBF/NPY image with nonzero = masked") from exc
    if shape is not None and arr.shape != tuple(shape):
        raise InputError(f"mask {storage.redact(url)} has shape {arr.shape} but the frames are {tuple(shape)}; "
                         "give the mask of this detector")
    return arr != 0


def integrator(spec: IntegratorSpec):
    """Return ``(ai, mask)`` for ``spec``, built once per worker thread and reused.

    ``mask`` combines the detector's own mask with the user mask (True = masked). One
    pyFAI integrator is not safe to call from two threads at once (its engines keep
    per-call buffers), so each thread of a worker gets its own; a distributed worker
    with ``threads_per_worker=1`` builds exactly one.
    """
    return _build_integrator(spec, threading.get_ident())


#: Serialises the building of integrators within a process: pyFAI's first call computes and
#: caches geometry arrays with code that aborted the process when two threads ran it at once.
_BUILD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=8)
def _build_integrator(spec: IntegratorSpec, thread: int):
    with _BUILD_LOCK:
        ai = _load_poni(spec.poni)
        mask = _combined_mask(ai, spec.frame_shape, spec.mask_url)
        # The combined mask becomes this integrator's detector mask: pyFAI then takes it as
        # known instead of checksumming (and, for medfilt1d_ng, re-combining) a user mask
        # on every frame, which cost ~9 % of a trimmed-mean frame.
        ai.detector.mask = mask.astype(np.int8)
        # one call on an empty frame builds and caches the geometry arrays and the engine
        integrate_frame(ai, np.zeros(spec.frame_shape, dtype=np.float32), spec, 1.0)
    logger.debug("built integrator for %s on pid %d", spec.method, os.getpid())
    return ai, mask


def _combined_mask(ai, shape: tuple[int, int], mask_url: str | None) -> np.ndarray:
    """The detector's own mask OR the user's mask at ``mask_url`` (True = masked)."""
    combined = np.zeros(shape, dtype=bool)
    if ai.detector.mask is not None and ai.detector.mask.shape == tuple(shape):
        combined |= ai.detector.mask.astype(bool)
    if mask_url is not None:
        combined |= _load_mask(mask_url, shape)
    return combined


def integrate_frame(ai, frame: np.ndarray, spec: IntegratorSpec, monitor: float):
    """Integrate one frame with pyFAI exactly as the stage does; returns pyFAI's result object.

    The mask is the integrator's detector mask, which :func:`integrator` sets to the
    combined detector and user mask.
    """
    common = dict(unit=UNIT, radial_range=spec.q_range, polarization_factor=spec.polarization_factor,
                  correctSolidAngle=True, normalization_factor=float(monitor))
    if spec.method == "trimmed_mean":
        return ai.medfilt1d_ng(frame, spec.npt, percentile=spec.percentile, **common)
    if spec.method == "sigma_clip":
        return ai.sigma_clip_ng(frame, spec.npt, error_model="azimuthal", thres=spec.sigma_clip_threshold, **common)
    return ai.integrate1d(frame, spec.npt, **common)


def _check_frame(frame: np.ndarray, mask: np.ndarray, source: rawframes.RawSource, index: int) -> None:
    if frame.shape != source.frame_shape:
        raise InputError(f"{source.name}: frame {index} has shape {frame.shape}, expected {source.frame_shape} "
                         "like the other frames and the detector")
    kind = frame.dtype.kind
    if kind in "iu" and (kind == "u" or frame.min() >= 0):
        return
    if kind == "f" and np.isfinite(frame.sum()) and frame.min() >= 0:
        return
    bad = ~mask & ~(frame >= 0)  # negative or NaN, at unmasked pixels
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        y, x = np.argwhere(bad)[0]
        raise InputError(f"{source.name}: frame {index} has {n_bad} unmasked pixel(s) with negative or NaN counts "
                         f"(first at y={y}, x={x}: {frame[y, x]}); add them to the mask (--mask) or check the "
                         "detector")


def _integrate_block(start: int, monitor: np.ndarray, *, source: rawframes.RawSource,
                     spec: IntegratorSpec) -> np.ndarray:
    """Integrate frames ``start`` to ``start + monitor.size - 1`` → ``(frames, npt)`` float32."""
    out = np.empty((monitor.size, spec.npt), dtype=np.float32)
    if monitor.size == 0:
        return out
    ai, mask = integrator(spec)
    for i, frame in rawframes.read_frames(source, start, start + monitor.size):
        _check_frame(frame, mask, source, i)
        res = integrate_frame(ai, frame, spec, monitor[i - start])
        if not np.any(res.count > 0):
            raise InputError(f"{source.name}: frame {i} has no valid pixel in q range {spec.q_range} (every pixel "
                             "is masked); check the mask, the q range and the frame")
        out[i - start] = res.intensity
    return out


def resolve_spec(scan: rawframes.RawScan, *, poni: str, mask: str | None = None, npt: int = 1000,
                 q_range: Sequence[float] | None = None, method: str = "trimmed_mean",
                 percentile: Sequence[float] = (10, 90), polarization_factor: float | None = 0.99,
                 sigma_clip_threshold: float = 5.0) -> IntegratorSpec:
    """Validate the integration settings against the dataset and return the task spec.

    Parameters
    ----------
    scan : RawScan
        The opened raw dataset.
    poni : str
        URL of the pyFAI PONI file.
    mask, npt, q_range, method, percentile, polarization_factor, sigma_clip_threshold
        As in :func:`integrate`.

    Raises
    ------
    ConfigError
        An unknown method, a bad npt, percentile or q range.
    InputError
        The frames do not match the PONI's detector or the mask, or the mask leaves no pixel.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown integration method {method!r}; choose one of {', '.join(METHODS)}")
    if int(npt) < 2:
        raise ConfigError(f"npt={npt}: the number of q bins must be at least 2")
    lo_p, hi_p = (float(p) for p in percentile)
    if not 0 <= lo_p < hi_p <= 100:
        raise ConfigError(f"percentile={tuple(percentile)}: expected two values 0 <= low < high <= 100")
    poni_text = storage.read_bytes(poni).decode()
    try:
        ai = _load_poni(poni_text)
    except Exception as exc:
        raise InputError(f"PONI file {storage.redact(poni)} cannot be read by pyFAI ({exc}); give a pyFAI .poni") from exc
    shape = scan.source.frame_shape
    det_shape = ai.detector.shape
    if det_shape is not None and tuple(det_shape) != tuple(shape):
        raise InputError(f"{scan.source.name}: frames are {shape} pixels but the PONI {storage.redact(poni)} "
                         f"describes a {ai.detector.name} detector of {tuple(det_shape)}; use the PONI of this "
                         "detector (or check the binning)")
    combined = _combined_mask(ai, shape, mask)
    mask_sha = None if mask is None else hashlib.sha256(storage.read_bytes(mask)).hexdigest()
    if combined.all():
        raise InputError(f"the mask leaves no valid pixel of {scan.source.name}; check the mask file")
    qvalid = _pixel_q(ai, combined)
    if q_range is None:
        q_range = (float(qvalid.min()), float(qvalid.max()))
    lo, hi = (float(v) for v in q_range)
    if not lo < hi:
        raise ConfigError(f"q_range={tuple(q_range)}: expected LOW < HIGH in 1/Å")
    if hi < qvalid.min() or lo > qvalid.max():
        raise InputError(f"q range [{lo}, {hi}] 1/Å is outside the detector's coverage "
                         f"[{qvalid.min():.4g}, {qvalid.max():.4g}] 1/Å for {scan.source.name}; every pixel would "
                         "be masked — choose a q range the detector covers")
    return IntegratorSpec(poni=poni_text, mask_url=mask, mask_sha256=mask_sha, frame_shape=tuple(shape),
                          npt=int(npt), q_range=(lo, hi), method=method, percentile=(lo_p, hi_p),
                          polarization_factor=polarization_factor, sigma_clip_threshold=float(sigma_clip_threshold))


def _pixel_q(ai, masked: np.ndarray, max_points: int = 250_000) -> np.ndarray:
    """q (1/Å) at the centres of the unmasked pixels, on a sub-grid of at most ~``max_points``."""
    stride = max(1, int(np.ceil(np.sqrt(masked.size / max_points))))
    rows = np.unique(np.r_[np.arange(0, masked.shape[0], stride), masked.shape[0] - 1])
    cols = np.unique(np.r_[np.arange(0, masked.shape[1], stride), masked.shape[1] - 1])
    keep = ~masked[np.ix_(rows, cols)]
    d1, d2 = np.meshgrid(rows, cols, indexing="ij")  # qFunction takes pixel indices (centres)
    q = ai.qFunction(d1[keep], d2[keep]) / 10.0  # pyFAI works in 1/nm
    if q.size == 0:  # the sub-grid missed the few valid pixels: use them all
        d1, d2 = np.nonzero(~masked)
        q = ai.qFunction(d1, d2) / 10.0
    return q


def q_centres(spec: IntegratorSpec) -> np.ndarray:
    """The q bin centres pyFAI uses for ``spec`` (uniform bins over ``q_range``)."""
    lo, hi = spec.q_range
    return lo + (np.arange(spec.npt) + 0.5) * ((hi - lo) / spec.npt)


def patterns_dataset(scan: rawframes.RawScan, spec: IntegratorSpec, *, frames_per_chunk: int = 64) -> xr.Dataset:
    """Build the lazy ``patterns`` Dataset of ``scan`` (nothing is read or integrated yet).

    Parameters
    ----------
    scan : RawScan
        The opened raw dataset.
    spec : IntegratorSpec
        From :func:`resolve_spec`.
    frames_per_chunk : int
        Frames per task (and per zarr chunk).

    Returns
    -------
    xarray.Dataset
        ``intensity`` (frame, q) float32 backed by one Dask task per frame chunk, coords
        ``angle``, ``translation``, ``monitor`` (frame) and ``q``.
    """
    if frames_per_chunk < 1:
        raise ConfigError(f"frames_per_chunk={frames_per_chunk}: expected a positive number")
    n = scan.source.n_frames
    sizes = normalize_chunks(frames_per_chunk, (n,))[0]
    name = "integrate-" + dask.base.tokenize(scan.source, spec, scan.monitor, frames_per_chunk)
    block = functools.partial(_integrate_block, source=scan.source, spec=spec)
    # One task per chunk of frames, with no dependencies: its first frame and its monitor
    # values are literals of the task. (Index and monitor as dask arrays made two tiny root
    # tasks per chunk, and the worker idled a scheduler round trip before every chunk.)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    graph = {(name, i, 0): (block, int(start), scan.monitor[start:start + size])
             for i, (start, size) in enumerate(zip(starts, sizes))}
    intensity = da.Array(HighLevelGraph.from_collections(name, graph, dependencies=()), name,
                         chunks=(sizes, (spec.npt,)), dtype=np.float32,
                         meta=np.empty((0, spec.npt), dtype=np.float32))  # no integrator on the driver
    return xr.Dataset(
        {"intensity": (("frame", "q"), intensity)},
        coords={"frame": np.arange(n), "q": q_centres(spec), "angle": ("frame", scan.angle),
                "translation": ("frame", scan.translation), "monitor": ("frame", scan.monitor)},
    )


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers of a stage."""
    import distributed
    import fabio
    import h5py
    import hdf5plugin
    import pyFAI

    return {"pyFAI": pyFAI.version, "numpy": np.__version__, "h5py": h5py.__version__,
            "hdf5plugin": hdf5plugin.version, "fabio": fabio.version, "dask": dask.__version__,
            "distributed": distributed.__version__, "xarray": xr.__version__}


def integrate(raw_url: str | Sequence[str], out_url: str, *, poni: str, mask: str | None = None, npt: int = 1000,
              q_range: Sequence[float] | None = None, method: str = "trimmed_mean",
              percentile: Sequence[float] = (10, 90), polarization_factor: float | None = 0.99,
              sigma_clip_threshold: float = 5.0, positioners: str | None = None, frames_per_chunk: int = 64,
              client=None, progress: bool = True) -> str:
    """Integrate every frame of a raw dataset into a ``patterns`` store.

    Parameters
    ----------
    raw_url : str or sequence of str
        Raw NeXus/HDF5 file (any fsspec URL), or a CBF/EDF series (folder, glob or list).
    out_url : str
        Destination of the ``patterns`` store.
    poni : str
        pyFAI PONI file (URL).
    mask : str, optional
        Mask image (fabio format or .npy; nonzero = masked).
    npt : int
        Number of q bins.
    q_range : (float, float), optional
        q range in 1/Å; default: the range covered by the unmasked pixels.
    method : {"trimmed_mean", "mean", "sigma_clip"}
        Azimuthal reduction.
    percentile : (float, float)
        Percentiles kept by the trimmed mean.
    polarization_factor : float or None
        pyFAI polarisation factor (None: no polarisation correction).
    sigma_clip_threshold : float
        Clipping threshold (in standard deviations) of ``sigma_clip``.
    positioners : str, optional
        Positioner table of a frame series.
    frames_per_chunk : int
        Frames per task and per zarr chunk.
    client : distributed.Client, optional
        Dask client; default: the current one, else the local threaded scheduler.
    progress : bool
        Show a progress bar.

    Returns
    -------
    str
        ``out_url``, a complete ``patterns`` store.

    Examples
    --------
    >>> integrate("raw/c1.nxs", "work/c1/patterns.zarr", poni="calib/id31.poni",
    ...           npt=1000, q_range=(0.5, 3.85))  # doctest: +SKIP
    """
    storage.begin_store(out_url)  # a failed run must not leave an earlier result looking current
    scan = rawframes.open_raw(raw_url, positioners)
    spec = resolve_spec(scan, poni=poni, mask=mask, npt=npt, q_range=q_range, method=method,
                        percentile=percentile, polarization_factor=polarization_factor,
                        sigma_clip_threshold=sigma_clip_threshold)
    ds = patterns_dataset(scan, spec, frames_per_chunk=frames_per_chunk)
    config = {k: v for k, v in asdict(spec).items() if k != "poni"}
    config.update(raw=storage.redact(scan.source.url), poni_url=storage.redact(poni), unit=UNIT,
                  frames_per_chunk=frames_per_chunk,
                  mask_url=storage.redact(mask) if mask else None)
    ds.attrs.update(poni=spec.poni, method=method, unit=UNIT, versions=json.dumps(library_versions()))
    logger.info("integrating %d frames of %s (%s, %d bins) into %s", scan.source.n_frames, scan.source.name,
                method, spec.npt, storage.redact(out_url))
    return write_dataset(ds, out_url, stage="patterns", config=config, client=client, progress=progress)


def write_dataset(ds: xr.Dataset, url: str, *, stage: str, config: dict, client=None, progress: bool = True) -> str:
    """Write a Dask-backed Dataset as a store: metadata, chunk-wise data, completion marker last.

    On a user error the partial store is removed and the error re-raised; a store is
    only ever marked complete after all of its chunks are written.
    """
    try:
        delayed = storage.create_store(ds, url, stage=stage, config=config, compute=False)
        _compute(delayed, client, progress)
    except XrdscaleError:
        _discard(url)
        raise
    except OSError as exc:
        _discard(url)
        raise StorageError(f"cannot write the {stage} store at {storage.redact(url)}: {exc}") from exc
    storage.mark_complete(url, {"stage": stage})
    logger.info("wrote %s store %s", stage, storage.redact(url))
    return url


def _discard(url: str) -> None:
    try:
        storage.clear(url)
    except XrdscaleError:
        logger.warning("could not remove the incomplete store %s", storage.redact(url))


def current_client(client=None):
    """The given client, else the current distributed client, else None (local scheduler)."""
    if client is not None:
        return client
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _compute(delayed, client, progress: bool) -> None:
    client = current_client(client)
    if client is None:
        if progress:
            from dask.diagnostics import ProgressBar

            with ProgressBar():
                dask.compute(delayed)
        else:
            dask.compute(delayed)
        return
    from distributed import progress as dprogress

    future = client.compute(delayed)
    if progress:
        dprogress(future)
    future.result()
