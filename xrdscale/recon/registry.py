"""Reconstruction engines behind one small protocol, looked up by name.

``Impl(engine, device)`` names an implementation; :func:`get_engine` resolves it
(``auto`` engine → ``batched``; ``auto`` device → CUDA when the engine can use it) and
degrades a CUDA request to the CPU with one INFO log line when no GPU is usable.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from xrdscale.exceptions import ConfigError
from xrdscale.recon.astra_engine import AstraEngine
from xrdscale.recon.batched import BatchedEngine
from xrdscale.recon.geometry import Geometry

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


#: engine name -> engine class (constant; engines are not registered by import side effect)
ENGINES: Mapping[str, type] = types.MappingProxyType({"astra": AstraEngine, "batched": BatchedEngine})
#: names of the engines (without ``auto``)
ENGINE_NAMES: tuple[str, ...] = tuple(ENGINES)


@dataclasses.dataclass(frozen=True)
class Impl:
    """An engine and a device, as a user names them (``auto`` allowed for both)."""

    engine: str = "auto"
    device: str = "auto"


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
    name = "batched" if impl.engine == "auto" else impl.engine
    if name not in ENGINES:
        raise ConfigError(f"unknown reconstruction engine {impl.engine!r}; available engines: "
                          f"{', '.join(['auto', *ENGINES])}")
    if impl.device not in DEVICES:
        raise ConfigError(f"unknown device {impl.device!r}; expected one of {', '.join(DEVICES)}")
    cls = ENGINES[name]
    has_cuda = cls.cuda_available()
    device = impl.device
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    elif device == "cuda" and not has_cuda:
        logger.info("engine %s: CUDA requested but not available here; using the CPU", name)
        device = "cpu"
    return cls(device=device)
