"""Training a PQ-Net deep ensemble from a library store into a model-registry entry.

The library is split by sample index into training (first 80 %), validation (next 10 %,
for early stopping) and held-out test (last 10 %, never seen in training) sets. Every
member trains with the paper's recipe (MAE on standardised targets, Adam, batch 32,
learning rate 5e-4, early stopping with patience 5) from its own seed; members run as
Ray tasks in parallel (one GPU each where there are GPUs) or one after the other in this
process. Training data stream from the store in windows, so memory stays bounded for
libraries of any size. The ensemble's test metrics go into the registry entry, each output's
beside its Cramér–Rao bound on the same held-out patterns (the best R² and MAE the library's
noise allows; :mod:`xrdscale.pqnet.identifiability`), whether it is accepted and whether the
data determine it only weakly.

Every epoch of every member is logged at INFO (logger ``xrdscale.pqnet.train``) while it
trains: epoch i/N, training and validation loss, time per epoch and the time left. Members
on Ray send their epochs to the driver through a Ray queue, and the driver logs them as
they come.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from xrdscale.exceptions import ConfigError, InputError, XrdscaleError
from xrdscale.io import storage
from xrdscale.pqnet import identifiability, registry
from xrdscale.pqnet.engine import Ensemble, export_onnx
from xrdscale.pqnet.library import label_var, open_library
from xrdscale.pqnet.model import ModelSpec, PQNet, pattern_norm
from xrdscale.runtime import ray as ray_runtime
from xrdscale.runtime.devices import resolve_device, torch_threads
from xrdscale.runtime.progress import format_duration

logger = logging.getLogger(__name__)

#: Samples read from the store at a time while training (bounds memory).
WINDOW = 32768


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one member (the paper's defaults)."""

    epochs: int = 35
    batch: int = 32
    lr: float = 5e-4
    patience: int = 5
    device: str = "cpu"
    threads: int = 1


def split(n: int) -> tuple[slice, slice, slice]:
    """Training, validation and held-out test index ranges of an ``n``-sample library."""
    n_test = max(1, n // 10)
    n_val = max(1, n // 10)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ConfigError(f"a library of {n} patterns is too small to split into training, validation and test; "
                          "simulate at least 10 patterns (thousands for a useful model)")
    return slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, n)


def _select_routes(labels: list[tuple[str, str]], outputs: list[str] | None) -> list[tuple[str, str]]:
    if not outputs:
        return list(labels)
    phases = {p for p, _ in labels}
    chosen = []
    for item in outputs:
        if "." in item:
            phase, param = item.split(".", 1)
            if (phase, param) not in labels:
                raise ConfigError(f"output {item!r} is not a label of the library (phases: {', '.join(sorted(phases))};"
                                  f" labels: {', '.join(f'{p}.{k}' for p, k in labels)})")
            chosen.append((phase, param))
        else:
            hits = [lb for lb in labels if lb[1] == item]
            if not hits:
                raise ConfigError(f"output {item!r} matches no label of the library; use scale, a, c, size_nm "
                                  "or PHASE.PARAM")
            chosen += hits
    return [lb for lb in labels if lb in set(chosen)]


def _read(ds, labels_sel: list[tuple[str, str]], sl: slice) -> tuple[np.ndarray, np.ndarray]:
    """Patterns and raw label matrix of a slice."""
    x = np.asarray(ds["patterns"][sl].values, dtype=np.float32)
    y = np.stack([np.asarray(ds[label_var(p, k)][sl].values, dtype=np.float64) for p, k in labels_sel], axis=1)
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0]) + (sl.start or 0)
        raise InputError(f"library pattern {bad} contains NaN/inf; regenerate the library")
    return x, y


def _relative(x: np.ndarray, y: np.ndarray, scale_mask: np.ndarray) -> np.ndarray:
    """Targets in network units: scale factors divided by the pattern norm."""
    norm = pattern_norm(torch.from_numpy(x)).numpy().astype(np.float64)
    return np.where(scale_mask[None, :], y / norm, y)


def epoch_line(record: dict[str, Any], member: str | None = None) -> str:
    """The log line of one epoch ``record`` (see :func:`train_member`).

    Examples
    --------
    >>> epoch_line({"seed": 1, "epoch": 4, "epochs": 35, "train": 0.0812, "val": 0.0903,
    ...             "mean_seconds": 3.1})
    'seed 1: epoch 4/35, loss 0.0812, val 0.0903, 3.1 s/epoch, at most 1 min 36 s left'
    """
    who = member or f"seed {record['seed']}"
    left = record["mean_seconds"] * (record["epochs"] - record["epoch"])
    line = (f"{who}: epoch {record['epoch']}/{record['epochs']}, loss {record['train']:.4f}, "
            f"val {record['val']:.4f}, {record['mean_seconds']:.1f} s/epoch")
    if record.get("stopped"):
        return line + f"; stopped early (no better val in {record['patience']} epochs)"
    return line + (f", at most {format_duration(left)} left" if left > 0 else ", done")


def _rng_devices(device: str) -> list[int]:
    """CUDA devices whose RNG a member on ``device`` uses (their state is restored after it)."""
    if device == "cpu":
        return []
    index = device.partition(":")[2]
    return [int(index) if index else torch.cuda.current_device()]


def train_member(library_url: str, spec_dict: dict, seed: int, cfg: TrainConfig,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None) -> registry.MemberFiles:
    """Train one member (usable as a Ray task); returns its weights, ONNX export and record.

    The member seeds its own torch RNG and thread count and restores the caller's after.

    Parameters
    ----------
    library_url : str
        The library store.
    spec_dict : dict
        The model spec (:meth:`ModelSpec.to_dict`).
    seed : int
        Seed of the initial weights, the dropout and the batch order.
    cfg : TrainConfig
        Hyper-parameters, device and threads.
    on_epoch : callable, optional
        Called after every epoch with a record ``{seed, epoch, epochs, train, val, seconds,
        mean_seconds, stopped, patience}``; default: log :func:`epoch_line` at INFO.
    """
    if on_epoch is None:
        def on_epoch(record: dict[str, Any]) -> None:
            logger.info("%s", epoch_line(record))

    cuda = _rng_devices(cfg.device)
    with torch_threads(cfg.threads), torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        return _train_member(library_url, spec_dict, seed, cfg, on_epoch)


def _train_member(library_url: str, spec_dict: dict, seed: int, cfg: TrainConfig,
                  on_epoch: Callable[[dict[str, Any]], None]) -> registry.MemberFiles:
    rng = np.random.default_rng(seed)
    spec = ModelSpec.from_dict(spec_dict)
    ds, _ = open_library(library_url)
    train_sl, val_sl, _ = split(ds.sizes["sample"])
    mask = np.array(spec.scale_mask)
    mean, std = np.array(spec.target_mean), np.array(spec.target_std)

    def prepared(sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _read(ds, list(spec.routes), sl)
        t = (_relative(x, y, mask) - mean) / std
        x = x / pattern_norm(torch.from_numpy(x)).numpy()
        return torch.from_numpy(x), torch.from_numpy(t.astype(np.float32))

    model = PQNet(spec).to(cfg.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # Halve the step when validation stalls (before early stopping ends the run).
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, cfg.patience // 2))
    loss_fn = nn.L1Loss()
    xv, tv = prepared(val_sl)
    starts = list(range(train_sl.start, train_sl.stop, WINDOW))
    cached = prepared(train_sl) if len(starts) == 1 else None
    best, best_state, bad_epochs = math.inf, None, 0
    curves: dict[str, list[float]] = {"train_mae": [], "val_mae": [], "epoch_seconds": []}
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        total, count = 0.0, 0
        for s in rng.permutation(starts):
            xw, tw = cached if cached is not None else prepared(slice(s, min(s + WINDOW, train_sl.stop)))
            order = torch.from_numpy(rng.permutation(len(xw)))
            for i in range(0, len(order), cfg.batch):
                idx = order[i:i + cfg.batch]
                xb, tb = xw[idx].to(cfg.device), tw[idx].to(cfg.device)
                opt.zero_grad()
                # The loss is taken on the routes' affine outputs, before the scale routes' softplus:
                # through the softplus, every pattern without the phase (target 0, output > 0) pushes the
                # route down, its gradient fades as it goes, and a route can die at 0 for every pattern
                # (a 39-output model's separator did: R² −0.62). Predictions (and the validation
                # loss) still go through the softplus: ≥ 0, within ln 2 / 100 of a std of max(r, 0).
                loss = loss_fn(model.raw_outputs(xb), tb)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                count += len(idx)
        model.eval()
        with torch.inference_mode():
            val = float(sum(loss_fn(model.standardised(xv[i:i + 4096].to(cfg.device)), tv[i:i + 4096].to(cfg.device))
                            * len(xv[i:i + 4096]) for i in range(0, len(xv), 4096)) / len(xv))
        sched.step(val)
        curves["train_mae"].append(total / count)
        curves["val_mae"].append(val)
        curves["epoch_seconds"].append(time.perf_counter() - t0)
        if val < best - 1e-6:
            best, bad_epochs = val, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        stopped = bad_epochs >= cfg.patience
        on_epoch({"seed": seed, "epoch": epoch + 1, "epochs": cfg.epochs, "train": total / count, "val": val,
                  "seconds": curves["epoch_seconds"][-1], "mean_seconds": float(np.mean(curves["epoch_seconds"])),
                  "stopped": stopped and epoch + 1 < cfg.epochs, "patience": cfg.patience})
        if stopped:
            break
    model = model.cpu()
    if best_state is not None:  # at least one epoch ran (epochs ≥ 1)
        model.load_state_dict(best_state)
    info = {"seed": seed, "epochs_run": len(curves["val_mae"]), "best_val_mae": best, "curves": curves}
    return registry.MemberFiles(state=registry.state_bytes(model), onnx=export_onnx(model), info=info)


def _spec_for(ds, routes: list[tuple[str, str]], train_sl: slice, phases: list[str], chunk: int) -> ModelSpec:
    """Target standardisation from the training split (read in windows)."""
    mask = np.array([k == "scale" for _, k in routes])
    s1 = np.zeros(len(routes))
    s2 = np.zeros(len(routes))
    n = 0
    for s in range(train_sl.start, train_sl.stop, chunk):
        x, y = _read(ds, routes, slice(s, min(s + chunk, train_sl.stop)))
        t = _relative(x, y, mask)
        s1 += t.sum(0)
        s2 += (t ** 2).sum(0)
        n += len(t)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
    const = [f"{p}.{k}" for (p, k), sd, mu in zip(routes, std, mean, strict=True) if sd <= 1e-9 * max(1.0, abs(mu))]
    if const:
        raise ConfigError(f"outputs {', '.join(const)} do not vary in the library; leave them out with --outputs")
    return ModelSpec(phases=tuple(phases), routes=tuple(routes), npt=int(ds.sizes["q"]),
                     target_mean=tuple(float(v) for v in mean), target_std=tuple(float(v) for v in std))


def _r2(true: np.ndarray, pred: np.ndarray) -> float:
    ss = float(((true - true.mean()) ** 2).sum())
    return float(1.0 - ((true - pred) ** 2).sum() / ss) if ss > 0 else float("nan")


def evaluate(ensemble: Ensemble, ds, routes: list[tuple[str, str]], sl: slice) -> dict:
    """Held-out metrics of an ensemble: R², MAE and mean ensemble std per output.

    A lattice or size output of a phase is scored on the patterns that contain the phase
    (scale > 0) only: where it is absent its label is a draw the pattern says nothing
    about. ``n`` is the number of patterns scored for each output.
    """
    preds, stds, trues, present = [], [], [], []
    absent_of = sorted({p for p, k in routes if k != "scale"})
    for s in range(sl.start, sl.stop, WINDOW):
        part = slice(s, min(s + WINDOW, sl.stop))
        x, y = _read(ds, routes, part)
        m, sd = ensemble.predict(x)
        preds.append(m)
        stds.append(sd)
        trues.append(y)
        present.append({p: np.asarray(ds[label_var(p, "scale")][part].values) > 0 for p in absent_of})
    pred, std, true = (np.concatenate(v) for v in (preds, stds, trues))
    out: dict[str, dict[str, float]] = {}
    for j, (p, k) in enumerate(routes):
        ok = np.concatenate([d[p] for d in present]) if k != "scale" else np.ones(len(true), dtype=bool)
        t, pr = true[ok, j], pred[ok, j]
        out[f"{p}.{k}"] = {"r2": _r2(t, pr) if t.size else float("nan"),
                           "mae": float(np.abs(t - pr).mean()) if t.size else float("nan"),
                           "mean_std": float(std[ok, j].mean()) if t.size else float("nan"), "n": int(ok.sum())}
    return {"n_test": int(sl.stop - sl.start), "outputs": out}


def held_out_bounds(ds, routes: list[tuple[str, str]], test_sl: slice, n: int) -> identifiability.Bounds | None:
    """Cramér–Rao bounds of the outputs on the first ``n`` held-out patterns (None: not computed).

    See :mod:`xrdscale.pqnet.identifiability`; a library whose phase library cannot be
    rebuilt here (e.g. a CIF file no longer where it was) gets no bounds and a WARNING.
    """
    if n <= 0:
        return None
    idx = np.arange(test_sl.start, min(test_sl.stop, test_sl.start + n))
    try:
        return identifiability.held_out_bounds(ds, idx, routes)
    except XrdscaleError as exc:
        logger.warning("no Cramér–Rao bounds for this model: %s", exc)
        return None


def train_ensemble(library_url: str, model_url: str, *, ensemble: int = 10, epochs: int = 35, batch: int = 32,
                   lr: float = 5e-4, patience: int = 5, outputs: list[str] | None = None, device: str = "auto",
                   parallel: bool = True, seed: int = 0, model_options: dict | None = None,
                   bounds: int = 256) -> str:
    """Train a deep ensemble on a library store and write its registry entry.

    Parameters
    ----------
    library_url : str
        A complete ``pqnet-library`` store (from :func:`xrdscale.pqnet.library.make_library`).
    model_url : str
        Registry entry to write (any fsspec URL).
    ensemble : int
        Number of members (they differ by seed).
    epochs, batch, lr, patience : int, int, float, int
        Maximum epochs, batch size, Adam learning rate, early-stopping patience.
    outputs : list of str, optional
        Outputs to predict: parameter names (``scale``, ``a``, ``c``, ``size_nm``) or
        ``PHASE.PARAM``; all labels of the library by default.
    device : {"auto", "cpu", "cuda"}
        ``auto`` and ``cuda`` use CUDA where it works, else the CPU (one INFO line;
        :func:`xrdscale.runtime.devices.resolve_device`).
    parallel : bool
        Train members as parallel Ray tasks (one GPU each on GPU machines).
    seed : int
        Member ``i`` uses seed ``seed + i``.
    model_options : dict, optional
        Architecture widths (``pattern_channels``, ``phase_channels``, ``hidden``, kernels).
    bounds : int
        Held-out patterns to compute the Cramér–Rao bounds of every output on
        (:mod:`xrdscale.pqnet.identifiability`); 0 skips them. Each output's metrics then
        hold ``r2_bound``, ``mae_bound``, ``accepted`` and ``weakly_determined`` beside
        ``r2`` and ``mae`` (see :func:`xrdscale.pqnet.identifiability.bounds_table`).

    Returns
    -------
    str
        The id of the registry entry.
    """
    if ensemble < 1 or epochs < 1 or batch < 1:
        raise ConfigError(f"ensemble={ensemble}, epochs={epochs}, batch={batch}: each must be at least 1")
    if bounds < 0:
        raise ConfigError(f"bounds={bounds}: give the number of held-out patterns to bound (0 skips the bounds)")
    device = resolve_device(device, what="pqnet train")
    ds, labels = open_library(library_url)
    train_sl, _, test_sl = split(ds.sizes["sample"])
    routes = _select_routes(labels, outputs)
    phases = list(dict.fromkeys(p for p, _ in routes))
    base = _spec_for(ds, routes, train_sl, phases, WINDOW)
    spec = ModelSpec.from_dict({**base.to_dict(), **(model_options or {})})
    cfg = TrainConfig(epochs=epochs, batch=batch, lr=lr, patience=patience, device=device)
    seeds = [seed + i for i in range(ensemble)]
    logger.info("training %d members on %s (%d outputs, %d training patterns)", ensemble, device,
                len(routes), train_sl.stop)
    if parallel and ensemble > 1:
        members = _train_on_ray(library_url, spec, seeds, cfg)
    else:
        members = [train_member(library_url, spec.to_dict(), s, cfg, _epoch_logger(seeds)) for s in seeds]
    models = []
    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: keep the caller's RNG as it was
        for m in members:
            net = PQNet(spec)
            net.load_state_dict(torch.load(io.BytesIO(m.state), weights_only=True))
            models.append(net.eval())
    metrics = evaluate(Ensemble(models, [m.onnx for m in members]), ds, routes, test_sl)
    metrics = identifiability.merge(metrics, held_out_bounds(ds, routes, test_sl, bounds))
    config = {"library": storage.redact(library_url), "library_id": ds.attrs.get("created"), "ensemble": ensemble,
              "epochs": epochs, "batch": batch, "lr": lr, "patience": patience, "device": device, "seed": seed,
              "bounds": bounds, "n_library": int(ds.sizes["sample"]),
              "split": [train_sl.stop, test_sl.start, test_sl.stop]}
    q = np.asarray(ds["q"].values)
    return registry.write_entry(model_url, spec=spec, q=q, phases_yaml=ds.attrs["phases_yaml"], members=members,
                                metrics=metrics, config=config)


def _epoch_logger(seeds: list[int]) -> Callable[[dict[str, Any]], None]:
    """Log an epoch record at INFO, naming the member as ``member i/N (seed s)``."""
    index = {s: i for i, s in enumerate(seeds)}

    def log(record: dict[str, Any]) -> None:
        member = f"member {index.get(record['seed'], 0) + 1}/{len(seeds)} (seed {record['seed']})"
        logger.info("%s", epoch_line(record, member))

    return log


def _train_member_on_ray(library_url: str, spec_dict: dict, seed: int, cfg: TrainConfig,
                         queue: Any) -> registry.MemberFiles:
    """:func:`train_member` in a Ray task, sending its epoch records to the driver through ``queue``."""
    return train_member(library_url, spec_dict, seed, cfg, on_epoch=queue.put_nowait)


def _train_on_ray(library_url: str, spec: ModelSpec, seeds: list[int], cfg: TrainConfig) -> list:
    """Train the members as parallel Ray tasks; log their epochs here as they come."""
    ray = ray_runtime.ensure()
    from ray.util.queue import Queue

    gpus = 0 if cfg.device == "cpu" else 1
    cpus = 1 if gpus else max(1, int(ray.available_resources().get("CPU", 1)) // len(seeds))
    # in a task, the one GPU Ray gives it is "cuda"
    cfg = TrainConfig(**{**cfg.__dict__, "threads": cpus, "device": "cuda" if gpus else "cpu"})
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=2)(_train_member_on_ray)
    log = _epoch_logger(seeds)
    queue = Queue(actor_options={"num_cpus": 0})
    try:
        refs = [task.remote(library_url, spec.to_dict(), s, cfg, queue) for s in seeds]
        pending = list(refs)
        while True:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0) if pending else ([], [])
            for record in queue.get_nowait_batch(queue.qsize()):
                log(record)
            if not pending:
                break
        return ray.get(refs)
    finally:
        queue.shutdown()
