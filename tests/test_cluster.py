"""Cluster connections: local Dask + lazy Ray, unreachable addresses, option parsing."""

from __future__ import annotations

import logging
import os
import socket
import sys

import pytest

from xrdscale.exceptions import ConfigError, StorageError
from xrdscale.runtime import devices
from xrdscale.runtime.cluster import (
    AddressCluster,
    KubernetesCluster,
    LocalCluster,
    check_reachable,
    cluster_from_option,
    connect,
)

requires_cuda = pytest.mark.skipif(devices.cuda_problem() is not None, reason="needs a usable CUDA device")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


def test_unreachable_dask_address_fails_before_anything_starts():
    port = _closed_port()
    with pytest.raises(StorageError, match=f"Dask scheduler at tcp://127.0.0.1:{port}.*nothing was started"):
        with connect(AddressCluster(kind="address", dask=f"tcp://127.0.0.1:{port}")):
            pass


def test_unreachable_ray_address_is_checked_too():
    from distributed import LocalCluster as DaskLocal

    with DaskLocal(n_workers=1, processes=False, protocol="tcp://", dashboard_address=":0") as dc:
        port = _closed_port()
        spec = AddressCluster(kind="address", dask=dc.scheduler_address, ray=f"ray://127.0.0.1:{port}")
        with pytest.raises(StorageError, match="Ray cluster"):
            with connect(spec):
                pass


def test_check_reachable_rejects_addresses_without_host():
    with pytest.raises(ConfigError, match="has no host"):
        check_reachable("tcp://:8786", default_port=8786)


def test_existing_scheduler_address_connects():
    from distributed import LocalCluster as DaskLocal

    with DaskLocal(n_workers=1, processes=False, dashboard_address=":0") as dc:
        with connect(AddressCluster(kind="address", dask=dc.scheduler_address)) as (client, ray_handle):
            assert client.submit(sum, [1, 2, 3]).result() == 6
            assert ray_handle.address is None and not ray_handle.started


def test_kubernetes_needs_a_cluster_name_or_image():
    with pytest.raises(ConfigError, match="dask_cluster"):
        with connect(KubernetesCluster(kind="kubernetes")):
            pass


def test_cluster_option_parsing():
    local = LocalCluster(workers=3)
    assert cluster_from_option("local", local) is local
    assert cluster_from_option("kubernetes", local).kind == "kubernetes"
    a = cluster_from_option("tcp://h:8786,ray://h:10001", local)
    assert (a.dask, a.ray) == ("tcp://h:8786", "ray://h:10001")
    assert cluster_from_option("tcp://h:8786", local).ray is None
    with pytest.raises(ConfigError, match="--cluster"):
        cluster_from_option("ray://h:10001", local)


def _attach_to_ray(address):
    """What an inference task does in a Dask worker: attach to the campaign's Ray."""
    from xrdscale.runtime import ray as ray_runtime

    return ray_runtime.ensure(address).is_initialized()


@pytest.mark.slow
def test_local_cluster_and_lazy_ray_shut_down_cleanly(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("distributed"), "propagate", True)  # to caplog's handler
    with caplog.at_level(logging.WARNING, logger="distributed"):
        with connect(LocalCluster(workers=1, dashboard=True)) as (client, ray_handle):
            assert client.dashboard_link
            assert client.submit(lambda x: x + 1, 1).result() == 2
            assert not ray_handle.started
            ray = ray_handle.ensure()

            @ray.remote
            def f(x):
                return 2 * x

            assert ray.get(f.remote(21)) == 42
            assert ray_handle.started
            address = ray.get_runtime_context().gcs_address
            assert client.submit(_attach_to_ray, address).result()  # the worker is attached to Ray now
        assert not ray.is_initialized()
    # the worker disconnected from Ray before Ray stopped, and exited by itself
    assert not [r for r in caplog.records if "still alive" in r.getMessage() or "killing" in r.getMessage()]


def test_gpu_request_without_cuda_degrades_to_cpu(caplog, monkeypatch):
    monkeypatch.setattr(devices, "cuda_problem", lambda index=None: "torch sees no CUDA device")
    devices.clear_cache()
    with caplog.at_level(logging.INFO, logger="xrdscale.runtime.devices"):
        with connect(LocalCluster(workers=1, gpu=True, dashboard=False)) as (client, _):
            assert len(client.nthreads()) == 1
    assert ("cluster.gpu: CUDA is not usable here (torch sees no CUDA device); running on the CPU"
            in caplog.messages)
    devices.clear_cache()


@pytest.mark.gpu
@requires_cuda
def test_gpu_cluster_has_one_worker_per_gpu():
    pytest.importorskip("dask_cuda")
    import torch

    with connect(LocalCluster(gpu=True, dashboard=False)) as (client, _):
        assert len(client.nthreads()) == torch.cuda.device_count()
        assert client.submit(lambda: __import__("torch").cuda.is_available()).result()


def test_a_dask_worker_without_xrdscale_is_named_before_anything_runs(tmp_path):
    """A worker whose environment lacks xrdscale: site-packages without its .pth files (``python -S``)."""
    import subprocess
    import sysconfig

    from distributed import Client
    from distributed import LocalCluster as DaskLocal

    with DaskLocal(n_workers=0, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=":0") as dc:
        env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
        worker = subprocess.Popen([sys.executable, "-S", "-m", "distributed.cli.dask_worker", dc.scheduler_address,
                                   "--no-nanny", "--nthreads", "1", "--no-dashboard"], env=env, cwd=tmp_path,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with Client(dc.scheduler_address, timeout=30) as c:
                c.wait_for_workers(1, timeout=60)
                bare = next(iter(c.scheduler_info()["workers"]))
            with pytest.raises(ConfigError, match="cannot import xrdscale") as err:
                with connect(AddressCluster(kind="address", dask=dc.scheduler_address)):
                    pass
            assert bare in str(err.value) and "install xrdscale==" in str(err.value)
        finally:
            worker.terminate()
            worker.wait(30)


def test_an_existing_dask_cluster_without_ray_refuses_a_private_ray(monkeypatch):
    from distributed import LocalCluster as DaskLocal

    with DaskLocal(n_workers=1, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=":0") as dc:
        with connect(AddressCluster(kind="address", dask=dc.scheduler_address)) as (_, ray_handle):
            with pytest.raises(ConfigError, match=r"cannot reach a Ray instance private to this driver.*ray://"):
                ray_handle.ensure()
            assert not ray_handle.started
