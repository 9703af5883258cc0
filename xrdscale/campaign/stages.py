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
from xrdscale.physics.constants import HC_KEV_ANGSTROM

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
        ``"dataset"``, ``"model"`` (before the datasets), ``"series"`` (once per item of the
        spec list named by ``collection``: a Bragg CDI series, an XCS cell) or ``"report"``
        (after them).
    suffix : str
        Store suffix (``.zarr``; empty for folders such as a model or a report).
    external : callable
        ``external(spec, dataset) -> dict``: input URLs outside the workspace (raw files,
        PONI, phase library) whose identity enters the input hash.
    ray : bool
        The stage runs work on Ray; the runner connects Ray before it starts its threads.
    reads : tuple of str
        Further upstream outputs it reads that lie upstream of its ``needs`` anyway (so they
        add no order); a stage the table lacks is left out of its inputs.
    preflight : callable
        ``preflight(spec)`` checks the stage's inputs before the campaign starts (raises).
    collection : str
        A series stage: the spec list it runs once per item of (``cdi``, ``xcs``).
    applies : callable
        A series stage: ``applies(item) -> bool``, whether the item needs it.
    check : bool
        A dataset stage that checks the dataset's maps (the full-profile fit): it runs after
        them, the maps stay the dataset's result, and the report gets its output beside them.
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
    reads: tuple[str, ...] = ()
    preflight: Callable[[Any], None] = field(default=lambda spec: None)
    collection: str = "cdi"
    applies: Callable[[Any], bool] = field(default=lambda item: True)
    check: bool = False


def _ray(call: StageCall) -> None:
    if call.ray is not None:
        call.ray.ensure()


def _library(spec: Any) -> Any:
    """The spec's phase library (None without one)."""
    if not spec.phases:
        return None
    from xrdscale.physics.phaselib import PhaseLibrary

    return PhaseLibrary.load(spec.phases)


def _phases(spec: Any, lib: Any = None) -> dict | None:
    """Phase objects of the spec's phase library (for weight fractions of non-built-in phases)."""
    lib = lib if lib is not None else _library(spec)
    return None if lib is None else dict(zip(lib.phase_names, lib.phases))


def _per_dataset(url: str | None, dataset: Any) -> str | None:
    """``url`` with ``{dataset}`` replaced by the dataset's id."""
    return None if url is None or dataset is None else url.replace("{dataset}", dataset.id)


def _run_library(call: StageCall) -> None:
    from xrdscale.stages.train import make_library

    make_library(call.spec.phases, call.out, call.spec.pipeline.train)


def _run_train(call: StageCall) -> None:
    from xrdscale.stages.train import train

    _ray(call)
    train(call.inputs["library"], call.out, call.spec.pipeline.train)


def _run_integrate(call: StageCall) -> None:
    from xrdscale.stages.integrate import integrate

    integrate(call.dataset.raw, call.out, poni=call.spec.geometry.poni, mask=call.spec.geometry.mask,
              config=call.spec.pipeline.integrate, progress=False)


def _run_sinogram(call: StageCall) -> None:
    from xrdscale.stages.sinogram import build_sinogram

    build_sinogram(call.inputs["integrate"], call.out, config=call.spec.pipeline.sinogram, progress=False)


def _absorption_config(spec: Any, dataset: Any, lib: Any = None) -> Any:
    """The absorption config of one dataset: ``{dataset}`` filled in, the energy from the phase library ``lib``."""
    cfg = spec.pipeline.absorption
    update: dict[str, Any] = {"mu_map": _per_dataset(cfg.mu_map, dataset), "maps": _per_dataset(cfg.maps, dataset)}
    if cfg.energy_kev is None and lib is not None:
        update["energy_kev"] = HC_KEV_ANGSTROM / lib.wavelength
    return cfg.model_copy(update=update)


def _run_absorption(call: StageCall) -> None:
    from xrdscale.stages.absorption import correct_absorption

    lib = _library(call.spec)  # loaded once: it gives the energy and the phases' compositions
    correct_absorption(call.inputs["sinogram"], call.out, config=_absorption_config(call.spec, call.dataset, lib),
                       phases=_phases(call.spec, lib), progress=False)


def _sinogram_input(inputs: Mapping[str, str]) -> str:
    return inputs.get("absorption") or inputs["sinogram"]


def _run_reconstruct(call: StageCall) -> None:
    from xrdscale.stages.reconstruct import reconstruct

    reconstruct(_sinogram_input(call.inputs), call.out, config=call.spec.pipeline.reconstruct, progress=False)


def _run_denoise(call: StageCall) -> None:
    from xrdscale.stages.denoise import denoise

    denoise(_sinogram_input(call.inputs), call.inputs["reconstruct"], call.out, config=call.spec.pipeline.denoise,
            progress=False)


def _run_analyse(call: StageCall) -> None:
    """PQ-Net maps with weight fractions, one lazy composition written once."""
    from xrdscale.stages.analyse import analyse

    _ray(call)
    volume = call.inputs.get("denoise") or call.inputs["reconstruct"]
    lib = _library(call.spec)
    analyse(call.inputs[MODEL], volume, call.out, phases=_phases(call.spec, lib), library=lib,
            config=call.spec.pipeline.analyse, progress=False)


def _run_fit(call: StageCall) -> None:
    """The full-profile fit of (a sample of) a dataset's pixels, started from PQ-Net, and its comparison with PQ-Net.

    Writes ``fit.zarr`` (a maps store) and ``fit-compare.zarr`` beside it (difference maps and
    ``compare.csv``: bias, MAE and disagreement beyond the combined uncertainties).
    """
    from xrdscale.stages.fit import fit_compare, fit_maps

    volume = call.inputs.get("denoise") or call.inputs["reconstruct"]
    fit_maps(call.inputs[MODEL], volume, call.out, config=call.spec.pipeline.fit, library=_library(call.spec),
             progress=False)
    fit_compare(call.out, call.inputs["analyse"], compare_url(call.out), config=call.spec.pipeline.fit_compare,
                progress=False)


def compare_url(fit_url: str) -> str:
    """Where the campaign's fit stage puts its comparison with PQ-Net: ``fit-compare.zarr`` beside ``fit.zarr``."""
    return fit_url.removesuffix(".zarr") + "-compare.zarr"


def _run_cdi(call: StageCall) -> None:
    """One Bragg CDI series: every state phased, aligned, strain, PCA, Table 1."""
    from xrdscale.stages.cdi import series

    s = call.dataset
    series([st.data for st in s.states], call.out, config=call.spec.pipeline.cdi, mask=s.mask,
           labels=[st.label for st in s.states], progress=False)


def _cdi_inputs(spec: Any, series: Any) -> dict:
    out = {f"state:{st.label}": st.data for st in series.states}
    if series.mask:
        out["mask"] = series.mask
    if spec.pipeline.cdi.init == "cnn" and spec.pipeline.cdi.cnn_model:
        out["cnn_model"] = storage.join(spec.pipeline.cdi.cnn_model, "model.json")
    return out


def _run_xcs(call: StageCall) -> None:
    """One XCS cell: EMR maps of every state; with a calibration, the x maps too."""
    from xrdscale.stages.xcs import emr_maps, lithium

    cell = call.dataset
    labels = [st.label for st in cell.states]
    cubes = [st.data for st in cell.states]
    if cell.calibration is None:
        emr_maps(cubes, call.out, config=call.spec.pipeline.xcs, labels=labels, mask=cell.mask, progress=False)
        return
    emr_url = call.out.removesuffix(".zarr") + "-emr.zarr"
    emr_maps(cubes, emr_url, config=call.spec.pipeline.xcs, labels=labels, mask=cell.mask, progress=False)
    lithium(emr_url, cell.calibration, call.out, config=call.spec.pipeline.lithium, progress=False)


def _xcs_inputs(spec: Any, cell: Any) -> dict:
    out = {f"state:{st.label}:{i}": part for st in cell.states for i, part in enumerate(st.data.split(","))}
    out.update({k: v for k, v in (("mask", cell.mask), ("calibration", cell.calibration)) if v})
    return out


def _run_ct(call: StageCall) -> None:
    """The CT scans of one XCS cell: every state reconstructed, then its interfaces' height maps and R_a.

    The output is a folder: ``<state>-volume.zarr`` and ``<state>.zarr`` (ct-roughness) per
    state with a scan; it is marked complete last.
    """
    from xrdscale.stages.ct import reconstruct, roughness

    storage.begin_store(call.out)
    for st in call.dataset.states:
        if not st.ct:
            continue
        volume = storage.join(call.out, f"{st.label}-volume.zarr")
        reconstruct(st.ct, volume, config=call.spec.pipeline.ct, progress=False)
        roughness(volume, storage.join(call.out, f"{st.label}.zarr"), config=call.spec.pipeline.roughness,
                  progress=False)
    storage.mark_complete(call.out, {"stage": "ct", "states": [st.label for st in call.dataset.states if st.ct]})


def _ct_inputs(spec: Any, cell: Any) -> dict:
    return {f"ct:{st.label}": st.ct for st in cell.states if st.ct}


def _run_report(call: StageCall) -> None:
    """The campaign report over the finished datasets and CDI series; the folder is marked complete last."""
    from xrdscale.stages.report import report

    by_id = {d.id: (c.cycle, d) for c in call.spec.cycles for d in c.datasets}
    entries = []
    for key, url in call.inputs.items():
        if not key.startswith("analyse:"):
            continue
        cycle, ds = by_id[key.split(":", 1)[1]]
        entries.append({"id": ds.id, "maps_url": url, "cycle": cycle, "state": ds.state, "voltage": ds.voltage,
                        "raw_url": ds.raw})
    model = None
    if MODEL in call.inputs:
        from xrdscale.pqnet.registry import open_entry

        model = {"url": storage.redact(call.inputs[MODEL]), "metrics": open_entry(call.inputs[MODEL]).metrics}
    cdi = [url for key, url in call.inputs.items() if key.startswith("cdi:")]
    xcs = [url for key, url in call.inputs.items() if key.startswith("xcs:")]
    fits = {key.split(":", 1)[1]: compare_url(url) for key, url in call.inputs.items() if key.startswith("fit:")}
    cells = {c.id: c for c in call.spec.xcs}
    rough = [storage.join(url, f"{st.label}.zarr") for key, url in call.inputs.items() if key.startswith("ct:")
             for st in cells[key.split(":", 1)[1]].states if st.ct]
    report(entries, call.out, config=call.spec.pipeline.report, title=f"xrdscale campaign {call.spec.campaign}",
           model=model, phases=_phases(call.spec) if entries else None, progress=False, cdi=cdi, xcs=xcs,
           roughness=rough, fits=fits)


def _check_poni(spec: Any) -> None:
    """A PONI file pyFAI cannot use (unreadable, no wavelength) is refused before any stage runs."""
    from xrdscale.stages.integrate import load_poni

    if spec.geometry is None:  # a Bragg-CDI-only campaign
        return
    load_poni(storage.read_bytes(spec.geometry.poni).decode("utf-8", "replace"),
              f"geometry.poni {storage.redact(spec.geometry.poni)}")


def _raw_inputs(spec: Any, ds: Any) -> dict:
    out = {"raw": ds.raw, "poni": spec.geometry.poni}
    if spec.geometry.mask:
        out["mask"] = spec.geometry.mask
    return out


def _absorption_inputs(spec: Any, ds: Any) -> dict:
    cfg = spec.pipeline.absorption
    # the phase library sets the energy when energy_kev is not given, and the μ of library phases
    return {k: v for k, v in (("mu_map", _per_dataset(cfg.mu_map, ds)), ("maps", _per_dataset(cfg.maps, ds)),
                              ("phases", spec.phases))
            if v is not None}


def _hashed(name: str) -> Callable[[Any], dict]:
    """The config hash of ``pipeline.<name>``: what its model declares to change the result."""
    return lambda spec: getattr(spec.pipeline, name).hashed()


def default_stages() -> list[Stage]:
    """The stages of xrdscale in graph order, each calling the real stage function with its config."""
    return [
        Stage("library", _run_library, lambda s: s.pipeline.train.library(), scope="model",
              external=lambda s, d: {"phases": s.phases}),
        Stage("train", _run_train, lambda s: s.pipeline.train.training(), needs=("library",), scope="model",
              suffix="", ray=True),
        Stage("integrate", _run_integrate, _hashed("integrate"), external=_raw_inputs, preflight=_check_poni),
        Stage("sinogram", _run_sinogram, _hashed("sinogram"), needs=("integrate",)),
        # the μ sources are inputs (hashed by identity), the energy is resolved per dataset
        Stage("absorption", _run_absorption,
              lambda s: {k: v for k, v in s.pipeline.absorption.hashed().items() if k not in ("mu_map", "maps")},
              needs=("sinogram",), enabled=lambda s: s.pipeline.absorption.enabled, external=_absorption_inputs),
        Stage("reconstruct", _run_reconstruct, _hashed("reconstruct"), needs=("absorption",)),
        Stage("denoise", _run_denoise, _hashed("denoise"), needs=("reconstruct",), reads=("absorption",),
              enabled=lambda s: s.pipeline.denoise.enabled),
        Stage("analyse", _run_analyse, _hashed("analyse"), needs=("denoise", MODEL), ray=True),
        Stage("fit", _run_fit, lambda s: {"fit": s.pipeline.fit.hashed(), "compare": s.pipeline.fit_compare.hashed()},
              needs=("analyse",), reads=("denoise", MODEL), enabled=lambda s: s.pipeline.fit.enabled, check=True),
        Stage("cdi", _run_cdi, _hashed("cdi"), scope="series", external=_cdi_inputs),
        Stage("xcs", _run_xcs, lambda s: {"xcs": s.pipeline.xcs.hashed(), "lithium": s.pipeline.lithium.hashed()},
              scope="series", external=_xcs_inputs, collection="xcs"),
        Stage("ct", _run_ct, lambda s: {"ct": s.pipeline.ct.hashed(), "roughness": s.pipeline.roughness.hashed()},
              scope="series", suffix="", external=_ct_inputs, collection="xcs",
              applies=lambda cell: any(st.ct for st in cell.states)),
        Stage("report", _run_report, _hashed("report"), scope="report", suffix=""),
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
