"""Training libraries: simulated patterns with their labels, generated in parallel on Dask.

A library store (stage ``pqnet-library``) holds

- ``patterns`` (sample, q) float32 in the absolute units of :mod:`xrdscale.physics.pattern`
  (``I_hkl = scale · m|F|² · LP / V²``; the Poisson noise is drawn at the library's total
  counts per pattern and scaled back, so noise level and units are independent), chunked by
  generation block;
- one label variable (sample) per predicted (phase, parameter), named ``<phase>__<param>``;
- ``attrs``: the phase library YAML text (``phases_yaml``), the label list (``labels``, JSON),
  the generation block size, the seed and ``intensity_unit`` (the K of the pattern model,
  :data:`xrdscale.physics.constants.INTENSITY_UNIT`; a store without it was simulated with
  K = 10⁻²), plus the usual provenance.

Every block of samples is simulated by one Dask task with its own seed
(``numpy.random.default_rng([seed, block])``), so the library does not depend on the
number of workers and no pattern passes through the driver.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import dask
import dask.array as da
import numpy as np
import xarray as xr
import yaml

from xrdscale.exceptions import ConfigError
from xrdscale.io import storage
from xrdscale.physics.constants import INTENSITY_UNIT
from xrdscale.physics.phaselib import PhaseLibrary

logger = logging.getLogger(__name__)

STAGE = "pqnet-library"
#: Samples simulated by one Dask task (and one zarr chunk of ``patterns``).
BLOCK = 2000


def label_var(phase: str, param: str) -> str:
    """Name of the store variable holding the label ``(phase, param)``."""
    return f"{phase}__{param}"


def library_text(phases_yaml: str, q_range: tuple[float, float] | None = None, npt: int | None = None) -> str:
    """The phase-library text actually simulated: the file, with its q grid overridden if asked.

    Parameters
    ----------
    phases_yaml : str
        Path or URL of the phase-library YAML.
    q_range : (float, float), optional
        Replace ``q_grid.min``/``q_grid.max`` [1/Å].
    npt : int, optional
        Replace ``q_grid.npt``.

    Returns
    -------
    str
        YAML text (the file verbatim when nothing is overridden).
    """
    lib = PhaseLibrary.load(phases_yaml)  # validates, with every problem listed
    if q_range is None and npt is None:
        return lib.text
    data = yaml.safe_load(lib.text)
    grid = dict(data["q_grid"])
    if q_range is not None:
        lo, hi = (float(v) for v in q_range)
        if not 0 < lo < hi:
            raise ConfigError(f"q range {q_range} is not increasing and positive; give LO < HI in 1/Å")
        grid.update(min=lo, max=hi)
    if npt is not None:
        grid["npt"] = int(npt)
    data["q_grid"] = grid
    return yaml.safe_dump(data, sort_keys=False)


def _load(text: str, base_dir: str | None, source: str = "phase library") -> PhaseLibrary:
    return PhaseLibrary.from_text(text, base_dir=base_dir, source=source)


def _simulate_block(text: str, base_dir: str | None, n: int, seed: int, block: int,
                    labels: list[tuple[str, str]]) -> np.ndarray:
    """Simulate one block; returns ``(n, npt + n_labels)`` float64 (patterns then labels)."""
    lib = _load(text, base_dir)
    rng = np.random.default_rng([seed, block])
    sampled = lib.sample(n, rng)
    patterns = lib.simulate(sampled, rng)
    cols = [np.asarray(sampled[p][k], dtype=np.float64)[:, None] for p, k in labels]
    return np.concatenate([patterns.astype(np.float64), *cols], axis=1)


def make_library(phases_yaml: str, out_url: str, *, n: int, q_range: tuple[float, float] | None = None,
                 npt: int | None = None, seed: int = 0, block: int = BLOCK, client=None) -> str:
    """Simulate a PQ-Net training library and write it as a zarr store.

    Parameters
    ----------
    phases_yaml : str
        Path or URL of the phase-library YAML (shared/DESIGN.md "Phase library").
    out_url : str
        Destination store URL.
    n : int
        Number of patterns.
    q_range : (float, float), optional
        Override the library's q range [1/Å].
    npt : int, optional
        Override the library's number of q points.
    seed : int
        Seed of the whole library; block ``i`` uses ``default_rng([seed, i])``.
    block : int
        Samples per Dask task and per zarr chunk.
    client : distributed.Client, optional
        Dask client to run on; the current/default scheduler otherwise.

    Returns
    -------
    str
        ``out_url``.

    Examples
    --------
    >>> make_library("xrdscale/data/phases/nca.yaml", "/tmp/nca-lib.zarr", n=4000)  # doctest: +SKIP
    """
    if n < 1:
        raise ConfigError(f"library size n={n}; give a positive number of patterns")
    text = library_text(phases_yaml, q_range, npt)
    base_dir = _dirname(phases_yaml)
    lib = _load(text, base_dir, storage.redact(phases_yaml))
    q = lib.q
    labels = lib.label_names()
    block = max(1, min(int(block), n))
    sizes = [min(block, n - i) for i in range(0, n, block)]
    width = q.size + len(labels)
    parts = [da.from_delayed(dask.delayed(_simulate_block)(text, base_dir, s, seed, i, labels),
                             shape=(s, width), dtype=np.float64) for i, s in enumerate(sizes)]
    table = da.concatenate(parts, axis=0)
    data: dict[str, tuple[tuple[str, ...], da.Array]] = {
        "patterns": (("sample", "q"), table[:, :q.size].astype(np.float32))}
    for j, (phase, param) in enumerate(labels):
        data[label_var(phase, param)] = (("sample",), table[:, q.size + j])
    ds = xr.Dataset(data, coords={"q": ("q", q), "sample": np.arange(n)})
    ds.attrs.update(phases_yaml=text, labels=json.dumps([list(x) for x in labels]), block=block, seed=seed,
                    intensity_unit=INTENSITY_UNIT)
    config = {"phases": storage.redact(phases_yaml), "n": n, "q_range": q_range, "npt": int(q.size),
              "seed": seed, "block": block, "intensity_unit": INTENSITY_UNIT}
    logger.info("simulating %d patterns (%d blocks of %d) from %s", n, len(sizes), block, phases_yaml)
    ctx = client.as_current() if client is not None else contextlib.nullcontext()
    with ctx:
        storage.write_store(ds, out_url, stage=STAGE, config=config,
                            encoding={"patterns": {"chunks": (block, q.size)}})
    return out_url


def open_library(url: str) -> tuple[xr.Dataset, list[tuple[str, str]]]:
    """Open a complete library store and return it with its label list."""
    ds = storage.open_store(url, stage=STAGE)
    labels = [(str(p), str(k)) for p, k in json.loads(ds.attrs["labels"])]
    return ds, labels


def _dirname(path: str) -> str:
    """Folder of a path or URL (what relative paths in a phase library refer to)."""
    return path.rstrip("/").rsplit("/", 1)[0] if storage.is_remote(path) else os.path.dirname(os.path.abspath(path))
