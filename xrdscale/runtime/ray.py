"""The one connection to Ray: :func:`ensure` is the only caller of ``ray.init`` in xrdscale.

Every part that needs Ray (the campaign's :class:`RayHandle`, :class:`~xrdscale.pqnet.serve.ServerPool`,
the inference tasks on Dask workers, parallel training) goes through :func:`ensure`, so
every connection uses the same settings:

- the ``xrdscale`` namespace (named actors are found from any attached process);
- ``log_to_driver=False``: actors' output stays in Ray's log files; what a user should see
  (training epochs, for instance) is sent back explicitly;
- ``logging_level`` from the dask config key ``xrdscale.ray.logging-level`` (default
  ``warning``; the command line sets it from ``-v``), so Ray's own driver-side chatter
  follows the command's verbosity;
- a new local instance has no dashboard and ``num_cpus`` CPUs.

Ray's token authentication is left to Ray: a new local instance enables it and writes the
token to ``~/.ray/auth_token``. Other processes that attach to that instance (Dask workers
that reach the inference actors) get ``RAY_AUTH_MODE`` in their worker environment from
:func:`xrdscale.runtime.cluster.worker_environ`; nothing here changes ``os.environ``.

Examples
--------
>>> ray = ensure()                       # doctest: +SKIP
>>> handle = RayHandle("ray://head:10001")
>>> handle.started
False
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from xrdscale.exceptions import StorageError

logger = logging.getLogger(__name__)

#: Ray namespace of xrdscale's named actors
NAMESPACE = "xrdscale"
#: dask config key of the level of Ray's driver-side logger
LOGGING_LEVEL_KEY = "xrdscale.ray.logging-level"

_lock = threading.RLock()


def logging_level() -> int:
    """The level of Ray's driver-side logging: dask config ``xrdscale.ray.logging-level`` (default WARNING)."""
    import dask

    value = dask.config.get(LOGGING_LEVEL_KEY, default="warning")
    if isinstance(value, int):
        return value
    level = logging.getLevelName(str(value).upper())
    return level if isinstance(level, int) else logging.WARNING


def init_kwargs(address: str | None = None, *, num_cpus: int | None = None) -> dict[str, Any]:
    """The keyword arguments of ``ray.init`` for ``address`` (None: a new local instance)."""
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False, "logging_level": logging_level()}
    if address is None:
        # "local": a new private instance even where a Ray cluster runs on this machine (or ran and
        # died, leaving its address on record): ray.init() without an address would attach to it.
        kwargs.update(address="local", num_cpus=num_cpus, include_dashboard=False)
    else:
        kwargs["address"] = address
    return kwargs


def ensure(address: str | None = None, *, num_cpus: int | None = None) -> Any:
    """Connect this process to Ray unless it is connected; return the ``ray`` module.

    Parameters
    ----------
    address : str, optional
        A Ray address (``ray://host:10001``, a GCS address ``host:port``, ``auto``); None
        starts a new local instance.
    num_cpus : int, optional
        CPUs of a new local instance (default: Ray's choice).

    Returns
    -------
    module
        ``ray``, initialised (an existing connection of this process is reused as it is).

    Raises
    ------
    StorageError
        Ray cannot be reached at ``address`` or cannot start.
    """
    import ray

    with _lock:
        if ray.is_initialized():
            return ray
        try:
            ray.init(**init_kwargs(address, num_cpus=num_cpus))
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            auth = ""
            if address and address.startswith("ray://") and not os.environ.get("RAY_AUTH_MODE"):
                # measured: a Ray client without RAY_AUTH_MODE=token times out on a cluster with token auth
                auth = ("; a cluster with token authentication (Ray's default) needs RAY_AUTH_MODE=token in this "
                        "process's environment and the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token "
                        "(`ray get-auth-token` on the head)")
            raise StorageError(
                f"cannot connect to Ray at {address or 'a new local instance'}: {exc}; check that the Ray "
                f"cluster runs and the address (ray://host:10001){auth}"
            ) from exc
        logger.debug("Ray connected (%s)", address or "new local instance")
    return ray


class RayHandle:
    """Connects to Ray on first use (:meth:`ensure`) and disconnects on :meth:`close`.

    Parameters
    ----------
    address : str or None
        ``None`` starts a local Ray instance; else a Ray address (``ray://host:10001``, ``auto``).
    num_cpus : int, optional
        CPUs of a local instance.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self._started = False

    def ensure(self) -> Any:
        """Initialise Ray if it is not yet (reusing an instance started by someone else); returns ``ray``."""
        import ray

        with _lock:
            if not ray.is_initialized():
                ensure(self.address, num_cpus=self.num_cpus)
                self._started = True
                logger.info("Ray started at %s", self.address or "local")
        return ray

    @property
    def started(self) -> bool:
        """True once this handle initialised Ray."""
        return self._started

    def close(self) -> None:
        """Shut Ray down if this handle started it."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False
