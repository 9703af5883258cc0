"""What every stage shares: its versioned config model and the one path that writes its output.

A stage is a lazy transform from xarray Dataset(s) to a Dataset plus a config model
(:class:`StageConfig`: frozen, ``extra="forbid"``, versioned). The same config object is
taken by the stage function, built from the options of its CLI command
(:mod:`xrdscale.cli.stages`), is ``pipeline.<stage>`` of a campaign spec, and gives the
run's config hash (:meth:`StageConfig.hashed`): fields that change how fast a result comes,
not what it is (actors, chunk sizes), are declared once with :func:`runtime_field`.

:func:`write_output` is the one shell around every stage's computation: provenance, the
computation on the client with progress, the completion marker last, and removal of the
partial output on failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import xarray as xr
from pydantic import Field, ValidationError

from xrdscale.config import Model, format_errors
from xrdscale.exceptions import ConfigError, StorageError, XrdscaleError
from xrdscale.io import storage

logger = logging.getLogger(__name__)

C = TypeVar("C", bound="StageConfig")

#: json_schema_extra key of fields that do not change a stage's result
AFFECTS_RESULT = "affects_result"


def runtime_field(default: Any, description: str, **kwargs: Any) -> Any:
    """A config field that changes speed or resources only; it stays out of the config hash."""
    return Field(default, description=description, json_schema_extra={AFFECTS_RESULT: False}, **kwargs)


class StageConfig(Model):
    """Settings of one stage; subclasses are ``pipeline.<stage>`` of a campaign spec.

    Attributes
    ----------
    stage : str
        The stage's name (class attribute).
    version : int
        The config's schema version (class attribute), recorded with every output.
    """

    stage: ClassVar[str] = ""
    version: ClassVar[int] = 1

    @classmethod
    def build(cls: type[C], config: C | Mapping[str, Any] | None = None, /, **settings: Any) -> C:
        """The config from a config object or mapping, overridden by keyword settings.

        Raises
        ------
        ConfigError
            Any invalid value; every problem is listed with its key and the valid choices.
        """
        if isinstance(config, cls) and not settings:
            return config
        base: dict[str, Any] = {}
        if isinstance(config, StageConfig):
            base = config.model_dump()
        elif config is not None:
            base = dict(config)
        try:
            return cls.model_validate({**base, **settings})
        except ValidationError as exc:
            lines = "\n  ".join(format_errors(exc, cls))
            raise ConfigError(f"invalid {cls.stage or cls.__name__} settings:\n  {lines}") from exc

    @classmethod
    def runtime_fields(cls) -> frozenset[str]:
        """Names of the fields declared with :func:`runtime_field`."""
        return frozenset(name for name, f in cls.model_fields.items()
                         if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get(AFFECTS_RESULT) is False)

    def hashed(self) -> dict[str, Any]:
        """The settings that determine the result (what a campaign hashes), with the version."""
        return {"version": self.version, **self.model_dump(mode="json", exclude=set(self.runtime_fields()))}

    def record(self) -> dict[str, Any]:
        """Every setting, with the version: what an output store records as its config."""
        return {"version": self.version, **self.model_dump(mode="json")}


def discard(url: str) -> None:
    """Remove a partial output (logged, never raised: the original error matters more)."""
    try:
        storage.clear(url)
    except XrdscaleError:
        logger.warning("could not remove the incomplete output %s", storage.redact(url))


def compute(collection: Any, *, client: Any = None, progress: bool = True, label: str = "",
            total: int | None = None, unit: str = "tasks") -> Any:
    """Compute a Dask collection on the client (or the local scheduler), with progress."""
    from xrdscale.runtime.progress import compute as tracked

    return tracked(collection, client=client, label=label, total=total, unit=unit, progress=progress)


def write_output(ds: xr.Dataset, url: str, *, kind: str, config: Mapping[str, Any], client: Any = None,
                 progress: bool = True, label: str | None = None, total: int | None = None,
                 unit: str = "tasks", encoding: Mapping[str, Any] | None = None,
                 marker: Mapping[str, Any] | None = None) -> str:
    """Write a (Dask-backed) Dataset as a complete store of ``kind``.

    Metadata and provenance (``stage``, ``config``, xrdscale version) first, then the
    chunks on the client with progress, then the completion marker. On any failure the
    partial store is removed and the error re-raised (an ``OSError`` as
    :class:`StorageError`): a store is only ever marked complete after all of its chunks.

    Parameters
    ----------
    ds : xarray.Dataset
        The lazy result of a stage.
    url : str
        Destination (any fsspec URL).
    kind : str
        Store kind of the data contract (``patterns``, ``sinogram``, ``volume``, ``maps``).
    config : mapping
        The settings recorded in ``attrs['config']``.
    client : distributed.Client, optional
        Default: the current one, else the local threaded scheduler.
    progress : bool
        Show progress (a bar in a terminal, a line every few seconds in a log).
    label, total, unit
        What the progress counts: ``total`` units reported by the tasks, or tasks.
    encoding : mapping, optional
        Per-variable zarr encoding.
    marker : mapping, optional
        Extra fields of the completion marker.

    Returns
    -------
    str
        ``url``.
    """
    try:
        delayed = storage.create_store(ds, url, stage=kind, config=config, encoding=encoding, compute=False)
        compute(delayed, client=client, progress=progress, label=label or kind, total=total, unit=unit)
    except OSError as exc:
        discard(url)
        raise StorageError(f"cannot write the {kind} store at {storage.redact(url)}: {exc}") from exc
    except BaseException:
        discard(url)
        raise
    storage.mark_complete(url, {"stage": kind, **(marker or {})})
    logger.info("wrote %s store %s", kind, storage.redact(url))
    return url


def guarded(url: str, body: Callable[[], str]) -> str:
    """Run ``body`` (which writes ``url``); on failure remove whatever it left at ``url``."""
    storage.begin_store(url)  # a failed run must not leave an earlier result looking current
    try:
        return body()
    except BaseException:
        discard(url)
        raise
