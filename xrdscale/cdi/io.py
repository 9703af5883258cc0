"""Bragg CDI data in and out: 3D diffraction patterns, detector masks, CXI results, NeXus rocking scans.

:func:`read_pattern` reads one 3D pattern ``(rocking/z, rows/y, cols/x)`` from a local path or any
fsspec URL, whatever it was written as (detected by content, then extension):

- ``.npy``: a 3D array;
- HDF5: the dataset named by ``dataset``; else CXI (``cxi_version`` at the root or
  ``entry_1/data_1/data``): ``entry_1/data_1/data``, with the mask of
  ``entry_1/instrument_1/detector_1/mask`` or ``entry_1/data_1/mask`` (non-zero = bad pixel);
  else NeXus rocking scans (below); else a root ``data``; else the file's only 3D dataset;
- NeXus rocking-curve scans: every ``NXentry`` group whose frames ``(n_frames, rows, cols)`` are
  found (the ``signal`` of its ``NXdata`` group, else ``entry/data/data``, else
  ``entry/instrument/detector/data``), with the rocking angle of every frame from
  ``entry/sample/rocking_angle``, else the first ``axes`` entry of the ``NXdata`` group (a dataset
  of that name in the group or in ``entry/sample`` / ``entry/instrument/positioners``), and the
  ``pixel_mask`` of ``entry/instrument/detector`` (non-zero = bad). Frames may be compressed with
  any hdf5plugin filter.

Repeated scans — several entries of one file, several files (a list of URLs, or one URL with a glob
pattern ``*``/``?``/``[``) or both — are summed after checking that their shapes and rocking angles
agree. The sum is exact for counts (float64, then float32, exact below 2**24 per voxel).

Processing order: detector ROI (``row0, row1, col0, col1``, half-open, on the raw frame), binning by
integer factors (sum; a bin is masked if *any* of its voxels is; trailing remainders dropped),
then a cube of side ``crop`` around the intensity maximum (the window shifted to stay inside the
array, padded with masked zeros along axes shorter than ``crop``), or, without ``crop``, every odd
axis padded by one masked zero plane at its end to an even length. Values under the mask are set to
0 and ignored by the validation.

:func:`write_cxi` / :func:`read_cxi` store a retrieved object (CXI 1.5 layout), and
:func:`write_rocking_scans` splits an expected intensity into Poisson scans in NeXus, the format
``xrdscale cdi simulate`` writes and :func:`read_pattern` reads back. Writers write a temporary file
and move it into place at the end: a failure never leaves a complete-looking file.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import h5py
import hdf5plugin
import numpy as np

from xrdscale import __version__
from xrdscale.exceptions import InputError
from xrdscale.io import storage

logger = logging.getLogger(__name__)

#: CXI version written by :func:`write_cxi`.
CXI_VERSION = 150
#: Candidate paths of a CXI pattern's mask.
CXI_MASKS = ("entry_1/instrument_1/detector_1/mask", "entry_1/data_1/mask")
#: Compressions of :func:`write_rocking_scans`.
COMPRESSIONS = ("bitshuffle", "lz4", "gzip", None)
#: Names :func:`read_cxi` returns itself; ``extra`` arrays of :func:`write_cxi` may not use them.
RESERVED = ("obj", "support", "chi2", "intensity", "attrs", "data", "process_1")

_NPY_MAGIC = b"\x93NUMPY"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_HDF5_EXT = (".h5", ".hdf5", ".hdf", ".cxi", ".nxs", ".nx5", ".nx")


@dataclass(frozen=True)
class Pattern:
    """A 3D Bragg diffraction pattern ready for phasing.

    Attributes
    ----------
    intensity : numpy.ndarray
        float32 ``(rocking/z, rows/y, cols/x)``, 0 where masked.
    mask : numpy.ndarray or None
        Boolean of the same shape, True where not measured (detector gaps, hot pixels, padding);
        None when everything was measured.
    meta : dict
        ``source`` (the URLs read), ``format``, ``datasets``, ``scans`` (number summed), ``angles``
        (rocking angle of every plane after binning/crop, or None), ``raw_shape``, ``roi``,
        ``binning``, ``crop`` (``{"side", "start"}`` or None), ``pad`` (planes added at the end of
        each axis).
    """

    intensity: np.ndarray
    mask: np.ndarray | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Volume:
    data: np.ndarray
    mask: np.ndarray | None
    angles: np.ndarray | None
    fmt: str
    dataset: str


# --------------------------------------------------------------------------------------------
# file access


def _expand(url: str | Sequence[str]) -> list[str]:
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise InputError("no pattern file given: pass a URL, a glob pattern or a list of URLs")
    out: list[str] = []
    for u in urls:
        if not isinstance(u, str):
            raise InputError(f"pattern URLs must be strings, got {u!r}")
        if any(ch in u for ch in "*?["):
            fs, path = storage.filesystem(u)
            with storage.io_errors(u, "list the pattern files"):
                matches = sorted(fs.glob(path))
            if not matches:
                raise InputError(f"no file matches {storage.redact(u)}; check the pattern")
            out.extend(fs.unstrip_protocol(m) if storage.is_remote(u) else m for m in matches)
        else:
            out.append(u)
    return out



def _kind(url: str, head: bytes) -> str:
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head.startswith(_HDF5_MAGIC):
        return "hdf5"
    low = url.lower()
    if low.endswith(".npy"):
        return "npy"
    if low.endswith(_HDF5_EXT):
        return "hdf5"
    raise InputError(f"{storage.redact(url)} is neither a .npy array nor an HDF5/CXI/NeXus file "
                     f"(its first bytes are {head[:8]!r}); convert it to one of these")


def _datasets(h5: h5py.File) -> dict[str, tuple[int, ...]]:
    found: dict[str, tuple[int, ...]] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            found[name] = tuple(obj.shape)

    h5.visititems(visit)
    return found


def _nx_class(obj: Any) -> str:
    value = obj.attrs.get("NX_class", "")
    return value.decode() if isinstance(value, bytes) else str(value)


def _is_cxi(h5: h5py.File) -> bool:
    return "cxi_version" in h5 or "entry_1/data_1/data" in h5


def _attr_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return _attr_str(value.flat[0]) if value.size else ""
    return str(value)


def _nx_frames(entry: h5py.Group) -> tuple[h5py.Dataset | None, h5py.Group | None]:
    """The frames dataset of an NXentry and its NXdata group."""
    groups = [g for g in entry.values() if isinstance(g, h5py.Group) and _nx_class(g) == "NXdata"]
    default = _attr_str(entry.attrs.get("default", ""))
    groups.sort(key=lambda g: g.name.rsplit("/", 1)[-1] != default)
    for group in groups:
        signal = _attr_str(group.attrs.get("signal", "data"))
        if isinstance(group.get(signal), h5py.Dataset):
            return group[signal], group
    for path in ("data/data", "instrument/detector/data"):
        if isinstance(entry.get(path), h5py.Dataset):
            return entry[path], None
    return None, None


def _nx_angles(entry: h5py.Group, group: h5py.Group | None) -> h5py.Dataset | None:
    """The rocking angle of every frame of an NXentry (see the module docstring)."""
    if isinstance(entry.get("sample/rocking_angle"), h5py.Dataset):
        return entry["sample/rocking_angle"]
    if group is not None and "axes" in group.attrs:
        axes = group.attrs["axes"]
        first = _attr_str(axes[0] if isinstance(axes, np.ndarray) and axes.ndim else axes).split(":")[0]
        if first and first != ".":
            for where in (group, entry.get("sample"), entry.get("instrument/positioners")):
                if isinstance(where, h5py.Group) and isinstance(where.get(first), h5py.Dataset):
                    return where[first]
    return None


def _read_mask_dataset(ds: h5py.Dataset) -> np.ndarray:
    return np.asarray(ds[()]) != 0


def _read_hdf5(f: Any, url: str, dataset: str | None) -> list[_Volume]:
    name = storage.redact(url)
    with h5py.File(f, "r") as h5:
        if dataset is not None:
            obj = h5.get(dataset)
            if not isinstance(obj, h5py.Dataset):
                listing = ", ".join(f"{k} {v}" for k, v in _datasets(h5).items() if len(v) >= 2) or "none"
                raise InputError(f"{name} has no dataset {dataset!r}; datasets of 2 or more dimensions: {listing}")
            angles = None
            parent = obj.parent
            while parent.name != "/" and _nx_class(parent) != "NXentry":
                parent = parent.parent
            if _nx_class(parent) == "NXentry":
                ads = _nx_angles(parent, obj.parent if _nx_class(obj.parent) == "NXdata" else None)
                angles = None if ads is None else np.asarray(ads[()], dtype=float)
            return [_Volume(np.asarray(obj[()]), None, angles, "hdf5", dataset)]
        if _is_cxi(h5):
            if not isinstance(h5.get("entry_1/data_1/data"), h5py.Dataset):
                raise InputError(f"{name} is a CXI file without entry_1/data_1/data (no diffraction pattern); "
                                 f"pass dataset= to read another dataset")
            mask = next((_read_mask_dataset(h5[m]) for m in CXI_MASKS if isinstance(h5.get(m), h5py.Dataset)), None)
            return [_Volume(np.asarray(h5["entry_1/data_1/data"][()]), mask, None, "cxi", "entry_1/data_1/data")]
        volumes = []
        for key, entry in h5.items():
            if not (isinstance(entry, h5py.Group) and _nx_class(entry) == "NXentry"):
                continue
            frames, group = _nx_frames(entry)
            if frames is None:
                continue
            ads = _nx_angles(entry, group)
            angles = None if ads is None else np.asarray(ads[()], dtype=float).reshape(-1)
            pm = entry.get("instrument/detector/pixel_mask")
            mask = _read_mask_dataset(pm) if isinstance(pm, h5py.Dataset) else None
            volumes.append(_Volume(np.asarray(frames[()]), mask, angles, "nexus", frames.name.lstrip("/")))
        if volumes:
            return volumes
        if isinstance(h5.get("data"), h5py.Dataset):
            return [_Volume(np.asarray(h5["data"][()]), None, None, "hdf5", "data")]
        found = _datasets(h5)
        three = [k for k, v in found.items() if len(v) == 3]
        if len(three) == 1:
            return [_Volume(np.asarray(h5[three[0]][()]), None, None, "hdf5", three[0])]
        if len(three) > 1:
            raise InputError(f"{name} has several 3D datasets ({', '.join(three)}); choose one with dataset=")
        listing = ", ".join(f"{k} {v}" for k, v in found.items()) or "no datasets at all"
        hint = " (a 2D frame: a Bragg CDI pattern needs a rocking series of frames)" if any(
            len(v) == 2 for v in found.values()) else ""
        raise InputError(f"{name} has no 3D dataset: found {listing}{hint}")


def _read_file(url: str, dataset: str | None) -> list[_Volume]:
    with storage.open_input(url, "pattern file") as f:
        head = f.read(8)
        f.seek(0)
        kind = _kind(url, head)
        with storage.io_errors(url, "read the pattern"):
            if kind == "npy":
                try:
                    data = np.load(f, allow_pickle=False)
                except ValueError as exc:
                    raise InputError(f"{storage.redact(url)} is not a readable .npy array: {exc}") from exc
                return [_Volume(np.asarray(data), None, None, "npy", "")]
            try:
                return _read_hdf5(f, url, dataset)
            except OSError as exc:
                raise InputError(f"{storage.redact(url)} is not a readable HDF5 file: {exc}") from exc


# --------------------------------------------------------------------------------------------
# masks and validation


def _load_mask(mask: str | np.ndarray) -> np.ndarray:
    if not isinstance(mask, str):
        return np.asarray(mask) != 0
    with storage.open_input(mask, "mask file") as f:
        head = f.read(8)
        f.seek(0)
        with storage.io_errors(mask, "read the mask"):
            if _kind(mask, head) == "npy":
                return np.load(f, allow_pickle=False) != 0
            with h5py.File(f, "r") as h5:
                for path in ("mask", *CXI_MASKS, "entry/instrument/detector/pixel_mask"):
                    if isinstance(h5.get(path), h5py.Dataset):
                        return _read_mask_dataset(h5[path])
                found = _datasets(h5)
                cands = [k for k, v in found.items() if len(v) in (2, 3)]
                if len(cands) == 1:
                    return _read_mask_dataset(h5[cands[0]])
                raise InputError(f"cannot tell the mask in {storage.redact(mask)}: expected a dataset 'mask' or a "
                                 f"single 2D/3D dataset, found {', '.join(f'{k} {found[k]}' for k in found) or 'none'}")


def _fit_mask(mask: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    if mask.shape == shape:
        return mask
    if mask.shape == shape[1:]:
        return np.broadcast_to(mask, shape)
    raise InputError(f"the {what} has shape {mask.shape}, which matches neither the detector frame {shape[1:]} "
                     f"nor the volume {shape}; give a (rows, cols) or a (frames, rows, cols) mask")


def _check_volume(vol: _Volume, url: str) -> None:
    if vol.data.ndim != 3:
        where = f"{storage.redact(url)}" + (f" ({vol.dataset})" if vol.dataset else "")
        if vol.data.ndim == 2:
            raise InputError(f"{where} holds a single 2D frame of shape {vol.data.shape}: a Bragg CDI pattern needs a "
                             f"rocking series of frames (frames, rows, cols)")
        raise InputError(f"{where} has shape {vol.data.shape}: a 3D pattern (frames, rows, cols) is needed")
    if vol.data.dtype == bool:
        vol.data = vol.data.astype(np.uint8)
    if not (np.issubdtype(vol.data.dtype, np.number) and not np.iscomplexobj(vol.data)):
        raise InputError(f"{storage.redact(url)}: the pattern has dtype {vol.data.dtype}; real numbers are needed")
    if vol.angles is not None and vol.angles.shape != (vol.data.shape[0],):
        raise InputError(f"{storage.redact(url)} ({vol.dataset}): {vol.angles.size} rocking angles for "
                         f"{vol.data.shape[0]} frames; there must be one angle per frame")


def _check_values(data: np.ndarray, mask: np.ndarray | None, url: str) -> None:
    valid = np.ones(data.shape, dtype=bool) if mask is None else ~mask
    if np.issubdtype(data.dtype, np.floating):
        bad = ~np.isfinite(data) & valid
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InputError(f"{storage.redact(url)}: {int(bad.sum())} NaN/inf intensities (the first at "
                             f"(frame, row, col) = {first}); mask them or fix the data")
    neg = (data < 0) & valid
    if neg.any():
        first = tuple(int(i) for i in np.argwhere(neg)[0])
        raise InputError(f"{storage.redact(url)}: {int(neg.sum())} negative intensities (the first, {data[first]}, "
                         f"at (frame, row, col) = {first}); intensities are counts >= 0: mask them or fix the data")


# --------------------------------------------------------------------------------------------
# processing


def _check_roi(roi: Sequence[int], frame: tuple[int, ...]) -> tuple[int, int, int, int]:
    try:
        r0, r1, c0, c1 = (int(v) for v in roi)
    except (TypeError, ValueError):
        raise InputError(f"roi must be 4 integers (row0, row1, col0, col1), got {roi!r}") from None
    if not (0 <= r0 < r1 <= frame[0] and 0 <= c0 < c1 <= frame[1]):
        raise InputError(f"roi (row0, row1, col0, col1) = {(r0, r1, c0, c1)} is outside the detector frame of "
                         f"{frame[0]} rows x {frame[1]} cols (need 0 <= row0 < row1 <= {frame[0]} and "
                         f"0 <= col0 < col1 <= {frame[1]})")
    return r0, r1, c0, c1


def _bin(data: np.ndarray, mask: np.ndarray | None, factors: tuple[int, int, int]) -> tuple[np.ndarray,
                                                                                           np.ndarray | None]:
    shape = tuple(n // b for n, b in zip(data.shape, factors))
    if min(shape) < 1:
        raise InputError(f"binning {factors} is larger than the data {data.shape} along some axis")
    cut = tuple(slice(0, n * b) for n, b in zip(shape, factors))
    split = (shape[0], factors[0], shape[1], factors[1], shape[2], factors[2])
    data = data[cut].reshape(split).sum(axis=(1, 3, 5))
    if mask is not None:
        mask = np.asarray(mask[cut].reshape(split).any(axis=(1, 3, 5)))
    return data, mask


def _crop(data: np.ndarray, mask: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    peak = np.unravel_index(int(np.argmax(np.where(mask, -np.inf, data))), data.shape)
    out = np.zeros((side,) * 3, dtype=data.dtype)
    out_mask = np.ones((side,) * 3, dtype=bool)
    src, dst, starts = [], [], []
    for n, p in zip(data.shape, peak):
        if n >= side:
            start = min(max(int(p) - side // 2, 0), n - side)
            src.append(slice(start, start + side))
            dst.append(slice(0, side))
        else:
            start = -((side - n) // 2)
            src.append(slice(0, n))
            dst.append(slice(-start, -start + n))
        starts.append(start)
    out[tuple(dst)] = data[tuple(src)]
    out_mask[tuple(dst)] = mask[tuple(src)]
    return out, out_mask, starts


def read_pattern(url: str | Sequence[str], *, roi: Sequence[int] | None = None,
                 binning: Sequence[int] = (1, 1, 1), crop: int | None = None, mask: str | np.ndarray | None = None,
                 dataset: str | None = None) -> Pattern:
    """Read a 3D Bragg pattern (see the module docstring for the formats and the processing order).

    Parameters
    ----------
    url : str or sequence of str
        A local path or fsspec URL, a glob pattern, or a list of them: every file (and every NeXus
        entry) is a repeated scan, and all are summed.
    roi : (row0, row1, col0, col1), optional
        Detector region of interest in raw pixels (half-open ranges).
    binning : (int, int, int)
        Bin factors along (rocking, rows, cols); intensities are summed.
    crop : int, optional
        Side of a cube cut around the intensity maximum.
    mask : str or numpy.ndarray, optional
        Detector mask (rows, cols), broadcast along the rocking axis, or a volume mask (frames, rows,
        cols) of the raw data; non-zero/True = not measured. A URL of a ``.npy`` or an HDF5 file
        (dataset ``mask``, a CXI/NeXus mask path, or its only 2D/3D dataset). Combined with any mask
        in the data file.
    dataset : str, optional
        HDF5 path of the pattern, overriding the automatic choice.

    Returns
    -------
    Pattern

    Raises
    ------
    InputError
        A missing file or dataset, data that are not 3D, NaN/inf or negative intensities, a mask that
        fits neither the frame nor the volume, an ROI outside the frame, scans that disagree, bad
        binning or crop.
    """
    factors = tuple(int(b) for b in binning)
    if len(factors) != 3 or any(b < 1 for b in factors) or any(int(b) != b for b in binning):
        raise InputError(f"binning must be 3 integers >= 1 (rocking, rows, cols), got {tuple(binning)!r}")
    if crop is not None and (isinstance(crop, bool) or int(crop) != crop or crop < 2):
        raise InputError(f"crop must be an integer >= 2 (the side of the cube), got {crop!r}")
    urls = _expand(url)
    total: np.ndarray | None = None
    total_mask: np.ndarray | None = None
    ref_angles: np.ndarray | None = None
    datasets: list[str] = []
    fmt = ""
    first = ""
    user_mask = None if mask is None else _load_mask(mask)
    n_scans = 0
    for u in urls:
        for vol in _read_file(u, dataset):
            _check_volume(vol, u)
            shape = vol.data.shape
            vmask = None if vol.mask is None else _fit_mask(vol.mask, shape, f"mask in {storage.redact(u)}")
            if user_mask is not None:
                um = _fit_mask(user_mask, shape, "mask")
                vmask = um if vmask is None else vmask | um
            _check_values(vol.data, vmask, u)
            data = vol.data.astype(np.float64)
            if vmask is not None:
                data[vmask] = 0
            label = f"{storage.redact(u)}" + (f":{vol.dataset}" if vol.dataset else "")
            if total is None:
                total, total_mask, ref_angles, fmt, first = data, vmask, vol.angles, vol.fmt, label
            else:
                if shape != total.shape:
                    raise InputError(f"repeated scans differ in shape: {first} is {total.shape}, {label} is {shape}; "
                                     f"only scans of the same frames can be summed")
                if (ref_angles is None) != (vol.angles is None) or (
                        ref_angles is not None and vol.angles is not None
                        and not np.allclose(ref_angles, vol.angles, rtol=0, atol=1e-6)):
                    raise InputError(f"repeated scans differ in rocking angles: {first} and {label}; only scans of the "
                                     f"same rocking curve can be summed")
                total += data
                if vmask is not None:
                    total_mask = vmask.copy() if total_mask is None else total_mask | vmask
            datasets.append(label)
            n_scans += 1
    assert total is not None
    raw_shape = total.shape
    data, vmask, angles = total, total_mask, ref_angles
    if vmask is not None:
        vmask = np.ascontiguousarray(vmask)
        data[vmask] = 0
    roi_t = None
    if roi is not None:
        roi_t = _check_roi(roi, raw_shape[1:])
        r0, r1, c0, c1 = roi_t
        data = data[:, r0:r1, c0:c1]
        vmask = None if vmask is None else vmask[:, r0:r1, c0:c1]
    if factors != (1, 1, 1):
        data, vmask = _bin(data, vmask, (factors[0], factors[1], factors[2]))
        if angles is not None:
            angles = angles[: data.shape[0] * factors[0]].reshape(data.shape[0], factors[0]).mean(axis=1)
    crop_info = None
    pad = [0, 0, 0]
    if crop is not None:
        side = int(crop)
        data, vmask, starts = _crop(data, np.zeros(data.shape, bool) if vmask is None else vmask, side)
        crop_info = {"side": side, "start": starts}
        if angles is not None:
            idx = np.arange(starts[0], starts[0] + side)
            step = float(angles[1] - angles[0]) if angles.size > 1 else 0.0
            angles = np.where((idx >= 0) & (idx < angles.size), angles[np.clip(idx, 0, angles.size - 1)],
                              angles[0] + idx * step)
    else:
        pad = [n % 2 for n in data.shape]
        if any(pad):
            data = np.pad(data, [(0, p) for p in pad])
            vmask = np.pad(np.zeros(data.shape, bool)[tuple(slice(0, n - p) for n, p in zip(data.shape, pad))]
                           if vmask is None else vmask, [(0, p) for p in pad], constant_values=True)
            if angles is not None and pad[0]:
                step = float(angles[-1] - angles[-2]) if angles.size > 1 else 0.0
                angles = np.append(angles, angles[-1] + step)
    if vmask is not None and not vmask.any():
        vmask = None
    meta: dict[str, Any] = {
        "source": [storage.redact(u) for u in urls], "format": fmt, "datasets": datasets, "scans": n_scans,
        "angles": None if angles is None else [float(a) for a in angles], "raw_shape": list(raw_shape),
        "roi": None if roi_t is None else list(roi_t), "binning": list(factors), "crop": crop_info, "pad": pad,
    }
    logger.info("read a %s pattern %s from %d scan(s) of %s", fmt, data.shape, n_scans, meta["source"][0])
    return Pattern(intensity=data.astype(np.float32), mask=None if vmask is None else np.ascontiguousarray(vmask),
                   meta=meta)


# --------------------------------------------------------------------------------------------
# writers


def _json_attr(value: Any) -> str:
    return json.dumps(value, default=lambda v: v.tolist() if isinstance(v, np.ndarray) else str(v))


def write_cxi(url: str, obj: np.ndarray, *, support: np.ndarray, chi2: float, intensity: np.ndarray | None = None,
              extra: Mapping[str, np.ndarray] | None = None, attrs: Mapping[str, Any] | None = None) -> str:
    """Write a retrieved object as a CXI file.

    Layout: ``cxi_version`` = 150; ``entry_1/image_1/data`` the complex64 object,
    ``entry_1/image_1/support`` (uint8), ``entry_1/image_1/chi2`` (also the ``chi2`` attribute of
    ``image_1``), every ``extra`` array as ``entry_1/image_1/<name>``, ``entry_1/data_1/data`` the
    float32 intensity when given, and ``entry_1/image_1/process_1`` with the ``xrdscale_version``,
    the time written and every ``attrs`` item as a JSON string attribute.

    Parameters
    ----------
    url : str
        Destination (local path or fsspec URL); written through a temporary file.
    obj : numpy.ndarray
        3D complex object.
    support : numpy.ndarray
        Support of the object's shape.
    chi2 : float
        Final Fourier-modulus error of the retrieval.
    intensity : numpy.ndarray, optional
        The measured intensity the object was retrieved from.
    extra : mapping of str to numpy.ndarray, optional
        More arrays (phase, strain, ...), named as anything but the :data:`RESERVED` names.
    attrs : mapping, optional
        JSON-serialisable provenance (config, command, ...).

    Returns
    -------
    str
        ``url``.

    Raises
    ------
    InputError
        An object that is not 3D, arrays whose shapes differ from the object's, a non-finite chi2,
        a reserved or nested extra name.
    """
    obj = np.asarray(obj)
    if obj.ndim != 3:
        raise InputError(f"the object must be 3D, got shape {obj.shape}")
    support = np.asarray(support)
    if support.shape != obj.shape:
        raise InputError(f"the support has shape {support.shape}, the object {obj.shape}; they must match")
    if intensity is not None and np.shape(intensity) != obj.shape:
        raise InputError(f"the intensity has shape {np.shape(intensity)}, the object {obj.shape}; they must match")
    chi2 = float(chi2)
    if not np.isfinite(chi2):
        raise InputError(f"chi2 must be finite, got {chi2}")
    for name in extra or {}:
        if name in RESERVED or "/" in name or not name:
            raise InputError(f"extra array name {name!r} is reserved or invalid; use a plain name other than "
                             f"{', '.join(RESERVED)}")
    with storage.staged(url) as local:
        with h5py.File(local, "w") as h5:
            h5.attrs["creator"] = f"xrdscale {__version__}"
            h5.create_dataset("cxi_version", data=CXI_VERSION)
            entry = h5.create_group("entry_1")
            entry.attrs["NX_class"] = "NXentry"
            image = entry.create_group("image_1")
            image.attrs["NX_class"] = "NXdata"
            image.attrs["signal"] = "data"
            image.create_dataset("data", data=obj.astype(np.complex64), compression="gzip", compression_opts=4)
            image.create_dataset("support", data=(support != 0).astype(np.uint8), compression="gzip")
            image.create_dataset("chi2", data=chi2)
            image.attrs["chi2"] = chi2
            image.create_dataset("data_type", data="complex object")
            image.create_dataset("data_space", data="real")
            for name, arr in (extra or {}).items():
                image.create_dataset(name, data=np.asarray(arr), compression="gzip", compression_opts=4)
            process = image.create_group("process_1")
            process.attrs["xrdscale_version"] = __version__
            process.attrs["written"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            for key, value in (attrs or {}).items():
                process.attrs[key] = _json_attr(value)
            if intensity is not None:
                data = entry.create_group("data_1")
                data.create_dataset("data", data=np.asarray(intensity, dtype=np.float32), compression="gzip",
                                    compression_opts=4)
    logger.info("wrote the CXI result %s", storage.redact(url))
    return url


def read_cxi(url: str) -> dict[str, Any]:
    """Read a CXI file of :func:`write_cxi` (or any CXI file with ``entry_1/image_1/data``).

    Returns
    -------
    dict
        ``obj`` (complex64), ``support`` (bool), ``chi2`` (float, NaN if absent), ``intensity`` when
        present, ``attrs`` (``process_1`` attributes, JSON decoded where they are JSON) and every other
        array of ``entry_1/image_1`` under its name.

    Raises
    ------
    InputError
        A missing file or a file without ``entry_1/image_1/data``.
    """
    with storage.open_input(url, "pattern file") as f, storage.io_errors(url, "read the CXI file"):
        if not f.read(8).startswith(_HDF5_MAGIC):
            raise InputError(f"{storage.redact(url)} is not an HDF5/CXI file")
        f.seek(0)
        with h5py.File(f, "r") as h5:
            image = h5.get("entry_1/image_1")
            if not isinstance(image, h5py.Group) or not isinstance(image.get("data"), h5py.Dataset):
                raise InputError(f"{storage.redact(url)} has no entry_1/image_1/data: not a CXI result")
            out: dict[str, Any] = {"obj": np.asarray(image["data"][()]).astype(np.complex64)}
            obj_shape = out["obj"].shape
            out["support"] = (np.asarray(image["support"][()]) != 0 if "support" in image
                              else np.ones(obj_shape, dtype=bool))
            out["chi2"] = float(image["chi2"][()]) if "chi2" in image else float(image.attrs.get("chi2", np.nan))
            if isinstance(h5.get("entry_1/data_1/data"), h5py.Dataset):
                out["intensity"] = np.asarray(h5["entry_1/data_1/data"][()])
            attrs: dict[str, Any] = {}
            if isinstance(image.get("process_1"), h5py.Group):
                for key, value in image["process_1"].attrs.items():
                    text = value.decode() if isinstance(value, bytes) else value
                    try:
                        attrs[key] = json.loads(text) if isinstance(text, str) and key not in (
                            "xrdscale_version", "written") else text
                    except json.JSONDecodeError:
                        attrs[key] = text
            out["attrs"] = attrs
            for name, ds in image.items():
                if name in RESERVED or name in ("data_type", "data_space") or not isinstance(ds, h5py.Dataset):
                    continue
                out[name] = ds[()]
    return out


def _compression(compression: str | None) -> dict[str, Any]:
    if compression is None:
        return {}
    if compression == "bitshuffle":
        return dict(hdf5plugin.Bitshuffle(cname="lz4"))
    if compression == "lz4":
        return dict(hdf5plugin.LZ4())
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4}
    raise InputError(f"unknown compression {compression!r}: use one of {', '.join(map(str, COMPRESSIONS))}")


def write_rocking_scans(url: str, intensity: np.ndarray, *, n_scans: int = 22, angles: np.ndarray | None = None,
                        rng: np.random.Generator | None = None, compression: str | None = "bitshuffle") -> str:
    """Split an expected 3D intensity into ``n_scans`` Poisson rocking scans in one NeXus file.

    Entry ``entry_<k>`` (k = 1..n_scans, ``NX_class`` NXentry) holds ``data/data``: uint32 frames
    ``(n_frames, rows, cols)`` drawn from Poisson(``intensity / n_scans``), one chunk per frame,
    compressed; ``data`` is an NXdata group (``signal`` = data, ``axes`` = rocking_angle) whose
    ``rocking_angle`` is a hard link to ``sample/rocking_angle`` (degrees), and
    ``instrument/detector/data`` links the frames. The sum of the scans has the expected intensity.

    Parameters
    ----------
    url : str
        Destination (local path or fsspec URL); written through a temporary file.
    intensity : numpy.ndarray
        Expected total intensity (frames, rows, cols), finite and >= 0.
    n_scans : int
        Number of repeated scans (>= 1).
    angles : numpy.ndarray, optional
        Rocking angle of every frame [deg]; default: steps of 0.01° centred on 0 at frame ``n // 2``.
    rng : numpy.random.Generator, optional
        Random generator of the counts (default: a fresh unseeded one).
    compression : {"bitshuffle", "lz4", "gzip", None}
        Frame compression (bitshuffle+LZ4 and LZ4 from hdf5plugin).

    Returns
    -------
    str
        ``url``.

    Raises
    ------
    InputError
        Intensity not 3D, not finite or negative; angles of the wrong length; a bad n_scans or compression.
    """
    expected = np.asarray(intensity, dtype=np.float64)
    if expected.ndim != 3:
        raise InputError(f"the intensity must be 3D (frames, rows, cols), got shape {expected.shape}")
    if not np.all(np.isfinite(expected)) or np.any(expected < 0):
        raise InputError("the intensity must be finite and >= 0 to draw Poisson scans")
    if isinstance(n_scans, bool) or int(n_scans) != n_scans or n_scans < 1:
        raise InputError(f"n_scans must be an integer >= 1, got {n_scans!r}")
    n = expected.shape[0]
    ang = (np.arange(n) - n // 2) * 0.01 if angles is None else np.asarray(angles, dtype=float)
    if ang.shape != (n,):
        raise InputError(f"{ang.size} rocking angles for {n} frames; give one angle per frame")
    filters = _compression(compression)
    gen = np.random.default_rng() if rng is None else rng
    with storage.staged(url) as local:
        with h5py.File(local, "w") as h5:
            h5.attrs["NX_class"] = "NXroot"
            h5.attrs["default"] = "entry_1"
            h5.attrs["creator"] = f"xrdscale {__version__}"
            for k in range(1, int(n_scans) + 1):
                entry = h5.create_group(f"entry_{k}")
                entry.attrs["NX_class"] = "NXentry"
                entry.attrs["default"] = "data"
                sample = entry.create_group("sample")
                sample.attrs["NX_class"] = "NXsample"
                rock = sample.create_dataset("rocking_angle", data=ang)
                rock.attrs["units"] = "deg"
                frames = gen.poisson(expected / n_scans).astype(np.uint32)
                data = entry.create_group("data")
                data.attrs["NX_class"] = "NXdata"
                data.attrs["signal"] = "data"
                data.attrs["axes"] = ["rocking_angle", ".", "."]
                ds = data.create_dataset("data", data=frames, chunks=(1, *frames.shape[1:]), **filters)
                ds.attrs["units"] = "counts"
                data["rocking_angle"] = rock
                detector = entry.create_group("instrument").create_group("detector")
                detector.attrs["NX_class"] = "NXdetector"
                detector["data"] = ds
    logger.info("wrote %d rocking scans %s to %s", n_scans, expected.shape, storage.redact(url))
    return url


def write_pattern(url: str, intensity: np.ndarray, *, mask: np.ndarray | None = None,
                  attrs: Mapping[str, Any] | None = None) -> str:
    """Write a measured (or simulated) 3D pattern as a data-only CXI file.

    Layout: ``cxi_version`` = 150, ``entry_1/data_1/data`` (float32, gzip), the mask at
    ``entry_1/instrument_1/detector_1/mask`` when given, ``attrs`` as JSON attributes of
    ``entry_1``. Written to a temporary name first, so a failure leaves no file.

    Returns
    -------
    str
        ``url``.
    """
    data = np.asarray(intensity, dtype=np.float32)
    if data.ndim != 3:
        raise InputError(f"a CDI pattern is 3D (rocking, rows, cols); got shape {data.shape}")
    with storage.staged(url) as local, h5py.File(local, "w") as h5:
        h5.create_dataset("cxi_version", data=CXI_VERSION)
        entry = h5.create_group("entry_1")
        for key, value in dict(attrs or {}).items():
            entry.attrs[key] = _json_attr(value)
        entry.create_dataset("data_1/data", data=data, compression="gzip", chunks=True)
        if mask is not None:
            entry.create_dataset("instrument_1/detector_1/mask", data=np.asarray(mask, dtype=np.uint8),
                                 compression="gzip")
    return url
