"""Which device a computation runs on: the one rule, in one place.

Every stage that can use a GPU asks :func:`resolve_device`. The rule (STYLE: "degrade to
the CPU with one INFO line") is the same everywhere:

- ``cpu`` runs on the CPU;
- ``auto``, ``cuda`` and ``cuda:N`` run on CUDA when it works here, that is when torch
  sees the device *and* a tiny allocation on it succeeds (a driver mismatch or a busy,
  exclusive-mode GPU only shows then);
- otherwise they run on the CPU, and the first time in a process that a given ``what``
  falls back, one INFO line says so and why:
  ``"<what>: CUDA is not usable here (<reason>); running on the CPU"``.

An explicit ``cuda`` request is not an error where there is no GPU: the same command then
works on a laptop and on a GPU node. Engines with their own CUDA build (ASTRA, ONNX
Runtime) pass a ``probe`` that says whether *they* can use CUDA.

:func:`torch_threads` sets torch's intra-op thread count for a block and restores it, so
library code never leaves the calling process changed.

Examples
--------
>>> resolve_device("cpu", what="reconstruct")
'cpu'
>>> resolve_device("auto", what="denoise") in ("cpu", "cuda")
True
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Callable, Iterator

from xrdscale.exceptions import ConfigError

logger = logging.getLogger(__name__)

#: what a user may ask for (``cuda:N`` too)
CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")

_CUDA = re.compile(r"cuda(?::(\d+))?")
_lock = threading.Lock()
_problems: dict[int | None, str | None] = {}  # probe results of torch's CUDA, per device index
_logged: set[str] = set()  # the ``what``s that already logged their fallback in this process


def _torch_problem(index: int | None) -> str | None:
    """Why torch cannot use CUDA device ``index`` (default device if None) here, or None if it can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.backends.cuda.is_built():
        return f"torch {torch.__version__} was built without CUDA"
    try:
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        count = torch.cuda.device_count()
        if index is not None and index >= count:
            return f"there is no device cuda:{index} ({count} CUDA device(s))"
        torch.zeros(1, device="cuda" if index is None else f"cuda:{index}").add_(1)
    except Exception as exc:  # any failure of the test allocation means "not usable"
        return f"a test allocation failed: {type(exc).__name__}: {exc}"
    return None


def cuda_problem(index: int | None = None) -> str | None:
    """Why torch cannot use CUDA here, or None when it can (probed once per process and device).

    Parameters
    ----------
    index : int, optional
        A device index; the default device when None.
    """
    with _lock:
        if index not in _problems:
            _problems[index] = _torch_problem(index)
        return _problems[index]


def degrade(what: str, reason: str) -> str:
    """Log, once per process for ``what``, that it runs on the CPU because of ``reason``; return ``"cpu"``."""
    with _lock:
        first = what not in _logged
        _logged.add(what)
    if first:
        logger.info("%s: CUDA is not usable here (%s); running on the CPU", what, reason)
    return "cpu"


def resolve_device(requested: str = "auto", *, what: str,
                   probe: Callable[[], str | None] | None = None) -> str:
    """The device to run ``what`` on: CUDA when it works here, else the CPU (one INFO line).

    Parameters
    ----------
    requested : {"auto", "cpu", "cuda", "cuda:N"}
        What the user asked for.
    what : str
        The computation, for the log line (e.g. ``"reconstruct (batched)"``).
    probe : callable, optional
        Returns why the engine cannot use CUDA here, or None when it can; replaces the torch
        probe for engines with their own CUDA build (ASTRA, ONNX Runtime, a Ray cluster).

    Returns
    -------
    str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (as requested).

    Raises
    ------
    ConfigError
        ``requested`` is none of the choices.
    """
    name = str(requested).strip().lower()
    if name == "cpu":
        return "cpu"
    match = _CUDA.fullmatch(name)
    if name != "auto" and match is None:
        raise ConfigError(f"unknown device {requested!r}; expected one of {', '.join(CHOICES)} or cuda:N")
    index = int(match.group(1)) if match is not None and match.group(1) is not None else None
    problem = probe() if probe is not None else cuda_problem(index)
    if problem is not None:
        return degrade(what, problem)
    return "cuda" if index is None else f"cuda:{index}"


def clear_cache() -> None:
    """Forget the probe results and the fallback lines already logged (for tests)."""
    with _lock:
        _problems.clear()
        _logged.clear()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads and restore the previous count after.

    ``None`` leaves the count as it is.
    """
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    n = max(1, int(n))
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)
