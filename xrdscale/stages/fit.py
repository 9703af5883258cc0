"""Conventional full-profile fitting: the baseline PQ-Net is judged against.

A whole-pattern least-squares fit with the same pattern model as the simulator and the
training libraries (:mod:`xrdscale.physics.pattern`), parameterised by a phase library:
per phase a scale factor and, where the library gives ranges, lattice parameters and
crystallite size; plus a Chebyshev background. Scale factors and background enter
linearly and are solved exactly (bounded linear least squares, scales ≥ 0) for every
trial of the non-linear parameters (variable projection), which are refined with a
trust-region method inside the library's ranges. It is what a Rietveld refinement of
scale, cell and size does, minus the structural parameters, and it is slow — seconds per
pattern — which is the point of PQ-Net.

:func:`fit_maps` is the ``fit`` stage: the same model in torch (:mod:`xrdscale.fitting`), fitted
by a Levenberg–Marquardt that steps all pixels of a Dask task together, from PQ-Net's
predictions (a model registry entry) or the library's midpoints, to a ``maps`` store with
standard errors, Rwp, χ²/dof, the convergence flag and the iterations per pixel.
:func:`fit_compare` compares two maps stores (a fit and PQ-Net, or two fits).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import numpy as np
import xarray as xr
from pydantic import Field
from scipy import optimize

from xrdscale.config import one_of
from xrdscale.exceptions import ConfigError, InputError
from xrdscale.io import storage
from xrdscale.physics.pattern import simulate_patterns
from xrdscale.physics.phaselib import PhaseLibrary
from xrdscale.stages.base import StageConfig, guarded, runtime_field, write_output

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    """Refined parameters of one pattern.

    Attributes
    ----------
    labels : dict
        ``{phase: {param: value}}`` in the units of the phase library (scale, a, c, size_nm).
    background : ndarray
        Chebyshev coefficients of the background.
    rwp : float
        Weighted profile R factor ``sqrt(Σ w (y − ŷ)² / Σ w y²)`` with Poisson weights.
    success : bool
        Whether the optimiser converged.
    """

    labels: dict[str, dict[str, float]]
    background: np.ndarray
    rwp: float
    success: bool


#: Floor of the Poisson weights, relative to the pattern's mean intensity.
WEIGHT_FLOOR = 1e-3


def poisson_weights(y: np.ndarray) -> np.ndarray:
    """Weights ``1/sqrt(y)`` of a pattern in absolute units (∝ Poisson weights ``1/sqrt(counts)``).

    The patterns of the contract are counts times an unknown constant, so the weights are
    proportional to Poisson weights whatever that constant; the floor (``WEIGHT_FLOOR`` of the
    mean intensity) is relative too, so a pattern ``k`` times stronger fits to ``k`` times the
    scale factors with the same lattice parameters and R factor.
    """
    y = np.asarray(y, dtype=float)
    mean = float(np.mean(np.abs(y))) if y.size else 0.0
    floor = WEIGHT_FLOOR * mean if mean > 0 else 1.0
    return 1.0 / np.sqrt(np.clip(y, floor, None))


def _nonlinear_keys(lib: PhaseLibrary) -> list[tuple[str, str, tuple[float, float]]]:
    keys = []
    for name, p in lib.spec.phases.items():
        for key in ("a", "c", "size_nm"):
            rng = getattr(p, key)
            if rng is not None and rng[1] > rng[0]:
                keys.append((name, key, (float(rng[0]), float(rng[1]))))
    return keys


def fit_pattern(lib: PhaseLibrary, q: np.ndarray, y: np.ndarray, *, order: int | None = None,
                max_nfev: int = 200) -> FitResult:
    """Fit one pattern with the phases of ``lib``.

    Parameters
    ----------
    lib : PhaseLibrary
        Phases, ranges, wavelength and instrument.
    q, y : ndarray
        The pattern on its q grid (any grid inside the library's q range).
    order : int, optional
        Chebyshev order of the background (default: the library's).
    max_nfev : int
        Budget of evaluations of the non-linear parameters.

    Returns
    -------
    FitResult
    """
    q = np.asarray(q, dtype=float)
    y = np.asarray(y, dtype=float)
    if q.shape != y.shape or q.ndim != 1:
        raise InputError(f"q and pattern must be 1D of equal length, got {q.shape} and {y.shape}")
    if not np.isfinite(y).all():
        raise InputError("pattern contains NaN or infinite values; mask or drop those points before fitting")
    order = lib.spec.background.chebyshev_order if order is None else order
    keys = _nonlinear_keys(lib)
    lo = np.array([r[0] for *_, r in keys])
    hi = np.array([r[1] for *_, r in keys])
    weight = poisson_weights(y)
    x = 2 * (q - q[0]) / (q[-1] - q[0]) - 1
    cheb = np.polynomial.chebyshev.chebvander(x, order)
    names = lib.phase_names
    instrument = lib.instrument_model()

    def design(theta: np.ndarray) -> np.ndarray:
        cols = []
        for name, phase in zip(names, lib.phases):
            params = {"scale": np.ones(1)}
            params.update({k: np.array([theta[i]]) for i, (n, k, _) in enumerate(keys) if n == name})
            cols.append(simulate_patterns(q, [phase], {name: params}, instrument)[0].astype(float))
        return np.column_stack(cols + [cheb])

    def linear(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = design(theta)
        lb = np.r_[np.zeros(len(names)), np.full(order + 1, -np.inf)]
        sol = optimize.lsq_linear(a * weight[:, None], y * weight, bounds=(lb, np.inf), method="bvls")
        return sol.x, a @ sol.x

    def residual(theta: np.ndarray) -> np.ndarray:
        return (y - linear(theta)[1]) * weight

    theta0 = 0.5 * (lo + hi)
    if keys:
        res = optimize.least_squares(residual, theta0, bounds=(lo, hi), x_scale=(hi - lo) / 4,
                                     diff_step=1e-3, max_nfev=max_nfev)
        theta, success = res.x, bool(res.success)
    else:
        theta, success = theta0, True
    coef, model = linear(theta)
    labels: dict[str, dict[str, float]] = {n: {"scale": float(coef[i])} for i, n in enumerate(names)}
    for i, (n, k, _) in enumerate(keys):
        labels[n][k] = float(theta[i])
    rwp = float(np.sqrt(np.sum((weight * (y - model)) ** 2) / np.sum((weight * y) ** 2)))
    return FitResult(labels=labels, background=coef[len(names):], rwp=rwp, success=success)


def fit_patterns(lib: PhaseLibrary, q: np.ndarray, patterns: np.ndarray, **kwargs) -> list[FitResult]:
    """Fit each row of ``patterns`` (N, npt) with :func:`fit_pattern`."""
    return [fit_pattern(lib, q, p, **kwargs) for p in np.atleast_2d(patterns)]


# -- the fit stage -------------------------------------------------------------------------

#: Map variable of each fitted phase parameter.
MAP_VARS = {"scale": "scale", "a": "a", "c": "c", "size_nm": "size"}
#: Target number of floats of one input chunk read by a task.
CHUNK_FLOATS = 4_000_000

Start = Annotated[str, one_of(("auto", "model", "midpoint"), "start")]
Weights = Annotated[str, one_of(("auto", "poisson", "counts", "noise"), "weights")]
Device = Annotated[str, one_of(("auto", "cpu", "cuda"), "device")]


class FitConfig(StageConfig):
    """Settings of the ``fit`` stage (``pipeline.fit`` of a campaign)."""

    stage: ClassVar[str] = "fit"

    max_iterations: int = Field(100, ge=1, le=10_000, description="most Levenberg-Marquardt steps per pixel "
                                                                  "(a pixel still moving then is flagged "
                                                                  "not converged)")
    tol: float = Field(1e-4, gt=0, lt=1, description="relative change of chi2 of a step that counts as converged")
    start: Start = Field("auto", description="start values: model (PQ-Net predictions), midpoint (the "
                                             "library's midpoints), auto (model when a model is given)")
    background_order: int | None = Field(None, ge=0, le=8, description="Chebyshev order of the background "
                                                                        "(default: the library's)")
    weights: Weights = Field("auto", description="least-squares weights: poisson (1/counts: integrated "
                                                 "patterns), counts (Poisson, the intensity per count "
                                                 "estimated per pixel: counts in any unit), noise (one "
                                                 "weight per pixel from its own noise: reconstructed "
                                                 "volumes, whose values are not counts), auto (noise for a "
                                                 "(y, x, q) volume, poisson for (frame, q) patterns)")
    starts: int = Field(8, ge=1, le=256, description="lattice start candidates per phase, screened by chi2 "
                                                      "before the fit (the given start and quasi-random points "
                                                      "of the box; 1: the given start only)")
    sample: float = Field(1.0, gt=0, le=1, description="fit this random fraction of the pixels (seeded; the "
                                                      "others are NaN and not converged): a check of PQ-Net on a "
                                                      "sample costs that fraction of a full fit")
    seed: int = Field(0, description="seed of the pixel sample")
    min_scale: dict[str, float] = Field(default_factory=dict, description="fit only the pixels where PQ-Net "
                                        "predicts at least this scale of each phase named, e.g. {NCA: 0.3} (an ROI "
                                        "where a phase is strong; needs a model start); the others are NaN")
    enabled: bool = Field(False, description="campaign: fit every dataset after analyse and compare the fit with "
                                             "PQ-Net in the report")
    batch: int = runtime_field(256, "pixels per Dask task", ge=1)
    block: int = runtime_field(64, "pixels per Jacobian evaluation (bounds memory)", ge=1)
    device: Device = runtime_field("cpu", "torch device of the fit (auto: CUDA when it works)")
    threads: int = runtime_field(1, "torch threads per task", ge=1)


@dataclass(frozen=True)
class _Source:
    lib: PhaseLibrary
    text: str
    base_dir: str | None
    q: np.ndarray
    model_url: str | None
    model_id: str | None
    routes: tuple[tuple[str, str], ...]


def _is_model(url: str) -> bool:
    return storage.exists(storage.join(url, "model.json"))


def _resolve(source: str, phases: str | PhaseLibrary | None, start: str,
             library: PhaseLibrary | None = None) -> _Source:
    """The phase library, q grid and (optional) model of ``source`` and ``phases`` (or ``library``)."""
    given: PhaseLibrary | None = None
    if isinstance(phases, PhaseLibrary):
        given = phases
    elif phases is not None:
        given = PhaseLibrary.load(phases)
    if _is_model(source):
        from xrdscale.pqnet.registry import open_entry

        entry = open_entry(source)
        if given is None and library is not None and library.text == entry.phases_yaml:
            given = library       # the model's own library, loaded from its folder: relative paths resolve
        lib = given or PhaseLibrary.from_text(entry.phases_yaml, source=f"phases of model {storage.redact(source)}")
        if list(entry.spec.phases) != lib.phase_names:
            raise InputError(f"model {storage.redact(source)} predicts phases {list(entry.spec.phases)} but the "
                             f"phase library {lib.source} has {lib.phase_names}; give the library the model was "
                             "trained on (or leave --phases out to use the model's)")
        model_url: str | None = source if start != "midpoint" else None
        return _Source(lib, lib.text, lib.base_dir, np.asarray(entry.q, dtype=float), model_url, entry.id,
                       tuple(entry.spec.routes))
    if start == "model":
        raise ConfigError(f"start='model' needs a PQ-Net model registry entry; {storage.redact(source)} is not one "
                          "(no model.json): give a model or use start='midpoint'")
    if given is not None:
        raise ConfigError("give the phase library either as SOURCE or as --phases (with a model), not both")
    if not storage.exists(source):
        raise InputError(f"{storage.redact(source)} does not exist; give a model registry entry (with model.json) "
                         "or a phase-library YAML")
    lib = PhaseLibrary.load(source)
    return _Source(lib, lib.text, lib.base_dir, lib.q, None, None, ())


@functools.lru_cache(maxsize=4)
def _pattern_model(text: str, base_dir: str | None, q: bytes, order: int | None, device: str) -> Any:
    from xrdscale.fitting.torch_model import PatternModel

    lib = PhaseLibrary.from_text(text, base_dir=base_dir)
    return PatternModel(lib, np.frombuffer(q, dtype=np.float64), order=order, device=device)


@functools.lru_cache(maxsize=2)
def _ensemble(model_url: str) -> Any:
    from xrdscale.pqnet.engine import Ensemble
    from xrdscale.pqnet.registry import open_entry

    entry = open_entry(model_url)
    return Ensemble([entry.load_member(i) for i in range(len(entry.members))], engine="torch", device="cpu")


def _fit_block(block: np.ndarray, chosen: np.ndarray, hi: np.ndarray | None, w: np.ndarray | None,
               src: dict[str, Any], cfg: dict[str, Any], device: str, nout: int) -> np.ndarray:
    """Fit the chosen pixels of one chunk; returns ``(*pixels, nout)`` float64 (see :func:`_columns`).

    Pixels left out of the sample (``chosen`` false) are NaN: the fit treats them as empty.
    """
    from xrdscale.fitting.batch import fit_batch
    from xrdscale.runtime.devices import torch_threads

    pix_shape = block.shape[:-1]
    x = np.asarray(block, dtype=np.float64).reshape(-1, block.shape[-1])
    x = np.where(np.asarray(chosen).reshape(-1, 1), x, np.nan)
    if hi is not None and w is not None:
        x = x[:, hi - 1] * (1 - w) + x[:, hi] * w
    with torch_threads(int(cfg["threads"]) if device == "cpu" else None):
        model = _pattern_model(src["text"], src["base_dir"], src["q"], cfg["background_order"], device)
        start = None
        if src["model_url"] is not None:
            start = np.full((x.shape[0], model.n_params), np.nan)
            ok = np.isfinite(x).all(axis=1)
            if ok.any():
                mean, _ = _ensemble(src["model_url"]).predict(x[ok].astype(np.float32))
                for r, (phase, key) in enumerate(src["routes"]):
                    j = model.index(phase, key)
                    if j is not None and not model.params[j].linear:
                        start[ok, j] = mean[:, r]
                strong = np.ones(mean.shape[0], dtype=bool)
                for phase, least in dict(cfg["min_scale"]).items():
                    strong &= mean[:, list(src["routes"]).index((phase, "scale"))] >= float(least)
                rows = np.flatnonzero(ok)[~strong]
                x[rows] = np.nan
        res = fit_batch(model, x, start, max_iterations=int(cfg["max_iterations"]), tol=float(cfg["tol"]),
                        block=int(cfg["block"]), weights=str(cfg["weights_used"]),
                        starts=int(cfg["starts"]), seed=int(cfg["seed"]))
    out = np.concatenate([res.params, res.std, res.rwp[:, None], res.chi2[:, None],
                          res.converged[:, None].astype(float), res.iterations[:, None].astype(float)], axis=1)
    assert out.shape[1] == nout
    return out.reshape(*pix_shape, nout)


def _pixels(ds: xr.Dataset, what: str) -> tuple[xr.DataArray, tuple[str, ...]]:
    stage = ds.attrs.get("stage")
    if "intensity" not in ds or "q" not in ds.coords:
        raise InputError(f"{what} ({stage!r} store) has no intensity(…, q); give a volume (y, x, q) or patterns "
                         "(frame, q) store")
    inten = ds["intensity"]
    pix_dims = tuple(map(str, inten.dims[:-1]))
    if inten.dims[-1] != "q" or pix_dims not in (("y", "x"), ("frame",)):
        raise InputError(f"{what}: intensity has dims {inten.dims}; expected (y, x, q) or (frame, q)")
    return inten, pix_dims


def fit_maps(source: str, data: str, out: str, *, config: FitConfig | Mapping[str, Any] | None = None,
             phases: str | PhaseLibrary | None = None, library: PhaseLibrary | None = None, client: Any = None,
             progress: bool = True, **settings: Any) -> str:
    """Full-profile fits of every pixel of a ``patterns`` or ``volume`` store, as a ``maps`` store.

    Parameters
    ----------
    source : str
        A PQ-Net model registry entry (with ``model.json``: its phase library, its q grid and its
        predictions as start values) or a phase-library YAML (its q grid; midpoint starts).
    data : str
        A ``patterns`` (frame, q) or ``volume`` (y, x, q) store covering the q grid of ``source``.
    out : str
        Destination ``maps`` store: ``scale``, ``a``, ``c``, ``size`` (phase, pixels) and their
        ``_std``, ``rwp``, ``chi2`` (χ²/dof), ``converged`` (bool), ``iterations`` on the input's
        pixel dims; NaN where a phase has no such parameter and for empty pixels.
    config : FitConfig or mapping, optional
        Settings; keyword ``settings`` of the same names override it.
    phases : str or PhaseLibrary, optional
        With a model: the phase library to fit with (its phases must be the model's).
    library : PhaseLibrary, optional
        With a model: its training library already loaded from its own folder, used when its
        text is the model's (so CIF and calibrant paths relative to the YAML resolve; a
        campaign passes its spec's library); otherwise ignored.
    client : distributed.Client, optional
        Dask client (one task per ``batch`` pixels).
    progress : bool
        Show progress.

    Returns
    -------
    str
        ``out``.

    Raises
    ------
    InputError
        The model's phases differ from ``phases``'; the data's q range does not cover the fit's
        q grid; every pixel is empty (all NaN or all zero).
    """
    from xrdscale.pqnet.predict import interpolation
    from xrdscale.runtime.devices import resolve_device

    cfg = FitConfig.build(config, **settings)

    def body() -> str:
        src = _resolve(source, phases, cfg.start, library)
        ds = storage.open_store(data)
        what = f"{ds.attrs.get('stage') or 'input'} store {storage.redact(data)}"
        inten, pix_dims = _pixels(ds, what)
        q_data = np.asarray(ds["q"].values, dtype=np.float64)
        hi: np.ndarray | None
        w: np.ndarray | None
        if q_data.shape == src.q.shape and np.allclose(q_data, src.q, rtol=0, atol=1e-9):
            hi = w = None
        else:
            hi, w = interpolation(q_data, src.q, what)
        arr = inten.data
        nonempty = bool(storage_compute((np.isfinite(arr) & (arr != 0)).any(), client))
        if not nonempty:
            raise InputError(f"{what}: every pattern is empty (all NaN or all zero); nothing to fit")
        scale_routes = {p for p, k in src.routes if k == "scale"}
        if cfg.min_scale and (src.model_url is None or not set(cfg.min_scale) <= scale_routes):
            raise ConfigError(f"min_scale {cfg.min_scale} selects pixels by PQ-Net's predicted scales: it needs a "
                              "model start (a model registry entry, start auto or model) that predicts the scale "
                              f"of each phase named (this one predicts {sorted(scale_routes) or 'none'})")
        device = resolve_device(cfg.device, what="fit")
        weights = cfg.weights if cfg.weights != "auto" else ("noise" if pix_dims == ("y", "x") else "poisson")
        model = _pattern_model(src.text, src.base_dir, src.q.tobytes(), cfg.background_order, "cpu")
        n_par = model.n_params
        nout = 2 * n_par + 4
        nq = arr.shape[-1]
        per = max(1, min(cfg.batch, CHUNK_FLOATS // nq))
        if len(pix_dims) == 2:
            rows = max(1, per // arr.shape[1])
            arr = arr.rechunk((min(rows, arr.shape[0]), arr.shape[1] if rows > 1 else min(per, arr.shape[1]), nq))
        else:
            arr = arr.rechunk((min(per, arr.shape[0]), nq))
        import dask.array as da

        src_d = {"text": src.text, "base_dir": src.base_dir, "q": src.q.tobytes(), "model_url": src.model_url,
                 "routes": src.routes}
        chosen = np.random.default_rng(cfg.seed).random(arr.shape[:-1]) < cfg.sample
        chosen_d = da.from_array(chosen[..., None], chunks=(*arr.chunks[:-1], (1,)))
        pred = da.map_blocks(_fit_block, arr, chosen_d, hi, w, src_d, {**cfg.model_dump(), "weights_used": weights},
                             device, nout,
                             dtype=np.float64, chunks=(*arr.chunks[:-1], (nout,)))
        maps = _assemble(pred, model, pix_dims, ds)
        maps.attrs.update(source=storage.redact(data), fit_source=storage.redact(source), model_id=src.model_id or "",
                          parameters=[p.name for p in model.params])
        record = {**cfg.record(), "source": storage.redact(source), "model_id": src.model_id,
                  "input": storage.redact(data), "device_used": device, "weights_used": weights,
                  "start_used": "model" if src.model_url else "midpoint"}
        return write_output(maps, out, kind="maps", config=record, client=client, progress=progress, label="fit")

    return guarded(out, body)


def storage_compute(value: Any, client: Any) -> Any:
    """Compute a small Dask value on the client (or the local scheduler)."""
    if client is not None:
        return client.compute(value).result()
    return value.compute()


def _assemble(pred: Any, model: Any, pix_dims: tuple[str, ...], ds: xr.Dataset) -> xr.Dataset:
    """The maps variables of the ``(…, 2P + 4)`` result array."""
    import dask.array as da

    n_par = model.n_params
    nan = da.full(pred.shape[:-1], np.nan, dtype=np.float32, chunks=pred.chunks[:-1])
    data: dict[str, Any] = {}
    for key, var in MAP_VARS.items():
        for suffix, off in (("", 0), ("_std", n_par)):
            layers = []
            for name in model.lib.phase_names:
                j = model.index(name, key)
                layers.append(pred[..., j + off].astype(np.float32) if j is not None else nan)
            data[var + suffix] = (("phase", *pix_dims), da.stack(layers, axis=0))
    data["rwp"] = (pix_dims, pred[..., 2 * n_par].astype(np.float32))
    data["chi2"] = (pix_dims, pred[..., 2 * n_par + 1].astype(np.float32))
    data["converged"] = (pix_dims, pred[..., 2 * n_par + 2] > 0.5)
    data["iterations"] = (pix_dims, pred[..., 2 * n_par + 3].astype(np.int32))
    coords: dict[str, Any] = {"phase": list(model.lib.phase_names)}
    for name, c in ds.coords.items():
        if name != "q" and set(c.dims) <= set(pix_dims):
            coords[str(name)] = c
    return xr.Dataset(data, coords=coords)


# -- comparing two maps stores ---------------------------------------------------------------

class FitCompareConfig(StageConfig):
    """Settings of ``fit compare``."""

    stage: ClassVar[str] = "fit-compare"

    sigma: float = Field(2.0, gt=0, description="a pixel disagrees when |a - b| > sigma * sqrt(std_a^2 + std_b^2)")


#: Per-phase variables compared, and per-pixel ones.
COMPARE_PHASE = ("scale", "a", "c", "size")
COMPARE_PIXEL = ("rwp", "chi2")


def fit_compare(maps_a: str, maps_b: str, out: str, *, config: FitCompareConfig | Mapping[str, Any] | None = None,
                client: Any = None, progress: bool = True, **settings: Any) -> str:
    """Difference maps ``<name>_diff`` (a − b) of two maps stores and a summary table ``compare.csv``.

    Parameters
    ----------
    maps_a, maps_b : str
        ``maps`` stores over the same phases and pixels (e.g. ``fit`` and ``analyse`` of one input).
    out : str
        Destination zarr store (kind ``fit-compare``); ``compare.csv`` inside it has one row per
        phase and parameter: ``n`` (pixels where both are finite), ``bias`` (mean a − b),
        ``mae`` (mean |a − b|) and ``frac_outside`` (the fraction with
        ``|a − b| > sigma·sqrt(std_a² + std_b²)``; NaN where no std is known).
    config : FitCompareConfig or mapping, optional
        ``sigma``.
    client, progress
        Unused (the maps are read whole); accepted as by every stage.

    Returns
    -------
    str
        ``out``.

    Raises
    ------
    InputError
        The stores differ in phases or pixel dims.
    """
    import pandas as pd

    cfg = FitCompareConfig.build(config, **settings)

    def body() -> str:
        a = storage.open_store(maps_a).load()
        b = storage.open_store(maps_b).load()
        for url, ds in ((maps_a, a), (maps_b, b)):
            if "scale" not in ds.data_vars or "phase" not in ds.coords:
                raise InputError(f"{storage.redact(url)} is not a maps store (no scale (phase, …)); give two maps "
                                 "stores from `xrdscale fit run` or `xrdscale analyse`")
        pa, pb = [str(v) for v in a["phase"].values], [str(v) for v in b["phase"].values]
        if pa != pb:
            raise InputError(f"the maps stores have different phases: {pa} and {pb}")
        if a["scale"].dims != b["scale"].dims or a["scale"].shape != b["scale"].shape:
            raise InputError(f"the maps stores have different pixels: scale {dict(a['scale'].sizes)} and "
                             f"{dict(b['scale'].sizes)}")
        data: dict[str, Any] = {}
        rows = []
        for var in (*COMPARE_PHASE, *COMPARE_PIXEL):
            if var not in a.data_vars or var not in b.data_vars:
                continue
            diff = (a[var].astype(np.float64) - b[var].astype(np.float64)).astype(np.float32)
            data[f"{var}_diff"] = diff
            std_a = a.get(f"{var}_std")
            std_b = b.get(f"{var}_std")
            for phase in (pa if "phase" in diff.dims else [None]):
                sel = {"phase": phase} if phase is not None else {}
                d = np.asarray(diff.sel(sel).values, dtype=np.float64).ravel()
                ok = np.isfinite(d)
                frac = np.nan
                if std_a is not None and std_b is not None:
                    sd = np.sqrt(np.asarray(std_a.sel(sel).values, dtype=np.float64).ravel() ** 2
                                 + np.asarray(std_b.sel(sel).values, dtype=np.float64).ravel() ** 2)
                    both = ok & np.isfinite(sd)
                    if both.any():
                        frac = float(np.mean(np.abs(d[both]) > cfg.sigma * sd[both]))
                rows.append({"phase": phase or "", "parameter": var, "n": int(ok.sum()),
                             "bias": float(d[ok].mean()) if ok.any() else np.nan,
                             "mae": float(np.abs(d[ok]).mean()) if ok.any() else np.nan, "frac_outside": frac})
        table = pd.DataFrame(rows, columns=["phase", "parameter", "n", "bias", "mae", "frac_outside"])
        coords = {k: v for k, v in a.coords.items()}
        result = xr.Dataset(data, coords=coords)
        result.attrs.update(maps_a=storage.redact(maps_a), maps_b=storage.redact(maps_b))
        record = {**cfg.record(), "maps_a": storage.redact(maps_a), "maps_b": storage.redact(maps_b)}
        storage.create_store(result, out, stage="fit-compare", config=record)
        storage.write_bytes(storage.join(out, "compare.csv"), table.to_csv(index=False).encode())
        storage.mark_complete(out, {"stage": "fit-compare"})
        logger.info("wrote fit-compare store %s", storage.redact(out))
        return out

    return guarded(out, body)


def read_compare(url: str) -> Any:
    """The ``compare.csv`` table of a ``fit-compare`` store as a pandas DataFrame."""
    import io

    import pandas as pd

    return pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(url, "compare.csv"))))
