"""Serving PQ-Net ensembles from Ray actors.

Each :class:`EnsembleServer` actor loads one registry entry (every member, verified
against its checksums) onto its device and answers ``predict(batch_id, patterns)`` with the
ensemble mean and standard deviation. ``predict`` is a pure function of its arguments, so
Ray may run it again after a crash: actors are created with ``max_restarts`` and
``max_task_retries``, and a killed actor is restarted and its pending batches retried.
Actors are named in the ``xrdscale`` namespace, so any process attached to the same Ray
cluster (a Dask worker, for instance) can reach them by name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from xrdscale.exceptions import ConfigError, StorageError
from xrdscale.pqnet.engine import ENGINES, Ensemble
from xrdscale.pqnet.registry import open_entry
from xrdscale.runtime import ray as ray_runtime
from xrdscale.runtime.devices import degrade, resolve_device

logger = logging.getLogger(__name__)

#: Ray namespace of the actors (that of every xrdscale Ray connection)
NAMESPACE = ray_runtime.NAMESPACE
#: Restarts of a crashed actor, and retries of a batch it was answering, before giving up.
MAX_RESTARTS = 4
#: dask config key: seconds an actor may take to start or to answer one batch (default 600).
#: An actor whose node died and whose resources (a GPU) are gone stays pending forever; after
#: this time the call fails, and the stage's retry starts a new pool on what the cluster has.
CALL_TIMEOUT_KEY = "xrdscale.ray.call-timeout"


def call_timeout() -> float:
    """Seconds an inference actor may take to start or answer a batch (dask config ``xrdscale.ray.call-timeout``)."""
    import dask

    return float(dask.config.get(CALL_TIMEOUT_KEY, default=600.0))


def ensemble_size(model_url: str, members: int | None = None) -> int:
    """How many members of the entry at ``model_url`` serve (``members`` first ones; default all).

    Raises
    ------
    ConfigError
        ``members`` is more than the entry has.
    """
    n = len(open_entry(model_url).members)
    if members is None:
        return n
    if not 1 <= members <= n:
        raise ConfigError(f"ensemble={members}: the model at {model_url} has {n} member(s); use at most {n} "
                          "(or leave ensemble unset to use all)")
    return int(members)


def load_ensemble(model_url: str, *, engine: str = "onnx", device: str = "cpu", threads: int = 1,
                  members: int | None = None) -> Ensemble:
    """Load the first ``members`` (default: every) member of the entry at ``model_url`` into one :class:`Ensemble`."""
    entry = open_entry(model_url)
    n = ensemble_size(model_url, members)
    members_ = [entry.load_member(i) for i in range(n)]
    onnx = [entry.load_onnx(i) for i in range(n)] if engine == "onnx" else None
    return Ensemble(members_, onnx, engine=engine, device=device, threads=threads)


class EnsembleServer:
    """Holds one whole ensemble; run as a Ray actor (see :class:`ServerPool`).

    Parameters
    ----------
    model_url : str
        Registry entry.
    engine : {"onnx", "torch"}
        Inference engine.
    device : str
        ``cpu`` or ``cuda``.
    threads : int
        Intra-op threads.
    """

    def __init__(self, model_url: str, engine: str, device: str, threads: int, members: int | None = None) -> None:
        self.ensemble = load_ensemble(model_url, engine=engine, device=device, threads=threads, members=members)

    def pid(self) -> int:
        """Process id of the actor (used to check restarts)."""
        return os.getpid()

    def device(self) -> str:
        """The device the ensemble runs on (``cpu`` where a GPU Ray gave it has no usable CUDA)."""
        return str(self.ensemble.device)

    def predict(self, batch_id: int, patterns: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        """Ensemble mean and std of ``patterns`` (batch, npt) on the model grid; idempotent."""
        mean, std = self.ensemble.predict(patterns)
        return batch_id, mean, std


class ServerPool:
    """A set of named :class:`EnsembleServer` actors serving one model.

    Parameters
    ----------
    model_url : str
        Registry entry to serve.
    actors : int
        Number of actors (each holds the whole ensemble).
    engine : {"onnx", "torch"}
        Inference engine.
    device : {"auto", "cpu", "cuda"}
        ``auto`` and ``cuda``: one GPU per actor when the Ray cluster has GPUs, else the CPU
        (one INFO line, :func:`xrdscale.runtime.devices.resolve_device`).
    threads : int
        CPUs (and intra-op threads) per actor on CPU.
    members : int, optional
        Serve the first ``members`` members of the ensemble (default: all).
    timeout : float, optional
        Seconds the actors may take to start, and each batch call to return (default
        :func:`call_timeout`).

    Raises
    ------
    StorageError
        The actors did not start within ``timeout`` (the message says what the cluster has).
    """

    def __init__(self, model_url: str, *, actors: int = 1, engine: str = "onnx", device: str = "auto",
                 threads: int = 1, members: int | None = None, timeout: float | None = None) -> None:
        if actors < 1:
            raise ConfigError(f"actors={actors}; give at least 1")
        if engine not in ENGINES:
            raise ConfigError(f"unknown inference engine {engine!r}; expected one of {', '.join(ENGINES)}")
        open_entry(model_url).verify()  # fail here, with a clear error, on a missing/partial/corrupt entry
        self.members = ensemble_size(model_url, members)
        ray = ray_runtime.ensure()
        gpus = ray.cluster_resources().get("GPU", 0)
        device = resolve_device(device, what="pqnet inference",
                                probe=lambda: None if gpus >= 1 else "the Ray cluster has no GPU")
        device = "cpu" if device == "cpu" else "cuda"  # an actor sees only the GPU Ray gives it
        self.timeout = call_timeout() if timeout is None else float(timeout)
        self.address = ray_runtime.worker_address()
        tag = uuid.uuid4().hex[:8]
        self.names = [f"pqnet-{tag}-{i}" for i in range(actors)]
        cls = ray.remote(EnsembleServer)
        resources = ray.cluster_resources()
        # On CPU, share the cluster's CPUs between the actors rather than leave some pending forever;
        # on GPUs, more actors than GPUs share them.
        cpus = min(float(threads), resources.get("CPU", 1.0) / actors)
        opts = ({"num_gpus": min(1.0, gpus / actors), "num_cpus": min(1.0, cpus)} if device == "cuda"
                else {"num_cpus": cpus})
        self.handles = [cls.options(name=n, namespace=NAMESPACE, max_restarts=MAX_RESTARTS,
                                    max_task_retries=MAX_RESTARTS, **opts).remote(model_url, engine, device, threads,
                                                                                   self.members)
                        for n in self.names]
        devices = self._wait_started(ray, opts)
        if device == "cuda" and "cpu" in devices:
            # the actors' own INFO line is in Ray's logs; the driver says it once too
            degrade("pqnet inference", f"the Ray cluster declares {gpus:g} GPU(s), but CUDA is not usable on the "
                                       "node the actors were placed on")
            device = "cpu"
        self.device = device
        logger.info("serving %s (%d member(s)) from %d actor(s) on %s (%s)", model_url, self.members, actors,
                    device, engine)

    def _wait_started(self, ray, opts: dict[str, float]) -> list[str]:
        """Wait for the actors to start; the devices they run on.

        Actors that wait for resources another pool holds (a second dataset's analyse on a
        cluster with one GPU) wait as long as that takes: the cluster's live nodes can host
        them. Actors that no live node can host (their node died) fail after ``timeout``.
        """
        refs = [h.device.remote() for h in self.handles]
        told = False
        while True:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout)
            if len(ready) == len(refs):
                return ray.get(refs)
            need = {{"num_cpus": "CPU", "num_gpus": "GPU"}[key]: value for key, value in opts.items()}
            alive = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
            if not any(all(node.get(k, 0.0) >= v - 1e-9 for k, v in need.items()) for node in alive):
                resources = ray.cluster_resources()
                self.close()
                raise StorageError(
                    f"the {len(self.handles)} inference actor(s) ({opts}) did not start within {self.timeout:.0f} s; "
                    f"the Ray cluster has {resources.get('CPU', 0):g} CPU and {resources.get('GPU', 0):g} GPU in "
                    "all: check that its nodes are alive (`ray status`), or ask for fewer actors or threads")
            if not told:
                logger.info("the inference actor(s) wait for Ray resources in use (another dataset's actors?): "
                            "the cluster can host them, so they wait on")
                told = True

    def pids(self) -> list[int]:
        """Process ids of the actors."""
        import ray

        return ray.get([h.pid.remote() for h in self.handles])

    def close(self) -> None:
        """Stop the actors."""
        import ray

        for h in self.handles:
            ray.kill(h, no_restart=True)

    def __enter__(self) -> ServerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def serving(model_url: str, pool: ServerPool | None = None, **options: Any) -> Iterator[ServerPool]:
    """Yield ``pool`` (left running), or a new :class:`ServerPool` of ``model_url`` stopped on exit."""
    if pool is not None:
        yield pool
        return
    own = ServerPool(model_url, **options)
    try:
        yield own
    finally:
        own.close()


def actor_handles(names: Sequence[str], address: str | None) -> list:
    """Handles of named actors, attaching this process to the Ray cluster at ``address`` if needed."""
    ray = ray_runtime.ensure(address)
    return [ray.get_actor(n, namespace=NAMESPACE) for n in names]


def predict_batches(handles: Sequence, patterns: np.ndarray, *, batch: int, offset: int = 0,
                    attempts: int = MAX_RESTARTS, timeout: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Send ``patterns`` in batches round-robin to the actors; return mean and std.

    Batches whose actor died are re-sent (``predict`` is idempotent) until ``attempts``
    failures, while Ray restarts the actor.

    Raises
    ------
    StorageError
        A batch got no answer within ``timeout`` seconds (default :func:`call_timeout`): an
        actor whose node died waits for resources that may never come back.
    """
    timeout = call_timeout() if timeout is None else timeout
    import ray

    starts = list(range(0, len(patterns), batch))
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for attempt in range(attempts + 1):
        todo = [s for s in starts if s not in results]
        refs = [handles[(offset + k) % len(handles)].predict.remote(s, patterns[s:s + batch])
                for k, s in enumerate(todo)]
        failed = None
        for ref in refs:
            try:
                s, mean, std = ray.get(ref, timeout=timeout)
                results[s] = (mean, std)
            except ray.exceptions.GetTimeoutError as exc:
                raise StorageError(f"an inference actor did not answer within {timeout:.0f} s (its Ray node may be "
                                   "gone, and its resources with it); the stage can be retried") from exc
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                failed = exc
        if failed is None:
            break
        if attempt == attempts:
            raise failed
        logger.warning("an inference actor failed (%s); retrying %d batch(es)", type(failed).__name__,
                       len(starts) - len(results))
        time.sleep(0.5 * (attempt + 1))
    mean = np.concatenate([results[s][0] for s in starts])
    std = np.concatenate([results[s][1] for s in starts])
    return mean, std
