"""Dask + Ray connections for a campaign: local, an existing cluster, or Kubernetes.

:func:`connect` turns the ``cluster:`` section of a campaign spec into a Dask client (the
engine of every array stage) and a Ray handle (the host of PQ-Net actors):

- ``local`` — a Dask ``LocalCluster`` (dask-cuda's ``LocalCUDACluster`` when ``gpu: true``
  and CUDA is present) and a local Ray instance, both stopped on exit;
- ``address`` — an existing Dask scheduler (``tcp://host:8786``) and Ray cluster
  (``ray://host:10001``); an unreachable address fails within seconds, before anything starts;
- ``kubernetes`` — the dask-kubernetes operator (an existing ``DaskCluster`` by name, or a
  new ``KubeCluster``) and a KubeRay ``RayCluster`` address; needs the ``k8s`` extra.

Ray is started lazily, on the first stage that needs it (:meth:`RayHandle.ensure`), so a
campaign whose analyses are all finished never starts it.

Examples
--------
>>> from xrdscale.runtime.cluster import LocalCluster
>>> with connect(LocalCluster(workers=1)) as (client, ray_handle):   # doctest: +SKIP
...     print(client.dashboard_link)
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlparse

from pydantic import Field

from xrdscale.config import Model
from xrdscale.exceptions import ConfigError, StorageError
from xrdscale.runtime.ray import RayHandle

__all__ = ["CLOSE_TIMEOUT", "WORKER_MALLOC_ENV", "AddressCluster", "ClusterSpec", "Connection", "KubernetesCluster",
           "LocalCluster", "RayHandle", "check_reachable", "check_workers", "cluster_from_option", "connect",
           "worker_environ", "worker_log_level", "worker_ray_environ"]

logger = logging.getLogger(__name__)


class LocalCluster(Model):
    """A Dask ``LocalCluster`` and a local Ray instance on this machine."""

    kind: Literal["local"] = "local"
    workers: int | None = Field(None, ge=1, description="Dask worker processes (default: Dask's choice)")
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = "auto"
    gpu: bool = Field(False, description="use dask-cuda's LocalCUDACluster where CUDA is present")
    dashboard: bool = True


class AddressCluster(Model):
    """An existing Dask scheduler and, optionally, an existing Ray cluster."""

    kind: Literal["address"]
    dask: str = Field(description="Dask scheduler address, e.g. tcp://host:8786")
    ray: str | None = Field(None, description="Ray client address, e.g. ray://host:10001")
    timeout: float = Field(10.0, gt=0, description="seconds to wait for the scheduler")


class KubernetesCluster(Model):
    """A Dask cluster of the dask-kubernetes operator and a KubeRay ``RayCluster``."""

    kind: Literal["kubernetes"]
    namespace: str = "xrdscale"
    dask_cluster: str | None = Field(None, description="name of an existing DaskCluster to connect to")
    image: str | None = Field(None, description="image of a new KubeCluster (when dask_cluster is absent)")
    workers: int = Field(2, ge=1)
    ray: str | None = Field(None, description="KubeRay head address, e.g. ray://raycluster-head-svc:10001")
    timeout: float = Field(60.0, gt=0)


ClusterSpec = Annotated[LocalCluster | AddressCluster | KubernetesCluster, Field(discriminator="kind")]



class Connection(NamedTuple):
    """What :func:`connect` yields: the Dask client and the Ray handle."""

    client: Any
    ray: RayHandle


def check_reachable(address: str, *, default_port: int, timeout: float = 3.0, what: str = "service") -> None:
    """Raise a :class:`StorageError` quickly when nothing listens at ``address``.

    Parameters
    ----------
    address : str
        ``scheme://host:port`` or ``host:port``.
    default_port : int
        Port used when the address has none.
    timeout : float
        Seconds to wait for the TCP connection.
    what : str
        Name of the service for the message.
    """
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme in ("inproc", "ucx"):
        return  # not a TCP address; the client reports failures of these itself
    host, port = parsed.hostname, parsed.port or default_port
    if not host:
        raise ConfigError(f"{what} address {address!r} has no host; expected e.g. tcp://host:{default_port}")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise StorageError(
            f"cannot reach the {what} at {address} ({exc}); check that it runs and that the address is "
            "right (cluster: in the spec or --cluster); nothing was started"
        ) from exc


#: Worker environment of the local clusters xrdscale starts. Dask's default
#: ``MALLOC_TRIM_THRESHOLD_=65536`` also fixes glibc's mmap threshold, so every large
#: temporary (pyFAI allocates tens of MB per Pilatus 2M frame) is mmapped and page-faulted
#: anew on each call, which halved pyFAI's frame rate inside workers; large buffers come from
#: the heap instead and stay there (the working set per worker is fixed, see benchmarks/).
#: Tasks run in worker threads, and glibc gives each thread its own arena of 64 MB heaps,
#: too small for those temporaries, so they were mmapped anyway (a trimmed-mean frame took
#: 25 % longer in a thread than in the main thread): ``MALLOC_ARENA_MAX=1`` keeps every
#: thread on the main heap, where the thresholds above apply.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": 2**28, "MALLOC_TRIM_THRESHOLD_": 2**29, "MALLOC_ARENA_MAX": 1}

#: Seconds a worker process gets to exit when a cluster xrdscale started closes.
CLOSE_TIMEOUT = 30.0


def worker_ray_environ() -> dict[str, str]:
    """Environment a local Dask worker needs to attach to the local Ray instance.

    A new local Ray enables token authentication (the token is in ``~/.ray/auth_token``);
    workers that reach its actors must be in token mode too, unless the user chose a mode.
    """
    return {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}


def worker_log_level() -> int:
    """Level of the ``distributed`` logs of local worker processes: that of this process.

    The command line sets it (quiet unless ``-v``); a library user's logging config is
    followed the same way.
    """
    return logging.getLogger("distributed").getEffectiveLevel()


@contextlib.contextmanager
def worker_environ() -> Iterator[None]:
    """Dask config under which new local worker processes get their environment.

    :data:`WORKER_MALLOC_ENV` before the process starts (glibc reads it then) and
    :func:`worker_ray_environ` in the worker. xrdscale does not change this process's
    environment (distributed's nanny copies the pre-spawn variables into it to spawn a worker).
    """
    import dask

    pre_spawn = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **WORKER_MALLOC_ENV}
    environ = {**worker_ray_environ(), **dask.config.get("distributed.nanny.environ", {})}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": pre_spawn, "distributed.nanny.environ": environ}):
        yield


def _local_cluster(spec: LocalCluster) -> Any:
    from distributed import LocalCluster as DaskLocalCluster

    from xrdscale.runtime.devices import resolve_device

    # The scheduler serves HTTP (health, metrics) even without a dashboard: on a free port,
    # rather than warning that 8787 is taken by another cluster.
    kwargs = dict(n_workers=spec.workers, threads_per_worker=spec.threads_per_worker,
                  memory_limit=spec.memory_limit, dashboard_address=":0",
                  scheduler_kwargs={"dashboard": spec.dashboard}, silence_logs=worker_log_level())
    if spec.gpu and resolve_device("cuda", what="cluster.gpu") != "cpu":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            raise ConfigError(
                "cluster.gpu is true and CUDA is present, but dask-cuda is not installed; "
                "install it with: pip install 'xrdscale[gpu]'"
            ) from exc
        logger.info("starting a LocalCUDACluster (one worker per GPU)")
        with worker_environ():
            return LocalCUDACluster(threads_per_worker=spec.threads_per_worker, dashboard_address=":0",
                                    scheduler_kwargs=kwargs["scheduler_kwargs"], silence_logs=kwargs["silence_logs"])
    with worker_environ():
        return DaskLocalCluster(**kwargs)


def _kube_cluster(spec: KubernetesCluster) -> Any:
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError as exc:
        raise ConfigError(
            "cluster kind 'kubernetes' needs dask-kubernetes; install it with: pip install 'xrdscale[k8s]'"
        ) from exc
    if spec.dask_cluster:
        logger.info("connecting to DaskCluster %s in namespace %s", spec.dask_cluster, spec.namespace)
        return KubeCluster.from_name(spec.dask_cluster, namespace=spec.namespace)
    if not spec.image:
        raise ConfigError("cluster kind 'kubernetes' needs either dask_cluster (an existing DaskCluster) or image")
    return KubeCluster(name="xrdscale", namespace=spec.namespace, image=spec.image, n_workers=spec.workers,
                       shutdown_on_close=True)


@contextlib.contextmanager
def connect(spec: LocalCluster | AddressCluster | KubernetesCluster) -> Iterator[Connection]:
    """Connect Dask and Ray for the cluster section ``spec`` of a campaign.

    Parameters
    ----------
    spec : LocalCluster, AddressCluster or KubernetesCluster
        The ``cluster:`` section of a campaign spec.

    Yields
    ------
    Connection
        ``(client, ray)``: a :class:`distributed.Client` set as the default scheduler and a
        :class:`RayHandle`. Whatever this call started is stopped on exit, in order: Ray in
        the workers, the client, the cluster (its workers get :data:`CLOSE_TIMEOUT` seconds to
        exit), then Ray.

    Raises
    ------
    StorageError
        An address cannot be reached (checked before anything starts).
    ConfigError
        The cluster kind needs an extra that is not installed.
    """
    from distributed import Client

    kind = spec.kind
    cluster = None
    if isinstance(spec, AddressCluster):
        check_reachable(spec.dask, default_port=8786, what="Dask scheduler")
        if spec.ray:
            check_reachable(spec.ray, default_port=10001, what="Ray cluster")
    if isinstance(spec, LocalCluster):
        cluster = _local_cluster(spec)
        client = Client(cluster)
        ray_handle = RayHandle(None, num_cpus=max(1, sum(client.nthreads().values())))
    elif isinstance(spec, AddressCluster):
        try:
            client = Client(spec.dask, timeout=spec.timeout)
        except (OSError, TimeoutError) as exc:
            raise StorageError(f"cannot connect to the Dask scheduler at {spec.dask}: {exc}") from exc
        try:
            check_workers(client, f"the Dask scheduler at {spec.dask}")
        except BaseException:
            client.close()
            raise
        ray_handle = RayHandle(spec.ray or None, private_to=_remote_workers(client, spec.dask))
    elif isinstance(spec, KubernetesCluster):
        cluster = _kube_cluster(spec)
        client = Client(cluster, timeout=spec.timeout)
        check_workers(client, f"DaskCluster {spec.dask_cluster or 'xrdscale'}")
        ray_handle = RayHandle(spec.ray or None, private_to=f"DaskCluster {spec.dask_cluster or 'xrdscale'}")
    else:
        raise ConfigError(f"unknown cluster kind {kind!r}; expected local, address or kubernetes")
    if client.dashboard_link and getattr(spec, "dashboard", True):
        logger.info("Dask dashboard: %s", client.dashboard_link)
    try:
        yield Connection(client, ray_handle)
    finally:
        _close(client, cluster if kind == "local" else None, ray_handle)


#: what each worker evaluates to report its xrdscale version (a builtin, so unpickling needs nothing of xrdscale)
_VERSION_PROBE = "__import__('xrdscale').__version__"


def check_workers(client: Any, where: str) -> None:
    """Raise a :class:`ConfigError` naming the Dask workers that lack this driver's xrdscale.

    A worker without xrdscale (or with another version) fails every task it gets, with a
    deserialisation error per task; this finds it before anything runs.

    Parameters
    ----------
    client : distributed.Client
        Connected client.
    where : str
        The cluster, as named in the message.
    """
    import xrdscale

    results = client.run(eval, _VERSION_PROBE, on_error="return")
    missing = {w: r for w, r in results.items() if isinstance(r, BaseException)}
    other = {w: r for w, r in results.items() if not isinstance(r, BaseException) and r != xrdscale.__version__}
    if missing:
        first = next(iter(missing.values()))
        raise ConfigError(
            f"{len(missing)} Dask worker(s) of {where} cannot import xrdscale ({', '.join(sorted(missing))}: "
            f"{type(first).__name__}: {first}); install xrdscale=={xrdscale.__version__} in the workers' "
            "environment (the cluster's image); nothing was started")
    if other:
        raise ConfigError(
            f"Dask worker(s) of {where} run xrdscale {', '.join(sorted(set(map(str, other.values()))))} and this "
            f"driver {xrdscale.__version__} ({', '.join(sorted(other))}); run the same version everywhere")


def _remote_workers(client: Any, address: str) -> str | None:
    """``address`` when the scheduler is another process (its workers cannot share this driver's Ray)."""
    from distributed.deploy.local import LocalCluster as DaskLocalCluster

    cluster = getattr(client, "cluster", None)
    if isinstance(cluster, DaskLocalCluster) or address.startswith("inproc://"):
        return None
    return address


def _ray_disconnect() -> None:
    """Disconnect this (worker) process from Ray, if it is connected."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _close(client: Any, cluster: Any, ray_handle: RayHandle) -> None:
    """Stop what :func:`connect` started, without leaving worker processes to be killed.

    Workers that attached to the local Ray (the inference tasks do) disconnect while it still
    runs; a worker still connected to a Ray that is gone takes longer to exit than the nanny
    waits, and is killed.
    """
    if ray_handle.started and cluster is not None:
        try:
            client.run(_ray_disconnect, wait=True)
        except Exception as exc:  # a worker that is gone need not disconnect
            logger.debug("could not disconnect the workers from Ray: %s", exc)
    if cluster is not None:
        try:
            client.run(_quiet_shutdown, wait=True)
        except Exception as exc:
            logger.debug("could not quieten the workers' shutdown: %s", exc)
    try:
        client.close(timeout=CLOSE_TIMEOUT)
    finally:
        try:
            if cluster is not None:
                _retire(cluster)
                cluster.close(timeout=CLOSE_TIMEOUT)
        finally:
            ray_handle.close()


def _quiet_shutdown() -> None:
    """In a worker of a local cluster that is closing: only critical ``distributed`` logs.

    A heartbeat that races the scheduler's close logs "Failed to communicate with scheduler
    during heartbeat" with a traceback (seen on a loaded machine); the work is written by then.
    """
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


def _retire(cluster: Any) -> None:
    """Close the workers of a local ``cluster``, giving each process :data:`CLOSE_TIMEOUT` seconds.

    ``cluster.close`` closes the nannies with distributed's fixed 5 s (a worker process that
    takes 4 s to exit, as one that imported torch and Ray can on a loaded machine, is killed
    with a warning); closing them first with a longer timeout lets them exit on their own.
    """
    import asyncio

    workers = list(getattr(cluster, "workers", {}).values())
    if not workers:
        return

    async def close_all() -> None:
        await asyncio.gather(*(w.close(timeout=CLOSE_TIMEOUT) for w in workers), return_exceptions=True)

    try:
        cluster.sync(close_all)
    except Exception as exc:
        logger.debug("closing the workers of %s: %s", cluster, exc)


def cluster_from_option(option: str, current: LocalCluster | AddressCluster | KubernetesCluster
                        ) -> LocalCluster | AddressCluster | KubernetesCluster:
    """Build a cluster section from the ``--cluster`` command-line option.

    Parameters
    ----------
    option : str
        ``local``, ``kubernetes`` or a Dask scheduler address; ``tcp://…,ray://…`` names both.
    current : cluster section
        The spec's section, kept when ``option`` names the same kind.
    """

    if option == current.kind:
        return current
    if option == "local":
        return LocalCluster()
    if option == "kubernetes":
        return KubernetesCluster(kind="kubernetes")
    parts = [p.strip() for p in option.split(",") if p.strip()]
    dask = [p for p in parts if not p.startswith("ray://")]
    ray = [p for p in parts if p.startswith("ray://")]
    if len(dask) != 1 or len(ray) > 1:
        raise ConfigError(
            f"--cluster {option!r}: expected local, kubernetes, a Dask scheduler address (tcp://host:8786) "
            "or 'tcp://host:8786,ray://host:10001'"
        )
    return AddressCluster(kind="address", dask=dask[0], ray=ray[0] if ray else None)
