"""Stores at fsspec URLs: zarr read/write with provenance attrs and completion markers.

Every stage writes one xarray Dataset as a zarr store at a URL (a local path,
``s3://bucket/prefix``, ``memory://…``). A store is only *complete* once its marker
file ``.xrdscale-complete`` exists; the marker is written last, after all data, so an
interrupted stage never leaves output that looks finished. Readers refuse incomplete
stores.

S3 credentials come from the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, instance roles) through botocore; a custom endpoint (MinIO, moto, Ceph)
from ``XRDSCALE_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``. They are never written into
stores, markers or logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import posixpath
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

import fsspec
import xarray as xr

from xrdscale import __version__
from xrdscale.exceptions import IncompleteStoreError, InputError, StorageError

logger = logging.getLogger(__name__)

MARKER = ".xrdscale-complete"


def storage_options(url: str) -> dict[str, Any]:
    """Return the fsspec storage options for ``url``, built from the environment only.

    Parameters
    ----------
    url : str
        Any fsspec URL or local path.

    Returns
    -------
    dict
        Options for :func:`fsspec.filesystem`; empty for local paths.
    """
    protocol = fsspec.utils.get_protocol(url)
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("XRDSCALE_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict[str, Any] = {}
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        profile = os.environ.get("AWS_PROFILE")
        if profile:
            opts["profile"] = profile
        # Retry transient failures (a restarting server) instead of failing a stage at once.
        opts["config_kwargs"] = {"retries": {"max_attempts": 5, "mode": "standard"}}
        return opts
    return {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for ``url`` with the environment's storage options."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    return fs, path


def is_remote(url: str) -> bool:
    """True if ``url`` is not a local path."""
    return fsspec.utils.get_protocol(url) not in ("file", "local")


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or a local path."""
    if is_remote(url):
        return posixpath.join(url.rstrip("/"), *parts)
    return os.path.join(url, *parts)


def resolve(path: str, base_dir: str | None) -> str:
    """Resolve ``path`` relative to ``base_dir`` unless it is absolute or a URL."""
    if base_dir is None or is_remote(path) or os.path.isabs(path):
        return path
    if is_remote(base_dir):
        return posixpath.normpath(posixpath.join(base_dir, path)).replace(":/", "://", 1)
    return os.path.normpath(os.path.join(base_dir, path))


def redact(url: str) -> str:
    """Strip any user:password part from a URL before it is logged or stored."""
    if "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


@contextlib.contextmanager
def io_errors(url: str, action: str) -> Iterator[None]:
    """Turn low-level I/O failures into one :class:`StorageError` naming ``url``.

    Parameters
    ----------
    url : str
        The URL being accessed (redacted in the message).
    action : str
        What was being done, e.g. ``"read the raw dataset"``.
    """
    try:
        yield
    except (StorageError, InputError):
        raise
    except FileNotFoundError as exc:
        raise StorageError(f"cannot {action}: {redact(url)} does not exist ({exc}); check the path") from exc
    except PermissionError as exc:
        raise StorageError(
            f"cannot {action} at {redact(url)}: permission denied ({exc}); check the credentials "
            "in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket"
        ) from exc
    except OSError as exc:
        raise StorageError(f"cannot {action} at {redact(url)}: {exc}") from exc
    except Exception as exc:  # botocore / aiohttp errors do not derive from OSError
        name = type(exc).__name__
        if any(k in name for k in ("ClientError", "EndpointConnection", "Credentials", "ClientConnector")):
            raise StorageError(
                f"cannot {action} at {redact(url)}: {name}: {exc}; check the endpoint "
                "(XRDSCALE_S3_ENDPOINT_URL) and credentials"
            ) from exc
        raise


def exists(url: str) -> bool:
    """True if something exists at ``url``."""
    fs, path = filesystem(url)
    with io_errors(url, "check"):
        return fs.exists(path)


def is_complete(url: str) -> bool:
    """True if the store at ``url`` carries its completion marker."""
    fs, path = filesystem(url)
    with io_errors(url, "check the completion marker of"):
        return fs.exists(posixpath.join(path, MARKER))


def read_marker(url: str) -> dict[str, Any]:
    """Return the JSON content of the completion marker of ``url``."""
    fs, path = filesystem(url)
    with io_errors(url, "read the completion marker of"), fs.open(posixpath.join(path, MARKER), "r") as f:
        return json.load(f)


def mark_complete(url: str, info: Mapping[str, Any] | None = None) -> None:
    """Write the completion marker of ``url`` (call it after all data is written)."""
    fs, path = filesystem(url)
    payload = {"xrdscale_version": __version__, "completed": _now(), **(info or {})}
    with io_errors(url, "write the completion marker of"), fs.open(posixpath.join(path, MARKER), "w") as f:
        json.dump(payload, f, default=str)


def clear(url: str) -> None:
    """Remove whatever is at ``url`` (marker first, so a crash mid-removal is never 'complete')."""
    fs, path = filesystem(url)
    with io_errors(url, "remove"):
        marker = posixpath.join(path, MARKER)
        if fs.exists(marker):
            fs.rm(marker)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def provenance(stage: str, config: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Attributes every store carries: stage, its config (JSON) and the xrdscale version."""
    attrs = {
        "stage": stage,
        "config": json.dumps(dict(config or {}), sort_keys=True, default=str),
        "xrdscale_version": __version__,
        "created": _now(),
    }
    attrs.update(extra)
    return attrs


def create_store(ds: xr.Dataset, url: str, *, stage: str, config: Mapping[str, Any] | None = None,
                 encoding: Mapping[str, Any] | None = None, compute: bool = True) -> Any:
    """Write ``ds`` with provenance attrs as a new zarr store at ``url``, *without* its marker.

    Any previous content is removed first. With ``compute=False`` only the metadata and the
    in-memory variables are written and the dask-backed ones are returned as a delayed
    write (for region-wise or progress-tracked computation); call :func:`mark_complete`
    once everything is written.

    Returns
    -------
    dask.delayed.Delayed or ZarrStore
        What :meth:`xarray.Dataset.to_zarr` returns.
    """
    begin_store(url)
    ds = _portable_strings(ds.copy())
    ds.attrs.update(provenance(stage, config))
    with io_errors(url, f"write the {stage} store"), warnings.catch_warnings():
        # Consolidated metadata is not (yet) in the zarr v3 spec, but zarr-python and xarray
        # support it and it saves one request per array on object stores.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        to_zarr: Any = ds.to_zarr  # one call for compute=True/False (two overloads)
        return to_zarr(url, mode="w", compute=compute, encoding=dict(encoding or {}),
                       storage_options=storage_options(url) or None, consolidated=True)


def write_store(ds: xr.Dataset, url: str, *, stage: str, config: Mapping[str, Any] | None = None,
                encoding: Mapping[str, Any] | None = None, marker: Mapping[str, Any] | None = None) -> str:
    """Write ``ds`` as a complete zarr store at ``url``.

    Any previous content is removed first, the data and provenance attrs are written
    (dask-backed variables are computed chunk by chunk on the current scheduler), and
    the completion marker is written last.

    Parameters
    ----------
    ds : xarray.Dataset
        The data to write.
    url : str
        Destination URL.
    stage : str
        Name of the stage that produced the data (``patterns``, ``sinogram``, …).
    config : mapping, optional
        The stage's configuration, recorded as JSON in ``attrs['config']``.
    encoding : mapping, optional
        Per-variable zarr encoding.
    marker : mapping, optional
        Extra fields for the completion marker.

    Returns
    -------
    str
        ``url``.
    """
    create_store(ds, url, stage=stage, config=config, encoding=encoding)
    mark_complete(url, {"stage": stage, **(marker or {})})
    logger.info("wrote %s store %s", stage, redact(url))
    return url


def _portable_strings(ds: xr.Dataset) -> xr.Dataset:
    """Store fixed-width unicode arrays as variable-length strings (specified in zarr v3)."""
    for name, var in list(ds.variables.items()):
        if var.dtype.kind == "U":
            ds[name] = var.astype(object)
    return ds


def begin_store(url: str) -> None:
    """Prepare ``url`` for a new store: drop any previous marker and content."""
    if exists(url):
        clear(url)


#: Files of a zarr group's own metadata (v3 and v2), not members of the group.
_GROUP_FILES = frozenset({"zarr.json", ".zgroup", ".zattrs", ".zmetadata", MARKER})


@dataclasses.dataclass(frozen=True)
class StoreLayout:
    """What the top level of a zarr store at a URL holds (read without opening it with xarray).

    Attributes
    ----------
    zarr_format : int or None
        2 or 3; None when there is no group metadata (``zarr.json`` or ``.zgroup``).
    attrs : dict
        The group's attributes.
    consolidated : bool
        The group carries consolidated metadata (``.zmetadata`` or v3 ``consolidated_metadata``).
    members : tuple of str
        Names of the entries beside the group metadata (arrays, subgroups).
    complete : bool
        The ``.xrdscale-complete`` marker exists.
    """

    zarr_format: int | None
    attrs: dict[str, Any]
    consolidated: bool
    members: tuple[str, ...]
    complete: bool

    @property
    def written_by_xrdscale(self) -> bool:
        """The group carries xrdscale's provenance attributes (or its completion marker)."""
        return self.complete or "xrdscale_version" in self.attrs

    @property
    def partial(self) -> bool:
        """Started by xrdscale and never completed, or an empty shell of a group.

        :func:`create_store` writes the group, then its attributes, then the arrays, and the
        marker last: a store interrupted on the way has provenance attributes but no marker,
        or (interrupted earlier) no group metadata or no members at all.
        """
        if self.complete:
            return False
        if self.zarr_format is None:
            return not self.members
        return not self.members or "xrdscale_version" in self.attrs


def store_layout(url: str) -> StoreLayout:
    """Read the group metadata at the top of the zarr store at ``url``.

    Parameters
    ----------
    url : str
        Store URL (any fsspec URL or local path).

    Returns
    -------
    StoreLayout

    Raises
    ------
    StorageError
        The URL cannot be read.
    """
    fs, path = filesystem(url)
    with io_errors(url, "read the store metadata of"):
        fs.invalidate_cache(path)  # object-store listings are cached; writers use other instances
        try:
            names = frozenset(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
        except (FileNotFoundError, NotADirectoryError):
            names = frozenset()
        members = tuple(sorted(n for n in names if n not in _GROUP_FILES))
        complete = MARKER in names
        if "zarr.json" in names:
            meta = _read_json(fs, posixpath.join(path, "zarr.json"))
            if meta.get("node_type", "group") == "group":
                return StoreLayout(3, dict(meta.get("attributes") or {}),
                                   meta.get("consolidated_metadata") is not None, members, complete)
        elif ".zgroup" in names:
            attrs = _read_json(fs, posixpath.join(path, ".zattrs")) if ".zattrs" in names else {}
            return StoreLayout(2, attrs, ".zmetadata" in names, members, complete)
    return StoreLayout(None, {}, False, members, complete)


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    try:
        doc = json.loads(fs.cat_file(path))
    except (ValueError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def open_zarr(url: str, *, dask: bool = True, layout: StoreLayout | None = None) -> xr.Dataset:
    """Open the zarr group at ``url`` with xarray, with no completeness or contract check.

    Consolidated metadata is used when the store has it and not asked for otherwise (no
    fallback warning for stores written with ``consolidated=False``).
    """
    layout = layout or store_layout(url)
    with io_errors(url, "open the store"):
        if dask:
            return xr.open_zarr(url, storage_options=storage_options(url) or None, consolidated=layout.consolidated)
        return xr.open_zarr(url, storage_options=storage_options(url) or None, consolidated=layout.consolidated,
                            chunks=None)


def open_store(url: str, *, require_complete: bool = True, stage: str | None = None,
               dask: bool = True) -> xr.Dataset:
    """Open the zarr store at ``url`` lazily (dask-backed).

    A store xrdscale wrote is only opened once complete (its marker exists). A store that
    xrdscale did not write (no marker, no provenance attributes) is accepted when it meets
    the data contract of its kind (see :mod:`xrdscale.io.contracts`): the ``stage`` asked
    for, else the kind its ``attrs['stage']`` or its variables name.

    Parameters
    ----------
    url : str
        Store URL.
    require_complete : bool
        Refuse stores xrdscale started but never marked complete (default).
    stage : str, optional
        Expected stage name; a store of another stage is refused.
    dask : bool
        Dask arrays of the stored chunks (default). ``False``: lazily indexed arrays that
        read on access; ``.chunk(...)`` then makes one read task per chunk asked for, which
        spares a graph of one task per stored chunk plus a rechunk.

    Raises
    ------
    StorageError
        Nothing at ``url`` or it cannot be read.
    IncompleteStoreError
        xrdscale started the store and never marked it complete.
    InputError
        The store belongs to another stage, or (not written by xrdscale) it does not meet
        the contract of its kind.
    """
    if not exists(url):
        raise StorageError(f"no store at {redact(url)}; check the path or run the stage that writes it")
    layout = store_layout(url)
    foreign = not layout.written_by_xrdscale and not layout.partial
    if require_complete and layout.partial:
        raise IncompleteStoreError(
            f"store {redact(url)} is incomplete (no {MARKER} marker): the stage that wrote it was "
            "interrupted or failed; run it again"
        )
    if layout.zarr_format is None and not layout.partial:
        raise InputError(f"{redact(url)} is not a zarr store (no zarr.json or .zgroup group metadata); "
                         "give the folder of a zarr store")
    ds = open_zarr(url, dask=dask, layout=layout)
    if layout.zarr_format == 2:
        _drop_v2_codecs(ds)
    if foreign:
        _accept_foreign(ds, url, stage)
    elif stage is not None and ds.attrs.get("stage") != stage:
        raise InputError(
            f"{redact(url)} is a {ds.attrs.get('stage', 'unknown')!r} store, expected a {stage!r} store"
        )
    return ds


def _drop_v2_codecs(ds: xr.Dataset) -> None:
    """Forget the zarr v2 codecs of a v2 store's variables: stores derived from it are v3."""
    for var in ds.variables.values():
        for key in ("compressor", "compressors", "filters", "serializer"):
            var.encoding.pop(key, None)


def _accept_foreign(ds: xr.Dataset, url: str, stage: str | None) -> None:
    """Check a store xrdscale did not write against its kind's contract; log its acceptance."""
    from xrdscale.io import contracts

    name = redact(url)
    own = ds.attrs.get("stage")
    if stage is not None and own is not None and own != stage:
        raise InputError(f"{name} is a {own!r} store, expected a {stage!r} store")
    kind = stage or (own if own in contracts.STORE_KINDS else None) or contracts.dataset_kind(ds)
    if kind is None:
        logger.info("%s: not written by xrdscale and of no store kind with a contract; accepted as is", name)
        return
    if kind not in contracts.STORE_KINDS:
        raise InputError(
            f"{name} was not written by xrdscale (no {MARKER} marker, no provenance attrs) and a {kind!r} "
            f"store has no data contract to check it against; write it with xrdscale (contracts exist for "
            f"{', '.join(contracts.STORE_KINDS)})"
        )
    problems = contracts.dataset_problems(ds, kind, name)
    if problems:
        looks = contracts.dataset_kind(ds)
        hint = f"; its variables match a {looks!r} store" if looks not in (None, kind) else ""
        raise InputError(
            f"{name} was not written by xrdscale and does not meet the {kind!r} store contract{hint} "
            f"({len(problems)} problem(s)):\n" + "\n".join(f"  {p}" for p in problems)
        )
    logger.info("%s: not written by xrdscale; accepted as a %s store (it meets the contract)", name, kind)


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` (any fsspec URL)."""
    fs, path = filesystem(url)
    with io_errors(url, "write"):
        parent = posixpath.dirname(path)
        if parent and not is_remote(url):
            os.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)


def check_writable(url: str, what: str) -> None:
    """Raise a :class:`StorageError` unless a small object can be written under ``url`` and removed.

    Run before any work starts, so that a workspace in a bucket that does not exist (or is
    read-only for these credentials) is one error, not a failure of every stage.
    """
    if not is_remote(url):
        _check_local_writable(url, what)
        return
    probe = join(url, f".xrdscale-probe-{os.getpid()}")
    fs, path = filesystem(probe)
    try:
        write_bytes(probe, b"")
        with io_errors(probe, f"remove the probe of {what}"):
            fs.rm(path)
    except StorageError as exc:
        bucket = f" (does the bucket {urlparse(url).netloc!r} exist?)" if is_remote(url) else ""
        raise StorageError(f"{what} {redact(url)} is not writable{bucket}: {exc}; fix the URL or create it first; "
                           "nothing was started") from exc


def _check_local_writable(url: str, what: str) -> None:
    """Check a local ``url`` can be created and written, creating nothing (a run that starts nothing leaves nothing)."""
    path = os.path.abspath(os.path.expanduser(filesystem(url)[1]))
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise StorageError(f"{what} {url} is not writable: {probe} is a file, not a folder; choose another path; "
                           "nothing was started")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StorageError(f"{what} {url} is not writable: no write permission on {probe}; choose another path or "
                           "fix its permissions; nothing was started")


def read_bytes(url: str) -> bytes:
    """Read all bytes at ``url``."""
    fs, path = filesystem(url)
    with io_errors(url, "read"), fs.open(path, "rb") as f:
        return f.read()


def put_file(local_path: str, url: str) -> None:
    """Copy a local file to ``url`` (a plain move for local destinations)."""
    fs, path = filesystem(url)
    with io_errors(url, "upload to"):
        if not is_remote(url):
            os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
            os.replace(local_path, path)
        else:
            fs.put_file(local_path, path)


@contextlib.contextmanager
def open_input(url: str, what: str) -> Iterator[Any]:
    """A readable binary file at ``url`` for reading ``what`` (e.g. ``"pattern file"``).

    Raises
    ------
    InputError
        Nothing at ``url``, or a directory there.
    """
    fs, path = filesystem(url)
    with io_errors(url, f"read the {what}"):
        if not fs.exists(path):
            raise InputError(f"no file at {redact(url)}; check the path of the {what}")
        if fs.isdir(path):
            raise InputError(f"{redact(url)} is a directory, not a {what}")
        with fs.open(path, "rb") as f:
            yield f


@contextlib.contextmanager
def staged(url: str) -> Iterator[str]:
    """A local temporary path that becomes the file ``url`` only when the block succeeds.

    For a local ``url`` the temporary file sits beside it and is renamed over it; for a
    remote one it is uploaded at the end. On failure nothing is left at ``url``.
    """
    fs, path = filesystem(url)
    if is_remote(url):
        with tempfile.TemporaryDirectory(prefix="xrdscale-") as tmp:
            local = os.path.join(tmp, os.path.basename(path) or "out")
            yield local
            put_file(local, url)
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    local = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield local
        put_file(local, url)
    finally:
        if os.path.exists(local):
            os.remove(local)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
