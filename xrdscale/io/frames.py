"""Raw detector frames: NeXus/HDF5 datasets at fsspec URLs and CBF/EDF series through fabio.

A raw dataset (shared/DESIGN.md) is one HDF5 file with the frames in
``/entry/data/data`` (n_frames, ny, nx), the incident intensity in
``/entry/instrument/monitor/data`` and the positioners in ``/entry/sample/rotation_angle``
(degrees) and ``/entry/sample/translation`` (mm); a time series (operando point or line scans)
also has the acquisition time of every frame in ``/entry/data/time`` (seconds, ``units``
``s``/``ms``/``min``/``h``, from ``/entry/start_time``, ISO 8601, where given). A frame series is a folder (or a list)
of CBF/EDF files in acquisition order plus a positioner table (CSV with the columns
``angle``, ``translation`` and ``monitor``; an optional ``file`` column names each row's
frame file, an optional ``time`` column each frame's time in seconds).

:func:`open_raw` reads the small per-frame vectors in the calling process and returns a
:class:`RawScan`; :func:`read_frames` yields frames one at a time and is what the
integration tasks call, each opening the file itself (local files through h5py's native
driver, remote ones through an fsspec file object).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import posixpath
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from xrdscale.exceptions import InputError, StorageError
from xrdscale.io import storage

logger = logging.getLogger(__name__)

DATA = "entry/data/data"
MONITOR = "entry/instrument/monitor/data"
ANGLE = "entry/sample/rotation_angle"
TRANSLATION = "entry/sample/translation"
TIME = "entry/data/time"
START_TIME = "entry/start_time"
SERIES_SUFFIXES = (".cbf", ".edf", ".edf.gz", ".cbf.gz")


@dataclass(frozen=True)
class RawSource:
    """Where a dataset's frames live; small and hashable, so tasks can carry it.

    Attributes
    ----------
    url : str
        The HDF5 file URL, or the folder/first file of a series (for messages).
    files : tuple of str
        The frame files of a series (empty for an HDF5 dataset).
    n_frames : int
        Number of frames.
    frame_shape : tuple of int
        (ny, nx) of one frame.
    dtype : str
        NumPy dtype of the stored counts.
    """

    url: str
    files: tuple[str, ...]
    n_frames: int
    frame_shape: tuple[int, int]
    dtype: str

    @property
    def name(self) -> str:
        """The dataset as it appears in messages (credentials stripped)."""
        return storage.redact(self.url)


@dataclass
class RawScan:
    """A raw dataset with its per-frame positioners and monitor, in acquisition order.

    ``time`` (seconds from ``start_time``, ISO 8601) is each frame's acquisition time where
    the file records it (``/entry/data/time``), else None.
    """

    source: RawSource
    angle: np.ndarray = field(repr=False)
    translation: np.ndarray = field(repr=False)
    monitor: np.ndarray = field(repr=False)
    time: np.ndarray | None = field(default=None, repr=False)
    start_time: str | None = None


def _import_filters() -> None:
    import hdf5plugin  # noqa: F401  (registers the compression filters with h5py)


@contextlib.contextmanager
def _open_h5(url: str) -> Iterator:
    """Open an HDF5 file read-only: native driver for local paths, fsspec file objects otherwise."""
    import h5py

    _import_filters()
    if storage.is_remote(url):
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb", block_size=8 * 2**20) as fobj, h5py.File(fobj, "r") as h5:
            yield h5
    else:
        with h5py.File(url, "r") as h5:
            yield h5


def open_raw(url: str | Sequence[str], positioners: str | None = None) -> RawScan:
    """Open a raw dataset and read its positioners and monitor.

    Parameters
    ----------
    url : str or sequence of str
        An HDF5/NeXus file URL, a folder of CBF/EDF frames, or a list of frame files.
    positioners : str, optional
        Positioner table (CSV) of a frame series; required for series, ignored for HDF5.

    Returns
    -------
    RawScan

    Raises
    ------
    InputError
        A required dataset or positioner is missing, has the wrong length or holds
        non-finite values, or a monitor value is not positive.
    StorageError
        The URL cannot be reached or read.
    """
    if isinstance(url, str) and not _is_series(url):
        return _open_hdf5(url)
    files = _series_files(url)
    if positioners is None:
        raise InputError(
            f"the frame series {storage.redact(_series_name(url))} has no positioner table; pass one "
            "(CSV with columns angle, translation, monitor) with --positioners"
        )
    return _open_series(url, files, positioners)


def _is_series(url: str) -> bool:
    if url.lower().endswith(SERIES_SUFFIXES) or any(c in url for c in "*?["):
        return True
    fs, path = storage.filesystem(url)
    with storage.io_errors(url, "open the raw dataset"):
        return fs.isdir(path)


def _open_hdf5(url: str) -> RawScan:
    name = storage.redact(url)
    if not storage.exists(url):
        raise StorageError(f"raw dataset {name} does not exist; check the path or URL")
    with storage.io_errors(url, "open the raw dataset"):
        try:
            with _open_h5(url) as h5:
                source, vectors = _hdf5_meta(url, h5)
                time, start = _frame_times(h5, name, source.n_frames)
        except OSError as exc:
            if type(exc) is not OSError:  # FileNotFound/Permission/Connection errors: storage problems
                raise
            raise InputError(f"{name} is not a readable HDF5/NeXus file ({exc}); check or re-transfer it") from exc
    scan = _scan(source, vectors[ANGLE], vectors[TRANSLATION], vectors[MONITOR],
                 {"angle": "/" + ANGLE, "translation": "/" + TRANSLATION, "monitor": "/" + MONITOR})
    scan.time, scan.start_time = time, start
    return scan


#: Seconds per unit of a time axis.
TIME_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0, "ms": 1e-3, "min": 60.0, "h": 3600.0}


def time_factor(unit: str | None, where: str) -> float:
    """Seconds per ``unit`` (None or empty: seconds).

    Raises
    ------
    InputError
        A unit not in :data:`TIME_UNITS`.
    """
    key = (unit or "s").strip().lower()
    if key not in TIME_UNITS:
        raise InputError(f"{where} has time units {unit!r}; expected one of {', '.join(TIME_UNITS)}")
    return TIME_UNITS[key]


def _frame_times(h5, name: str, n: int) -> tuple[np.ndarray | None, str | None]:
    """``/entry/data/time`` in seconds and ``/entry/start_time`` of an HDF5 file (None where absent)."""
    start = h5[START_TIME][()] if START_TIME in h5 else None
    start = start.decode() if isinstance(start, bytes) else (None if start is None else str(start))
    if TIME not in h5:
        return None, start
    ds = h5[TIME]
    unit = ds.attrs.get("units")
    unit = unit.decode() if isinstance(unit, bytes) else unit
    time = np.asarray(ds[()], dtype=np.float64) * time_factor(unit, f"{name}: /{TIME}")
    if time.shape != (n,):
        raise InputError(f"{name}: /{TIME} has shape {time.shape}, expected ({n},), one time per frame")
    bad = np.flatnonzero(~np.isfinite(time))
    if bad.size:
        raise InputError(f"{name}: /{TIME} is not finite at frame {bad[0]} ({bad.size} frames); repair the file")
    return time, start


def _hdf5_meta(url: str, h5) -> tuple[RawSource, dict[str, np.ndarray]]:
    name = storage.redact(url)
    missing = [k for k in (DATA, MONITOR, ANGLE, TRANSLATION) if k not in h5]
    if missing:
        raise InputError(
            f"{name} lacks " + ", ".join("/" + k for k in missing) + "; a raw dataset needs "
            f"/{DATA}, /{MONITOR}, /{ANGLE} and /{TRANSLATION} (shared/DESIGN.md)"
        )
    data = h5[DATA]
    if data.ndim != 3:
        raise InputError(f"{name}: /{DATA} has shape {data.shape}, expected (n_frames, ny, nx)")
    vectors = {k: np.asarray(h5[k][()], dtype=np.float64) for k in (MONITOR, ANGLE, TRANSLATION)}
    source = RawSource(url=url, files=(), n_frames=int(data.shape[0]),
                       frame_shape=(int(data.shape[1]), int(data.shape[2])), dtype=str(data.dtype))
    return source, vectors


def _series_name(url: str | Sequence[str]) -> str:
    return url if isinstance(url, str) else (url[0] if url else "<empty list>")


def _series_files(url: str | Sequence[str]) -> list[str]:
    if not isinstance(url, str):
        return list(url)
    fs, path = storage.filesystem(url)
    protocol = url.split("://", 1)[0] + "://" if storage.is_remote(url) else ""
    with storage.io_errors(url, "list the frame series"):
        if any(c in url for c in "*?["):
            paths = sorted(fs.glob(path))
        elif fs.isdir(path):
            paths = sorted(p for p in fs.ls(path, detail=False) if p.lower().endswith(SERIES_SUFFIXES))
        else:
            paths = [path]
    if not paths:
        raise InputError(f"no CBF/EDF frames found at {storage.redact(url)}; check the folder or pattern")
    return [protocol + p if protocol else p for p in paths]


def _open_series(url: str | Sequence[str], files: list[str], table_url: str) -> RawScan:
    name = storage.redact(_series_name(url))
    text = storage.read_bytes(table_url).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    need = ("angle", "translation", "monitor")
    header = rows[0].keys() if rows else []
    missing = [k for k in need if k not in header]
    if missing:
        raise InputError(f"positioner table {storage.redact(table_url)} lacks the column(s) {', '.join(missing)}; "
                         "it needs angle, translation, monitor (one row per frame, acquisition order)")
    if "file" in header:
        by_name = {posixpath.basename(f): f for f in files}
        try:
            files = [by_name[posixpath.basename(r["file"])] for r in rows]
        except KeyError as exc:
            raise InputError(f"positioner table {storage.redact(table_url)} names frame file {exc} which is not "
                             f"in the series {name}") from exc
    if len(rows) != len(files):
        raise InputError(f"positioner table {storage.redact(table_url)} has {len(rows)} rows but the series {name} "
                         f"has {len(files)} frames; give one row per frame")
    try:
        vec = {k: np.array([float(r[k]) for r in rows]) for k in need}
    except (TypeError, ValueError) as exc:
        raise InputError(f"positioner table {storage.redact(table_url)} holds a non-numeric value ({exc})") from exc
    first = _read_series_frame(files[0], name, 0)
    source = RawSource(url=_series_name(url), files=tuple(files), n_frames=len(files),
                       frame_shape=(int(first.shape[0]), int(first.shape[1])), dtype=str(first.dtype))
    scan = _scan(source, vec["angle"], vec["translation"], vec["monitor"],
                 {k: f"column {k} of {storage.redact(table_url)}" for k in need})
    if "time" in header:  # a time series: seconds of each frame
        try:
            scan.time = np.array([float(r["time"]) for r in rows])
        except (TypeError, ValueError) as exc:
            raise InputError(f"positioner table {storage.redact(table_url)}: column time holds a non-numeric "
                             f"value ({exc}); give each frame's time in seconds") from exc
    return scan


def _scan(source: RawSource, angle: np.ndarray, translation: np.ndarray, monitor: np.ndarray,
          where: dict[str, str]) -> RawScan:
    for key, vec in (("angle", angle), ("translation", translation), ("monitor", monitor)):
        if vec.shape != (source.n_frames,):
            raise InputError(f"{source.name}: {where[key]} has shape {vec.shape}, expected ({source.n_frames},), "
                             "one value per frame")
        bad = np.flatnonzero(~np.isfinite(vec))
        if bad.size:
            raise InputError(f"{source.name}: {where[key]} is not finite at frame {bad[0]} ({bad.size} frames); "
                             "the positioner/monitor record is incomplete — repair the file")
    bad = np.flatnonzero(monitor <= 0)
    if bad.size:
        raise InputError(f"{source.name}: monitor (I0) is {monitor[bad[0]]} at frame {bad[0]} ({bad.size} frames); "
                         "patterns are divided by I0, which must be positive — exclude those frames or fix I0")
    return RawScan(source=source, angle=angle, translation=translation, monitor=monitor)


def read_frames(source: RawSource, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index, frame)`` for frames ``start`` to ``stop - 1``, one frame in memory at a time.

    Raises
    ------
    InputError
        A frame cannot be decoded (truncated or corrupt chunk/file); the message names
        the dataset and the frame.
    StorageError
        A remote file cannot be reached.
    """
    if source.files:
        for i in range(start, stop):
            yield i, _read_series_frame(source.files[i], source.name, i)
        return
    with storage.io_errors(source.url, "open the raw dataset"), _open_h5(source.url) as h5:
        data = h5[DATA]
        for i in range(start, stop):
            try:
                frame = data[i]
            except (OSError, ValueError, RuntimeError) as exc:
                raise _frame_error(source, i, exc) from exc
            yield i, frame


def _frame_error(source: RawSource, index: int, exc: Exception) -> Exception:
    msg = (f"{source.name}: frame {index} of /{DATA} cannot be read ({exc}); the file is truncated or a "
           "compressed chunk is corrupt — transfer the file again or drop the frame")
    if storage.is_remote(source.url):
        return StorageError(msg + " (or the object store connection failed; check the endpoint and credentials)")
    return InputError(msg)


def _read_series_frame(path: str, name: str, index: int) -> np.ndarray:
    import fabio

    try:
        if storage.is_remote(path):
            suffix = "".join(posixpath.basename(path).partition(".")[1:])
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, "frame" + suffix)
                with open(local, "wb") as f:
                    f.write(storage.read_bytes(path))
                return np.asarray(fabio.open(local).data)
        return np.asarray(fabio.open(path).data)
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise StorageError(f"{name}: frame {index} file {storage.redact(path)} does not exist") from exc
    except Exception as exc:  # fabio raises a variety of errors on corrupt files
        raise InputError(f"{name}: frame {index} ({storage.redact(path)}) cannot be decoded by fabio ({exc}); "
                         "the file is truncated or corrupt") from exc
