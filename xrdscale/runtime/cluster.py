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
import threading
from collections.abc import Iterator
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlparse

from pydantic import Field

from xrdscale.config import Model
from xrdscale.exceptions import ConfigError, StorageError

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



class RayHandle:
    """Connects to Ray on first use and disconnects on :meth:`close`.

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
        self._lock = threading.Lock()
        self._started = False

    def ensure(self) -> Any:
        """Initialise Ray if it is not yet (reusing an instance started by someone else); returns ``ray``."""
        import ray

        with self._lock:
            if not ray.is_initialized():
                kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
                if self.address is None:
                    kwargs.update(num_cpus=self.num_cpus, include_dashboard=False)
                else:
                    kwargs["address"] = self.address
                try:
                    ray.init(**kwargs)
                except (ConnectionError, TimeoutError, RuntimeError) as exc:
                    raise StorageError(
                        f"cannot connect to Ray at {self.address or 'a new local instance'}: {exc}; check that "
                        "the Ray cluster runs and the address (ray://host:10001)"
                    ) from exc
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


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


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


@contextlib.contextmanager
def worker_environ() -> Iterator[None]:
    """Dask config under which new local worker processes get :data:`WORKER_MALLOC_ENV`."""
    import dask

    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **WORKER_MALLOC_ENV}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        yield


def _local_cluster(spec: Any) -> Any:
    from distributed import LocalCluster

    kwargs = dict(n_workers=spec.workers, threads_per_worker=spec.threads_per_worker,
                  memory_limit=spec.memory_limit, dashboard_address=":0" if spec.dashboard else None,
                  silence_logs=logging.ERROR)
    if spec.gpu:
        if _cuda_available():
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError as exc:
                raise ConfigError(
                    "cluster.gpu is true and CUDA is present, but dask-cuda is not installed; "
                    "install it with: pip install 'xrdscale[gpu]'"
                ) from exc
            logger.info("starting a LocalCUDACluster (one worker per GPU)")
            return LocalCUDACluster(threads_per_worker=spec.threads_per_worker,
                                    dashboard_address=kwargs["dashboard_address"], silence_logs=logging.ERROR)
        logger.info("cluster.gpu is true but no CUDA device is present: using a CPU LocalCluster")
    with worker_environ():
        return LocalCluster(**kwargs)


def _kube_cluster(spec: Any) -> Any:
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
def connect(spec: Any) -> Iterator[Connection]:
    """Connect Dask and Ray for the cluster section ``spec`` of a campaign.

    Parameters
    ----------
    spec : LocalCluster, AddressCluster or KubernetesCluster
        The ``cluster:`` section (see :mod:`xrdscale.campaign.spec`).

    Yields
    ------
    Connection
        ``(client, ray)``: a :class:`distributed.Client` set as the default scheduler and a
        :class:`RayHandle`. Whatever this call started is stopped on exit.

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
    if kind == "address":
        check_reachable(spec.dask, default_port=8786, what="Dask scheduler")
        if spec.ray:
            check_reachable(spec.ray, default_port=10001, what="Ray cluster")
    if kind == "local":
        # Dask workers attach to the local Ray to reach the inference actors; Ray enables token
        # auth for a new local cluster, so the workers must start in token mode too (the token
        # itself is in the user's ~/.ray/auth_token, shared by both).
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        cluster = _local_cluster(spec)
        client = Client(cluster)
        ray_handle = RayHandle(None, num_cpus=max(1, sum(client.nthreads().values())))
    elif kind == "address":
        try:
            client = Client(spec.dask, timeout=spec.timeout)
        except (OSError, TimeoutError) as exc:
            raise StorageError(f"cannot connect to the Dask scheduler at {spec.dask}: {exc}") from exc
        ray_handle = RayHandle(spec.ray or None)
    elif kind == "kubernetes":
        cluster = _kube_cluster(spec)
        client = Client(cluster, timeout=spec.timeout)
        ray_handle = RayHandle(spec.ray or None)
    else:
        raise ConfigError(f"unknown cluster kind {kind!r}; expected local, address or kubernetes")
    if client.dashboard_link:
        logger.info("Dask dashboard: %s", client.dashboard_link)
    try:
        yield Connection(client, ray_handle)
    finally:
        ray_handle.close()
        client.close()
        if cluster is not None and kind == "local":
            cluster.close()


def cluster_from_option(option: str, current: Any) -> Any:
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
