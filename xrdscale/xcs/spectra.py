"""Energy-resolved detector cubes in and out: HDF5/NeXus and HEXITEC ``.hxt`` spectra, energy calibration.

A :class:`Cube` holds one energy spectrum per detector pixel for one or several beam planes:
``counts`` is a lazy dask array ``(plane, y, x, bin)`` (the plane axis is always there), ``energy``
the bin centres [keV]. :func:`open_cube` reads it from a local path or any fsspec URL, detecting the
format by content:

- HDF5 / NeXus (magic ``\\x89HDF``): a dataset ``spectra`` ``(y, x, bin)`` or ``(plane, y, x, bin)``
  and ``energy`` ``(bin,)`` [keV] beside it, looked for at the file root, then (recursively) in the
  first ``NXentry`` group (e.g. ``entry/data/spectra``), then anywhere in the file; ``dataset=``
  names the spectra dataset instead. Optional datasets beside it: ``planes`` (names), ``mask``
  ``(y, x)`` (non-zero = excluded pixel) and ``spectra_corrected`` (charge-sharing corrected spectra
  of the same shape; with ``dataset=NAME`` also ``NAME_corrected``). The file's root attributes and
  those of the group holding the spectra are returned in ``meta["attrs"]``.
- HEXITEC binary ``.hxt`` (label ``HEXITECH``), versions 2 and 3, little-endian: 8-byte label;
  uint64 version; 9 × uint32 motor positions (mss_x, mss_y, mss_z, mss_rot, gal_x, gal_y, gal_z,
  gal_rot, gal_rot2); int32 prefix length n; the prefix (v3: 100 bytes reserved, n used; v2: n
  bytes); a timestamp (v3: 16 bytes, v2: 13 bytes); uint32 rows, cols, bins; float64 bin energies
  [bins] (keV); float64 counts [rows][cols][bins]. One plane per file.

Reading is lazy: every chunk of ``chunk_rows`` detector rows (of one plane) is one task of a
module-level function that opens the file by URL and reads only its rows (a ranged read of an
``.hxt``, a hyperslab of the HDF5 dataset), so the graph pickles to a distributed cluster and a
worker holds one chunk at a time. Every block read is checked by :func:`check_counts`: a computation
over a cube with negative counts fails with an :class:`~xrdscale.exceptions.InputError`.

:func:`write_cube` / :func:`write_hxt` write both formats (a temporary file moved into place at the
end, :func:`xrdscale.io.storage.staged`). :func:`calibrate_energy` fits a per-pixel linear energy
calibration to known lines, :func:`apply_energy_calibration` rebins every pixel onto the common
energy axis conserving counts, and :func:`bad_pixels` flags dead and noisy pixels.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import h5py
import numpy as np

from xrdscale import __version__
from xrdscale.exceptions import InputError
from xrdscale.io import storage

logger = logging.getLogger(__name__)

#: Label of a HEXITEC ``.hxt`` file.
HXT_LABEL = b"HEXITECH"
#: ``.hxt`` versions :func:`open_cube` reads.
HXT_VERSIONS = (2, 3)
#: Motor names of an ``.hxt`` header, in file order.
HXT_MOTORS = ("mss_x", "mss_y", "mss_z", "mss_rot", "gal_x", "gal_y", "gal_z", "gal_rot", "gal_rot2")
#: Bytes reserved for the prefix and the timestamp by ``.hxt`` version.
HXT_PREFIX_BYTES = {3: 100}
HXT_TIMESTAMP_BYTES = {2: 13, 3: 16}
#: Choices of ``charge_sharing``.
CHARGE_SHARING = ("auto", "raw", "corrected")

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_FIXED = struct.Struct("<8sQ9Ii")  # label, version, motors, prefix length
_DIMS = struct.Struct("<3I")


@dataclass(frozen=True)
class Cube:
    """Energy spectra of every detector pixel for one or several beam planes.

    Attributes
    ----------
    counts : dask.array.Array or numpy.ndarray
        ``(plane, y, x, bin)`` counts in the stored dtype (lazy from :func:`open_cube`, numpy from
        :func:`read_cube`).
    energy : numpy.ndarray
        ``(bin,)`` bin centres [keV], strictly increasing.
    planes : tuple of str
        One name per plane (``("plane",)`` for a single unnamed plane).
    mask : numpy.ndarray or None
        ``(y, x)`` bool, True = excluded pixel; None when the file has no mask.
    meta : dict
        ``source`` (redacted URL), ``format`` (``"hdf5"`` or ``"hxt"``), and for HDF5 ``dataset``,
        ``charge_sharing`` (``"raw"`` or ``"corrected"``, what was read), ``datasets``, ``attrs``; for
        HXT ``version``, ``motors`` (name → position), ``prefix``, ``timestamp``.
    """

    counts: Any
    energy: np.ndarray
    planes: tuple[str, ...]
    mask: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def edges(self) -> np.ndarray:
        """Bin edges [keV], ``(bin + 1,)``: midpoints of the centres, the end bins extended symmetrically."""
        e = np.asarray(self.energy, dtype=np.float64)
        if e.size == 1:
            return np.array([e[0] - 0.5, e[0] + 0.5])
        mid = 0.5 * (e[1:] + e[:-1])
        return np.concatenate([[2 * e[0] - mid[0]], mid, [2 * e[-1] - mid[-1]]])

    @property
    def shape(self) -> tuple[int, ...]:
        """``(plane, y, x, bin)``."""
        return tuple(int(s) for s in self.counts.shape)


def check_counts(block: np.ndarray, where: str = "the spectra") -> np.ndarray:
    """Return ``block`` if all its values are counts ≥ 0; raise otherwise.

    Parameters
    ----------
    block : numpy.ndarray
        Spectra (any shape).
    where : str
        What the block is (file and rows), for the message.

    Returns
    -------
    numpy.ndarray
        ``block`` itself.

    Raises
    ------
    InputError
        Some value is negative or NaN.
    """
    arr = np.asarray(block)
    if arr.dtype.kind == "f":
        bad = ~(arr >= 0)
    elif arr.dtype.kind == "i":
        bad = arr < 0
    else:
        return block
    if np.any(bad):
        finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
        low = f"{float(finite.min()):g}" if finite.size else "nan"
        raise InputError(
            f"negative counts in {where} ({int(bad.sum())} value(s), lowest {low}): spectra must be counts >= 0; "
            "give the raw or charge-sharing-corrected counts, not background-subtracted or log spectra"
        )
    return block


def _check_energy(energy: Any, bins: int, where: str) -> np.ndarray:
    e = np.asarray(energy, dtype=np.float64)
    if e.ndim != 1 or e.size != bins:
        raise InputError(f"{where}: the energy axis has shape {e.shape} but the spectra have {bins} bins; "
                         "give one energy (keV) per bin")
    if not np.all(np.isfinite(e)) or (e.size > 1 and not np.all(np.diff(e) > 0)):
        raise InputError(f"{where}: the bin energies must be finite and strictly increasing "
                         f"(got {e[:4].tolist()}…); give the bin centres in keV in ascending order")
    return e


# --------------------------------------------------------------------------------------------
# file access


@contextlib.contextmanager
def _h5(url: str) -> Iterator[h5py.File]:
    """An h5py file at ``url`` (local paths directly, other URLs through an fsspec file object)."""
    if not storage.is_remote(url):
        _, path = storage.filesystem(url)
        with storage.io_errors(url, "read the spectra"), h5py.File(path, "r") as h5:
            yield h5
        return
    with storage.open_input(url, "spectra file (HDF5 or .hxt)") as f, h5py.File(f, "r") as h5:
        yield h5


def _kind(url: str, head: bytes) -> str:
    if head.startswith(_HDF5_MAGIC):
        return "hdf5"
    if head.startswith(HXT_LABEL):
        return "hxt"
    if url.lower().endswith(".hxt"):
        raise InputError(f"{storage.redact(url)} is not a HEXITEC .hxt file: its label is {head[:8]!r}, "
                         f"expected {HXT_LABEL.decode()}; check the file (truncated or another format?)")
    raise InputError(f"{storage.redact(url)} is neither HDF5/NeXus nor a HEXITEC .hxt file (its first bytes "
                     f"are {head[:8]!r}; expected {_HDF5_MAGIC!r} or {HXT_LABEL!r}); convert it to one of these")


def open_cube(url: str, *, dataset: str | None = None, charge_sharing: str = "auto", chunk_rows: int = 16,
              plane_name: str | None = None) -> Cube:
    """Open the spectra of an HDF5/NeXus or HEXITEC ``.hxt`` file lazily (see the module docstring).

    Parameters
    ----------
    url : str
        Local path or fsspec URL.
    dataset : str, optional
        HDF5 path of the spectra dataset (default: ``spectra`` found as described above).
    charge_sharing : {"auto", "raw", "corrected"}
        HDF5 only: ``"auto"`` reads ``spectra_corrected`` where the file has it, else ``spectra``;
        ``"raw"`` always ``spectra``; ``"corrected"`` requires ``spectra_corrected``.
    chunk_rows : int
        Detector rows per dask chunk.
    plane_name : str, optional
        Name of the plane of a single-plane file (``.hxt``, 3D HDF5 without ``planes``); default ``"plane"``.

    Returns
    -------
    Cube
        ``counts`` is a dask array ``(plane, y, x, bin)`` chunked by ``(1, chunk_rows, x, bin)``.

    Raises
    ------
    InputError
        No such file, unknown format, a malformed or truncated file, inconsistent energies or shapes,
        or no spectra of the kind asked for; the message names the file, what was found and what is
        expected. (Negative counts are reported when the counts are computed.)
    """
    if charge_sharing not in CHARGE_SHARING:
        raise InputError(f"charge_sharing must be one of {', '.join(CHARGE_SHARING)}, got {charge_sharing!r}")
    if int(chunk_rows) != chunk_rows or chunk_rows < 1:
        raise InputError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    if plane_name is not None and (not isinstance(plane_name, str) or not plane_name):
        raise InputError(f"plane_name must be a non-empty string, got {plane_name!r}")
    with storage.open_input(url, "spectra file (HDF5 or .hxt)") as f:
        head = f.read(8)
    kind = _kind(url, head)
    if kind == "hxt":
        return _open_hxt(url, int(chunk_rows), plane_name)
    return _open_hdf5(url, dataset, charge_sharing, int(chunk_rows), plane_name)


def read_cube(url: str, **kw: Any) -> Cube:
    """Read a whole cube into memory: :func:`open_cube` with ``counts`` computed to a numpy array.

    Parameters
    ----------
    url : str
        Local path or fsspec URL.
    **kw
        Keyword arguments of :func:`open_cube`.

    Returns
    -------
    Cube
        ``counts`` is a numpy array ``(plane, y, x, bin)``.
    """
    cube = open_cube(url, **kw)
    counts = cube.counts.compute(scheduler="synchronous")
    return Cube(counts=counts, energy=cube.energy, planes=cube.planes, mask=cube.mask, meta=cube.meta)


# --------------------------------------------------------------------------------------------
# HXT


def _hxt_header(url: str) -> dict[str, Any]:
    name = storage.redact(url)
    fs, path = storage.filesystem(url)
    with storage.open_input(url, "spectra file (HDF5 or .hxt)") as f:
        size = int(fs.size(path))
        raw = f.read(_FIXED.size)
        if len(raw) < _FIXED.size:
            raise InputError(f"{name} is a truncated .hxt file: its header needs at least {_FIXED.size} bytes, "
                             f"the file has {size}; re-export it")
        label, version, *rest = _FIXED.unpack(raw)
        motors, n_prefix = rest[:9], rest[9]
        if label != HXT_LABEL:
            raise InputError(f"{name}: .hxt label is {label!r}, expected {HXT_LABEL.decode()}")
        if version not in HXT_VERSIONS:
            raise InputError(f"{name}: .hxt version {version} is not supported; versions "
                             f"{', '.join(map(str, HXT_VERSIONS))} are")
        reserved = HXT_PREFIX_BYTES.get(version, n_prefix)
        if not 0 <= n_prefix <= reserved:
            raise InputError(f"{name}: .hxt prefix length {n_prefix} is out of range (0 to {reserved} for "
                             f"version {version}); the header is corrupt")
        stamp_bytes = HXT_TIMESTAMP_BYTES[version]
        rest_raw = f.read(reserved + stamp_bytes + _DIMS.size)
        header_len = _FIXED.size + reserved + stamp_bytes + _DIMS.size
        if len(rest_raw) < reserved + stamp_bytes + _DIMS.size:
            raise InputError(f"{name} is a truncated .hxt file: its version-{version} header needs {header_len} "
                             f"bytes, the file has {size}; re-export it")
        prefix = rest_raw[:n_prefix].split(b"\0", 1)[0].decode("latin-1")
        stamp = rest_raw[reserved:reserved + stamp_bytes].split(b"\0", 1)[0].decode("latin-1")
        rows, cols, bins = _DIMS.unpack(rest_raw[reserved + stamp_bytes:])
        if min(rows, cols, bins) < 1:
            raise InputError(f"{name}: .hxt dimensions rows={rows}, cols={cols}, bins={bins} must all be >= 1")
        energy_raw = f.read(8 * bins)
        if len(energy_raw) < 8 * bins:
            raise InputError(f"{name} is a truncated .hxt file: header and {bins} bin energies need "
                             f"{header_len + 8 * bins} bytes, the file has {size}; re-export it")
    energy = _check_energy(np.frombuffer(energy_raw, dtype="<f8"), bins, name)
    data_offset = header_len + 8 * bins
    expected = data_offset + rows * cols * bins * 8
    if size < expected:
        raise InputError(
            f"{name} is a truncated .hxt file: {rows}x{cols} pixels x {bins} bins need {rows * cols * bins * 8} "
            f"bytes of counts ({expected} bytes in all), the file has {size - data_offset} ({size} in all); "
            "re-export it or copy it again"
        )
    if size > expected:
        logger.warning("%s: %d bytes after the .hxt counts are ignored", name, size - expected)
    return {"version": int(version), "motors": dict(zip(HXT_MOTORS, (int(m) for m in motors), strict=True)),
            "prefix": prefix, "timestamp": stamp, "rows": int(rows), "cols": int(cols), "bins": int(bins),
            "energy": energy, "offset": int(data_offset)}


def _read_hxt_rows(url: str, offset: int, row0: int, row1: int, cols: int, bins: int) -> np.ndarray:
    """Rows ``row0:row1`` of an ``.hxt`` file's counts, ``(1, rows, cols, bins)`` float64 (a dask task)."""
    row_bytes = cols * bins * 8
    fs, path = storage.filesystem(url)
    with storage.io_errors(url, "read the spectra"):
        if not storage.is_remote(url):
            mm = np.memmap(path, dtype="<f8", mode="r", offset=offset + row0 * row_bytes,
                           shape=(row1 - row0, cols, bins))
            block = np.array(mm, dtype=np.float64)
            del mm
        else:
            raw = fs.cat_file(path, start=offset + row0 * row_bytes, end=offset + row1 * row_bytes)
            block = np.frombuffer(raw, dtype="<f8").astype(np.float64).reshape(row1 - row0, cols, bins)
    check_counts(block, f"rows {row0}-{row1 - 1} of {storage.redact(url)}")
    return block[None]


def _open_hxt(url: str, chunk_rows: int, plane_name: str | None) -> Cube:
    hdr = _hxt_header(url)
    rows, cols, bins = hdr["rows"], hdr["cols"], hdr["bins"]
    blocks = []
    for r0 in range(0, rows, chunk_rows):
        r1 = min(rows, r0 + chunk_rows)
        task = dask.delayed(_read_hxt_rows, pure=True)(url, hdr["offset"], r0, r1, cols, bins)
        blocks.append(da.from_delayed(task, shape=(1, r1 - r0, cols, bins), dtype=np.float64))
    counts = da.concatenate(blocks, axis=1)
    meta = {"source": storage.redact(url), "format": "hxt",
            **{k: hdr[k] for k in ("version", "motors", "prefix", "timestamp")}}
    return Cube(counts=counts, energy=hdr["energy"], planes=(plane_name or "plane",), mask=None, meta=meta)


def write_hxt(path_or_url: str, counts: Any, energy: Any, *, version: int = 3,
              motors: Sequence[int] = (0,) * 9, prefix: str = "xrdscale", timestamp: str = "") -> str:
    """Write one plane of spectra as a HEXITEC ``.hxt`` file (the layout of the module docstring).

    Parameters
    ----------
    path_or_url : str
        Destination.
    counts : array_like
        ``(y, x, bin)`` counts (written as float64).
    energy : array_like
        ``(bin,)`` bin energies [keV], strictly increasing.
    version : {2, 3}
        File version.
    motors : sequence of 9 int
        Motor positions (uint32), in the order of :data:`HXT_MOTORS`.
    prefix : str
        File prefix (at most 100 bytes in version 3).
    timestamp : str
        Timestamp text (at most 16 bytes in version 3, 13 in version 2; padded with NULs).

    Returns
    -------
    str
        ``path_or_url``.
    """
    c = np.asarray(counts, dtype="<f8")
    if c.ndim != 3:
        raise InputError(f"write_hxt: counts must be (y, x, bin), got shape {c.shape}")
    e = _check_energy(energy, c.shape[2], "write_hxt")
    if version not in HXT_VERSIONS:
        raise InputError(f"write_hxt: version must be one of {HXT_VERSIONS}, got {version!r}")
    m = [int(v) for v in motors]
    if len(m) != 9 or any(not 0 <= v < 2**32 for v in m):
        raise InputError(f"write_hxt: motors must be 9 integers in [0, 2**32), got {tuple(motors)!r}")
    pre = prefix.encode("latin-1")
    reserved = HXT_PREFIX_BYTES.get(version, len(pre))
    if len(pre) > reserved:
        raise InputError(f"write_hxt: the prefix has {len(pre)} bytes, version {version} allows {reserved}")
    stamp = timestamp.encode("latin-1")
    n_stamp = HXT_TIMESTAMP_BYTES[version]
    if len(stamp) > n_stamp:
        raise InputError(f"write_hxt: the timestamp has {len(stamp)} bytes, version {version} allows {n_stamp}")
    header = (_FIXED.pack(HXT_LABEL, version, *m, len(pre)) + pre.ljust(reserved, b"\0") + stamp.ljust(n_stamp, b"\0")
              + _DIMS.pack(*c.shape))
    with storage.staged(path_or_url) as local:
        with open(local, "wb") as f:
            f.write(header)
            f.write(e.astype("<f8").tobytes())
            f.write(np.ascontiguousarray(c).tobytes())
    logger.info("wrote %s (.hxt v%d, %s)", storage.redact(path_or_url), version, "x".join(map(str, c.shape)))
    return path_or_url


# --------------------------------------------------------------------------------------------
# HDF5


def _datasets(h5: h5py.File) -> list[str]:
    found: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            found.append(name)

    h5.visititems(visit)
    return found


def _nx_class(obj: Any) -> str:
    value = obj.attrs.get("NX_class", "")
    if isinstance(value, np.ndarray):
        value = value.flat[0] if value.size else ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _find_named(group: h5py.Group, name: str) -> str | None:
    """Path of the first dataset called ``name`` under ``group`` (breadth-first, sorted)."""
    queue = [group]
    while queue:
        g = queue.pop(0)
        if isinstance(g.get(name, getlink=False), h5py.Dataset):
            return str(g[name].name).lstrip("/")
        queue.extend(g[k] for k in sorted(g) if isinstance(g.get(k), h5py.Group))
    return None


def _spectra_path(h5: h5py.File) -> str | None:
    if isinstance(h5.get("spectra"), h5py.Dataset):
        return "spectra"
    entries = [h5[k] for k in h5 if isinstance(h5.get(k), h5py.Group) and _nx_class(h5[k]) == "NXentry"]
    for entry in entries[:1]:
        found = _find_named(entry, "spectra")
        if found:
            return found
    return _find_named(h5, "spectra")


def _sibling(path: str, name: str) -> str:
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    return f"{parent}/{name}" if parent else name


def _attrs(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, np.ndarray):
            v = [x.decode() if isinstance(x, bytes) else x for x in v.tolist()]
        elif isinstance(v, np.generic):
            v = v.item()
        out[str(k)] = v
    return out


def _read_h5_block(url: str, path: str, plane: int | None, row0: int, row1: int) -> np.ndarray:
    """Rows ``row0:row1`` of one plane of an HDF5 spectra dataset, ``(1, rows, x, bin)`` (a dask task)."""
    with _h5(url) as h5:
        ds = h5[path]
        block = ds[row0:row1] if plane is None else ds[plane, row0:row1]
    where = f"rows {row0}-{row1 - 1}" + ("" if plane is None else f" of plane {plane}") + \
        f" of {path} in {storage.redact(url)}"
    check_counts(block, where)
    return np.asarray(block)[None]


def _open_hdf5(url: str, dataset: str | None, charge_sharing: str, chunk_rows: int,
               plane_name: str | None) -> Cube:
    name = storage.redact(url)
    with _h5(url) as h5:
        names = _datasets(h5)
        listing = ", ".join(names[:30]) + (" …" if len(names) > 30 else "") if names else "none"
        if dataset is not None:
            raw_path = dataset.strip("/")
            if not isinstance(h5.get(raw_path), h5py.Dataset):
                raise InputError(f"{name} has no dataset {dataset!r}; its datasets are: {listing}")
            base = raw_path.rsplit("/", 1)[-1]
            candidates = [_sibling(raw_path, f"{base}_corrected"), _sibling(raw_path, "spectra_corrected")]
        else:
            found = _spectra_path(h5)
            if found is None:
                raise InputError(f"{name} has no 'spectra' dataset (at the root or in an NXentry); its datasets "
                                 f"are: {listing}; write the spectra as 'spectra' or pass dataset=")
            raw_path = found
            candidates = [_sibling(raw_path, "spectra_corrected")]
        corr_path = next((p for p in candidates if isinstance(h5.get(p), h5py.Dataset)), None)
        if charge_sharing == "corrected" and corr_path is None:
            raise InputError(f"{name} has no charge-sharing-corrected spectra ({' or '.join(candidates)}); its "
                             f"datasets are: {listing}; use charge_sharing='raw' or 'auto'")
        use_corr = corr_path is not None and charge_sharing in ("auto", "corrected")
        path = corr_path if use_corr and corr_path is not None else raw_path
        ds = h5[path]
        shape = tuple(int(s) for s in ds.shape)
        if len(shape) not in (3, 4):
            raise InputError(f"{name}: {path} has shape {shape}; spectra must be (y, x, bin) or (plane, y, x, bin)")
        if use_corr and tuple(h5[raw_path].shape) != shape:
            raise InputError(f"{name}: {path} has shape {shape} but {raw_path} has {tuple(h5[raw_path].shape)}; "
                             "corrected spectra must have the shape of the raw ones")
        dtype = ds.dtype
        if dtype.kind not in "iuf":
            raise InputError(f"{name}: {path} holds {dtype} values; spectra must be numbers (counts)")
        energy_path = _sibling(raw_path, "energy")
        if not isinstance(h5.get(energy_path), h5py.Dataset):
            energy_path = "energy"
        if not isinstance(h5.get(energy_path), h5py.Dataset):
            raise InputError(f"{name} has no 'energy' dataset beside {raw_path} (bin centres in keV); its datasets "
                             f"are: {listing}")
        energy = _check_energy(h5[energy_path][()], shape[-1], f"{name}: {energy_path}")
        n_planes = shape[0] if len(shape) == 4 else 1
        planes_path = _sibling(raw_path, "planes")
        if isinstance(h5.get(planes_path), h5py.Dataset):
            stored = [p.decode() if isinstance(p, bytes) else str(p) for p in np.atleast_1d(h5[planes_path][()])]
            if len(stored) != n_planes:
                raise InputError(f"{name}: {planes_path} names {len(stored)} plane(s) but {path} has {n_planes}")
            planes = tuple(stored)
        elif n_planes == 1:
            planes = (plane_name or "plane",)
        else:
            planes = tuple(f"plane_{i}" for i in range(n_planes))
        mask_path = _sibling(raw_path, "mask")
        mask = None
        if isinstance(h5.get(mask_path), h5py.Dataset):
            m = np.asarray(h5[mask_path][()])
            if m.shape != shape[-3:-1]:
                raise InputError(f"{name}: {mask_path} has shape {m.shape}, expected the detector shape "
                                 f"{shape[-3:-1]} (y, x)")
            mask = m != 0
        attrs = _attrs(h5)
        if "/" in raw_path:
            attrs.update(_attrs(h5[raw_path.rsplit("/", 1)[0]]))
    rows, cols, bins = shape[-3:]
    blocks = []
    for p in range(n_planes):
        row_blocks = []
        for r0 in range(0, rows, chunk_rows):
            r1 = min(rows, r0 + chunk_rows)
            task = dask.delayed(_read_h5_block, pure=True)(url, path, p if len(shape) == 4 else None, r0, r1)
            row_blocks.append(da.from_delayed(task, shape=(1, r1 - r0, cols, bins), dtype=dtype))
        blocks.append(da.concatenate(row_blocks, axis=1))
    counts = da.concatenate(blocks, axis=0)
    meta = {"source": name, "format": "hdf5", "dataset": path, "charge_sharing": "corrected" if use_corr else "raw",
            "datasets": names, "attrs": attrs}
    return Cube(counts=counts, energy=energy, planes=planes, mask=mask, meta=meta)


def _attr_value(value: Any) -> Any:
    if isinstance(value, str | int | float | bool | np.generic):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "iufb":
        return value
    if isinstance(value, list | tuple) and value and all(isinstance(v, int | float) for v in value):
        return np.asarray(value)
    return json.dumps(value, default=str)


def write_cube(url: str, counts: Any, energy: Any, *, planes: Sequence[str] | None = None,
               mask: Any = None, corrected: Any = None, attrs: Mapping[str, Any] | None = None) -> str:
    """Write spectra as an HDF5 file that :func:`open_cube` reads (datasets at the root).

    Parameters
    ----------
    url : str
        Destination (local path or fsspec URL); written through a temporary file.
    counts : array_like
        ``(y, x, bin)`` or ``(plane, y, x, bin)`` counts ≥ 0 (stored in their dtype, gzip).
    energy : array_like
        ``(bin,)`` bin centres [keV], strictly increasing.
    planes : sequence of str, optional
        One name per plane (``counts`` 4D: one per leading index; 3D: one name).
    mask : array_like, optional
        ``(y, x)``, non-zero = excluded pixel.
    corrected : array_like, optional
        Charge-sharing-corrected spectra of the shape of ``counts`` (``spectra_corrected``).
    attrs : mapping, optional
        Root attributes (numbers, strings, numeric arrays; anything else is stored as JSON text).
        ``xrdscale_version`` and ``created`` are always added.

    Returns
    -------
    str
        ``url``.
    """
    c = np.asarray(counts)
    if c.ndim not in (3, 4):
        raise InputError(f"write_cube: counts must be (y, x, bin) or (plane, y, x, bin), got shape {c.shape}")
    if c.dtype.kind not in "iuf":
        raise InputError(f"write_cube: counts must be numbers, got {c.dtype}")
    check_counts(c, "the counts given to write_cube")
    e = _check_energy(energy, c.shape[-1], "write_cube")
    n_planes = c.shape[0] if c.ndim == 4 else 1
    if planes is not None:
        names = [str(p) for p in ([planes] if isinstance(planes, str) else planes)]
        if len(names) != n_planes:
            raise InputError(f"write_cube: {len(names)} plane name(s) for {n_planes} plane(s)")
    corr = None
    if corrected is not None:
        corr = np.asarray(corrected)
        if corr.shape != c.shape:
            raise InputError(f"write_cube: corrected spectra have shape {corr.shape}, counts {c.shape}")
        check_counts(corr, "the corrected spectra given to write_cube")
    m = None
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != c.shape[-3:-1]:
            raise InputError(f"write_cube: the mask has shape {m.shape}, expected (y, x) = {c.shape[-3:-1]}")
    rows_per_chunk = max(1, min(c.shape[-3], (1 << 22) // max(1, c.shape[-2] * c.shape[-1] * c.itemsize)))
    chunks = (1,) * (c.ndim - 3) + (rows_per_chunk, c.shape[-2], c.shape[-1])
    with storage.staged(url) as local, h5py.File(local, "w") as h5:
        h5.attrs["xrdscale_version"] = __version__
        h5.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        for k, v in (attrs or {}).items():
            h5.attrs[str(k)] = _attr_value(v)
        h5.create_dataset("spectra", data=c, chunks=chunks, compression="gzip", compression_opts=4, shuffle=True)
        if corr is not None:
            h5.create_dataset("spectra_corrected", data=corr, chunks=chunks, compression="gzip",
                              compression_opts=4, shuffle=True)
        h5.create_dataset("energy", data=e).attrs["units"] = "keV"
        if planes is not None:
            h5.create_dataset("planes", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
        if m is not None:
            h5.create_dataset("mask", data=(m != 0).astype(np.uint8))
    logger.info("wrote %s (%s spectra)", storage.redact(url), "x".join(map(str, c.shape)))
    return url


# --------------------------------------------------------------------------------------------
# energy calibration and bad pixels


def _centroids(counts: np.ndarray, energy: np.ndarray, centre: np.ndarray, half: float) -> np.ndarray:
    """Background-subtracted centroid [keV] per pixel of the counts within ``centre ± half``.

    ``centre`` is ``(y, x)``; the background is the straight line through the mean counts of the
    two bins at each end of the window; NaN where nothing is left above it.
    """
    lo = np.searchsorted(energy, centre - half, side="left")
    hi = np.searchsorted(energy, centre + half, side="right")  # exclusive
    i0, i1 = int(lo.min()), int(hi.max())
    sub = counts[..., i0:i1].astype(np.float64)
    e = energy[i0:i1]
    idx = np.arange(i0, i1)
    inside = (idx >= lo[..., None]) & (idx < hi[..., None])
    n_in = inside.sum(axis=-1)

    def edge_mean(first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        take = np.clip(first[..., None] + np.arange(2), i0, i1 - 1) - i0
        vals = np.take_along_axis(sub, take, axis=-1).mean(axis=-1)
        pos = energy[take + i0].mean(axis=-1)
        return vals, pos

    b_lo, e_lo = edge_mean(lo)
    b_hi, e_hi = edge_mean(hi - 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(e_hi > e_lo, (b_hi - b_lo) / (e_hi - e_lo), 0.0)
        bg = b_lo[..., None] + slope[..., None] * (e - e_lo[..., None])
        net = np.where(inside, np.clip(sub - bg, 0.0, None), 0.0)
        total = net.sum(axis=-1)
        cen = (net * e).sum(axis=-1) / total
    return np.where((total > 0) & (n_in >= 3), cen, np.nan)


def calibrate_energy(counts: Any, energy: Any, lines_kev: Sequence[float] | Mapping[str, float], *,
                     window_kev: float = 1.5, iterations: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel linear energy calibration ``true = gain · nominal + offset`` from known lines.

    For every pixel and line, the background-subtracted centroid (a straight background through the
    ends of the window) of the counts within ``±window_kev`` is taken on the nominal axis ``energy``;
    the window starts at the line's true energy and is re-centred on the centroid ``iterations``
    times. ``gain`` and ``offset`` are then the least-squares line through the points
    (centroid, true energy) of the pixel.

    Parameters
    ----------
    counts : array_like
        ``(y, x, bin)`` spectra on the nominal axis.
    energy : array_like
        ``(bin,)`` nominal bin centres [keV].
    lines_kev : sequence of float or mapping name -> keV
        True energies of the lines (e.g. :func:`xrdscale.xcs.physics.fluorescence_lines` and the
        elastic line at the incident energy). Lines whose window is not inside ``energy`` are skipped.
    window_kev : float
        Half-width of the window around each line [keV]; keep it below half the spacing of the lines.
    iterations : int
        Re-centrings of the windows.

    Returns
    -------
    gain, offset : numpy.ndarray
        ``(y, x)`` maps; ``gain = 1``, ``offset = 0`` (and a warning in the log) for pixels where fewer
        than two lines were found (no counts above the background).

    Raises
    ------
    InputError
        Fewer than two lines lie within the energy range, or the shapes are inconsistent.
    """
    c = np.asarray(counts)
    if c.ndim != 3:
        raise InputError(f"calibrate_energy: counts must be (y, x, bin), got shape {c.shape}")
    e = _check_energy(energy, c.shape[-1], "calibrate_energy")
    if not window_kev > 0:
        raise InputError(f"calibrate_energy: window_kev must be > 0, got {window_kev!r}")
    values = list(lines_kev.values()) if isinstance(lines_kev, Mapping) else list(lines_kev)
    lines = sorted(float(v) for v in values if e[0] <= float(v) - window_kev and float(v) + window_kev <= e[-1])
    if len(lines) < 2:
        raise InputError(
            f"calibrate_energy: {len(lines)} of the lines {sorted(float(v) for v in values)} keV lie (with their "
            f"±{window_kev} keV windows) inside the energy range {e[0]:.3g}-{e[-1]:.3g} keV; at least two are "
            "needed to fit gain and offset"
        )
    measured = np.empty((len(lines), *c.shape[:2]))
    for k, line in enumerate(lines):
        centre = np.full(c.shape[:2], line)
        for _ in range(max(1, int(iterations) + 1)):
            cen = _centroids(c, e, centre, window_kev)
            centre = np.where(np.isfinite(cen), np.clip(cen, e[0] + window_kev, e[-1] - window_kev), centre)
        measured[k] = cen
    true = np.asarray(lines)[:, None, None] * np.ones_like(measured)
    ok = np.isfinite(measured)
    n = ok.sum(axis=0)
    w = ok.astype(np.float64)
    xm = np.where(ok, measured, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = (w * xm).sum(axis=0) / n
        my = (w * true).sum(axis=0) / n
        sxx = (w * (xm - mx) ** 2).sum(axis=0)
        sxy = (w * (xm - mx) * (true - my)).sum(axis=0)
        gain = sxy / sxx
        offset = my - gain * mx
    good = (n >= 2) & np.isfinite(gain) & np.isfinite(offset) & (gain > 0)
    if not np.all(good):
        logger.warning("calibrate_energy: %d of %d pixels have fewer than two lines above the background; "
                       "they keep gain 1 and offset 0", int((~good).sum()), good.size)
    return np.where(good, gain, 1.0), np.where(good, offset, 0.0)


def _edges(energy: np.ndarray) -> np.ndarray:
    mid = 0.5 * (energy[1:] + energy[:-1])
    return np.concatenate([[2 * energy[0] - mid[0]], mid, [2 * energy[-1] - mid[-1]]])


def apply_energy_calibration(counts: Any, energy: Any, gain: Any, offset: Any) -> np.ndarray:
    """Rebin every pixel from its calibrated bin edges onto the common axis ``energy``, conserving counts.

    Pixel ``(i, j)``'s bin edges are ``gain[i, j] · edges + offset[i, j]`` (``edges`` those of
    ``energy``); its cumulative counts, linear within each bin (counts uniform in energy), are
    interpolated at the common edges and differenced. Counts that the calibration moves outside the
    common axis are dropped (the total is conserved for spectra that stay inside it).

    Parameters
    ----------
    counts : array_like
        ``(y, x, bin)`` spectra on the nominal axis.
    energy : array_like
        ``(bin,)`` common (nominal) bin centres [keV].
    gain, offset : array_like
        ``(y, x)`` calibration maps of :func:`calibrate_energy`.

    Returns
    -------
    numpy.ndarray
        ``(y, x, bin)`` counts on ``energy`` (float64, or float32 for float32 input).
    """
    c = np.asarray(counts)
    if c.ndim != 3:
        raise InputError(f"apply_energy_calibration: counts must be (y, x, bin), got shape {c.shape}")
    e = _check_energy(energy, c.shape[-1], "apply_energy_calibration")
    if e.size < 2:
        raise InputError("apply_energy_calibration: at least two bins are needed")
    g = np.broadcast_to(np.asarray(gain, dtype=np.float64), c.shape[:2])
    o = np.broadcast_to(np.asarray(offset, dtype=np.float64), c.shape[:2])
    if not (np.all(np.isfinite(g)) and np.all(g > 0) and np.all(np.isfinite(o))):
        raise InputError("apply_energy_calibration: gains must be finite and > 0 and offsets finite")
    edges = _edges(e)
    cum = np.concatenate([np.zeros((*c.shape[:2], 1)), np.cumsum(c, axis=-1, dtype=np.float64)], axis=-1)
    # position of every common edge on the pixel's nominal axis: true = g·nominal + o
    pos = (edges[None, None, :] - o[..., None]) / g[..., None]
    k = np.clip(np.searchsorted(edges, pos, side="right") - 1, 0, edges.size - 2)
    frac = np.clip((pos - edges[k]) / (edges[k + 1] - edges[k]), 0.0, 1.0)
    lo = np.take_along_axis(cum, k, axis=-1)
    hi = np.take_along_axis(cum, k + 1, axis=-1)
    at = lo + frac * (hi - lo)
    out = np.diff(at, axis=-1)
    np.clip(out, 0.0, None, out=out)  # rounding only
    return out.astype(np.float32) if c.dtype == np.float32 else out


def bad_pixels(total_counts: Any, *, dead_fraction: float = 0.1, noisy_sigma: float = 6.0) -> np.ndarray:
    """Dead and noisy pixels of a map of total counts per pixel.

    Dead: total below ``dead_fraction × median``. Noisy: total above ``median + noisy_sigma × σ``
    with the robust scatter ``σ = 1.4826 · MAD`` (median absolute deviation), at least
    ``sqrt(median)`` (the Poisson scatter, so a perfectly flat map flags nothing). Non-finite totals
    are bad too. The median and MAD are taken over the finite pixels.

    Parameters
    ----------
    total_counts : array_like
        ``(y, x)`` counts summed over energy (and planes).
    dead_fraction : float
        Fraction of the median below which a pixel is dead.
    noisy_sigma : float
        Robust standard deviations above the median beyond which a pixel is noisy.

    Returns
    -------
    numpy.ndarray
        ``(y, x)`` bool, True = bad pixel.

    Examples
    --------
    >>> t = np.full((4, 4), 100.0); t[0, 0] = 0.0; t[1, 1] = 1e4
    >>> np.argwhere(bad_pixels(t)).tolist()
    [[0, 0], [1, 1]]
    """
    t = np.asarray(total_counts, dtype=np.float64)
    if t.ndim != 2:
        raise InputError(f"bad_pixels: total_counts must be a (y, x) map, got shape {t.shape}")
    finite = np.isfinite(t)
    if not finite.any():
        raise InputError("bad_pixels: no pixel has a finite total")
    vals = t[finite]
    med = float(np.median(vals))
    sigma = max(1.4826 * float(np.median(np.abs(vals - med))), float(np.sqrt(max(med, 0.0))))
    with np.errstate(invalid="ignore"):
        dead = t < dead_fraction * med
        noisy = t > med + noisy_sigma * sigma
    mask = dead | noisy | ~finite
    logger.info("bad_pixels: %d dead, %d noisy, %d non-finite of %d", int((dead & finite).sum()),
                int((noisy & finite).sum()), int((~finite).sum()), t.size)
    return mask
