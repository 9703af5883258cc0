"""Absorption CT of a coin cell: projections → flat/dark correction → ring removal → FBP slices.

The rotation axis is vertical (detector rows are slices, ``z``), the beam parallel, and a
scan covers 180° or 360° (the paper: 3600 projections over 360° at 115 keV). One Dask task
reconstructs the slices of a block of detector rows (:func:`reconstruct_block`):

1. :func:`open_projections` opens an NXtomo or a plain HDF5 file lazily: the projection
   frames are a Dask array chunked along detector rows, whose tasks open the file by URL
   themselves (picklable, no h5py object in the graph); flats and darks are read at once.
2. :func:`normalize`: ``−log((P − D̄)/(F̄ − D̄))``, the transmission clipped to
   ``min_transmission``.
3. :func:`remove_rings`: stripe removal in every sinogram with algotom's implementation of
   Vo, Atwood & Drakopoulos (2018), the combination of their algorithms 3–6
   (``remove_all_stripe``) or the sorting method alone.
4. :func:`find_center`: the rotation axis from the 360° symmetry
   ``p(θ + 180°, t) = p(θ, −t)`` (see there), algotom's ``find_center_vo`` for 180° scans.
5. :func:`reconstruct_slices`: filtered back projection with ASTRA, slice by slice.

Geometry and orientation. Sinograms are scikit-image's: ``p(θ, col)`` with ``θ`` the
rotation angle in degrees and the rotation axis at column ``center``; a slice projected
with :func:`skimage.transform.radon` (``theta = angles``) reconstructs in the same
orientation (rows ``y``, columns ``x``, no flip or transpose). The volume is ``n × n``
pixels of one detector column with the rotation axis at pixel ``(n // 2, n // 2)``
(scikit-image's ``radon``/``iradon`` centre; ``(n − 1)/2`` for odd ``n``), whatever the
detector column of the axis: the reconstruction never resamples the sinogram, the
detector offset goes into ASTRA's ``parallel_vec`` geometry instead (per angle, together
with the half-pixel volume shift of even ``n``). ASTRA's CPU ``FBP`` only takes
``parallel`` geometries, so the ramp filter is applied here (:func:`filter_response`:
:func:`xrdscale.recon.filters.frequency_response`'s Ram-Lak kernel and padding, ASTRA's) and the
filtered sinogram is back-projected with ASTRA's ``BP`` (``BP_CUDA`` on a GPU) and scaled
by ``π / n_angles``: the same filtered back projection for 180° and 360° scans, exact for
any axis position.

Units: with unit detector spacing the reconstruction is the attenuation per pixel (its
line integrals along the rays, in pixel lengths, are the sinogram); with ``pixel_size_um``
it is divided by the pixel size, i.e. in 1/µm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import astra
import dask
import dask.array as da
import h5py
import numpy as np

from xrdscale.exceptions import ConfigError, InputError
from xrdscale.io import storage
from xrdscale.recon.filters import frequency_response, padded_length

logger = logging.getLogger(__name__)

#: NXtomo ``image_key`` values
IMAGE_PROJECTION, IMAGE_FLAT, IMAGE_DARK = 0, 1, 2

#: where the frames of an NXtomo entry may be (relative to the entry)
NX_DATA = ("data/data", "instrument/detector/data")
NX_IMAGE_KEY = ("instrument/detector/image_key", "data/image_key")
NX_ANGLE = ("sample/rotation_angle", "data/rotation_angle")
PLAIN_DATA = ("projections", "data")

#: ring removal methods of :func:`remove_rings`
RING_METHODS = ("all", "sorting", "none")

#: FBP filters: the ramp (Ram-Lak) times a window (f in cycles per bin, Nyquist 0.5)
FILTERS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann")

#: at most this many angle pairs enter :func:`find_center` (evenly strided above)
CENTER_MAX_PAIRS = 360

_LENGTH_TO_UM = {"m": 1e6, "metre": 1e6, "meter": 1e6, "mm": 1e3, "um": 1.0, "µm": 1.0, "micron": 1.0,
                 "micrometre": 1.0, "micrometer": 1.0, "nm": 1e-3}


@dataclasses.dataclass(frozen=True, eq=False)
class Projections:
    """The frames of one CT scan.

    Attributes
    ----------
    data : dask.array.Array
        ``(angle, row, col)`` projection frames, read lazily from the file in chunks of
        detector rows (every chunk task opens the file by URL: the array pickles).
    flats : numpy.ndarray or None
        ``(n, row, col)`` flat fields (open beam).
    darks : numpy.ndarray or None
        ``(n, row, col)`` dark frames (none: zero).
    angles_deg : numpy.ndarray
        ``(angle,)`` rotation angle of every projection in degrees.
    meta : dict
        ``source`` (redacted URL), ``layout`` (``nxtomo``/``plain``), ``dataset`` and
        ``pixel_um`` (pixel size in µm) when the file gives it.
    """

    data: da.Array
    flats: np.ndarray | None
    darks: np.ndarray | None
    angles_deg: np.ndarray
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(angle, row, col)``."""
        n_angle, n_row, n_col = (int(s) for s in self.data.shape)
        return n_angle, n_row, n_col

    def averaged(self) -> Projections:
        """The same scan with flats and darks replaced by their means (one frame each, float32).

        Cheaper to ship to every Dask task; :func:`normalize` gives the same result.
        """
        flats = None if self.flats is None else _mean_frame(self.flats)[None]
        darks = None if self.darks is None else _mean_frame(self.darks)[None]
        return dataclasses.replace(self, flats=flats, darks=darks)

    def read_rows(self, r0: int, r1: int) -> np.ndarray:
        """Projection rows ``r0:r1`` of all angles, ``(angle, r1 − r0, col)``, read in the calling thread."""
        n_rows = self.shape[1]
        if not 0 <= r0 < r1 <= n_rows:
            raise InputError(f"rows {r0}:{r1} are outside the detector's 0:{n_rows}")
        return np.asarray(self.data[:, r0:r1].compute(scheduler="synchronous"))


# --------------------------------------------------------------------------------------------
# reading


@contextlib.contextmanager
def _open_h5(url: str) -> Iterator[h5py.File]:
    fs, path = storage.filesystem(url)
    with storage.io_errors(url, "read the projections"):
        if not fs.exists(path):
            raise InputError(f"no file at {storage.redact(url)}; check the path")
        if not storage.is_remote(url):
            try:
                h5 = h5py.File(path, "r")
            except OSError as exc:
                raise InputError(f"{storage.redact(url)} is not a readable HDF5 file: {exc}") from exc
            with h5:
                yield h5
            return
        with fs.open(path, "rb") as f:
            try:
                h5 = h5py.File(f, "r")
            except OSError as exc:
                raise InputError(f"{storage.redact(url)} is not a readable HDF5 file: {exc}") from exc
            with h5:
                yield h5


def _read_rows(url: str, dataset: str, frames: Sequence[int], r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` of the projection frames ``frames`` (sorted indices) of ``dataset`` in the file at ``url``.

    The range of the frames is read and the projections picked from it (a plain slice when
    they are one contiguous run). A module-level function of plain arguments: the chunk
    tasks of :attr:`Projections.data` pickle and open the file themselves.
    """
    with _open_h5(url) as h5:
        block = np.asarray(h5[dataset][frames[0]:frames[-1] + 1, r0:r1, :])
    if len(frames) == frames[-1] - frames[0] + 1:
        return block
    return block[np.asarray(frames, dtype=np.int64) - frames[0]]


def _nx_class(obj: Any) -> str:
    value = obj.attrs.get("NX_class", "")
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _first_entry(h5: h5py.File) -> h5py.Group | None:
    for _, obj in h5.items():
        if isinstance(obj, h5py.Group) and _nx_class(obj) == "NXentry":
            return obj
    entry = h5.get("entry")
    return entry if isinstance(entry, h5py.Group) else None


def _find(group: h5py.Group, paths: tuple[str, ...]) -> h5py.Dataset | None:
    for p in paths:
        obj = group.get(p)
        if isinstance(obj, h5py.Dataset):
            return obj
    return None


def _units(ds: h5py.Dataset) -> str:
    u = ds.attrs.get("units", "")
    return (u.decode() if isinstance(u, bytes) else str(u)).strip()


def _angles_deg(ds: h5py.Dataset) -> np.ndarray:
    values = np.asarray(ds[()], dtype=np.float64).reshape(-1)
    if _units(ds).lower() in ("rad", "radian", "radians"):
        return np.rad2deg(values)
    return values


def _pixel_um(ds: h5py.Dataset | None) -> float | None:
    """Pixel size in µm of an NXdetector ``x_pixel_size`` (NeXus default unit: metres)."""
    if ds is None:
        return None
    value = float(np.asarray(ds[()]).reshape(-1)[0])
    unit = _units(ds).lower()
    if unit in _LENGTH_TO_UM:
        return value * _LENGTH_TO_UM[unit]
    if not unit and value < 1e-3:
        return value * 1e6
    logger.info("pixel size %g with unknown unit %r: not used", value, unit)
    return None


def _listing(h5: h5py.File) -> str:
    found: list[str] = []
    h5.visititems(lambda name, obj: found.append(f"{name} {obj.shape}") if isinstance(obj, h5py.Dataset) else None)
    return ", ".join(found[:20]) or "no datasets at all"


def _frames_arg(idx: np.ndarray) -> Sequence[int]:
    """The projection frame indices: a ``range`` when contiguous (compact in every task), else a tuple."""
    idx = np.sort(idx)
    if idx.size and int(idx[-1]) - int(idx[0]) + 1 == idx.size:
        return range(int(idx[0]), int(idx[-1]) + 1)
    return tuple(int(i) for i in idx)


def _layout(h5: h5py.File, name: str) -> dict[str, Any]:
    """Where the projections, flats, darks and angles of an open file are (NXtomo first, then plain)."""
    entry = _first_entry(h5)
    if entry is not None and _find(entry, NX_DATA) is not None:
        data = _find(entry, NX_DATA)
        assert data is not None
        if data.ndim != 3:
            raise InputError(f"{name}: {data.name} has shape {data.shape}; NXtomo frames must be 3D (frame, row, col)")
        key_ds = _find(entry, NX_IMAGE_KEY)
        n_frames = data.shape[0]
        key = (np.zeros(n_frames, dtype=np.int64) if key_ds is None
               else np.asarray(key_ds[()], dtype=np.int64).reshape(-1))
        if key.size != n_frames:
            raise InputError(f"{name}: image_key has {key.size} values for {n_frames} frames; they must match")
        proj_idx = np.flatnonzero(key == IMAGE_PROJECTION)
        if proj_idx.size == 0:
            raise InputError(f"{name}: no projection in {data.name} (no frame with image_key 0); check the file")
        ang_ds = _find(entry, NX_ANGLE)
        if ang_ds is None:
            raise InputError(f"{name}: no rotation_angle (entry/sample/rotation_angle or entry/data/rotation_angle); "
                             "the reconstruction needs the angle of every projection")
        ang = _angles_deg(ang_ds)
        if ang.size == n_frames:
            angles = ang[proj_idx]
        elif ang.size == proj_idx.size:
            angles = ang
        else:
            raise InputError(f"{name}: rotation_angle has {ang.size} values for {n_frames} frames "
                             f"({proj_idx.size} projections); give one angle per frame or per projection")

        def frames_of(k: int) -> np.ndarray | None:
            sel = np.flatnonzero(key == k)
            return np.asarray(data[int(sel[0]):int(sel[-1]) + 1])[sel - sel[0]] if sel.size else None

        pixel = _pixel_um(_find(entry, ("instrument/detector/x_pixel_size",)))
        return {"layout": "nxtomo", "dataset": data.name, "shape": data.shape, "dtype": data.dtype,
                "frames": _frames_arg(proj_idx), "angles": angles, "flats": frames_of(IMAGE_FLAT),
                "darks": frames_of(IMAGE_DARK), "pixel_um": pixel}
    plain = _find(h5, PLAIN_DATA)
    if plain is not None:
        if plain.ndim != 3:
            raise InputError(f"{name}: {plain.name} has shape {plain.shape}; projections must be 3D (angle, row, col)")
        if not isinstance(h5.get("angles"), h5py.Dataset):
            raise InputError(f"{name}: no 'angles' dataset; the reconstruction needs the angle (deg) of every "
                             "projection")
        angles = _angles_deg(h5["angles"])
        if angles.size != plain.shape[0]:
            raise InputError(f"{name}: 'angles' has {angles.size} values for {plain.shape[0]} projections; they "
                             "must match")
        flats = np.asarray(h5["flats"][()]) if isinstance(h5.get("flats"), h5py.Dataset) else None
        darks = np.asarray(h5["darks"][()]) if isinstance(h5.get("darks"), h5py.Dataset) else None
        pixel = h5.attrs.get("pixel_size_um")
        return {"layout": "plain", "dataset": plain.name, "shape": plain.shape, "dtype": plain.dtype,
                "frames": range(plain.shape[0]), "angles": angles, "flats": flats, "darks": darks,
                "pixel_um": None if pixel is None else float(pixel)}
    raise InputError(f"{name} is neither an NXtomo file (an NXentry with data/data or instrument/detector/data) nor "
                     f"a plain one (a 'projections' or 'data' dataset); found {_listing(h5)}")


def _reference_frames(source: str | np.ndarray | None, kind: str) -> np.ndarray | None:
    """Flats (``kind`` "flats") or darks given as an array or as another file's."""
    if source is None or isinstance(source, np.ndarray):
        return None if source is None else np.asarray(source)
    name = storage.redact(source)
    with _open_h5(source) as h5:
        key = IMAGE_FLAT if kind == "flats" else IMAGE_DARK
        entry = _first_entry(h5)
        if entry is not None and _find(entry, NX_DATA) is not None:
            data = _find(entry, NX_DATA)
            assert data is not None
            key_ds = _find(entry, NX_IMAGE_KEY)
            if key_ds is None:
                return np.asarray(data[()])           # a file of flats (or darks) only
            sel = np.flatnonzero(np.asarray(key_ds[()]).reshape(-1) == key)
            if sel.size:
                return np.asarray(data[int(sel[0]):int(sel[-1]) + 1])[sel - sel[0]]
        elif isinstance(h5.get(kind), h5py.Dataset):
            return np.asarray(h5[kind][()])
        elif _find(h5, PLAIN_DATA) is not None:
            ds = _find(h5, PLAIN_DATA)
            assert ds is not None
            return np.asarray(ds[()])
        raise InputError(f"{name} has no {kind} (image_key {key} frames, a '{kind}' dataset, or a file of {kind} "
                         f"only); found {_listing(h5)}")


def _check_frames(frames: np.ndarray | None, frame_shape: tuple[int, int], kind: str, name: str) -> np.ndarray | None:
    if frames is None:
        return None
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3 or frames.shape[1:] != frame_shape or frames.shape[0] == 0:
        raise InputError(f"{name}: the {kind} have shape {frames.shape} but the projection frames are {frame_shape} "
                         f"(row, col); give {kind} of the same detector frame")
    return frames


def open_projections(url: str, *, chunk_rows: int = 8, flats: str | np.ndarray | None = None,
                     darks: str | np.ndarray | None = None) -> Projections:
    """Open the projections of a CT scan lazily, with its flats, darks and angles.

    Two layouts are read. NXtomo: the first NXentry's ``data/data`` or
    ``instrument/detector/data`` ``(frame, row, col)``, ``image_key`` (0 projection, 1
    flat, 2 dark; all projections without it) and ``sample/rotation_angle`` or
    ``data/rotation_angle`` (degrees unless its ``units`` say radians; one per frame or
    one per projection); the pixel size from ``instrument/detector/x_pixel_size`` (its
    ``units``, metres without). Plain: root datasets ``projections`` or ``data``
    ``(angle, row, col)``, ``flats``, ``darks``, ``angles`` (deg) and a ``pixel_size_um``
    attribute.

    Parameters
    ----------
    url : str
        The HDF5 file (local path or fsspec URL).
    chunk_rows : int
        Detector rows per chunk of :attr:`Projections.data`.
    flats, darks : str or numpy.ndarray, optional
        Flat fields / darks from elsewhere, replacing the file's: an array ``(n, row, col)``
        or ``(row, col)``, or the URL of another file (its image_key 1 / 2 frames, its
        ``flats`` / ``darks`` dataset, or all its frames if it holds nothing else).

    Returns
    -------
    Projections

    Raises
    ------
    InputError
        No file, neither layout, no projections, no flats, angles that do not match the
        projections, flats or darks of another frame shape.
    """
    if chunk_rows < 1:
        raise InputError(f"chunk_rows must be at least 1, got {chunk_rows}")
    name = storage.redact(url)
    with _open_h5(url) as h5:
        lay = _layout(h5, name)
    n_frames, n_rows, n_col = lay["shape"]
    angles = np.asarray(lay["angles"], dtype=np.float64)
    frames = lay["frames"]
    n_proj = len(frames)
    frame_shape = (int(n_rows), int(n_col))
    flat_frames = _check_frames(_reference_frames(flats, "flats") if flats is not None else lay["flats"],
                                frame_shape, "flats", name)
    dark_frames = _check_frames(_reference_frames(darks, "darks") if darks is not None else lay["darks"],
                                frame_shape, "darks", name)
    if flat_frames is None:
        raise InputError(f"{name} has no flat fields (image_key 1 / a 'flats' dataset): flat/dark correction needs "
                         "them; record flats, or pass flats from another file (open_projections(url, flats=...))")
    if dark_frames is None:
        logger.info("%s has no darks: the dark current is taken as zero", name)
    chunks = []
    token = dask.base.tokenize(url, lay["dataset"], frames, n_rows, n_col)
    for r0 in range(0, n_rows, chunk_rows):
        r1 = min(r0 + chunk_rows, n_rows)
        delayed = dask.delayed(_read_rows, pure=True)(url, lay["dataset"], frames, r0, r1,
                                                     dask_key_name=f"read-projections-{token}-{r0}")
        chunks.append(da.from_delayed(delayed, shape=(n_proj, r1 - r0, n_col), dtype=lay["dtype"]))
    data = da.concatenate(chunks, axis=1)
    meta: dict[str, Any] = {"source": name, "layout": lay["layout"], "dataset": lay["dataset"]}
    if lay["pixel_um"] is not None:
        meta["pixel_um"] = float(lay["pixel_um"])
    logger.info("opened %d projections of %d × %d pixels from %s (%s; %d flats, %d darks)", n_proj, n_rows, n_col,
                name, lay["layout"], flat_frames.shape[0], 0 if dark_frames is None else dark_frames.shape[0])
    return Projections(data=data, flats=flat_frames, darks=dark_frames, angles_deg=angles, meta=meta)


# --------------------------------------------------------------------------------------------
# corrections


def _mean_frame(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames, dtype=np.float32)
    return frames if frames.ndim == 2 else frames.mean(axis=0, dtype=np.float64).astype(np.float32)


def normalize(block: np.ndarray, flats: np.ndarray | None, darks: np.ndarray | None, *,
              min_transmission: float = 1e-3) -> np.ndarray:
    """Flat/dark-corrected attenuation ``−log((P − D̄)/(F̄ − D̄))`` of a block of projections.

    Parameters
    ----------
    block : numpy.ndarray
        ``(angle, row, col)`` raw frames.
    flats : numpy.ndarray
        ``(n, row, col)`` flat fields or their ``(row, col)`` mean, rows matching ``block``.
    darks : numpy.ndarray or None
        ``(n, row, col)`` darks or their mean; None for zero dark current.
    min_transmission : float
        Lower clip of the transmission (keeps ``−log`` finite in opaque or dead pixels).
        Pixels whose flat is not above the dark get transmission 1 (no information).

    Returns
    -------
    numpy.ndarray
        ``(angle, row, col)`` float32 line integrals.
    """
    block = np.asarray(block)
    if block.ndim != 3:
        raise InputError(f"normalize needs an (angle, row, col) block, got shape {block.shape}")
    if flats is None:
        raise InputError("no flat fields: flat/dark correction needs them; record flats, or pass flats from "
                         "another file (open_projections(url, flats=...))")
    flat = _mean_frame(flats)
    dark = np.zeros_like(flat) if darks is None else _mean_frame(darks)
    if flat.shape != block.shape[1:] or dark.shape != block.shape[1:]:
        raise InputError(f"flats {flat.shape} / darks {dark.shape} do not match the frames {block.shape[1:]} "
                         "(row, col); pass the rows of the block")
    if not 0 < min_transmission < 1:
        raise InputError(f"min_transmission must be in (0, 1), got {min_transmission}")
    den = flat - dark
    good = den > 0
    trans = (block.astype(np.float32) - dark) / np.where(good, den, 1.0)
    trans = np.where(good, trans, 1.0)
    return (-np.log(np.maximum(trans, np.float32(min_transmission)))).astype(np.float32)


def _odd_at_most(value: int, limit: int) -> int:
    v = max(3, min(int(value), int(limit)))
    return v if v % 2 == 1 else v - 1


def ring_sizes(n_col: int, la_size: int = 61, sm_size: int = 21) -> tuple[int, int]:
    """``(la_size, sm_size)`` clamped to a sinogram of ``n_col`` columns.

    Odd, at least 3, at most ``n_col / 8`` and ``n_col / 24``: algotom's defaults (51 and 21)
    are made for detectors of thousands of columns (about 2 % and 1 % of 2560); on a
    narrow detector windows that wide span real structure and the median filters of the
    sorted sinogram distort it.
    """
    la = _odd_at_most(la_size, max(3, n_col // 8))
    sm = _odd_at_most(sm_size, max(3, n_col // 24))
    return la, sm


def remove_rings(sinogram: np.ndarray, *, method: str = "all", snr: float = 3.0, la_size: int = 61,
                 sm_size: int = 21, domain: str = "transmission") -> np.ndarray:
    """Remove the stripes of a sinogram (rings of its slice) with algotom (Vo et al. 2018).

    Parameters
    ----------
    sinogram : numpy.ndarray
        ``(angle, col)`` line integrals.
    method : {"all", "sorting", "none"}
        ``all``: :func:`algotom.prep.removal.remove_all_stripe` (dead, large and
        small-to-medium stripes: algorithms 6, 5, 4 + 3); ``sorting``:
        :func:`algotom.prep.removal.remove_stripe_based_sorting` (algorithm 3); ``none``.
    snr : float
        Stripe detection ratio (> 1; larger is less sensitive).
    la_size, sm_size : int
        Median window sizes for large and small stripes, clamped to the sinogram
        (:func:`ring_sizes`: algotom needs windows well inside the detector width).
        Where algotom's stripe detection refuses a sinogram (it raises on noise-free
        data, e.g. a mean of many rows), ``all`` falls back to the sorting method.
    domain : {"transmission", "attenuation"}
        Where algotom works: on the transmission ``exp(−sinogram)`` (default; as in
        algotom's own pipelines, which remove stripes from the flat-field-corrected
        intensities before the log: gain errors are multiplicative there, air is 1, and the
        ratio normalisation of large stripes never divides by ~0) or on the line
        integrals themselves. The result is line integrals in either case.

    Returns
    -------
    numpy.ndarray
        ``(angle, col)`` float32.
    """
    sino = np.asarray(sinogram, dtype=np.float32)
    if sino.ndim != 2 or min(sino.shape) < 4:
        raise InputError(f"a sinogram must be 2D (angle, col) with at least 4 of each, got shape {sino.shape}")
    if method not in RING_METHODS:
        raise ConfigError(f"unknown ring removal method {method!r}; expected one of {', '.join(RING_METHODS)}")
    if domain not in ("transmission", "attenuation"):
        raise ConfigError(f"unknown ring removal domain {domain!r}; expected 'transmission' or 'attenuation'")
    if method == "none":
        return sino.copy()
    if not snr > 1:
        raise ConfigError(f"snr must be above 1, got {snr}")
    from algotom.prep import removal

    la, sm = ring_sizes(sino.shape[1], la_size, sm_size)
    work = np.exp(-sino.astype(np.float64)).astype(np.float32) if domain == "transmission" else sino
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if method == "sorting":
            out = removal.remove_stripe_based_sorting(work, size=sm)
        else:
            try:
                out = removal.remove_all_stripe(work, snr=float(snr), la_size=la, sm_size=sm)
            except ValueError as exc:  # algotom's stripe detection refuses noise-free (e.g. averaged) sinograms
                logger.debug("remove_all_stripe: %s; falling back to the sorting method alone", exc)
                out = removal.remove_stripe_based_sorting(work, size=sm)
        out = np.asarray(out, dtype=np.float64)
        if domain == "transmission":
            out = -np.log(np.maximum(out, np.exp(-np.max(sino, initial=0.0)) * 1e-3))
    if not np.all(np.isfinite(out)):
        logger.debug("ring removal left non-finite values; keeping the input there")
        out = np.where(np.isfinite(out), out, sino)
    return np.asarray(out, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# centre of rotation


def _fourier_shift(a: np.ndarray, shift: float, n_pad: int) -> np.ndarray:
    """``a`` shifted by ``shift`` columns (``out[i] = a[i − shift]``), edge-padded to ``n_pad``."""
    n = a.shape[1]
    left = (n_pad - n) // 2
    padded = np.pad(a, ((0, 0), (left, n_pad - n - left)), mode="edge")
    f = np.fft.rfftfreq(n_pad)
    out = np.fft.irfft(np.fft.rfft(padded, axis=1) * np.exp(-2j * np.pi * f * shift), n_pad, axis=1)
    return out[:, left:left + n]


def _pairs(angles_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(i, j)`` of projections with ``θ_j ≈ θ_i + 180°`` (within a quarter of the angular step)."""
    a = np.mod(np.asarray(angles_deg, dtype=np.float64), 360.0)
    order = np.argsort(a)
    s = a[order]
    step = float(np.median(np.diff(s))) if s.size > 1 else 1.0
    target = np.mod(s + 180.0, 360.0)
    pos = np.clip(np.searchsorted(s, target), 0, s.size - 1)
    best = pos.copy()
    for cand in (pos - 1, (pos + 1) % s.size, pos):
        d = np.abs(np.mod(s[cand] - target + 180.0, 360.0) - 180.0)
        better = d < np.abs(np.mod(s[best] - target + 180.0, 360.0) - 180.0)
        best = np.where(better, cand, best)
    err = np.abs(np.mod(s[best] - target + 180.0, 360.0) - 180.0)
    keep = (err <= 0.25 * step) & (s < 180.0)
    return order[keep], order[best[keep]]


def find_center(sinogram: np.ndarray, angles_deg: np.ndarray) -> float:
    """Column of the rotation axis in a sinogram, from its 360° (or 180°) symmetry.

    In a parallel beam ``p(θ + 180°, t) = p(θ, −t)`` about the axis, so with ``c`` the
    axis column the mirrored opposite projection is the projection shifted:
    ``p(θ + 180°, n − 1 − col) = p(θ, col + s)``, ``s = 2c − (n − 1)``. Where at least a
    tenth of the angles (and at least 3) have an opposite one (a 360° scan), ``s`` is the
    minimum of ``Σ (P(· + s/2) − Q(· − s/2))²`` over the pairs ``P, Q`` (both halves shifted
    by half, with Fourier shifts, so neither is interpolated more than the other), from
    the integer peak of their cross-correlation refined by Brent's method within ±1.5
    columns; the columns near the edges are left out. The integer peak correlates the
    column derivatives of ``P`` and ``Q``, which vanish in the air around the sample. Otherwise (a 180° scan) algotom's
    :func:`algotom.prep.calculation.find_center_vo` (Vo et al. 2014) on the sinogram.
    Run it on a ring-removed sinogram (stripes are not mirror symmetric); the mean of
    the sinograms of several rows is the sinogram of their mean slice and works too.

    Parameters
    ----------
    sinogram : numpy.ndarray
        ``(angle, col)`` line integrals.
    angles_deg : numpy.ndarray
        ``(angle,)`` angles in degrees.

    Returns
    -------
    float
        Axis position in columns, on the detector's pixel index (its centre is ``(n − 1)/2``).
    """
    from scipy.optimize import minimize_scalar

    sino = np.asarray(sinogram, dtype=np.float64)
    angles = np.asarray(angles_deg, dtype=np.float64).reshape(-1)
    if sino.ndim != 2 or sino.shape[0] != angles.size:
        raise InputError(f"sinogram {sino.shape} and {angles.size} angles do not match (angle, col)")
    n = sino.shape[1]
    i, j = _pairs(angles)
    if i.size < max(3, angles.size // 10):
        from algotom.prep.calculation import find_center_vo

        wrapped = np.mod(angles, 360.0)
        half = np.flatnonzero(wrapped < 180.0)
        half = half[np.argsort(wrapped[half])]
        logger.debug("find_center: %d opposite pairs only; find_center_vo on the 0–180° projections", i.size)
        return float(find_center_vo(sino[half], ncore=1))
    if i.size > CENTER_MAX_PAIRS:
        pick = np.linspace(0, i.size - 1, CENTER_MAX_PAIRS).round().astype(int)
        i, j = i[pick], j[pick]
    p = sino[i]
    q = sino[j][:, ::-1]
    n_pad = padded_length(n)
    # integer shift: peak of Σ_θ P'(col + s) Q'(col) of the column derivatives (zero in air and
    # flat regions, so the zero padding of the correlation does not pull it towards lag 0)
    fp = np.fft.rfft(np.diff(p, axis=1), n_pad, axis=1)
    fq = np.fft.rfft(np.diff(q, axis=1), n_pad, axis=1)
    corr = np.fft.irfft((np.conj(fq) * fp).sum(axis=0), n_pad)
    lags = np.fft.fftfreq(n_pad, 1.0 / n_pad)
    limit = n // 2
    corr = np.where(np.abs(lags) <= limit, corr, -np.inf)
    s0 = float(lags[int(np.argmax(corr))])
    margin = int(np.ceil(abs(s0) / 2 + 3))
    inner = slice(margin, n - margin) if n - 2 * margin >= 4 else slice(None)

    def cost(s: float) -> float:
        d = _fourier_shift(p, -s / 2, n_pad) - _fourier_shift(q, s / 2, n_pad)
        return float(np.mean(d[:, inner] ** 2))

    res = minimize_scalar(cost, bounds=(s0 - 1.5, s0 + 1.5), method="bounded", options={"xatol": 1e-3})
    center = (float(res.x) + n - 1) / 2.0
    logger.debug("find_center: %d pairs, shift %.3f → axis at column %.3f", i.size, float(res.x), center)
    return center


# --------------------------------------------------------------------------------------------
# reconstruction


@functools.lru_cache(maxsize=8)
def _astra_geometry(n: int, angles: tuple[float, ...], center: float) -> tuple[dict, dict, int]:
    """ASTRA ``(vol_geom, proj_geom, projector)`` of ``n`` columns with the axis at ``center``, built once per process.

    Volume: ASTRA's centred ``n × n`` grid; the rotation axis sits at volume pixel
    ``n // 2``, i.e. at ``A = (δ, δ)``, ``δ = n // 2 − (n − 1)/2``. Angle ``θ`` of the
    scan is ASTRA's ``−θ`` (scikit-image's orientation, rows flipped on the way out);
    with ``u = (cos, sin)(−θ)`` bin ``i`` sees the ray ``(x − A)·u = i − center``, i.e. a
    ``parallel_vec`` detector centred at ``((n − 1)/2 − center + A·u) u``.
    """
    theta = -np.deg2rad(np.asarray(angles, dtype=np.float64))
    c, s = np.cos(theta), np.sin(theta)
    delta = n // 2 - (n - 1) / 2.0
    offset = (n - 1) / 2.0 - center + delta * (c + s)
    vectors = np.stack([s, -c, offset * c, offset * s, c, s], axis=1)
    vol_geom = astra.create_vol_geom(n, n)
    proj_geom = astra.create_proj_geom("parallel_vec", n, vectors)
    projector = astra.create_projector("linear", proj_geom, vol_geom)
    logger.debug("built ASTRA projector: %d angles × %d columns, axis at column %.3f", len(angles), n, center)
    return vol_geom, proj_geom, projector


def check_filter(name: str) -> str:
    """Return ``name`` if it is one of :data:`FILTERS`, else raise :class:`ConfigError`."""
    if name not in FILTERS:
        raise ConfigError(f"unknown FBP filter {name!r}; expected one of {', '.join(FILTERS)}")
    return name


@functools.lru_cache(maxsize=16)
def filter_response(name: str, n: int) -> np.ndarray:
    """Frequency response of FBP filter ``name`` on the ``rfft`` grid of ``n`` zero-padded columns.

    The band-limited Ram-Lak ramp of :func:`xrdscale.recon.filters.frequency_response`
    (ASTRA's kernel and padding) times ``sinc(f)`` (shepp-logan), ``cos(πf)`` (cosine),
    ``0.54 + 0.46 cos(2πf)`` (hamming) or ``(1 + cos 2πf)/2`` (hann).
    """
    check_filter(name)
    ramp = frequency_response("ram-lak", n)
    f = np.fft.rfftfreq(padded_length(n))
    window = {"ram-lak": np.ones_like(f), "shepp-logan": np.sinc(f), "cosine": np.cos(np.pi * f),
              "hamming": 0.54 + 0.46 * np.cos(2 * np.pi * f), "hann": 0.5 * (1.0 + np.cos(2 * np.pi * f))}[name]
    return ramp * window


def _filter(sinos: np.ndarray, filter_name: str) -> np.ndarray:
    n = sinos.shape[-1]
    n_pad = padded_length(n)
    response = filter_response(filter_name, n)
    out = np.fft.irfft(np.fft.rfft(sinos, n_pad, axis=-1) * response, n_pad, axis=-1)[..., :n]
    return np.ascontiguousarray(out, dtype=np.float32)


def _use_cuda(device: str) -> bool:
    if device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"unknown device {device!r}; expected 'cpu', 'cuda' or 'auto'")
    if device == "cpu":
        return False
    available = bool(astra.use_cuda())
    if device == "cuda" and not available:
        raise ConfigError("device='cuda' but ASTRA sees no usable CUDA GPU here; use device='cpu' or 'auto'")
    return available


def reconstruct_slices(sinograms: np.ndarray, angles_deg: np.ndarray, *, center: float | None = None,
                       filter_name: str = "ram-lak", device: str = "cpu",
                       pixel_size_um: float | None = None) -> np.ndarray:
    """Filtered back projection of every slice with ASTRA (any angle set: 180° or 360° scans).

    Parameters
    ----------
    sinograms : numpy.ndarray
        ``(slice, angle, col)`` line integrals (one sinogram per detector row).
    angles_deg : numpy.ndarray
        ``(angle,)`` rotation angles in degrees (scikit-image's ``theta`` convention).
    center : float, optional
        Column of the rotation axis; the detector centre ``(n − 1)/2`` by default.
    filter_name : {"ram-lak", "shepp-logan", "cosine", "hamming", "hann"}
        Ramp filter (:func:`filter_response`).
    device : {"cpu", "cuda", "auto"}
        ASTRA's ``BP`` with the ``linear`` CPU projector, or ``BP_CUDA`` (only where
        ``astra.use_cuda()``; ``auto`` takes it when there).
    pixel_size_um : float, optional
        Detector pixel size; given, the volume is in 1/µm instead of 1/pixel.

    Returns
    -------
    numpy.ndarray
        ``(slice, n, n)`` float32, ``n`` the number of columns, rotation axis at pixel
        ``(n // 2, n // 2)``, orientation of :func:`skimage.transform.iradon`.
    """
    sinos = np.asarray(sinograms)
    if sinos.ndim == 2:
        sinos = sinos[None]
    angles = np.asarray(angles_deg, dtype=np.float64).reshape(-1)
    if sinos.ndim != 3 or sinos.shape[1] != angles.size or sinos.shape[2] < 4:
        raise InputError(f"sinograms must be (slice, angle, col) with {angles.size} angles and at least 4 columns, "
                         f"got shape {np.shape(sinograms)}")
    if not np.all(np.isfinite(angles)):
        raise InputError("the angles have NaN or infinite values")
    check_filter(filter_name)
    n = int(sinos.shape[2])
    c = (n - 1) / 2.0 if center is None else float(center)
    if not np.isfinite(c) or abs(c - (n - 1) / 2.0) > n / 4:
        raise InputError(f"center {c} is more than a quarter of the detector ({n} columns) off its centre "
                         f"{(n - 1) / 2:.1f}: check the centre of rotation")
    cuda = _use_cuda(device)
    vol_geom, proj_geom, projector = _astra_geometry(n, tuple(float(a) for a in angles), round(c, 6))
    scale = np.pi / angles.size
    if pixel_size_um is not None:
        if not pixel_size_um > 0:
            raise InputError(f"pixel_size_um must be positive, got {pixel_size_um}")
        scale /= float(pixel_size_um)
    out = np.empty((sinos.shape[0], n, n), dtype=np.float32)
    sino_id = astra.data2d.create("-sino", proj_geom, 0.0)
    vol_id = astra.data2d.create("-vol", vol_geom, 0.0)
    cfg = astra.astra_dict("BP_CUDA" if cuda else "BP")
    cfg["ProjectionDataId"] = sino_id
    cfg["ReconstructionDataId"] = vol_id
    if not cuda:
        cfg["ProjectorId"] = projector
    alg_id = astra.algorithm.create(cfg)
    try:
        for k in range(sinos.shape[0]):
            astra.data2d.store(sino_id, _filter(np.asarray(sinos[k], dtype=np.float64), filter_name))
            astra.data2d.store(vol_id, 0.0)
            astra.algorithm.run(alg_id, 1)
            out[k] = astra.data2d.get_shared(vol_id)[::-1] * np.float32(scale)
    finally:
        astra.algorithm.delete(alg_id)
        astra.data2d.delete([sino_id, vol_id])
    return out


def sinograms_of(proj: Projections, r0: int, r1: int) -> np.ndarray:
    """Flat/dark-corrected sinograms ``(r1 − r0, angle, col)`` of detector rows ``r0:r1``."""
    block = proj.read_rows(r0, r1)
    flats = None if proj.flats is None else np.asarray(proj.flats)[..., r0:r1, :]
    darks = None if proj.darks is None else np.asarray(proj.darks)[..., r0:r1, :]
    return np.ascontiguousarray(normalize(block, flats, darks).transpose(1, 0, 2))


def estimate_center(proj: Projections, rows: tuple[int, int] | None = None, *, rings: str = "all") -> float:
    """The rotation axis of a scan, from the mean sinogram of detector rows ``rows`` (all by default).

    The mean of the rows' sinograms is the sinogram of their mean slice, so one
    :func:`find_center` on it uses all of them; call it once and pass the result to every
    :func:`reconstruct_block`.
    """
    r0, r1 = (0, proj.shape[1]) if rows is None else rows
    mean = sinograms_of(proj, r0, r1).mean(axis=0)
    return find_center(remove_rings(mean, method=rings), proj.angles_deg)


def reconstruct_block(proj: Projections, r0: int, r1: int, *, rings: str = "all", center: float | None = None,
                      filter_name: str = "ram-lak", device: str = "cpu", snr: float = 3.0, la_size: int = 61,
                      sm_size: int = 21, pixel_size_um: float | None = None) -> np.ndarray:
    """Reconstruct the slices of detector rows ``r0:r1``: what one Dask task runs.

    Reads the rows of all projections (in the calling thread), normalises them
    (:func:`normalize`), removes the rings of every sinogram (:func:`remove_rings`) and
    back-projects them (:func:`reconstruct_slices`).

    Parameters
    ----------
    proj : Projections
        The scan (:func:`open_projections`).
    r0, r1 : int
        Detector rows (slices ``z``) to reconstruct.
    rings : {"all", "sorting", "none"}
        Ring removal method.
    center : float, optional
        Column of the rotation axis; found on this block's mean sinogram when omitted
        (pass one value, e.g. from :func:`estimate_center`, to keep the blocks consistent).
    filter_name, device, pixel_size_um
        As :func:`reconstruct_slices`.
    snr, la_size, sm_size
        As :func:`remove_rings`.

    Returns
    -------
    numpy.ndarray
        ``(r1 − r0, n, n)`` float32.
    """
    sinos = sinograms_of(proj, r0, r1)
    for k in range(sinos.shape[0]):
        sinos[k] = remove_rings(sinos[k], method=rings, snr=snr, la_size=la_size, sm_size=sm_size)
    if center is None:
        center = find_center(sinos.mean(axis=0), proj.angles_deg)
        logger.info("rows %d:%d: rotation axis at column %.3f", r0, r1, center)
    return reconstruct_slices(sinos, proj.angles_deg, center=center, filter_name=filter_name, device=device,
                              pixel_size_um=pixel_size_um)
