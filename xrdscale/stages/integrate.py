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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.array.core import normalize_chunks
from dask.highlevelgraph import HighLevelGraph
from pydantic import Field, field_validator

from xrdscale.config import one_of
from xrdscale.exceptions import ConfigError, InputError, XrdscaleWarning
from xrdscale.io import frames as rawframes
from xrdscale.io import storage
from xrdscale.runtime.progress import report
from xrdscale.stages.base import StageConfig, guarded, runtime_field, write_output

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("trimmed_mean", "mean", "sigma_clip")
UNIT = "q_A^-1"


Method = Annotated[str, one_of(METHODS, "integration method")]


class IntegrateConfig(StageConfig):
    """Settings of the ``integrate`` stage (``pipeline.integrate`` of a campaign)."""

    stage: ClassVar[str] = "integrate"

    npt: int = Field(1000, ge=2, description="number of q bins")
    q_range: tuple[float, float] | None = Field(
        None, description="q range LOW HIGH in 1/Å, the outer edges of the bins (default: what the unmasked "
                          "pixels cover)")
    method: Method = Field("trimmed_mean", description="azimuthal reduction")
    percentile: tuple[float, float] = Field((10.0, 90.0), description="percentiles kept by trimmed_mean")
    polarization_factor: float | None = Field(0.99, ge=-1.0, le=1.0,
                                              description="pyFAI polarisation factor (null: no correction)")
    sigma_clip_threshold: float = Field(5.0, gt=0, description="clipping threshold of sigma_clip (std devs)")
    frames_per_chunk: int = runtime_field(64, "frames per Dask task and per zarr chunk", ge=1)

    @field_validator("q_range")
    @classmethod
    def _ascending(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] < value[1]:
            raise ValueError(f"q_range {list(value)}: expected 0 <= LOW < HIGH in 1/Å")
        return value

    @field_validator("percentile")
    @classmethod
    def _percentiles(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] < value[1] <= 100:
            raise ValueError(f"percentile {list(value)}: expected two values 0 <= low < high <= 100")
        return value


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


def load_poni(poni_text: str, name: str = "PONI file"):
    """A pyFAI integrator from PONI text, with a clear error for what pyFAI cannot use.

    Raises
    ------
    InputError
        pyFAI cannot parse the text, or it names no wavelength (q needs one).
    """
    try:
        ai = _load_poni(poni_text)
    except Exception as exc:
        raise InputError(f"PONI file {name} cannot be read by pyFAI ({type(exc).__name__}: {exc}); give a "
                         "pyFAI .poni file (as pyFAI-calib2 writes it)") from exc
    if not ai.wavelength:
        raise InputError(f"PONI file {name} has no wavelength; q needs one: add a line 'Wavelength: <metres>' "
                         "(e.g. 'Wavelength: 1.30509e-11' for 0.130509 Å) or calibrate with pyFAI-calib2")
    return ai


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
        report(1)  # one frame done: the progress moves per frame, not per chunk
    return out


def resolve_spec(scan: rawframes.RawScan, *, poni: str, mask: str | None = None,
                 config: IntegrateConfig | None = None, **settings: Any) -> IntegratorSpec:
    """Validate the integration settings against the dataset and return the task spec.

    Parameters
    ----------
    scan : RawScan
        The opened raw dataset.
    poni : str
        URL of the pyFAI PONI file.
    mask : str, optional
        URL of the mask image.
    config : IntegrateConfig, optional
        The settings; keyword ``settings`` (its field names) override it.

    Raises
    ------
    ConfigError
        An invalid setting.
    InputError
        A PONI file pyFAI cannot read or without a wavelength, frames that do not match
        the PONI's detector or the mask, or a mask or q range that leaves no pixel.
    """
    cfg = IntegrateConfig.build(config, **settings)
    npt, method, (lo_p, hi_p) = cfg.npt, cfg.method, cfg.percentile
    poni_text = storage.read_bytes(poni).decode()
    ai = load_poni(poni_text, storage.redact(poni))
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
    q_range = cfg.q_range
    if q_range is None:
        q_range = (float(qvalid.min()), float(qvalid.max()))
    lo, hi = (float(v) for v in q_range)
    if hi < qvalid.min() or lo > qvalid.max():
        raise InputError(f"q range [{lo}, {hi}] 1/Å is outside the detector's coverage "
                         f"[{qvalid.min():.4g}, {qvalid.max():.4g}] 1/Å for {scan.source.name}; every pixel would "
                         "be masked — choose a q range the detector covers")
    # More than a bin (and 1 % of the range) beyond the unmasked pixels: whole bins get no pixel.
    margin = max((hi - lo) / npt, 0.01 * (hi - lo))
    if lo < qvalid.min() - margin or hi > qvalid.max() + margin:
        warnings.warn(f"{scan.source.name}: q range [{lo:.4g}, {hi:.4g}] 1/Å extends beyond the detector's "
                      f"coverage [{qvalid.min():.4g}, {qvalid.max():.4g}] 1/Å (unmasked pixels); the bins outside "
                      "it get no pixel and hold 0 — narrow q_range (--q-range) to the coverage", XrdscaleWarning,
                      stacklevel=2)
    return IntegratorSpec(poni=poni_text, mask_url=mask, mask_sha256=mask_sha,
                          frame_shape=(int(shape[0]), int(shape[1])),
                          npt=int(npt), q_range=(lo, hi), method=method, percentile=(lo_p, hi_p),
                          polarization_factor=cfg.polarization_factor,
                          sigma_clip_threshold=float(cfg.sigma_clip_threshold))


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
        ``angle``, ``translation``, ``monitor`` (frame), ``q``, and ``time`` (frame, seconds)
        when the raw file records each frame's time.
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
    graph: dict[Any, Any] = {(name, i, 0): (block, int(start), scan.monitor[start:start + size])
             for i, (start, size) in enumerate(zip(starts, sizes))}
    intensity = da.Array(HighLevelGraph.from_collections(name, graph, dependencies=()), name,
                         chunks=(sizes, (spec.npt,)), dtype=np.float32,
                         meta=np.empty((0, spec.npt), dtype=np.float32))  # no integrator on the driver
    ds = xr.Dataset(
        {"intensity": (("frame", "q"), intensity)},
        coords={"frame": np.arange(n), "q": q_centres(spec), "angle": ("frame", scan.angle),
                "translation": ("frame", scan.translation), "monitor": ("frame", scan.monitor)},
    )
    if scan.time is not None:  # a time series (operando scans): each frame's acquisition time
        ds = ds.assign_coords(time=("frame", scan.time))
        ds["time"].attrs.update(units="s", long_name="acquisition time", start_time=scan.start_time or "")
    return ds


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


def integrate(raw_url: str | Sequence[str], out_url: str, *, poni: str, mask: str | None = None,
              positioners: str | None = None, config: IntegrateConfig | None = None, client: Any = None,
              progress: bool = True, **settings: Any) -> str:
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
    positioners : str, optional
        Positioner table of a frame series.
    config : IntegrateConfig, optional
        The settings (npt, q_range, method, percentile, polarization_factor,
        sigma_clip_threshold, frames_per_chunk); keyword ``settings`` of the same names
        override it.
    client : distributed.Client, optional
        Dask client; default: the current one, else the local threaded scheduler.
    progress : bool
        Show progress, frame by frame.

    Returns
    -------
    str
        ``out_url``, a complete ``patterns`` store.

    Examples
    --------
    >>> integrate("raw/c1.nxs", "work/c1/patterns.zarr", poni="calib/id31.poni",
    ...           npt=1000, q_range=(0.5, 3.85))  # doctest: +SKIP
    """
    cfg = IntegrateConfig.build(config, **settings)

    def body() -> str:
        scan = rawframes.open_raw(raw_url, positioners)
        spec = resolve_spec(scan, poni=poni, mask=mask, config=cfg)
        ds = patterns_dataset(scan, spec, frames_per_chunk=cfg.frames_per_chunk)
        record = cfg.record()
        record.update(q_range=list(spec.q_range), mask_sha256=spec.mask_sha256, frame_shape=list(spec.frame_shape),
                      raw=storage.redact(scan.source.url), poni_url=storage.redact(poni), unit=UNIT,
                      mask_url=storage.redact(mask) if mask else None)
        ds.attrs.update(poni=spec.poni, method=cfg.method, unit=UNIT, versions=json.dumps(library_versions()))
        logger.info("integrating %d frames of %s (%s, %d bins) into %s", scan.source.n_frames, scan.source.name,
                    cfg.method, spec.npt, storage.redact(out_url))
        return write_output(ds, out_url, kind="patterns", config=record, client=client, progress=progress,
                            label="integrate", total=scan.source.n_frames, unit="frames")

    return guarded(out_url, body)
