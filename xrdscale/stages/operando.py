"""The ``operando`` stage: weight fractions over time of a series of point or line scans.

A ``patterns`` store whose frames carry their acquisition ``time`` (integrated from a raw
file with ``/entry/data/time``) and the cell's electrochemistry log
(:mod:`xrdscale.io.echem`) become one ``operando`` store: the PQ-Net ensemble's scale
factors with their std (:func:`xrdscale.pqnet.predict.predict_maps`, Ray actors), the
Hill & Howard weight fractions with their first-order std
(:func:`xrdscale.analysis.fractions.with_weight_fractions`), and per frame the voltage and
current interpolated from the log, the cycle (numbered from the current's sign) and the step
(+1 charge, −1 discharge, 0 rest). The whole log rides along (``echem_*`` on dim ``echem``) for
the voltage curve of the report (:mod:`xrdscale.analysis.operando_report`).

The inputs are checked before any actor starts: a patterns store without times, a log
without a time, voltage or current column, or a log that does not span the scans each end
the stage with an :class:`~xrdscale.exceptions.InputError` saying what to do, and nothing is
left at the output.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from xrdscale.exceptions import InputError
from xrdscale.io import storage
from xrdscale.stages.analyse import AnalyseConfig
from xrdscale.stages.base import guarded, write_output

logger = logging.getLogger(__name__)


#: Settings of the ``operando`` stage: the ``analyse`` stage's own (ensemble, actors, engine, quality
#: maps …), so ``pipeline.analyse`` of a campaign spec is also this stage's section; the command
#: line (``xrdscale operando``) is its entry point, not the campaign's stage graph.
OperandoConfig = AnalyseConfig


def scan_times(ds: xr.Dataset, what: str) -> np.ndarray:
    """The ``time`` (frame) coordinate of a patterns store [s].

    Raises
    ------
    InputError
        The store has no ``time`` coordinate over its frames.
    """
    if "time" not in ds.coords or tuple(ds["time"].dims) != ("frame",):
        raise InputError(f"{what} has no time (frame) coordinate: its raw file records no acquisition time per "
                         "frame; an operando series needs /entry/data/time (seconds) in the raw NeXus file (or a "
                         "time column in the positioner table of a frame series) — add it and integrate again")
    return np.asarray(ds["time"].values, dtype=np.float64)


def with_echem(maps: xr.Dataset, log: Any, times: np.ndarray) -> xr.Dataset:
    """``maps`` with ``voltage``, ``current``, ``cycle``, ``step`` (frame) from ``log`` and the log itself."""
    at = log.at(times)
    maps = maps.assign_coords(time=("frame", times), voltage=("frame", at["voltage"]),
                              current=("frame", at["current"]), cycle=("frame", at["cycle"]),
                              step=("frame", at["step"]))
    maps = maps.assign(echem_time=("echem", log.time), echem_voltage=("echem", log.voltage),
                       echem_current=("echem", log.current))
    for name, units in (("time", "s"), ("voltage", "V"), ("current", "A"), ("echem_time", "s"),
                        ("echem_voltage", "V"), ("echem_current", "A")):
        maps[name].attrs["units"] = units
    maps["step"].attrs["flag_meanings"] = "1 charge, -1 discharge, 0 rest"
    maps.attrs.update(echem=log.source)
    return maps


def operando(model_url: str, patterns_url: str, echem_url: str, out_url: str, *,
             phases: Mapping[str, Any] | None = None, library: Any = None, config: OperandoConfig | None = None,
             pool: Any = None, client: Any = None, progress: bool = True, **settings: Any) -> str:
    """Weight fractions over time of a timed ``patterns`` store, with the cell's log, as an ``operando`` store.

    Parameters
    ----------
    model_url : str
        PQ-Net model registry entry (e.g. trained on xrdscale/data/phases/licx4.yaml).
    patterns_url : str
        A ``patterns`` store with a ``time`` (frame) coordinate.
    echem_url : str
        The electrochemistry log: CSV, or a NeXus/HDF5 group (``FILE.nxs::/entry/echem``).
    out_url : str
        Destination ``operando`` store.
    phases, library
        As for :func:`xrdscale.stages.analyse.analyse`.
    config : OperandoConfig, optional
        Ensemble, actors, batch, engine, device, threads, quality maps; keyword ``settings`` override it.
    pool : ServerPool, optional
        Running actors of this model (left running).
    client : distributed.Client, optional
        Dask client.
    progress : bool
        Show progress.

    Returns
    -------
    str
        ``out_url``.

    Raises
    ------
    InputError
        No frame times, a log without time/voltage/current, or a log that does not span the scans.

    Examples
    --------
    >>> operando("models/licx4", "work/op/patterns.zarr", "echem/cell.csv",
    ...          "work/op/operando.zarr")  # doctest: +SKIP
    """
    from xrdscale.analysis.fractions import with_weight_fractions
    from xrdscale.io.echem import read_echem
    from xrdscale.pqnet.predict import predict_maps
    from xrdscale.pqnet.registry import open_entry
    from xrdscale.pqnet.serve import serving

    cfg = OperandoConfig.build(config, **settings)

    def body() -> str:
        what = f"patterns store {storage.redact(patterns_url)}"
        ds = storage.open_store(patterns_url, stage="patterns")
        times = scan_times(ds, what)
        log = read_echem(echem_url).shifted_to(ds["time"].attrs.get("start_time") or None)
        log.check_covers(times, what)
        entry = open_entry(model_url)
        with serving(model_url, pool, actors=cfg.actors, engine=cfg.engine, device=cfg.device,
                     threads=cfg.threads, members=cfg.ensemble) as actors:
            maps = predict_maps(ds, entry, actors, batch=cfg.batch, what=storage.redact(patterns_url),
                                quality=cfg.quality_settings(), phases=phases, library=library)
            maps = with_echem(with_weight_fractions(maps, phases), log, times)
            maps.attrs.update(model=storage.redact(model_url), source=storage.redact(patterns_url))
            record = {**cfg.record(), "ensemble": int(actors.members), "model": storage.redact(model_url),
                      "model_id": entry.id, "input": storage.redact(patterns_url),
                      "echem": storage.redact(echem_url), "device": actors.device}
            return write_output(maps, out_url, kind="operando", config=record, client=client, progress=progress,
                                label="operando", marker={"model_id": entry.id})

    return guarded(out_url, body)


def raw_times(raw_url: str) -> tuple[np.ndarray, str | None]:
    """Frame times [s] and start time of a raw file of timed scans.

    Raises
    ------
    InputError
        The raw file records no time per frame.
    """
    from xrdscale.io.frames import TIME, open_raw

    scan = open_raw(raw_url)
    if scan.time is None:
        raise InputError(f"raw file {storage.redact(raw_url)} has no /{TIME}: an operando series needs the "
                         "acquisition time of every frame (seconds, one per frame); write it at acquisition or add it "
                         "from the scan log, then run again")
    return np.asarray(scan.time, dtype=np.float64), scan.start_time


def check_inputs(raw_url: str, echem_url: str) -> None:
    """Fail before any work when the raw file has no frame times or the log does not span them.

    Raises
    ------
    InputError
        The raw file records no time per frame, or the log is unreadable, lacks a column or
        does not cover the frames.
    """
    from xrdscale.io.echem import read_echem

    times, start = raw_times(raw_url)
    read_echem(echem_url).shifted_to(start).check_covers(times, f"raw file {storage.redact(raw_url)}")


def run_series(raw_url: str, echem_url: str, out_url: str, *, model: str, poni: str, mask: str | None = None,
               npt: int = 500, margin: float = 0.05, ensemble: int | None = None, pool: Any = None,
               reuse: bool = False, progress: bool = True) -> str:
    """A raw file of timed scans to ``out_url/operando.zarr`` (via ``out_url/patterns.zarr``); returns the store.

    The integration covers the model's q range plus ``margin`` [1/Å] each side; with ``reuse``
    a complete ``patterns.zarr`` is kept (a resumed live watch). ``pool``: running actors of
    ``model``. The inputs are not checked here (:func:`check_inputs`).
    """
    from xrdscale.pqnet.registry import open_entry
    from xrdscale.stages.integrate import integrate

    q = open_entry(model).q
    patterns = storage.join(out_url, "patterns.zarr")
    if not (reuse and storage.is_complete(patterns)):
        integrate(raw_url, patterns, poni=poni, mask=mask, npt=npt, progress=progress,
                  q_range=(max(0.0, float(q[0]) - margin), float(q[-1]) + margin))
    return operando(model, patterns, echem_url, storage.join(out_url, "operando.zarr"), ensemble=ensemble,
                    pool=pool, progress=progress)
