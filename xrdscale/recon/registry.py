"""Reconstruction engines behind one small protocol, looked up by name.

``Impl(engine, device)`` names an implementation; :meth:`Impl.resolved` validates it and
resolves ``auto`` (engine → ``batched``; device → CUDA where the engine can use it), and
:func:`get_engine` instantiates it. The device follows the one rule of
:func:`xrdscale.runtime.devices.resolve_device`: a ``cuda`` or ``auto`` request runs on the
CPU where the engine cannot use CUDA, with one INFO line per process and engine.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from xrdscale.exceptions import ConfigError
from xrdscale.recon.geometry import Geometry
from xrdscale.runtime.devices import resolve_device

logger = logging.getLogger(__name__)

ALGORITHMS: tuple[str, ...] = ("fbp", "sirt")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


class Engine(Protocol):
    """What every reconstruction engine provides.

    Sinograms are ``(angle, translation, channel)`` float32 arrays; volumes are
    ``(y, x, channel)`` float32 arrays with ``y`` ascending.
    """

    name: str
    device: str

    def fbp(self, geometry: Geometry, sino: np.ndarray, filter_name: str) -> np.ndarray:
        """Filtered back projection of every channel of ``sino``."""

    def sirt(self, geometry: Geometry, sino: np.ndarray, iterations: int) -> np.ndarray:
        """``iterations`` SIRT iterations of every channel of ``sino``, starting from zero."""


#: engine name -> ``module:Class`` of the engine (imported on first use: importing the registry,
#: as the stage configs and the CLI do, loads neither ASTRA nor torch)
ENGINES: Mapping[str, str] = types.MappingProxyType({"astra": "xrdscale.recon.astra_engine:AstraEngine",
                                                     "batched": "xrdscale.recon.batched:BatchedEngine"})
#: names of the engines (without ``auto``)
ENGINE_NAMES: tuple[str, ...] = tuple(ENGINES)


@dataclasses.dataclass(frozen=True)
class Impl:
    """An engine and a device, as a user names them (``auto`` allowed for both)."""

    engine: str = "auto"
    device: str = "auto"

    def resolved(self) -> Impl:
        """This implementation with a concrete engine and the device it runs on here.

        Raises
        ------
        ConfigError
            Unknown engine or device name (the message lists the available ones).
        """
        name = "batched" if self.engine == "auto" else self.engine
        if name not in ENGINES:
            raise ConfigError(f"unknown reconstruction engine {self.engine!r}; available engines: "
                              f"{', '.join(['auto', *ENGINES])}")
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; expected one of {', '.join(DEVICES)}")
        device = resolve_device(self.device, what=f"reconstruct ({name})", probe=_cuda_probe(name))
        return Impl(name, device)


def engine_class(name: str) -> Any:
    """The class of engine ``name`` (imported here, on first use)."""
    import importlib

    module, _, attr = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def _cuda_probe(name: str) -> Callable[[], str | None] | None:
    """The CUDA check of engine ``name`` (None: torch's, which the batched engine uses)."""
    if name == "batched":
        return None
    cls = engine_class(name)
    return lambda: None if cls.cuda_available() else f"the {name} engine has no CUDA build or sees no GPU"


def check_algorithm(name: str) -> str:
    """Return ``name`` if it is a known algorithm, else raise :class:`ConfigError`."""
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown reconstruction algorithm {name!r}; expected one of {', '.join(ALGORITHMS)}")
    return name


def get_engine(impl: Impl) -> Engine:
    """Instantiate the engine named by ``impl`` on the device it can use.

    Parameters
    ----------
    impl : Impl
        Requested engine (``astra``, ``batched`` or ``auto``) and device (``cpu``,
        ``cuda`` or ``auto``).

    Returns
    -------
    Engine

    Raises
    ------
    ConfigError
        Unknown engine or device name (the message lists the available ones).
    """
    concrete = impl.resolved()
    return engine_class(concrete.engine)(device=concrete.device)
