"""The phase library: what a user writes to train PQ-Net on their own phases.

A versioned YAML file (shared/DESIGN.md "Phase library") validated by pydantic. Every
problem in a file is reported at once, each with its YAML path. Paths are relative to
the YAML file; any fsspec URL works.

Example
-------
.. code-block:: yaml

    version: 1
    wavelength: 0.130509
    q_grid: {min: 1.16, max: 3.82, npt: 1000}
    instrument: {U: 0.0, V: 0.0, W: 4.0e-4, X: 0.0}
    background: {chebyshev_order: 2, amplitude: [0.0, 0.05]}
    noise: {counts: [1.0e4, 1.0e6]}
    phases:
      NCA: {cif: cif/NCA.cif, scale: [0, 1], a: [2.810, 2.875], c: [14.15, 14.55], size_nm: [60, 1000]}
      Al: {builtin: Al, scale: [0, 1], a: [4.048, 4.052]}
      separator:
        peak: {q: [1.52, 1.53], fwhm: [0.01, 0.05]}
        scale: [0, 1]
        composition: {formula: C2H4, density: 0.94}     # or {elements: {C: 2, H: 4}, density: 0.94}

``composition`` (optional, any phase) gives the element make-up and density [g/cm³] used for
X-ray attenuation (:mod:`xrdscale.physics.attenuation`): ``elements`` maps element symbols to
amounts (atoms per formula unit, any normalisation) or ``formula`` is a chemical formula
(xraylib's parser), never both. A ``peak`` phase has no structure, so its composition needs
both the make-up and ``density``; a crystalline phase takes what it does not give from its
structure (cell contents, crystallographic density).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Annotated

import numpy as np
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from xrdscale.config import Model, format_errors
from xrdscale.exceptions import ConfigError, XrdscaleError
from xrdscale.io import storage
from xrdscale.physics.attenuation import Composition
from xrdscale.physics.crystal import BUILTIN_PHASES, AmorphousPeak, Phase, builtin_cif
from xrdscale.physics.pattern import Instrument, add_background_and_noise, simulate_patterns

logger = logging.getLogger(__name__)

Range = Annotated[list[float], Field(min_length=2, max_length=2)]
#: Location parts pydantic adds for validators, left out of the YAML paths of errors.
_SKIP_LOC = ("function-after",)


def _check_range(v: list[float] | None) -> list[float] | None:
    if v is not None and v[0] > v[1]:
        raise ValueError(f"range {v} has min > max; write [min, max]")
    return v


class QGrid(Model):
    """The q grid of the patterns [1/Å]."""

    min: float = Field(gt=0)
    max: float = Field(gt=0)
    npt: int = Field(ge=16, le=100_000)

    @model_validator(mode="after")
    def _ordered(self) -> QGrid:
        if self.min >= self.max:
            raise ValueError(f"min {self.min} must be below max {self.max}")
        return self


class InstrumentSpec(Model):
    """Instrumental profile: explicit Caglioti parameters or a calibrant pattern to fit them to."""

    U: float = 0.0
    V: float = 0.0
    W: float | None = None
    X: float = 0.0
    calibrant: str | None = None
    pattern: str | None = Field(None, description="two-column text file q [1/Å], intensity of the calibrant")

    @model_validator(mode="after")
    def _one_source(self) -> InstrumentSpec:
        if self.calibrant is None and self.W is None:
            raise ValueError("give W (and optionally U, V, X) or a calibrant with its integrated pattern")
        if self.calibrant is not None and self.pattern is None:
            raise ValueError(f"calibrant {self.calibrant!r} needs `pattern`: the integrated calibration "
                             "pattern (q [1/Å], intensity columns), e.g. from `xrdscale integrate`")
        return self


class BackgroundSpec(Model):
    """Chebyshev background; ``amplitude`` is relative to the pattern's maximum."""

    chebyshev_order: int = Field(2, ge=0, le=8)
    amplitude: Range = [0.0, 0.05]
    _r = field_validator("amplitude")(_check_range)


class NoiseSpec(Model):
    """Poisson noise: total counts per pattern drawn log-uniformly from ``counts``."""

    counts: Range | None = None
    _r = field_validator("counts")(_check_range)


class PeakSpec(Model):
    """A non-crystalline single peak: position and width ranges [1/Å]."""

    q: Range
    fwhm: Range
    _r = field_validator("q", "fwhm")(_check_range)


class CompositionSpec(Model):
    """Element make-up and density of a phase, for X-ray attenuation (see the module docstring)."""

    elements: dict[str, float] | None = Field(None, description="element symbol → atoms per formula unit")
    formula: str | None = Field(None, description="chemical formula, e.g. LiC6 or C2H4")
    density: float | None = Field(None, gt=0, lt=30, description="density [g/cm³]")

    @model_validator(mode="after")
    def _valid(self) -> CompositionSpec:
        if self.elements is not None and self.formula is not None:
            raise ValueError("give elements or formula, not both")
        if self.elements is None and self.formula is None and self.density is None:
            raise ValueError("give elements (e.g. {Li: 1, C: 6}) or formula (e.g. LiC6), and/or density [g/cm³]")
        try:  # check the symbols and the formula now, with the YAML path in the message
            if self.elements is not None:
                Composition.from_elements(self.elements, 1.0)
            if self.formula is not None:
                Composition.from_formula(self.formula, 1.0)
        except XrdscaleError as exc:
            raise ValueError(str(exc)) from None
        return self

    def resolve(self, phase: Phase | AmorphousPeak) -> Composition:
        """The composition of ``phase``: what this spec gives, the rest from the phase's structure."""
        if self.elements is not None:
            fractions = dict(Composition.from_elements(self.elements, 1.0).mass_fractions)
        elif self.formula is not None:
            fractions = dict(Composition.from_formula(self.formula, 1.0).mass_fractions)
        elif isinstance(phase, Phase):
            fractions = dict(phase.mass_fractions)
        else:
            raise ConfigError(f"peak phase {phase.name!r} needs composition elements or formula")
        if self.density is not None:
            density = self.density
        elif isinstance(phase, Phase):
            density = phase.density()
        else:
            raise ConfigError(f"peak phase {phase.name!r} needs a composition density [g/cm³]")
        return Composition(fractions, float(density))


class PhaseSpec(Model):
    """One phase: a structure (``cif`` or ``builtin``) or a ``peak``, sampling ranges, an optional composition."""

    cif: str | None = None
    builtin: str | None = None
    peak: PeakSpec | None = None
    scale: Range = [0.0, 1.0]
    absent: float = Field(0.0, ge=0.0, le=1.0, description="probability that the phase is absent from a pattern")
    a: Range | None = None
    c: Range | None = None
    size_nm: Range | None = None
    composition: CompositionSpec | None = Field(None, description="element make-up and density, for attenuation")
    _r = field_validator("scale", "a", "c", "size_nm")(_check_range)

    @model_validator(mode="after")
    def _one_source(self) -> PhaseSpec:
        given = [k for k in ("cif", "builtin", "peak") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of cif, builtin, peak (got {', '.join(given)})")
        if self.builtin is not None and self.builtin not in BUILTIN_PHASES:
            raise ValueError(f"unknown builtin phase {self.builtin!r}; choose from {', '.join(BUILTIN_PHASES)}")
        if self.peak is not None and (self.a or self.c or self.size_nm):
            raise ValueError("a peak component has no lattice or size; remove a/c/size_nm")
        comp = self.composition
        if self.peak is not None and comp is not None and (comp.density is None
                                                           or (comp.elements is None and comp.formula is None)):
            raise ValueError("a peak component has no structure to take its composition from: give "
                             "composition with elements (or formula) and density, e.g. "
                             "{elements: {C: 2, H: 4}, density: 0.94}")
        return self


class PhaseLibrarySpec(Model):
    """The validated content of a phase-library YAML file."""

    version: int = Field(1, ge=1, le=1)
    wavelength: float = Field(gt=0, lt=10)
    q_grid: QGrid
    instrument: InstrumentSpec
    background: BackgroundSpec = BackgroundSpec()
    noise: NoiseSpec = NoiseSpec()
    phases: dict[str, PhaseSpec] = Field(min_length=1)


def _uniform(rng: np.random.Generator, bounds: list[float], n: int) -> np.ndarray:
    """``n`` draws uniform in ``[bounds[0], bounds[1])`` (``rng.uniform(lo, hi, n)``)."""
    return rng.uniform(bounds[0], bounds[1], n)


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem, each with its YAML path (and the valid keys of an unknown key)."""
    lines = format_errors(exc, PhaseLibrarySpec, skip=_SKIP_LOC)
    return f"{source} has {len(lines)} problem(s):\n" + "\n".join(f"  {line}" for line in lines)


class PhaseLibrary:
    """A loaded phase library: phases built from their structures, ranges and the pattern model.

    Parameters
    ----------
    spec : PhaseLibrarySpec
        The validated YAML content.
    base_dir : str, optional
        Folder (or URL) that relative paths in the spec refer to.
    text : str, optional
        The YAML text it was read from (kept for provenance).
    source : str, optional
        What the spec was read from (the file's path or URL), named in error messages.
    """

    def __init__(self, spec: PhaseLibrarySpec, base_dir: str | None = None, text: str | None = None,
                 source: str | None = None) -> None:
        self.spec = spec
        self.base_dir = base_dir
        self.source = source or "phase library"
        self.text = text if text is not None else yaml.safe_dump(spec.model_dump(exclude_none=True), sort_keys=False)
        problems = []
        phases: list[Phase | AmorphousPeak] = []
        for name, p in spec.phases.items():
            try:
                phases.append(self._build_phase(name, p))
            except XrdscaleError as exc:
                problems.append(f"  phases.{name}: {exc}")
        if problems:
            raise ConfigError(f"{self.source} has {len(problems)} problem(s):\n" + "\n".join(problems))
        self.phases = phases

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str) -> PhaseLibrary:
        """Read and validate a phase-library YAML file (local path or URL).

        Raises
        ------
        ConfigError
            Listing every problem with its YAML path.
        """
        if not storage.exists(path):
            raise ConfigError(f"phase library {path!r} does not exist; give the path of a phase-library YAML")
        text = storage.read_bytes(path).decode("utf-8")
        base = os.path.dirname(path.rstrip("/")) if not storage.is_remote(path) else path.rsplit("/", 1)[0]
        return cls.from_text(text, base_dir=base, source=storage.redact(path))

    @classmethod
    def from_text(cls, text: str, base_dir: str | None = None, source: str = "phase library") -> PhaseLibrary:
        """Build a library from YAML text."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{source} must be a YAML mapping with version, wavelength, q_grid, instrument, phases")
        try:
            spec = PhaseLibrarySpec.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None
        return cls(spec, base_dir=base_dir, text=text, source=source)

    def _build_phase(self, name: str, p: PhaseSpec) -> Phase | AmorphousPeak:
        phase = self._build_structure(name, p)
        if p.composition is not None:
            comp = p.composition.resolve(phase)
            phase = dataclasses.replace(phase, composition=(dict(comp.mass_fractions), comp.density))
        return phase

    def _build_structure(self, name: str, p: PhaseSpec) -> Phase | AmorphousPeak:
        if p.peak is not None:
            return AmorphousPeak(name, q=float(np.mean(p.peak.q)), fwhm=float(np.mean(p.peak.fwhm)))
        if p.cif is not None:
            phase = Phase.from_cif(storage.resolve(p.cif, self.base_dir), name)
        else:
            if (p.builtin or name) not in BUILTIN_PHASES:
                raise ConfigError(f"no structure: give `cif: path/to/{name}.cif`, `builtin: <one of "
                                  f"{', '.join(BUILTIN_PHASES)}>` or `peak: {{q: [..], fwhm: [..]}}`")
            phase = Phase.from_cif(builtin_cif(p.builtin or name), name)
        for key in ("a", "c"):
            if getattr(p, key) is not None and key not in phase.lattice_keys:
                raise ConfigError(f"{phase.system} phase has no lattice parameter {key!r}; "
                                  f"it has {list(phase.lattice_keys)}")
        return phase

    # -- properties -----------------------------------------------------------------------
    @property
    def wavelength(self) -> float:
        """Wavelength [Å]."""
        return self.spec.wavelength

    @property
    def q(self) -> np.ndarray:
        """The q grid [1/Å]."""
        g = self.spec.q_grid
        return np.linspace(g.min, g.max, g.npt)

    @property
    def phase_names(self) -> list[str]:
        """Phase names in file order."""
        return list(self.spec.phases)

    def phase(self, name: str) -> Phase | AmorphousPeak:
        """The phase called ``name``."""
        return self.phases[self.phase_names.index(name)]

    def label_names(self) -> list[tuple[str, str]]:
        """The (phase, parameter) pairs a network predicts: scale, and every ranged lattice/size key."""
        out = []
        for name, p in self.spec.phases.items():
            out.append((name, "scale"))
            out.extend((name, k) for k in ("a", "c", "size_nm") if getattr(p, k) is not None)
        return out

    @functools.cached_property
    def _instrument(self) -> Instrument:
        ins = self.spec.instrument
        if ins.calibrant is None or ins.pattern is None:  # the spec's validator requires W, or both of these
            return Instrument(self.wavelength, U=ins.U, V=ins.V, W=float(ins.W or 0.0), X=ins.X)
        url = storage.resolve(ins.pattern, self.base_dir)
        try:
            data = np.loadtxt(storage.read_bytes(url).decode().splitlines())
        except ValueError as exc:
            raise ConfigError(f"instrument.pattern {url!r} (in {self.source}) is not a two-column text file "
                              f"(q, intensity): {exc}") from exc
        return Instrument.fit_calibrant(data[:, 0], data[:, 1], self.wavelength, ins.calibrant)

    def instrument_model(self) -> Instrument:
        """The instrumental profile (fitted to the calibrant once, then reused)."""
        return self._instrument

    # -- sampling and simulation -------------------------------------------------------------
    def sample(self, n: int, rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
        """Draw ``n`` label sets uniformly from the ranges (scale 0 with probability ``absent``)."""
        labels: dict[str, dict[str, np.ndarray]] = {}
        for name, p in self.spec.phases.items():
            d = {"scale": _uniform(rng, p.scale, n)}
            if p.absent > 0:
                d["scale"] = np.where(rng.random(n) < p.absent, 0.0, d["scale"])
            for key in ("a", "c", "size_nm"):
                rng_ = getattr(p, key)
                if rng_ is not None:
                    d[key] = _uniform(rng, rng_, n)
            labels[name] = d
        return labels

    def simulate(self, labels: dict[str, dict[str, np.ndarray]], rng: np.random.Generator, *,
                 noise: bool = True) -> np.ndarray:
        """Patterns for the labels, with the library's instrument, background and noise.

        Returns
        -------
        ndarray (n, npt) float32
        """
        params: dict[str, dict[str, np.ndarray]] = {}
        n = len(next(iter(labels.values()))["scale"])
        for name, p in self.spec.phases.items():
            d = dict(labels.get(name, {}))
            if p.peak is not None:  # nuisance: the peak's position and width
                d.setdefault("q", _uniform(rng, p.peak.q, n))
                d.setdefault("fwhm", _uniform(rng, p.peak.fwhm, n))
            params[name] = d
        clean = simulate_patterns(self.q, self.phases, params, self.instrument_model())
        bg_spec = self.spec.background
        peak = clean.max(axis=1).astype(float)
        level = _uniform(rng, bg_spec.amplitude, n) * np.where(peak > 0, peak, 1.0)
        coef = np.zeros((n, bg_spec.chebyshev_order + 1))
        coef[:, 0] = level
        if bg_spec.chebyshev_order > 0:
            # Higher orders share at most half the constant so the background stays positive.
            w = rng.uniform(-1, 1, (n, bg_spec.chebyshev_order))
            w /= np.maximum(np.abs(w).sum(axis=1, keepdims=True), 1e-12)
            coef[:, 1:] = 0.5 * level[:, None] * w
        counts = None
        if noise and self.spec.noise.counts is not None:
            lo, hi = np.log(self.spec.noise.counts)
            counts = np.exp(rng.uniform(lo, hi, n))
        return add_background_and_noise(clean, self.q, coef, counts, rng)
