"""Checks of files and stores against the data contracts of xrdscale.

The contracts are what outlives any one module: the raw NeXus/HDF5 layout, the variables,
dimensions and coordinates of every store kind, the phase-library YAML, the campaign-spec
YAML and the model registry. Every ``check_*`` function returns a list of problems, each a
line that names the path, the variable or key and what is expected; an empty list means the
input meets its contract. :func:`check` detects what a path is and runs the right check;
``xrdscale check PATH…`` prints its result.

Store kinds and what they hold:

- ``patterns``: ``intensity`` (frame, q) with coords ``angle`` (frame), ``translation``
  (frame) and ``q`` (1/Å, increasing)
- ``sinogram``: ``intensity`` (angle, translation, q); ``angle`` strictly ascending in
  [0, 180) degrees, ``translation`` increasing in mm with the rotation axis (0) inside
- ``volume``: ``intensity`` (y, x, q) with coords ``y``, ``x`` in mm
- ``maps``: ``scale``, ``a``, ``c``, ``size`` (phase, y, x) each with ``<name>_std``
  (pixel dims ``frame`` when predicted from a patterns store); optional
  ``weight_fraction``, ``rwp``, ``chi2``, ``ood``
- ``unrolled``: maps variables on (phase, radius, angle) (or (radius, angle))
- ``regions``: ``region`` (y, x), integer codes −1 outside, 0 HL, 1 DL, 2 IN
- ``truth``: ``scale``, ``a``, ``c``, ``size`` (phase, y, x), optionally ``projection``
  (angle, translation, q)
- ``cdi-series``: ``phase``, ``displacement``, ``strain``, ``amplitude`` (state, z, y, x),
  ``support`` (z, y, x), ``omega`` and ``chi2`` (state), coords ``z``, ``y``, ``x`` in nm
- ``xcs`` (Compton imaging): ``emr``, ``emr_std`` (state, y, x), once calibrated ``x_li``
  and ``x_li_std`` (state, y, x); ``profile`` (state, region, pz) with ``pz`` in a.u.
- ``ct-volume``: ``attenuation`` (z, y, x), coords ``z``, ``y``, ``x`` in µm
- ``ct-roughness``: ``height`` (interface, y, x) in µm, ``ra`` and ``rq`` (interface) in µm,
  ``fraction`` (component)
- ``operando``: maps variables on (phase, frame) with ``weight_fraction`` and
  ``weight_fraction_std``; coords ``time`` (s), ``voltage`` (V), ``current`` (A), ``cycle`` and
  ``step`` (frame); the electrochemistry log ``echem_time``, ``echem_voltage``,
  ``echem_current`` (echem)

Files: ``cxi`` (a Bragg CDI result): ``entry_1/image_1/data`` the complex 3D object, with
``entry_1/image_1/support`` of its shape and the scalar ``entry_1/image_1/chi2``.

Examples
--------
>>> from xrdscale.io import contracts
>>> contracts.check("work/c1/sinogram.zarr")  # doctest: +SKIP
('sinogram', [])
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence

import numpy as np
import xarray as xr
import yaml

from xrdscale.exceptions import XrdscaleError
from xrdscale.io import storage

logger = logging.getLogger(__name__)

#: Kinds of zarr stores with a contract.
STORE_KINDS = ("patterns", "sinogram", "volume", "maps", "unrolled", "regions", "truth", "cdi-series", "xcs",
               "ct-volume", "ct-roughness", "operando")
#: Every kind :func:`check` understands.
KINDS = ("raw", *STORE_KINDS, "cxi", "phases", "spec", "model")

#: Suffixes of raw NeXus/HDF5 files.
RAW_SUFFIXES = (".nxs", ".h5", ".hdf5", ".nx5", ".nexus")
YAML_SUFFIXES = (".yaml", ".yml")

#: The per-phase parameters of a maps store (each with a ``<name>_std`` companion).
MAP_PARAMS = ("scale", "a", "c", "size")
#: Optional per-phase variables of a maps store.
MAP_OPTIONAL = ("weight_fraction", "weight_fraction_std")
#: Optional per-pixel variables of a maps store (analyse and fit stages).
MAP_PIXEL = ("rwp", "chi2", "ood", "converged")
#: Pixel dimensions of a maps store: an image, or the frames of a patterns store.
MAP_PIXEL_DIMS = (("y", "x"), ("frame",))
#: Region codes of a regions store: outside, HL, DL, IN.
REGION_CODES = (-1, 0, 1, 2)

#: Intensity dims of the stores that hold patterns.
INTENSITY_DIMS = {"patterns": ("frame", "q"), "sinogram": ("angle", "translation", "q"), "volume": ("y", "x", "q")}

_UNITS = {
    "mm": {"mm", "millimetre", "millimeter", "millimetres", "millimeters"},
    "nm": {"nm", "nanometre", "nanometer", "nanometres", "nanometers"},
    "um": {"um", "µm", "μm", "micrometre", "micrometer", "micrometres", "micrometers", "micron", "microns"},
    "a.u.": {"a.u.", "au", "atomic units", "atomic unit"},
    "deg": {"deg", "degree", "degrees", "°"},
    "1/angstrom": {"1/angstrom", "1/å", "1/a", "1/ang", "å^-1", "a^-1", "angstrom^-1", "å-1", "a-1", "å⁻¹",
                   "angstrom-1", "inverse angstrom", "1/angstroms", "angstrom**-1"},
}

_RAW_DATA = "entry/data/data"
_RAW_VECTORS = ("entry/instrument/monitor/data", "entry/sample/rotation_angle", "entry/sample/translation")


# -- dispatch -------------------------------------------------------------------------------

def check(url: str, kind: str | None = None) -> tuple[str, list[str]]:
    """Check ``url`` against the contract of its kind.

    Parameters
    ----------
    url : str
        A raw NeXus/HDF5 file, a zarr store, a phase-library or campaign-spec YAML, or a
        model registry entry (any fsspec URL).
    kind : str, optional
        One of :data:`KINDS`; default: detected with :func:`detect`.

    Returns
    -------
    kind : str
        The kind checked (``"unknown"`` when it could not be told).
    problems : list of str
        Empty when ``url`` meets the contract.
    """
    name = storage.redact(url)
    if kind is not None and kind not in KINDS:
        return kind, [f"{name}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}"]
    try:
        if not storage.exists(url):
            return kind or "unknown", [f"{name}: does not exist; check the path or URL"]
        found = kind or detect(url)
        if found is None:
            return "unknown", [f"{name}: not a raw NeXus/HDF5 file (.nxs/.h5/.hdf5), a zarr store, a phase "
                               "library or campaign spec YAML, or a model registry entry (model.json); "
                               f"give --kind (one of {', '.join(KINDS)})"]
        if found == "raw":
            return found, check_raw(url)
        if found == "cxi":
            return found, check_cxi(url)
        if found == "phases":
            return found, check_phase_library(url)
        if found == "spec":
            return found, check_spec(url)
        if found == "model":
            return found, check_model(url)
        return _check_store(url, found if kind is not None else None)
    except XrdscaleError as exc:
        return kind or "unknown", _lines(str(exc), name)


def detect(url: str) -> str | None:
    """Tell what ``url`` is: one of :data:`KINDS`, a stage name, ``"store"`` (a zarr group of no
    known kind) or None.

    Files are told by their suffix (``.nxs``/``.h5``/``.hdf5`` raw; ``.yaml``/``.yml`` a
    campaign spec when it has ``cycles``, else a phase library when it has a ``phases``
    mapping) or, for HDF5, their signature. Folders with ``model.json`` are model registry
    entries; zarr groups are stores of the kind their ``attrs['stage']`` names, else the kind
    their variables and dimensions match (see :func:`dataset_kind`).
    """
    low = url.lower().rstrip("/")
    if low.endswith(".cxi"):
        return "cxi"
    if low.endswith(RAW_SUFFIXES):
        return "raw"
    if low.endswith(YAML_SUFFIXES):
        return _yaml_kind(url)
    fs, path = storage.filesystem(url)
    with storage.io_errors(url, "inspect"):
        is_dir = fs.isdir(path)
    if not is_dir:
        with storage.io_errors(url, "read"), fs.open(path, "rb") as f:
            head = f.read(8)
        return "raw" if head == b"\x89HDF\r\n\x1a\n" else None
    if storage.exists(storage.join(url, "model.json")):
        return "model"
    layout = storage.store_layout(url)
    if layout.zarr_format is None:
        return None
    stage = layout.attrs.get("stage")
    if isinstance(stage, str) and stage:
        return stage
    try:
        ds = storage.open_zarr(url, layout=layout)
    except Exception:  # noqa: BLE001 - the store check reports why it cannot be opened
        return "store"
    return dataset_kind(ds) or "store"


def _yaml_kind(url: str) -> str | None:
    try:
        doc = yaml.safe_load(storage.read_bytes(url).decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return "spec" if "cycles" in storage.read_bytes(url).decode("utf-8", "replace") else "phases"
    if isinstance(doc, dict) and "cycles" in doc:
        return "spec"
    if isinstance(doc, dict) and isinstance(doc.get("phases"), dict):
        return "phases"
    return None


def dataset_kind(ds: xr.Dataset) -> str | None:
    """The store kind a Dataset's variables and dimensions match, or None.

    ``intensity`` on (frame, q), (angle, translation, q) or (y, x, q) is a patterns,
    sinogram or volume store; ``scale`` with ``*_std`` companions a maps store, without
    them a truth store; variables on (…, radius, angle) an unrolled store; ``region`` (y, x)
    a regions store.
    """
    if "intensity" in ds.data_vars:
        dims = tuple(ds["intensity"].dims)
        for kind, want in INTENSITY_DIMS.items():
            if dims == want:
                return kind
        if set(dims) == {"frame", "q"}:
            return "patterns"
        if set(dims) == {"angle", "translation", "q"}:
            return "sinogram"
        if set(dims) == {"y", "x", "q"}:
            return "volume"
        return None
    names = {str(n) for n in ds.data_vars}
    if "emr" in names:
        return "xcs"
    if "attenuation" in names:
        return "ct-volume"
    if {"height", "ra"} <= names:
        return "ct-roughness"
    if "scale" in names:
        if "projection" in names or not any(n.endswith("_std") for n in names):
            return "truth"
        return "maps"
    if names and all(tuple(ds[v].dims[-2:]) == ("radius", "angle") for v in ds.data_vars):
        return "unrolled"
    if "region" in names:
        return "regions"
    if any(n.endswith("_std") for n in names):
        return "maps"
    return None


def _lines(text: str, name: str) -> list[str]:
    """Split a multi-problem error message into one problem per line, each naming ``name``."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1 and "problem(s)" in lines[0] and lines[0].rstrip().endswith(":"):
        return [f"{name}: {ln.strip()}" for ln in lines[1:]]
    return [text if name in text else f"{name}: {text}"]


# -- raw NeXus/HDF5 -------------------------------------------------------------------------

def check_raw(url: str) -> list[str]:
    """Check a raw NeXus/HDF5 dataset.

    ``/entry/data/data`` must be 3D (n_frames, ny, nx) integer counts compressed with an
    HDF5 filter (hdf5plugin's Bitshuffle/LZ4, Blosc, gzip, …); the monitor, the rotation
    angle (degrees) and the translation (mm) one finite value per frame, the monitor positive.

    Parameters
    ----------
    url : str
        The file (any fsspec URL).

    Returns
    -------
    list of str
        The problems found.
    """
    from xrdscale.io.frames import _open_h5

    name = storage.redact(url)
    if not storage.exists(url):
        return [f"{name}: does not exist; check the path or URL"]
    with storage.io_errors(url, "read the raw dataset"):
        try:
            with _open_h5(url) as h5:
                return _raw_problems(h5, name)
        except OSError as exc:
            if type(exc) is not OSError:  # missing file, permission, connection: storage problems
                raise
            return [f"{name}: not a readable HDF5/NeXus file ({exc}); expected the raw layout with /{_RAW_DATA}"]


def _raw_problems(h5, name: str) -> list[str]:
    import h5py

    problems = []
    for key, what in ((_RAW_DATA, "frames (n_frames, ny, nx) integer counts"),
                      (_RAW_VECTORS[0], "incident intensity I0 (n_frames)"),
                      (_RAW_VECTORS[1], "rotation angle in degrees (n_frames)"),
                      (_RAW_VECTORS[2], "translation in mm (n_frames)")):
        if key not in h5:
            problems.append(f"{name}: missing /{key}; expected the {what}")
        elif not isinstance(h5[key], h5py.Dataset):
            problems.append(f"{name}: /{key} is a group; expected a dataset of the {what}")
    if problems:
        return problems
    data = h5[_RAW_DATA]
    if data.ndim != 3:
        problems.append(f"{name}: /{_RAW_DATA} has shape {data.shape}; expected 3 dims (n_frames, ny, nx)")
    if not np.issubdtype(data.dtype, np.integer):
        problems.append(f"{name}: /{_RAW_DATA} has dtype {data.dtype}; expected integer counts")
    problems += _compression_problems(data, name)
    n = int(data.shape[0]) if data.ndim else 0
    for key in _RAW_VECTORS:
        vec = h5[key]
        if vec.shape != (n,):
            problems.append(f"{name}: /{key} has shape {vec.shape}; expected ({n},), one value per frame")
            continue
        if not np.issubdtype(vec.dtype, np.number):
            problems.append(f"{name}: /{key} has dtype {vec.dtype}; expected numbers")
            continue
        values = np.asarray(vec[()], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            problems.append(f"{name}: /{key} is not finite at frame {bad[0]} ({bad.size} frames); "
                            "expected a finite value per frame")
        elif key == _RAW_VECTORS[0] and np.any(values <= 0):
            bad = np.flatnonzero(values <= 0)
            problems.append(f"{name}: /{key} (I0) is {values[bad[0]]:g} at frame {bad[0]} ({bad.size} frames); "
                            "expected positive values")
    return problems


def _compression_problems(data, name: str) -> list[str]:
    from h5py import h5z

    plist = data.id.get_create_plist()
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    compressing = [f for f in filters if f not in (h5z.FILTER_SHUFFLE, h5z.FILTER_FLETCHER32)]
    if not compressing:
        how = "stored without filters" if not filters else "stored with only shuffle/checksum filters"
        return [f"{name}: /{_RAW_DATA} is not compressed ({how}); expected an HDF5 compression filter "
                "(hdf5plugin Bitshuffle-LZ4, Blosc, LZ4, Zstd, or gzip)"]
    missing = [f for f in compressing if not h5z.filter_avail(f)]
    if missing:
        return [f"{name}: /{_RAW_DATA} is compressed with HDF5 filter id(s) {missing} that are not available; "
                "expected a filter hdf5plugin provides (install hdf5plugin)"]
    return []


# -- stores ---------------------------------------------------------------------------------

def check_store(url: str, kind: str | None = None) -> list[str]:
    """Check the zarr store at ``url`` against the contract of ``kind``.

    Parameters
    ----------
    url : str
        Store URL.
    kind : str, optional
        One of :data:`STORE_KINDS`; default: ``attrs['stage']``, else what its variables match.

    Returns
    -------
    list of str
        The problems found: the contract's, and for a store xrdscale wrote a missing
        completion marker or provenance attribute.
    """
    return _check_store(url, kind)[1]


def _check_store(url: str, kind: str | None) -> tuple[str, list[str]]:
    name = storage.redact(url)
    if not storage.exists(url):
        return kind or "store", [f"{name}: does not exist; check the path or URL"]
    layout = storage.store_layout(url)
    problems = []
    if layout.partial:
        problems.append(f"{name}: incomplete: xrdscale started this store and never marked it complete (no "
                        f"{storage.MARKER} marker); run the stage that writes it again")
    if layout.zarr_format is None:
        return kind or "store", problems or [f"{name}: not a zarr store; expected zarr.json or .zgroup metadata"]
    try:
        ds = storage.open_zarr(url, layout=layout)
    except XrdscaleError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken store is a finding, not a crash of the checker
        return kind or "store", [*problems, f"{name}: cannot be opened as a zarr store ({type(exc).__name__}: "
                                            f"{exc}); expected a zarr group readable by xarray"]
    stage = ds.attrs.get("stage")
    found = kind or (stage if isinstance(stage, str) and stage else None) or dataset_kind(ds) or "store"
    if kind is not None and stage is not None and stage != kind:
        problems.append(f"{name}: attrs['stage'] is {stage!r}; expected {kind!r}")
    if layout.written_by_xrdscale:
        for key in ("stage", "config", "xrdscale_version"):
            if key not in ds.attrs:
                problems.append(f"{name}: attrs lack {key!r}; every xrdscale store records its stage, config "
                                "and xrdscale version")
    if found in STORE_KINDS:
        problems += dataset_problems(ds, found, name)
    elif found == "store":
        problems.append(f"{name}: no store contract matches its variables {sorted(map(str, ds.data_vars))}; expected "
                        "e.g. intensity (frame, q) patterns, intensity (angle, translation, q) sinogram, "
                        "intensity (y, x, q) volume, scale/a/c/size (phase, y, x) maps")
    elif not layout.written_by_xrdscale:
        problems.append(f"{name}: a {found!r} store that xrdscale did not write; there is no contract to "
                        f"check it against (contracts: {', '.join(STORE_KINDS)})")
    return found, problems


def dataset_problems(ds: xr.Dataset, kind: str, name: str = "store") -> list[str]:
    """Check an opened store against the contract of ``kind``.

    Only coordinates are read; data variables are checked by name, dims and dtype.

    Parameters
    ----------
    ds : xarray.Dataset
        The store, opened lazily.
    kind : str
        One of :data:`STORE_KINDS`.
    name : str
        How the store is named in the messages.

    Returns
    -------
    list of str
        The problems found.
    """
    if kind not in STORE_KINDS:
        raise ValueError(f"no contract for {kind!r} stores; expected one of {STORE_KINDS}")
    return _CHECKS[kind](ds, name)


def _dims(dims: Sequence[Hashable]) -> str:
    return "(" + ", ".join(map(str, dims)) + ")"


def _variable(ds: xr.Dataset, var: str, dims: Sequence[str], name: str, problems: list[str], *,
              floating: bool = False, required: bool = True) -> bool:
    dims = tuple(dims)
    if var not in ds.data_vars:
        if required:
            problems.append(f"{name}: no variable {var!r}; expected {var} {_dims(dims)} "
                            f"(found {sorted(map(str, ds.data_vars))})")
        return False
    got = tuple(ds[var].dims)
    ok = True
    if got != dims:
        problems.append(f"{name}: variable {var} has dims {_dims(got)}; expected {_dims(dims)}")
        ok = False
    dtype = ds[var].dtype
    if floating and dtype.kind != "f":
        problems.append(f"{name}: variable {var} has dtype {dtype}; expected floating point "
                        "(NaN where a value does not apply)")
        ok = False
    elif dtype.kind not in "biuf":
        problems.append(f"{name}: variable {var} has dtype {dtype}; expected numbers")
        ok = False
    return ok


def _coord(ds: xr.Dataset, coord: str, dim: str, name: str, problems: list[str], *, units: str | None = None,
           increasing: bool = False) -> np.ndarray | None:
    if coord not in ds.coords:
        what = f" in {units}" if units else ""
        problems.append(f"{name}: no coordinate {coord!r}; expected {coord} ({dim}){what}")
        return None
    c = ds.coords[coord]
    if tuple(c.dims) != (dim,):
        problems.append(f"{name}: coordinate {coord} has dims {_dims(c.dims)}; expected ({dim})")
        return None
    if c.dtype.kind not in "iuf":
        problems.append(f"{name}: coordinate {coord} has dtype {c.dtype}; expected numbers")
        return None
    values = np.asarray(c.values, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        problems.append(f"{name}: coordinate {coord} is not finite at index {bad[0]} ({bad.size} values); "
                        "expected finite values")
        return None
    if increasing and values.size > 1 and np.any(np.diff(values) <= 0):
        problems.append(f"{name}: coordinate {coord} is not strictly increasing "
                        f"({values[0]:g} … {values[-1]:g}); expected ascending values")
    given = c.attrs.get("units")
    if units is not None and isinstance(given, str) and given.strip().lower() not in _UNITS[units]:
        problems.append(f"{name}: coordinate {coord} has units {given!r}; expected {units}")
    return values


def _q(ds: xr.Dataset, name: str, problems: list[str]) -> None:
    q = _coord(ds, "q", "q", name, problems, units="1/angstrom", increasing=True)
    if q is not None and q.size and q[0] < 0:
        problems.append(f"{name}: coordinate q starts at {q[0]:g}; expected q ≥ 0 in 1/Å")


def _angles_half_turn(values: np.ndarray | None, coord: str, name: str, problems: list[str]) -> None:
    if values is None or not values.size:
        return
    if np.any(np.diff(values) <= 0) or values[0] < 0 or values[-1] >= 180:
        problems.append(f"{name}: coordinate {coord} spans {values[0]:g} … {values[-1]:g} deg; expected "
                        "strictly ascending angles in [0, 180)")


def _check_patterns(ds: xr.Dataset, name: str) -> list[str]:
    problems: list[str] = []
    _variable(ds, "intensity", INTENSITY_DIMS["patterns"], name, problems)
    _coord(ds, "angle", "frame", name, problems, units="deg")
    _coord(ds, "translation", "frame", name, problems, units="mm")
    _q(ds, name, problems)
    return problems


def _check_sinogram(ds: xr.Dataset, name: str) -> list[str]:
    problems: list[str] = []
    _variable(ds, "intensity", INTENSITY_DIMS["sinogram"], name, problems)
    angle = _coord(ds, "angle", "angle", name, problems, units="deg")
    _angles_half_turn(angle, "angle", name, problems)
    t = _coord(ds, "translation", "translation", name, problems, units="mm", increasing=True)
    if t is not None and t.size and not (t.min() <= 0 <= t.max()):
        problems.append(f"{name}: coordinate translation spans {t.min():g} … {t.max():g} mm; expected the "
                        "rotation axis at translation 0 inside the range")
    _q(ds, name, problems)
    return problems


def _check_volume(ds: xr.Dataset, name: str) -> list[str]:
    problems: list[str] = []
    _variable(ds, "intensity", INTENSITY_DIMS["volume"], name, problems)
    for c in ("y", "x"):
        _coord(ds, c, c, name, problems, units="mm", increasing=True)
    _q(ds, name, problems)
    return problems


def _phase_coord(ds: xr.Dataset, name: str, problems: list[str]) -> None:
    if "phase" not in ds.coords:
        problems.append(f"{name}: no coordinate 'phase'; expected phase (phase) naming each phase")
        return
    c = ds.coords["phase"]
    if tuple(c.dims) != ("phase",):
        problems.append(f"{name}: coordinate phase has dims {_dims(c.dims)}; expected (phase)")
        return
    values = [str(v) for v in c.values]
    if len(set(values)) != len(values):
        problems.append(f"{name}: coordinate phase has repeated names {values}; expected one entry per phase")


def _check_maps(ds: xr.Dataset, name: str, *, std: bool = True) -> list[str]:
    problems: list[str] = []
    _phase_coord(ds, name, problems)
    pix: tuple[str, ...] = ("y", "x")
    if "scale" in ds.data_vars and tuple(ds["scale"].dims[:1]) == ("phase",) \
            and tuple(ds["scale"].dims[1:]) in MAP_PIXEL_DIMS:
        pix = tuple(map(str, ds["scale"].dims[1:]))
    per_phase = ("phase", *pix)
    for p in MAP_PARAMS:
        _variable(ds, p, per_phase, name, problems, floating=True)
        if std:
            _variable(ds, f"{p}_std", per_phase, name, problems, floating=True)
    for v in MAP_OPTIONAL:
        _variable(ds, v, per_phase, name, problems, floating=True, required=False)
    for v in MAP_PIXEL:
        _variable(ds, v, pix, name, problems, required=False)
    if pix == ("y", "x"):
        for c in pix:
            _coord(ds, c, c, name, problems, units="mm", increasing=True)
    return problems


def _check_truth(ds: xr.Dataset, name: str) -> list[str]:
    problems = _check_maps(ds, name, std=False)
    if "projection" in ds.data_vars:
        _variable(ds, "projection", ("angle", "translation", "q"), name, problems)
        _angles_half_turn(_coord(ds, "angle", "angle", name, problems, units="deg"), "angle", name, problems)
        _coord(ds, "translation", "translation", name, problems, units="mm", increasing=True)
        _q(ds, name, problems)
    return problems


def _check_unrolled(ds: xr.Dataset, name: str) -> list[str]:
    problems: list[str] = []
    if not ds.data_vars:
        return [f"{name}: no variables; expected maps variables on (phase, radius, angle)"]
    for v in ds.data_vars:
        dims = tuple(ds[v].dims)
        if dims not in (("phase", "radius", "angle"), ("radius", "angle")):
            problems.append(f"{name}: variable {v} has dims {_dims(dims)}; expected (phase, radius, angle) "
                            "or (radius, angle)")
    if any("phase" in ds[v].dims for v in ds.data_vars):
        _phase_coord(ds, name, problems)
    _coord(ds, "radius", "radius", name, problems, units="mm", increasing=True)
    _coord(ds, "angle", "angle", name, problems, units="deg", increasing=True)
    return problems


def _check_regions(ds: xr.Dataset, name: str) -> list[str]:
    problems: list[str] = []
    if _variable(ds, "region", ("y", "x"), name, problems):
        region = ds["region"]
        if region.dtype.kind not in "iu":
            problems.append(f"{name}: variable region has dtype {region.dtype}; expected integer codes "
                            "(-1 outside, 0 HL, 1 DL, 2 IN)")
        else:
            codes = sorted(set(np.unique(np.asarray(region.values)).tolist()) - set(REGION_CODES))
            if codes:
                problems.append(f"{name}: variable region holds codes {codes}; expected -1 outside, 0 HL, "
                                "1 DL, 2 IN")
    for c in ("y", "x"):
        _coord(ds, c, c, name, problems, units="mm", increasing=True)
    return problems


#: Per-voxel and per-state variables of a cdi-series store.
CDI_VOLUMES = ("amplitude", "phase", "displacement", "strain")
CDI_STATES = ("omega", "chi2")


def _check_cdi_series(ds: xr.Dataset, name: str) -> list[str]:
    problems: list[str] = []
    for v in CDI_VOLUMES:
        _variable(ds, v, ("state", "z", "y", "x"), name, problems, floating=True)
    _variable(ds, "support", ("z", "y", "x"), name, problems)
    for v in CDI_STATES:
        _variable(ds, v, ("state",), name, problems, floating=True)
    for c in ("z", "y", "x"):
        _coord(ds, c, c, name, problems, units="nm", increasing=True)
    return problems


def _check_xcs(ds: xr.Dataset, name: str) -> list[str]:
    problems: list[str] = []
    for v in ("emr", "emr_std"):
        _variable(ds, v, ("state", "y", "x"), name, problems, floating=True)
    for v in ("x_li", "x_li_std"):
        _variable(ds, v, ("state", "y", "x"), name, problems, floating=True, required=False)
    if ("x_li" in ds.data_vars) != ("x_li_std" in ds.data_vars):
        problems.append(f"{name}: x_li and x_li_std come together; one of them is missing")
    _variable(ds, "profile", ("state", "region", "pz"), name, problems, floating=True)
    _coord(ds, "pz", "pz", name, problems, units="a.u.", increasing=True)
    return problems


def _check_ct_volume(ds: xr.Dataset, name: str) -> list[str]:
    problems: list[str] = []
    _variable(ds, "attenuation", ("z", "y", "x"), name, problems, floating=True)
    for c in ("z", "y", "x"):
        _coord(ds, c, c, name, problems, units="um", increasing=True)
    return problems


def _check_ct_roughness(ds: xr.Dataset, name: str) -> list[str]:
    problems: list[str] = []
    _variable(ds, "height", ("interface", "y", "x"), name, problems, floating=True)
    for v in ("ra", "rq"):
        _variable(ds, v, ("interface",), name, problems, floating=True)
    _variable(ds, "fraction", ("component",), name, problems, floating=True)
    return problems


def check_cxi(url: str) -> list[str]:
    """Problems of a Bragg CDI result file against the CXI contract (empty: it meets it)."""
    import h5py

    name = storage.redact(url)
    problems: list[str] = []
    fs, path = storage.filesystem(url)
    with storage.io_errors(url, "read"), fs.open(path, "rb") as f:
        try:
            h5 = h5py.File(f, "r")
        except OSError as exc:
            return [f"{name}: not an HDF5/CXI file ({exc})"]
        with h5:
            obj = h5.get("entry_1/image_1/data")
            if not isinstance(obj, h5py.Dataset):
                return [f"{name}: no entry_1/image_1/data; expected the complex object of a CDI reconstruction"]
            if obj.ndim != 3 or obj.dtype.kind != "c":
                problems.append(f"{name}: entry_1/image_1/data is {obj.dtype} of shape {obj.shape}; expected a "
                                "complex 3D object")
            support = h5.get("entry_1/image_1/support")
            if not isinstance(support, h5py.Dataset) or support.shape != obj.shape:
                problems.append(f"{name}: entry_1/image_1/support is missing or not of the object's shape "
                                f"{obj.shape}")
            chi2 = h5.get("entry_1/image_1/chi2")
            if not isinstance(chi2, h5py.Dataset) or chi2.shape not in ((), (1,)):
                problems.append(f"{name}: entry_1/image_1/chi2 is missing or not a scalar (χ² of Eq. 1)")
    return problems


def _check_operando(ds: xr.Dataset, name: str) -> list[str]:
    problems = _check_maps(ds, name)
    for v in MAP_OPTIONAL:
        _variable(ds, v, ("phase", "frame"), name, problems, floating=True)
    for c in ("time", "voltage", "current", "cycle"):
        _coord(ds, c, "frame", name, problems)
    for v in ("echem_time", "echem_voltage", "echem_current"):
        _variable(ds, v, ("echem",), name, problems, floating=True)
    return problems


_CHECKS = {"patterns": _check_patterns, "sinogram": _check_sinogram, "volume": _check_volume, "maps": _check_maps,
           "unrolled": _check_unrolled, "regions": _check_regions, "truth": _check_truth,
           "cdi-series": _check_cdi_series, "xcs": _check_xcs, "ct-volume": _check_ct_volume,
           "ct-roughness": _check_ct_roughness, "operando": _check_operando}


# -- YAML and the model registry -------------------------------------------------------------

def check_phase_library(url: str) -> list[str]:
    """Check a phase-library YAML by loading it (every structure included).

    Returns
    -------
    list of str
        One line per problem :meth:`xrdscale.physics.phaselib.PhaseLibrary.load` reports.
    """
    from xrdscale.physics.phaselib import PhaseLibrary

    try:
        PhaseLibrary.load(url)
    except XrdscaleError as exc:
        return _lines(str(exc), storage.redact(url))
    return []


def check_spec(url: str) -> list[str]:
    """Check a campaign-spec YAML with :func:`xrdscale.campaign.spec.load_spec`.

    Returns
    -------
    list of str
        One line per problem the spec's validation reports.
    """
    from xrdscale.campaign.spec import load_spec

    try:
        load_spec(url)
    except XrdscaleError as exc:
        return _lines(str(exc), storage.redact(url))
    return []


def check_model(url: str) -> list[str]:
    """Check a PQ-Net model registry entry: its marker, ``model.json`` and every member's checksum.

    Returns
    -------
    list of str
        The problem :func:`xrdscale.pqnet.registry.open_entry` or the verification reports.
    """
    from xrdscale.pqnet.registry import open_entry

    try:
        open_entry(url).verify()
    except XrdscaleError as exc:
        return _lines(str(exc), storage.redact(url))
    return []

