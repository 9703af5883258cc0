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

from xrdscale.exceptions import ConfigError, StorageError

logger = logging.getLogger(__name__)

#: Ray namespace of xrdscale's named actors
NAMESPACE = "xrdscale"
#: dask config key of the level of Ray's driver-side logger
LOGGING_LEVEL_KEY = "xrdscale.ray.logging-level"

_lock = threading.RLock()
#: the address this process connected to through :func:`ensure` (None: a new local instance)
_connected: dict[str, str | None] = {}


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
        if address is None:
            _note_recorded_cluster()
        try:
            _init(ray, address, num_cpus)
        except (ConnectionError, TimeoutError, RuntimeError) as exc:
            mismatch = _version_mismatch(str(exc))
            if mismatch:
                raise StorageError(f"the Ray cluster at {address} {mismatch}") from exc
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
        _connected["address"] = address
        logger.debug("Ray connected (%s)", address or "new local instance")
    return ray


def recorded_cluster() -> str | None:
    """The GCS address in Ray's record of the last cluster ``ray start`` ran on this machine, if any.

    The record (``/tmp/ray/ray_current_cluster``) outlives a cluster that was killed.
    """
    try:
        from ray._common.utils import get_ray_address_file

        path = get_ray_address_file(None)
    except ImportError:  # Ray moved it: the default place
        import tempfile

        path = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _note_recorded_cluster() -> None:
    """One INFO line when Ray has a record of another cluster on this machine: it is not followed."""
    import socket

    recorded = recorded_cluster()
    if not recorded:
        return
    host, _, port = recorded.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
        state = "runs"
    except (OSError, ValueError):
        state = "is not running (a stale record)"
    logger.info("a Ray cluster recorded at %s %s; this run starts its own private Ray instance", recorded, state)


#: attempts of a Ray client connection whose server-side session failed to start
CLIENT_ATTEMPTS = 3


def _init(ray: Any, address: str | None, num_cpus: int | None) -> None:
    """``ray.init``; a Ray client connection is tried again when the server's session failed to start.

    Measured on a cluster-in-a-box: the head's client proxy occasionally fails to start the
    per-client server ("Initialization failure from server … Starting Ray client server
    failed"), and the next attempt succeeds.
    """
    import time

    for attempt in range(1, CLIENT_ATTEMPTS + 1):
        try:
            ray.init(**init_kwargs(address, num_cpus=num_cpus))
            return
        except ConnectionAbortedError as exc:
            if not (address or "").startswith("ray://") or attempt == CLIENT_ATTEMPTS \
                    or "Initialization failure" not in str(exc):
                raise
            logger.warning("the Ray client server at %s failed to start a session (attempt %d/%d); trying again",
                           address, attempt, CLIENT_ATTEMPTS)
            time.sleep(2.0 * attempt)


def _version_mismatch(message: str) -> str | None:
    """Ray's multi-line "Version mismatch" error as one plain sentence (None for other errors)."""
    import re

    found = re.search(r"Version mismatch.*?Ray: (\S+)\s+Python: (\S+).*?Ray: (\S+)\s+Python: (\S+)", message, re.S)
    if found is None:
        return None
    ray_c, py_c, ray_d, py_d = found.groups()
    return (f"runs Ray {ray_c} on Python {py_c}, and this driver Ray {ray_d} on Python {py_d}; they must match "
            "(Ray exactly, Python to the minor version): run the driver from the cluster's image, or install "
            f"ray=={ray_c} on Python {'.'.join(py_c.split('.')[:2])} here")


def worker_address() -> str:
    """The address other processes (Dask workers) use to reach the Ray cluster this process is on.

    A driver connected through the Ray client (``ray://``) hands on that address: the Dask
    workers of a cluster are not Ray nodes, and a GCS address is only usable from a Ray node.
    Otherwise the GCS address of the cluster (a local instance: its workers run on this machine).
    """
    import ray

    address = _connected.get("address")
    if address and address.startswith("ray://"):
        return address
    return str(ray.get_runtime_context().gcs_address)


def check_nodes(timeout: float = 120.0) -> None:
    """Raise a :class:`ConfigError` naming the Ray nodes that lack this driver's xrdscale.

    An actor of xrdscale on such a node fails to start with an import error; this asks every
    alive node first, with a zero-CPU task pinned to it.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    import xrdscale

    probe = ray.remote(num_cpus=0, max_retries=0)(lambda: __import__("xrdscale").__version__)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = {n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote() for n in nodes}
    bad: dict[str, str] = {}
    for node, ref in refs.items():
        try:
            version = ray.get(ref, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - an import error arrives wrapped in Ray's task error
            cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            bad[node] = f"cannot import xrdscale ({cause})"
            continue
        if version != xrdscale.__version__:
            bad[node] = f"runs xrdscale {version}"
    if bad:
        raise ConfigError(
            f"Ray node(s) of the cluster do not run this driver's xrdscale {xrdscale.__version__}: "
            + "; ".join(f"{k}: {v}" for k, v in bad.items())
            + f"; install xrdscale=={xrdscale.__version__} on every Ray node (the cluster's image)")


class RayHandle:
    """Connects to Ray on first use (:meth:`ensure`) and disconnects on :meth:`close`.

    Parameters
    ----------
    address : str or None
        ``None`` starts a local Ray instance; else a Ray address (``ray://host:10001``, ``auto``).
    num_cpus : int, optional
        CPUs of a local instance.
    private_to : str, optional
        With ``address=None`` on a cluster whose Dask workers run elsewhere (an existing
        scheduler, Kubernetes): the scheduler's address. Those workers cannot reach a Ray
        instance private to this driver, so :meth:`ensure` refuses to start one and says
        what to give instead.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None, *,
                 private_to: str | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.private_to = private_to
        self._started = False

    def ensure(self) -> Any:
        """Initialise Ray if it is not yet (reusing an instance started by someone else); returns ``ray``."""
        import ray

        with _lock:
            if not ray.is_initialized():
                if self.address is None and self.private_to is not None:
                    raise ConfigError(
                        f"the PQ-Net stages run on Ray actors that the Dask workers call, and the workers of "
                        f"the Dask cluster at {self.private_to} cannot reach a Ray instance private to this "
                        "driver; give a Ray cluster they can reach: --cluster 'tcp://host:8786,ray://host:10001' "
                        "(or cluster.ray in the spec)")
                ensure(self.address, num_cpus=self.num_cpus)
                self._started = True
                if self.address is not None:
                    try:
                        check_nodes()
                    except BaseException:
                        self.close()
                        raise
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
