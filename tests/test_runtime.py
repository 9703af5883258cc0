"""The runtime layer: one device rule, one ``ray.init``, no process-global state left changed."""

from __future__ import annotations

import copy
import logging
import os
import pathlib
import re

import numpy as np
import pytest
import torch

from xrdscale.exceptions import ConfigError
from xrdscale.runtime import devices
from xrdscale.runtime.devices import clear_cache, resolve_device, torch_threads

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "xrdscale"


def _cuda_works() -> bool:
    clear_cache()
    return devices.cuda_problem() is None


requires_cuda = pytest.mark.skipif(not _cuda_works(), reason="needs a usable CUDA device")


@pytest.fixture(autouse=True)
def _fresh_device_cache():
    clear_cache()
    yield
    clear_cache()


def _fallback_lines(caplog, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "xrdscale.runtime.devices" and r.getMessage().startswith(f"{what}: ")]


# -- devices -----------------------------------------------------------------------------

def test_cpu_is_always_cpu():
    assert resolve_device("cpu", what="x") == "cpu"
    assert resolve_device(" CPU ", what="x") == "cpu"


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu", ""])
def test_unknown_device_lists_the_choices(bad):
    with pytest.raises(ConfigError, match=r"unknown device .*expected one of auto, cpu, cuda or cuda:N"):
        resolve_device(bad, what="x")


def test_without_cuda_auto_and_cuda_degrade_with_exactly_one_info_line(monkeypatch, caplog):
    monkeypatch.setattr(devices, "_torch_problem", lambda index: "torch sees no CUDA device")
    with caplog.at_level(logging.INFO, logger="xrdscale.runtime.devices"):
        assert resolve_device("cuda", what="reconstruct (batched)") == "cpu"
        assert resolve_device("auto", what="reconstruct (batched)") == "cpu"
        assert resolve_device("cuda:1", what="reconstruct (batched)") == "cpu"
        assert resolve_device("cuda", what="denoise (U-Net)") == "cpu"
    assert _fallback_lines(caplog, "reconstruct (batched)") == [
        "reconstruct (batched): CUDA is not usable here (torch sees no CUDA device); running on the CPU"]
    assert len(_fallback_lines(caplog, "denoise (U-Net)")) == 1  # one line per ``what``
    assert all(r.levelno == logging.INFO for r in caplog.records)


def test_a_failing_test_allocation_means_not_usable(monkeypatch, caplog):
    """torch reports a GPU, but allocating on it fails (driver mismatch, exclusive GPU in use)."""
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def zeros(*args, **kwargs):
        raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")

    monkeypatch.setattr(torch, "zeros", zeros)
    with caplog.at_level(logging.INFO, logger="xrdscale.runtime.devices"):
        assert resolve_device("cuda", what="t") == "cpu"
    assert "a test allocation failed: RuntimeError: CUDA error: all CUDA-capable" in caplog.text


def test_missing_device_index_is_a_reason_not_an_error(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices._torch_problem(3) == "there is no device cuda:3 (1 CUDA device(s))"


def test_an_engine_probe_replaces_the_torch_check(caplog):
    with caplog.at_level(logging.INFO, logger="xrdscale.runtime.devices"):
        assert resolve_device("auto", what="onnx", probe=lambda: "ONNX Runtime has no CUDA provider") == "cpu"
        assert resolve_device("cuda", what="ray", probe=lambda: None) == "cuda"
        assert resolve_device("cuda:2", what="ray", probe=lambda: None) == "cuda:2"
    assert _fallback_lines(caplog, "onnx") == [
        "onnx: CUDA is not usable here (ONNX Runtime has no CUDA provider); running on the CPU"]
    assert not _fallback_lines(caplog, "ray")


def test_reconstruction_engines_follow_the_rule(monkeypatch, caplog):
    from xrdscale.recon.astra_engine import AstraEngine
    from xrdscale.recon.registry import Impl, get_engine

    monkeypatch.setattr(devices, "_torch_problem", lambda index: "torch sees no CUDA device")
    monkeypatch.setattr(AstraEngine, "cuda_available", staticmethod(lambda: False))
    with caplog.at_level(logging.INFO, logger="xrdscale.runtime.devices"):
        assert get_engine(Impl("batched", "cuda")).device == "cpu"
        assert get_engine(Impl("auto", "auto")).device == "cpu"
        assert get_engine(Impl("astra", "cuda")).device == "cpu"
    assert len(_fallback_lines(caplog, "reconstruct (batched)")) == 1
    assert _fallback_lines(caplog, "reconstruct (astra)") == [
        "reconstruct (astra): CUDA is not usable here (the astra engine has no CUDA build or sees no GPU); "
        "running on the CPU"]
    assert Impl("auto", "cpu").resolved() == Impl("batched", "cpu")
    with pytest.raises(ConfigError, match="unknown reconstruction engine 'tomopy'"):
        Impl("tomopy").resolved()


def test_onnx_inference_degrades_when_its_cuda_provider_is_missing(caplog):
    import onnxruntime as ort

    from _builders import tiny_spec
    from xrdscale.pqnet.engine import Ensemble, export_onnx
    from xrdscale.pqnet.model import PQNet

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has a CUDA provider")
    member = PQNet(tiny_spec()).eval()
    with caplog.at_level(logging.INFO, logger="xrdscale.runtime.devices"):
        ens = Ensemble([member], [export_onnx(member)], engine="onnx", device="cuda")
    assert ens.device == "cpu"
    assert len(_fallback_lines(caplog, "pqnet inference (onnx)")) == 1


def test_torch_threads_restores_the_count():
    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_torch_inference_leaves_the_thread_count_and_rng_alone():
    from _builders import tiny_spec
    from xrdscale.pqnet.engine import Ensemble
    from xrdscale.pqnet.model import PQNet

    before, state = torch.get_num_threads(), torch.random.get_rng_state()
    ens = Ensemble([PQNet(tiny_spec()).eval()], engine="torch", device="cpu", threads=before + 1)
    ens.predict(np.random.default_rng(0).random((3, 64), dtype=np.float32))
    assert torch.get_num_threads() == before
    assert ens.device == "cpu"
    torch.random.set_rng_state(state)


# -- Ray and the process environment -----------------------------------------------------

def _package_sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE.parent)): p.read_text() for p in PACKAGE.rglob("*.py")}


def test_ray_init_is_called_only_in_runtime_ray():
    callers = sorted(name for name, text in _package_sources().items() if re.search(r"\bray\.init\(", text))
    assert callers == [os.path.join("xrdscale", "runtime", "ray.py")]


def test_library_code_does_not_set_the_ray_auth_mode_in_the_environment():
    offenders = sorted(name for name, text in _package_sources().items()
                       if re.search(r"os\.environ(\.setdefault|\[)\(?\s*[\"']RAY_AUTH_MODE", text))
    assert offenders == []


def test_one_set_of_ray_init_kwargs():
    from xrdscale.runtime.ray import NAMESPACE, init_kwargs

    local = init_kwargs(None, num_cpus=3)
    assert local == {"namespace": NAMESPACE, "log_to_driver": False, "logging_level": local["logging_level"],
                     "address": "local", "num_cpus": 3, "include_dashboard": False}
    remote = init_kwargs("ray://head:10001")
    assert remote["address"] == "ray://head:10001" and "include_dashboard" not in remote
    assert remote["namespace"] == NAMESPACE and remote["log_to_driver"] is False


def test_ray_logging_level_comes_from_the_dask_config():
    import dask

    from xrdscale.runtime.ray import LOGGING_LEVEL_KEY, init_kwargs

    with dask.config.set({LOGGING_LEVEL_KEY: "error"}):
        assert init_kwargs()["logging_level"] == logging.ERROR
    with dask.config.set({LOGGING_LEVEL_KEY: "info"}):
        assert init_kwargs()["logging_level"] == logging.INFO


def test_worker_environ_carries_the_ray_auth_mode_without_touching_os_environ(monkeypatch):
    import dask

    from xrdscale.runtime.cluster import WORKER_MALLOC_ENV, worker_environ

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    before = dict(os.environ)
    with worker_environ():
        assert dask.config.get("distributed.nanny.environ")["RAY_AUTH_MODE"] == "token"
        assert dask.config.get("distributed.nanny.pre-spawn-environ")["MALLOC_ARENA_MAX"] == \
            WORKER_MALLOC_ENV["MALLOC_ARENA_MAX"]
    assert dict(os.environ) == before
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with worker_environ():
        assert dask.config.get("distributed.nanny.environ")["RAY_AUTH_MODE"] == "disabled"


def test_ray_handle_is_reexported_by_the_cluster_module():
    from xrdscale.runtime import cluster, ray

    assert cluster.RayHandle is ray.RayHandle
    handle = ray.RayHandle("ray://nowhere:10001")
    assert not handle.started
    handle.close()  # never started: nothing to do


# -- GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@requires_cuda
def test_cuda_is_used_where_it_works(caplog):
    with caplog.at_level(logging.INFO, logger="xrdscale.runtime.devices"):
        assert resolve_device("auto", what="gpu test") == "cuda"
        assert resolve_device("cuda", what="gpu test") == "cuda"
        assert resolve_device("cuda:0", what="gpu test") == "cuda:0"
        n = torch.cuda.device_count()
        assert resolve_device(f"cuda:{n}", what="gpu test (missing index)") == "cpu"
    assert not _fallback_lines(caplog, "gpu test")
    assert len(_fallback_lines(caplog, "gpu test (missing index)")) == 1


@pytest.mark.gpu
@requires_cuda
def test_batched_reconstruction_on_cuda_matches_the_cpu():
    from _builders import phantom_sinograms
    from xrdscale.recon.geometry import Geometry
    from xrdscale.recon.registry import Impl, get_engine

    sino, _, angles = phantom_sinograms(32, 40, scales=(1.0, 3.0))
    g = Geometry(tuple(angles), 32)
    gpu = get_engine(Impl("batched", "cuda"))
    assert gpu.device == "cuda"
    cpu = get_engine(Impl("batched", "cpu")).fbp(g, sino.astype(np.float32), "ram-lak")
    np.testing.assert_allclose(gpu.fbp(g, sino.astype(np.float32), "ram-lak"), cpu, rtol=1e-4,
                               atol=1e-4 * np.abs(cpu).max())


@pytest.mark.gpu
@requires_cuda
def test_torch_inference_on_cuda_matches_the_cpu():
    from _builders import tiny_spec
    from xrdscale.pqnet.engine import Ensemble
    from xrdscale.pqnet.model import PQNet

    member = PQNet(tiny_spec()).eval()
    x = np.random.default_rng(0).random((16, 64), dtype=np.float32)
    mean_cpu, _ = Ensemble([copy.deepcopy(member)], engine="torch", device="cpu").predict(x)
    gpu = Ensemble([member], engine="torch", device="cuda")
    assert gpu.device == "cuda"
    np.testing.assert_allclose(gpu.predict(x)[0], mean_cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@requires_cuda
def test_onnx_inference_uses_its_cuda_provider_or_says_why_not(caplog):
    from _builders import tiny_spec
    from xrdscale.pqnet.engine import Ensemble, export_onnx
    from xrdscale.pqnet.model import PQNet

    member = PQNet(tiny_spec()).eval()
    with caplog.at_level(logging.INFO, logger="xrdscale.runtime.devices"):
        ens = Ensemble([member], [export_onnx(member)], engine="onnx", device="cuda")
    lines = _fallback_lines(caplog, "pqnet inference (onnx)")
    assert (ens.device == "cuda" and not lines) or (ens.device == "cpu" and len(lines) == 1)
    x = np.random.default_rng(0).random((8, 64), dtype=np.float32)
    ref, _ = Ensemble([member], engine="torch", device="cpu").predict(x)
    np.testing.assert_allclose(ens.predict(x)[0], ref, rtol=1e-4, atol=1e-5)
