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
import datetime as _dt
import json
import logging
import os
import posixpath
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

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
        return ds.to_zarr(url, mode="w", compute=compute, encoding=dict(encoding or {}),
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


def open_store(url: str, *, require_complete: bool = True, stage: str | None = None,
               dask: bool = True) -> xr.Dataset:
    """Open the zarr store at ``url`` lazily (dask-backed).

    Parameters
    ----------
    url : str
        Store URL.
    require_complete : bool
        Refuse stores without a completion marker (default).
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
        The store was never marked complete.
    InputError
        The store belongs to another stage.
    """
    if not exists(url):
        raise StorageError(f"no store at {redact(url)}; check the path or run the stage that writes it")
    if require_complete and not is_complete(url):
        raise IncompleteStoreError(
            f"store {redact(url)} is incomplete (no {MARKER} marker): the stage that wrote it was "
            "interrupted or failed; run it again"
        )
    with io_errors(url, "open the store"):
        ds = xr.open_zarr(url, storage_options=storage_options(url) or None, consolidated=None,
                          **({} if dask else {"chunks": None}))
    if stage is not None and ds.attrs.get("stage") != stage:
        raise InputError(
            f"{redact(url)} is a {ds.attrs.get('stage', 'unknown')!r} store, expected a {stage!r} store"
        )
    return ds


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` (any fsspec URL)."""
    fs, path = filesystem(url)
    with io_errors(url, "write"):
        parent = posixpath.dirname(path)
        if parent and not is_remote(url):
            os.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)


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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
