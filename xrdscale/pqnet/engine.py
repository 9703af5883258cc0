"""Inference engines for PQ-Net members: ONNX Runtime (default) and torch (the reference).

On the 2-core CPUs this was measured on, ONNX Runtime ran a 13-phase member about
four times faster than an eager torch forward pass (``benchmarks/pqnet.py`` prints both),
so ``onnx`` is the default; ``torch`` stays available and the tests check that both
give the same outputs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from xrdscale.exceptions import ConfigError
from xrdscale.pqnet.model import PQNet
from xrdscale.runtime.devices import degrade, resolve_device, torch_threads

logger = logging.getLogger(__name__)

ENGINES = ("onnx", "torch")


def export_onnx(model: PQNet) -> bytes:
    """Export one member to ONNX (dynamic batch axis) and return the serialised graph.

    Parameters
    ----------
    model : PQNet
        A member in any mode; it is exported in eval mode (dropout off).

    Returns
    -------
    bytes
        The ONNX model with input ``patterns`` (batch, npt) and output ``outputs`` (batch, n_routes).
    """
    model = model.eval()
    example = torch.rand(2, model.spec.npt, generator=torch.Generator().manual_seed(0))  # not the global RNG
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but exports this graph in ~0.1 s instead of
        # ~5 s for torch.export; fall back to the latter if it ever goes away.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.onnx.export(model, (example,), buf,  # type: ignore[arg-type]  # a file-like object is accepted
                              input_names=["patterns"], output_names=["outputs"],
                              dynamic_axes={"patterns": {0: "batch"}, "outputs": {0: "batch"}}, dynamo=False)
        except (RuntimeError, TypeError, AttributeError) as exc:
            logger.info("TorchScript ONNX export unavailable (%s); using torch.export", exc)
            buf = io.BytesIO()
            with contextlib.redirect_stdout(io.StringIO()):
                prog = torch.onnx.export(model, (example,), input_names=["patterns"], output_names=["outputs"],
                                         dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True)
            if prog is None:
                raise RuntimeError("torch.onnx.export returned no program") from exc
            prog.save(buf)  # type: ignore[arg-type]  # a file-like object is accepted
    return buf.getvalue()


def _onnx_cuda_problem() -> str | None:
    """Why ONNX Runtime cannot use CUDA here, or None."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"ONNX Runtime {ort.__version__} has no CUDA provider (install onnxruntime-gpu)"
    return None


class Ensemble:
    """All members of one PQ-Net ensemble on one device, answering with mean and std.

    Parameters
    ----------
    members : sequence of PQNet
        The trained members (same spec).
    onnx_models : sequence of bytes, optional
        Their ONNX exports; required for ``engine="onnx"``.
    engine : {"onnx", "torch"}
        Which runtime evaluates the members.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``, resolved by :func:`xrdscale.runtime.devices.resolve_device`:
        CUDA where it works (for ONNX Runtime: where its CUDA provider is installed and
        starts), else the CPU with one INFO line. ``device`` holds the device used.
    threads : int
        Intra-op threads per member evaluation (torch's are set for each call and restored).
    """

    def __init__(self, members: Sequence[PQNet], onnx_models: Sequence[bytes] | None = None, *,
                 engine: str = "onnx", device: str = "cpu", threads: int = 1) -> None:
        if engine not in ENGINES:
            raise ConfigError(f"unknown inference engine {engine!r}; expected one of {', '.join(ENGINES)}")
        self.engine = engine
        self.threads = max(1, threads)
        self.n_routes = len(members[0].spec.routes)
        self.npt = members[0].spec.npt
        if engine == "torch":
            self.device = resolve_device(device, what="pqnet inference (torch)")
            self._members = [m.to(self.device).eval() for m in members]
            self._sessions = []
        else:
            import onnxruntime as ort

            if onnx_models is None or len(onnx_models) != len(members):
                raise ConfigError("engine='onnx' needs the ONNX export of every member; use engine='torch'")
            what = "pqnet inference (onnx)"
            self.device = resolve_device(device, what=what, probe=_onnx_cuda_problem)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            providers: list[str | tuple[str, dict[str, Any]]] = ["CPUExecutionProvider"]
            if self.device != "cpu":
                index = self.device.partition(":")[2]
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(index)}) if index
                                 else "CUDAExecutionProvider")
            self._sessions = [ort.InferenceSession(b, opts, providers=providers) for b in onnx_models]
            if self.device != "cpu" and "CUDAExecutionProvider" not in self._sessions[0].get_providers():
                # ONNX Runtime falls back to the CPU by itself when its CUDA libraries do not load
                self.device = degrade(what, "ONNX Runtime could not start its CUDA provider")
            self._members = []

    @property
    def size(self) -> int:
        """Number of members."""
        return len(self._members) or len(self._sessions)

    def member_outputs(self, patterns: np.ndarray) -> np.ndarray:
        """Outputs of every member, ``(members, batch, n_routes)`` float32, absolute units."""
        x = np.ascontiguousarray(patterns, dtype=np.float32)
        if self.engine == "onnx":
            return np.stack([s.run(None, {"patterns": x})[0] for s in self._sessions])
        with torch.inference_mode(), torch_threads(self.threads if self.device == "cpu" else None):
            xt = torch.from_numpy(x).to(self.device)
            return np.stack([m(xt).cpu().numpy() for m in self._members])

    def predict(self, patterns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ensemble mean and standard deviation over members, each ``(batch, n_routes)``."""
        out = self.member_outputs(patterns)
        return out.mean(axis=0), out.std(axis=0)
