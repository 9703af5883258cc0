"""The stage table of a campaign: which function runs each stage, on what, with which config.

Every dataset goes through integrate → sinogram → [absorption] → reconstruct → [denoise]
→ analyse; the campaign as a whole trains the PQ-Net ensemble first (``library`` →
``train``, when the spec names no model) and writes the ``report`` last. Each
:class:`Stage` names its upstream stages, the part of the spec that configures it, and an
adapter that calls the real stage function of xrdscale (docs/internal-api.md) with store
URLs. The runner hashes the config and inputs of every stage and skips those whose output
is already complete for the same hashes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xrdscale.io import storage

logger = logging.getLogger(__name__)

#: The dataset id under which campaign-wide stages (library, train, report) are recorded.
CAMPAIGN = "_campaign"
#: Name of the input that stands for the trained model in :attr:`Stage.needs`.
MODEL = "model"


@dataclass(frozen=True)
class StageCall:
    """Everything one run of a stage needs.

    Attributes
    ----------
    spec : CampaignSpec
        The resolved campaign spec.
    dataset : Dataset or None
        The dataset (``None`` for campaign-wide stages).
    inputs : mapping
        Upstream stage name (or ``"model"``) → store URL; for ``report`` the ``analyse``
        outputs keyed ``analyse:<dataset id>``.
    out : str
        The URL to write.
    config : mapping
        The stage's settings from the spec.
    ray : RayHandle or None
        Connects Ray on demand.
    """

    spec: Any
    dataset: Any
    inputs: Mapping[str, str]
    out: str
    config: Mapping[str, Any]
    ray: Any = None


@dataclass(frozen=True)
class Stage:
    """One stage of the campaign graph.

    Attributes
    ----------
    name : str
        Stage name; also the store name in the workspace.
    run : callable
        ``run(call: StageCall) -> None`` writes ``call.out`` (completion marker last).
    config : callable
        ``config(spec) -> dict``: the settings whose change invalidates the output.
    needs : tuple of str
        Upstream stages of the same dataset, or ``"model"``.
    enabled : callable
        ``enabled(spec) -> bool``; a disabled stage is left out of the graph and its
        downstream reads its upstream instead.
    scope : str
        ``"dataset"``, ``"model"`` (before the datasets) or ``"report"`` (after them).
    suffix : str
        Store suffix (``.zarr``; empty for folders such as a model or a report).
    external : callable
        ``external(spec, dataset) -> dict``: input URLs outside the workspace (raw files,
        PONI, phase library) whose identity enters the input hash.
    ray : bool
        The stage runs work on Ray; the runner connects Ray before it starts its threads.
    """

    name: str
    run: Callable[[StageCall], None]
    config: Callable[[Any], dict]
    needs: tuple[str, ...] = ()
    enabled: Callable[[Any], bool] = field(default=lambda spec: True)
    scope: str = "dataset"
    suffix: str = ".zarr"
    external: Callable[[Any, Any], dict] = field(default=lambda spec, ds: {})
    ray: bool = False


def _dump(model: Any) -> dict:
    return model.model_dump(mode="json")


def _ray(call: StageCall) -> None:
    if call.ray is not None:
        call.ray.ensure()


def _phases(spec: Any) -> dict | None:
    """Phase objects of the spec's phase library (for weight fractions of non-built-in phases)."""
    if not spec.phases:
        return None
    from xrdscale.physics.phaselib import PhaseLibrary

    lib = PhaseLibrary.load(spec.phases)
    return dict(zip(lib.phase_names, lib.phases))


def _run_library(call: StageCall) -> None:
    from xrdscale.pqnet.library import make_library

    cfg = call.config
    make_library(call.spec.phases, call.out, n=cfg["n"], seed=cfg["seed"])


def _run_train(call: StageCall) -> None:
    from xrdscale.pqnet.train import train_ensemble

    cfg = call.config
    _ray(call)
    train_ensemble(call.inputs["library"], call.out, ensemble=cfg["ensemble"], epochs=cfg["epochs"],
                   seed=cfg["seed"], outputs=cfg.get("outputs"))


def _run_integrate(call: StageCall) -> None:
    from xrdscale.stages.integrate import integrate

    cfg = call.config
    integrate(call.dataset.raw, call.out, poni=call.spec.geometry.poni, mask=call.spec.geometry.mask,
              npt=cfg["npt"], q_range=tuple(cfg["q_range"]) if cfg["q_range"] else None,
              method=cfg["method"], percentile=tuple(cfg["percentile"]), progress=False)


def _run_sinogram(call: StageCall) -> None:
    from xrdscale.stages.sinogram import build_sinogram

    build_sinogram(call.inputs["integrate"], call.out, center=call.config["center"], progress=False)


def _run_absorption(call: StageCall) -> None:
    from xrdscale.stages.absorption import correct_absorption

    correct_absorption(call.inputs["sinogram"], call.out, mu_map=call.spec.pipeline.absorption.mu_map)


def _sinogram_input(inputs: Mapping[str, str]) -> str:
    return inputs.get("absorption") or inputs["sinogram"]


def _run_reconstruct(call: StageCall) -> None:
    from xrdscale.stages.reconstruct import reconstruct

    cfg = call.config
    reconstruct(_sinogram_input(call.inputs), call.out, algorithm=cfg["algorithm"],
                iterations=cfg["iterations"], filter=cfg["filter"])


def _run_denoise(call: StageCall) -> None:
    from xrdscale.stages.denoise import denoise

    denoise(_sinogram_input(call.inputs), call.inputs["reconstruct"], call.out)


def _run_analyse(call: StageCall) -> None:
    """PQ-Net prediction into a scratch store, then the ``maps`` store with weight fractions."""
    from xrdscale.analysis.fractions import with_weight_fractions
    from xrdscale.pqnet.predict import predict

    cfg = call.config
    _ray(call)
    volume = call.inputs.get("denoise") or call.inputs["reconstruct"]
    scratch = call.out.rstrip("/").removesuffix(".zarr") + ".predicted.zarr"
    # the number of actors changes the speed, not the result: it is not part of the hashed config
    predict(call.inputs[MODEL], volume, scratch, actors=call.spec.pipeline.analyse.actors, batch=cfg["batch"])
    maps = storage.open_store(scratch, stage="maps")
    config = {"model": storage.redact(call.inputs[MODEL]), **cfg}
    storage.write_store(with_weight_fractions(maps, _phases(call.spec)), call.out, stage="maps", config=config)
    storage.clear(scratch)


def _run_report(call: StageCall) -> None:
    """The campaign report over the finished datasets; the folder is marked complete last."""
    from xrdscale.analysis.report import write_report

    by_id = {d.id: (c.cycle, d) for c in call.spec.cycles for d in c.datasets}
    entries = []
    for key, url in call.inputs.items():
        if not key.startswith("analyse:"):
            continue
        cycle, ds = by_id[key.split(":", 1)[1]]
        entries.append({"id": ds.id, "maps_url": url, "cycle": cycle, "state": ds.state, "voltage": ds.voltage,
                        "raw_url": ds.raw})
    model = {"url": storage.redact(call.inputs[MODEL])} if MODEL in call.inputs else None
    storage.begin_store(call.out)
    write_report(entries, call.out, title=f"xrdscale campaign {call.spec.campaign}", model=model,
                 rois=call.config["rois"], phases=_phases(call.spec), progress=False)
    storage.mark_complete(call.out, {"stage": "report"})


def _raw_inputs(spec: Any, ds: Any) -> dict:
    out = {"raw": ds.raw, "poni": spec.geometry.poni}
    if spec.geometry.mask:
        out["mask"] = spec.geometry.mask
    return out


def default_stages() -> list[Stage]:
    """The stages of xrdscale in graph order, each calling the real stage function."""
    p = lambda name: (lambda spec: _dump(getattr(spec.pipeline, name)))  # noqa: E731
    return [
        Stage("library", _run_library, lambda s: {k: v for k, v in p("train")(s).items() if k in ("n", "seed")},
              scope="model", external=lambda s, d: {"phases": s.phases}),
        Stage("train", _run_train, lambda s: {k: v for k, v in p("train")(s).items() if k != "n"},
              needs=("library",), scope="model", suffix="", ray=True),
        Stage("integrate", _run_integrate, p("integrate"), external=_raw_inputs),
        Stage("sinogram", _run_sinogram, p("sinogram"), needs=("integrate",)),
        Stage("absorption", _run_absorption, lambda s: {k: v for k, v in p("absorption")(s).items() if k != "mu_map"},
              needs=("sinogram",), enabled=lambda s: s.pipeline.absorption.enabled,
              external=lambda s, d: {"mu_map": s.pipeline.absorption.mu_map}),
        Stage("reconstruct", _run_reconstruct, p("reconstruct"), needs=("absorption",)),
        Stage("denoise", _run_denoise, p("denoise"), needs=("reconstruct",),
              enabled=lambda s: s.pipeline.denoise.enabled),
        Stage("analyse", _run_analyse, lambda s: {k: v for k, v in p("analyse")(s).items() if k != "actors"},
              needs=("denoise", MODEL), ray=True),
        Stage("report", _run_report, p("report"), scope="report", suffix=""),
    ]


def input_identity(url: str) -> dict:
    """What identifies an external input: its URL plus size and modification stamp (or ETag).

    Raises
    ------
    StorageError
        ``url`` does not exist or cannot be read.
    """
    fs, path = storage.filesystem(url)
    with storage.io_errors(url, "read"):
        info = fs.info(path)
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return {"url": storage.redact(url), "size": info.get("size"), "stamp": str(stamp)}
