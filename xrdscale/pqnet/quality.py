"""Quality maps of PQ-Net predictions: the residual of the implied pattern and an out-of-distribution flag.

Every pixel's ensemble-mean parameters are rendered through the shared pattern model
(:func:`xrdscale.physics.pattern.simulate_patterns`) with the phase library the model was
trained on (the entry's ``phases.yaml``); parameters the model does not predict take the
midpoints of the library's ranges (a peak phase's position and width included). The
Chebyshev background of the library's order is then fitted to the residual by linear least
squares (one pseudo-inverse for all pixels), and

- ``rwp = sqrt(Σ w (y − ŷ)² / Σ w y²)``, ``chi2 = Σ w (y − ŷ)² / (N − P)`` (reduced; ``P`` the
  number of predicted outputs plus background terms) and ``R_exp = sqrt((N − P) / Σ w y²)``;
- weights ``w = 1 / σ²`` with ``σ² = g · max(y, g)``: Poisson statistics of ``y / g`` counts,
  at least one count. Patterns in absolute units (library patterns, reconstructed volumes)
  are not counts, so the gain ``g`` (intensity per count) is estimated for each pattern from
  its own noise floor: the robust (median) spread of the second difference of the residual,
  ``var(Δ²r) ≈ 6 σ²``. For a reconstructed volume this is an approximation (its noise is not
  Poisson and is correlated along q after interpolation), the same one for the data and for
  the held-out reference below, so the flags are calibrated on what they are applied to.
  ``rwp`` does not depend on ``g`` except through the one-count floor.

``ood`` is a bit mask per pixel (:data:`OOD_BITS`), phase-independent:

- 1 (``residual``): ``rwp > k · sqrt(R_exp² + R_model² + R_art²)``: the residual is far above
  what the pattern's own noise, the network's typical misfit and the reconstruction's artefacts
  explain. ``R_model`` is the 95th percentile of the misfit ``sqrt(max(rwp² − R_exp², 0))`` of
  held-out library patterns and ``k`` is :attr:`QualitySettings.residual_factor`. ``R_art =
  sqrt(2 Σ w min(y, 0)² / Σ w y²)`` measures a pixel's artefacts from its negative intensities,
  which no diffraction pattern has (FBP's streaks and ringing; twice their power, for artefacts
  as often positive as negative). It is 0 for counts: on the demo's reconstructed volumes,
  whose negative dips dominated rwp (median 1.4 with R_art 1.4), bit 1 went from every
  pixel of the sample to 13 %;
- 2 (``ensemble_spread``): the largest ensemble std over the outputs, each divided by its
  median on the held-out patterns (scale std divided by the pattern's mean intensity, so the
  test does not depend on the data's units), above :attr:`QualitySettings.spread_factor`
  times the 99th percentile of that score on the held-out patterns;
- 4 (``range_edge``): a predicted lattice parameter or crystallite size within
  :attr:`QualitySettings.edge` (1 %) of the width of its library range of a bound, or
  outside it, for a phase that is present (scale / mean intensity at least a tenth of the
  library's mean). Scale factors are not tested: zero is their normal lower bound and their
  units are the data's.

The held-out reference is simulated when the maps are computed (a few hundred library
patterns, fixed seed, through the same ensemble), so it needs nothing stored at training.
Pixels with no intensity get NaN ``rwp``/``chi2`` and ``ood`` 0.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from xrdscale.exceptions import XrdscaleError
from xrdscale.physics.counting import counting_gain
from xrdscale.physics.crystal import AmorphousPeak, Phase
from xrdscale.physics.pattern import Instrument, simulate_patterns
from xrdscale.physics.phaselib import PhaseLibrary, PhaseLibrarySpec, PhaseSpec

logger = logging.getLogger(__name__)

#: Bits of the ``ood`` mask.
OOD_RESIDUAL, OOD_SPREAD, OOD_EDGE = 1, 2, 4
#: Bit → meaning, as stored in the ``ood`` variable's attrs.
OOD_BITS = {OOD_RESIDUAL: "residual", OOD_SPREAD: "ensemble_spread", OOD_EDGE: "range_edge"}
#: Channels :meth:`QualityModel.assess` adds per pixel.
CHANNELS = ("rwp", "chi2", "ood")
#: Percentiles of the held-out reference: misfit (R_model) and spread score.
MODEL_PERCENTILE, SPREAD_PERCENTILE = 95.0, 99.0
#: Patterns assessed at a time (each needs a few float64 copies of itself).
BLOCK = 1024
#: A phase is present (its lattice edges are tested) above this fraction of the library's mean scale.
PRESENT_FRACTION = 0.1


@dataclass(frozen=True)
class QualitySettings:
    """Thresholds of the ``ood`` flag and the size of the held-out reference (see the module docstring).

    Parameters
    ----------
    residual_factor : float
        ``k`` of bit 1: flag ``rwp > k · sqrt(R_exp² + R_model² + R_art²)``.
    spread_factor : float
        Bit 2: flag a spread score above this times its held-out 99th percentile.
    edge : float
        Bit 4: fraction of a library range's width that counts as its edge.
    reference : int
        Held-out library patterns simulated for the reference levels.
    seed : int
        Seed of the held-out patterns.
    """

    residual_factor: float = 2.0
    spread_factor: float = 1.5
    edge: float = 0.01
    reference: int = 512
    seed: int = 12345


@dataclass(frozen=True)
class QualityModel:
    """What a Dask task needs to render the implied patterns and flag them (picklable, small)."""

    q: np.ndarray
    phases: tuple[Phase | AmorphousPeak, ...]
    instrument: Instrument
    routes: tuple[tuple[str, str], ...]
    fixed: Mapping[str, Mapping[str, float]]
    ranges: Mapping[int, tuple[float, float]]
    present: Mapping[int, tuple[int, float]]
    bg_order: int
    settings: QualitySettings = QualitySettings()
    model_rwp: float = 0.0
    spread_ref: tuple[float, ...] | None = None
    spread_limit: float = float("inf")
    reference: dict[str, float] = field(default_factory=dict)

    # -- rendering ------------------------------------------------------------------------
    def render(self, mean: np.ndarray) -> np.ndarray:
        """Noise-free patterns ``(n, npt)`` (no background) implied by the predictions ``mean`` ``(n, R)``."""
        mean = np.asarray(mean, dtype=np.float64)
        params: dict[str, dict[str, Any]] = {}
        for ph in self.phases:
            d: dict[str, Any] = dict(self.fixed.get(ph.name, {}))
            for j, (p, k) in enumerate(self.routes):
                if p != ph.name:
                    continue
                v = mean[:, j]
                if k in ("a", "c"):
                    v = np.maximum(v, 1e-2)      # a wild prediction must not break the pattern model
                elif k == "size_nm":
                    v = np.maximum(v, 1.0)
                d[k] = v
            params[ph.name] = d
        return simulate_patterns(self.q, self.phases, params, self.instrument).astype(np.float64)

    # -- statistics -----------------------------------------------------------------------
    def statistics(self, patterns: np.ndarray, mean: np.ndarray,
                   artefacts: bool = False) -> tuple[np.ndarray, ...]:
        """``rwp``, ``chi2`` and ``R_exp`` of each pattern ``(n, npt)`` against its implied pattern.

        With ``artefacts``, also ``R_art`` (see the module docstring) as a fourth array.
        """
        y = np.asarray(patterns, dtype=np.float64)
        resid = y - self.render(mean)
        x = 2 * (self.q - self.q[0]) / (self.q[-1] - self.q[0]) - 1
        vander = np.polynomial.chebyshev.chebvander(x, self.bg_order)          # (npt, k+1)
        resid -= (resid @ np.linalg.pinv(vander).T) @ vander.T                  # least-squares background
        gain = counting_gain(y, resid)
        w = 1.0 / (gain * np.maximum(y, gain))
        dof = max(y.shape[1] - len(self.routes) - (self.bg_order + 1), 1)
        wy2 = (w * y ** 2).sum(axis=1)
        wr2 = (w * resid ** 2).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            empty = ~(wy2 > 0)
            rwp = np.where(empty, np.nan, np.sqrt(wr2 / wy2))
            rexp = np.where(empty, np.nan, np.sqrt(dof / wy2))
        chi2 = np.where(empty, np.nan, wr2 / dof)
        if not artefacts:
            return rwp, chi2, rexp
        with np.errstate(divide="ignore", invalid="ignore"):
            rart = np.where(empty, np.nan, np.sqrt(2 * (w * np.minimum(y, 0.0) ** 2).sum(axis=1) / wy2))
        return rwp, chi2, rexp, rart

    def spread_score(self, patterns: np.ndarray, std: np.ndarray) -> np.ndarray:
        """Largest ensemble std over the outputs, each over its held-out median (scale std per mean intensity)."""
        rel = _relative_std(patterns, std, self.routes)
        ref = np.asarray(self.spread_ref if self.spread_ref is not None else np.ones(len(self.routes)))
        return (rel / ref).max(axis=1)

    def assess(self, patterns: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        """``(n, 3)`` float64 of ``rwp``, ``chi2`` and the ``ood`` bit mask of each pattern.

        Evaluated in blocks of :data:`BLOCK` patterns, so a task's memory stays bounded.
        """
        if len(patterns) > BLOCK:
            return np.concatenate([self.assess(patterns[s:s + BLOCK], mean[s:s + BLOCK], std[s:s + BLOCK])
                                   for s in range(0, len(patterns), BLOCK)])
        rwp, chi2, rexp, rart = self.statistics(patterns, mean, artefacts=True)
        s = self.settings
        ood = np.zeros(len(rwp), dtype=np.int64)
        with np.errstate(invalid="ignore"):
            floor = np.sqrt(rexp ** 2 + self.model_rwp ** 2 + rart ** 2)
            ood |= np.where(rwp > s.residual_factor * floor, OOD_RESIDUAL, 0)
            ood |= np.where(self.spread_score(patterns, std) > s.spread_factor * self.spread_limit, OOD_SPREAD, 0)
        ood |= np.where(self._at_edge(patterns, mean), OOD_EDGE, 0)
        ood[~np.isfinite(rwp)] = 0
        return np.stack([rwp, chi2, ood.astype(np.float64)], axis=1)

    def _at_edge(self, patterns: np.ndarray, mean: np.ndarray) -> np.ndarray:
        edge = np.zeros(len(mean), dtype=bool)
        if not self.ranges:
            return edge
        norm = _norm(patterns)
        for j, (lo, hi) in self.ranges.items():
            margin = self.settings.edge * (hi - lo)
            v = mean[:, j]
            out = (v < lo + margin) | (v > hi - margin)
            if j in self.present:
                k, level = self.present[j]
                out &= mean[:, k] / norm >= level
            edge |= out
        return edge

    # -- reference ------------------------------------------------------------------------
    def calibrated(self, patterns: np.ndarray, mean: np.ndarray, std: np.ndarray) -> QualityModel:
        """This model with its reference levels set from held-out library ``patterns`` and their predictions."""
        rel = _relative_std(patterns, std, self.routes)
        ref = np.maximum(np.median(rel, axis=0), 1e-12)
        base = dataclasses.replace(self, spread_ref=tuple(float(v) for v in ref))
        rwp, _, rexp = base.statistics(patterns, mean)
        ok = np.isfinite(rwp)
        misfit = np.sqrt(np.maximum(rwp[ok] ** 2 - rexp[ok] ** 2, 0.0))
        model_rwp = float(np.percentile(misfit, MODEL_PERCENTILE)) if misfit.size else 0.0
        limit = float(np.percentile(base.spread_score(patterns, std), SPREAD_PERCENTILE))
        reference = {"n": int(len(patterns)), "rwp_median": float(np.median(rwp[ok])) if ok.any() else float("nan"),
                     "rexp_median": float(np.median(rexp[ok])) if ok.any() else float("nan"),
                     "model_rwp": model_rwp, "spread_limit": limit}
        logger.info("quality reference from %d held-out library patterns: median rwp %.4g, median R_exp %.4g, "
                    "R_model %.4g, spread limit %.3g", len(patterns), reference["rwp_median"],
                    reference["rexp_median"], model_rwp, limit)
        return dataclasses.replace(base, model_rwp=model_rwp, spread_limit=limit, reference=reference)

    def attrs(self) -> dict[str, Any]:
        """JSON-serialisable description of the quality maps, for the maps store's attrs."""
        s = self.settings
        return {"quality_weights": "w = 1/(g max(y, g)), g the intensity per count from the noise floor of the "
                                   "second difference of the residual (Poisson statistics of y/g counts)",
                "quality_background_order": int(self.bg_order), "ood_residual_factor": s.residual_factor,
                "ood_spread_factor": s.spread_factor, "ood_edge": s.edge,
                **{f"quality_reference_{k}": v for k, v in self.reference.items()}}


def _norm(patterns: np.ndarray) -> np.ndarray:
    """Each pattern's mean intensity (the network's input normalisation), floored."""
    from xrdscale.pqnet.model import EMPTY_NORM

    return np.maximum(np.asarray(patterns, dtype=np.float64).mean(axis=1), EMPTY_NORM)


def _relative_std(patterns: np.ndarray, std: np.ndarray, routes) -> np.ndarray:
    scale = np.array([k == "scale" for _, k in routes])
    std = np.asarray(std, dtype=np.float64)
    return np.where(scale[None, :], std / _norm(patterns)[:, None], std)


class _ModelLibrary(PhaseLibrary):
    """The model's phase library, with structures it cannot build taken from ``known`` phase objects."""

    def __init__(self, spec: Any, known: Mapping[str, Any], **kwargs: Any) -> None:
        self._known = dict(known)
        super().__init__(spec, **kwargs)

    def _build_structure(self, name: str, p: PhaseSpec) -> Phase | AmorphousPeak:
        if name in self._known:
            return self._known[name]
        return super()._build_structure(name, p)


def model_library(entry: Any, phases: Mapping[str, Any] | None = None,
                  library: PhaseLibrary | None = None) -> PhaseLibrary:
    """The phase library the entry's model was trained on (its ``phases.yaml``).

    ``library``, when its text is the entry's, is that library already loaded from its own
    folder (so paths relative to the YAML, a CIF or a calibrant pattern, resolve). Otherwise
    structures that cannot be built from the text alone are taken from ``phases`` (name →
    phase object).

    Raises
    ------
    XrdscaleError
        The library cannot be rebuilt.
    """
    if library is not None and library.text == entry.phases_yaml:
        return library
    source = f"phase library of model {entry.id}"
    try:
        return PhaseLibrary.from_text(entry.phases_yaml, source=source)
    except XrdscaleError:
        if not phases:
            raise
        spec = PhaseLibrarySpec.model_validate(yaml.safe_load(entry.phases_yaml))  # valid: from_text read it
        return _ModelLibrary(spec, phases, text=entry.phases_yaml, source=source)


def build(entry: Any, phases: Mapping[str, Any] | None = None, settings: QualitySettings | None = None,
          library: PhaseLibrary | None = None) -> tuple[QualityModel, PhaseLibrary] | None:
    """The (uncalibrated) quality model of a registry entry and its library; None (one warning) if impossible."""
    from xrdscale.analysis.fractions import resolve_phases

    settings = settings or QualitySettings()
    try:
        lib = model_library(entry, phases, library)
        instrument = lib.instrument_model()
        objects = dict(zip(lib.phase_names, lib.phases))
        extra = [p for p in entry.spec.phases if p not in objects]
        if extra:  # predicted phases the library lacks: built-in or given structures, no ranges
            objects.update(resolve_phases(extra, phases))
    except XrdscaleError as exc:
        logger.warning("no residual or ood maps for model %s: its phase library cannot be rebuilt (%s)",
                       entry.id, exc)
        return None
    routes = tuple(entry.spec.routes)
    predicted = set(routes)
    fixed: dict[str, dict[str, float]] = {}
    ranges: dict[int, tuple[float, float]] = {}
    for name in objects:
        p = lib.spec.phases.get(name)
        d: dict[str, float] = {}
        if p is None:
            if (name, "scale") not in predicted:
                d["scale"] = 0.0
            fixed[name] = d
            continue
        if (name, "scale") not in predicted:
            d["scale"] = float(np.mean(p.scale))
        for key in ("a", "c", "size_nm"):
            rng = getattr(p, key)
            if rng is not None and (name, key) not in predicted:
                d[key] = float(np.mean(rng))
        if p.peak is not None:
            d["q"], d["fwhm"] = float(np.mean(p.peak.q)), float(np.mean(p.peak.fwhm))
        fixed[name] = d
    index = {r: j for j, r in enumerate(routes)}
    present: dict[int, tuple[int, float]] = {}
    for j, (name, key) in enumerate(routes):
        p = lib.spec.phases.get(name)
        rng = getattr(p, key, None) if p is not None and key in ("a", "c", "size_nm") else None
        if rng is None:
            continue
        ranges[j] = (float(rng[0]), float(rng[1]))
        k = index.get((name, "scale"))
        if k is not None:
            present[j] = (k, PRESENT_FRACTION * float(entry.spec.target_mean[k]))
    qm = QualityModel(q=np.asarray(entry.q, dtype=np.float64), phases=tuple(objects.values()), instrument=instrument,
                      routes=routes, fixed=fixed, ranges=ranges, present=present,
                      bg_order=int(lib.spec.background.chebyshev_order), settings=settings)
    return qm, lib


def reference_patterns(lib: PhaseLibrary, q: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` held-out library patterns (noise and background as in training) on the model grid ``q``."""
    rng = np.random.default_rng([seed, 7919])
    patterns = lib.simulate(lib.sample(n, rng), rng).astype(np.float64)
    if lib.q.shape != np.shape(q) or not np.allclose(lib.q, q):
        patterns = np.stack([np.interp(q, lib.q, p) for p in patterns])
    return patterns.astype(np.float32)


def calibrate(entry: Any, predict: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], *,
              phases: Mapping[str, Any] | None = None, settings: QualitySettings | None = None,
              library: PhaseLibrary | None = None) -> QualityModel | None:
    """The quality model of ``entry`` with reference levels from held-out patterns through ``predict``.

    Parameters
    ----------
    entry : ModelEntry
        The registry entry.
    predict : callable
        Patterns ``(n, npt)`` on the model grid → ensemble mean and std ``(n, R)`` (the
        ensemble the maps are predicted with).
    phases : mapping, optional
        Phase objects for structures the entry's library text cannot build.
    library : PhaseLibrary, optional
        The entry's library loaded from its folder (:func:`model_library`).
    settings : QualitySettings, optional
        Thresholds and reference size.

    Returns
    -------
    QualityModel or None
        None (after one warning) when the entry's phase library cannot be rebuilt.
    """
    built = build(entry, phases, settings, library)
    if built is None:
        return None
    qm, lib = built
    x = reference_patterns(lib, qm.q, qm.settings.reference, qm.settings.seed)
    mean, std = predict(x)
    return qm.calibrated(x, mean, std)
