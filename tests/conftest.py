"""Shared fixtures: seeded RNG, an in-process Dask client, a real S3 server process (moto),
thread limits, and the ``gpu`` marker's skip where no CUDA device is usable.

Builders of test data live in ``_builders.py``, not here: fixtures are for resources with a
set-up and a tear-down, builders are plain functions a test calls with its own arguments.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

# Keep BLAS/torch from oversubscribing the 2 cores of CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def xrdscale_cli(monkeypatch, capsys):
    """``run(*args) -> (exit status, stdout, stderr)`` of ``xrdscale ARGS…`` through its entry point.

    Errors are printed and the exit status is what a user sees. The command points the root
    logger at the captured stderr; it is restored after the test, so later tests do not log
    into a closed stream.
    """
    import logging

    from xrdscale import cli

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["xrdscale", *args])
        code = 0
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    yield run
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


@pytest.fixture(scope="module")
def dask_client():
    """A Dask client of an in-process ``LocalCluster`` (one worker, two threads, ``dashboard_address=None``).

    In-process (``processes=False``), so stage doubles and monkeypatches of the test module
    are seen by the tasks; one per test module, closed after its last test.
    """
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


def requires_cuda(library: str = "any") -> str | None:
    """Why a test that needs CUDA through ``library`` cannot run here (None: it can).

    ``library`` is ``"astra"`` (``astra.use_cuda()``: ASTRA built with CUDA and a GPU it can
    use), ``"torch"`` (``torch.cuda.is_available()``) or ``"any"`` (either). The probes are
    the ones xrdscale itself asks, so a test runs exactly where xrdscale would take its CUDA
    path. Used by :func:`pytest_runtest_setup` for tests marked ``gpu``.
    """
    probes = {"astra": _astra_cuda, "torch": _torch_cuda}
    if library not in (*probes, "any"):
        raise ValueError(f"requires_cuda: unknown library {library!r}; expected astra, torch or any")
    names = list(probes) if library == "any" else [library]
    if any(probes[name]() for name in names):
        return None
    return f"needs a CUDA device usable by {' or '.join(names)}; none here"


def _astra_cuda() -> bool:
    import astra

    return bool(astra.use_cuda())


def _torch_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip (with the reason) a test marked ``gpu`` where no CUDA device is usable.

    ``@pytest.mark.gpu`` needs any CUDA device; ``@pytest.mark.gpu(library="astra")`` (or
    ``"torch"``) one that this library can use.
    """
    marker = item.get_closest_marker("gpu")
    if marker is not None:
        reason = requires_cuda(*marker.args, **marker.kwargs)
        if reason is not None:
            pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 30.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"S3 server did not open port {port}")


@pytest.fixture(scope="session")
def s3_server():
    """A real moto S3 server process on a free local port (as s3fs's own tests do).

    Yields the endpoint URL; the environment is pointed at it with dummy credentials.
    """
    if shutil.which("moto_server") is None and not _has_module("moto.server"):
        pytest.skip("moto[server] is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        saved = {k: os.environ.get(k) for k in
                 ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "XRDSCALE_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
        os.environ.update({
            "AWS_ACCESS_KEY_ID": "testing-key-id",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1",
            "XRDSCALE_S3_ENDPOINT_URL": endpoint,
        })
        yield endpoint
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the moto server; yields ``s3://<bucket>``."""
    import s3fs

    name = "xrdscale-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    if fs.exists(name):
        fs.rm(name, recursive=True)
    fs.mkdir(name)
    fs.invalidate_cache()
    yield f"s3://{name}"


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance (2 CPUs) for a test module, unless one is already running."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a cluster on record
    yield
    if started:
        ray.shutdown()
