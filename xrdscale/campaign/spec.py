"""The campaign spec: a versioned, validated YAML file naming every dataset of a campaign.

A spec names the campaign, its workspace (a local path or any fsspec URL), the detector
geometry, the phase library or a trained model, the cluster to run on, per-stage pipeline
settings and the cycles with their datasets. Paths are relative to the YAML file; any
fsspec URL is accepted. :func:`load_spec` reports every problem of a spec at once, each
with its YAML path (``cycles[0].datasets[1].id: …``).

Examples
--------
>>> spec = load_spec("jobs/demo.yaml")            # doctest: +SKIP
>>> [d.id for d in spec.datasets()]               # doctest: +SKIP
['c1-charged', 'c1-discharged']
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from xrdscale.config import Model as _Model
from xrdscale.config import format_errors
from xrdscale.exceptions import ConfigError
from xrdscale.io import storage
from xrdscale.runtime.cluster import ClusterSpec, LocalCluster
from xrdscale.stages.absorption import AbsorptionConfig
from xrdscale.stages.analyse import AnalyseConfig
from xrdscale.stages.cdi import CdiConfig
from xrdscale.stages.ct import CtConfig, RoughnessConfig
from xrdscale.stages.denoise import DenoiseConfig
from xrdscale.stages.fit import FitCompareConfig, FitConfig
from xrdscale.stages.integrate import IntegrateConfig
from xrdscale.stages.reconstruct import ReconstructConfig
from xrdscale.stages.report import ReportConfig
from xrdscale.stages.sinogram import SinogramConfig
from xrdscale.stages.train import TrainConfig
from xrdscale.stages.xcs import LithiumConfig, XcsConfig

logger = logging.getLogger(__name__)

SPEC_VERSION = 1
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")




class Geometry(_Model):
    """Detector geometry: a pyFAI PONI file and an optional mask image."""

    poni: str
    mask: str | None = None


class Pipeline(_Model):
    """Per-stage settings; every key optional, defaults are the package's.

    Each section *is* the stage's own config model (:mod:`xrdscale.stages`): the same
    object reaches the stage function, and gives the run's config hash.
    """

    integrate: IntegrateConfig = IntegrateConfig()
    sinogram: SinogramConfig = SinogramConfig()
    absorption: AbsorptionConfig = AbsorptionConfig()
    reconstruct: ReconstructConfig = ReconstructConfig()
    denoise: DenoiseConfig = DenoiseConfig()
    train: TrainConfig = TrainConfig()
    analyse: AnalyseConfig = AnalyseConfig()
    fit: FitConfig = FitConfig()
    fit_compare: FitCompareConfig = FitCompareConfig()
    report: ReportConfig = ReportConfig()
    cdi: CdiConfig = CdiConfig()
    xcs: XcsConfig = XcsConfig()
    lithium: LithiumConfig = LithiumConfig()
    ct: CtConfig = CtConfig()
    roughness: RoughnessConfig = RoughnessConfig()


class RunnerConfig(_Model):
    """How the runner schedules work."""

    concurrency: int = Field(2, ge=1, description="datasets processed at once")
    retries: int = Field(2, ge=0, description="extra attempts of a failed stage")


def _plain_id(value: str) -> str:
    if "/" in value or "\\" in value or ".." in value or not _ID_RE.match(value):
        raise ValueError(
            f"dataset id {value!r} must be a plain name (letters, digits, '.', '_', '-'; "
            "no '/', no '..'): it names the dataset's folder in the workspace"
        )
    return value


class Dataset(_Model):
    """One XRD-CT dataset: a raw NeXus file recorded at one state of charge."""

    id: str
    state: str
    voltage: float
    raw: str

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        return _plain_id(value)


class CdiState(_Model):
    """One charge state of a Bragg CDI series: its diffraction pattern (or rocking-curve scans)."""

    label: str = Field(min_length=1)
    data: str
    voltage: float | None = None


class CdiSeries(_Model):
    """A Bragg CDI series of one crystal across charge states (the first state is the reference)."""

    id: str
    states: list[CdiState] = Field(min_length=2)
    mask: str | None = Field(None, description="detector mask shared by the states")

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        return _plain_id(value)


class XcsState(_Model):
    """One state of charge of an XCS-CT cell: its Compton spectrum cube, and optionally a CT scan."""

    label: str = Field(min_length=1)
    data: str = Field(description="spectrum cube (HDF5/NeXus, .hxt, or plane files joined by commas)")
    voltage: float | None = None
    ct: str | None = Field(None, description="CT projections of the same state (NXtomo or HDF5)")


class XcsCell(_Model):
    """A solid-state cell imaged by Compton scattering (and CT) across states of charge."""

    id: str
    states: list[XcsState] = Field(min_length=1)
    calibration: str | None = Field(None, description="EMR → x calibration (JSON of `xrdscale xcs calibrate`, or a "
                                                      "CSV of emr, x); gives the x maps")
    mask: str | None = Field(None, description="pixel mask shared by the states")

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        return _plain_id(value)

    @model_validator(mode="after")
    def _unique_labels(self) -> XcsCell:
        labels = [st.label for st in self.states]
        if len(set(labels)) != len(labels):
            raise ValueError(f"state labels of cell {self.id!r} must be unique; got {labels}")
        return self


class Cycle(_Model):
    cycle: int
    datasets: list[Dataset] = Field(min_length=1)


class WatchConfig(_Model):
    """Live mode (``campaign watch``): datasets join the campaign as their raw files land.

    A file is *complete* when, with ``complete: stable``, its size and modification time have
    not changed for ``stable_seconds`` and it opens as HDF5 with its frames readable; with
    ``complete: marker``, when a sidecar ``<file><marker>`` exists (the writer creates it
    last). A file not complete ``timeout`` seconds after it was first seen is reported and
    never analysed.
    """

    pattern: str = Field(description="raw files to pick up: a glob relative to the spec (or a URL) whose fields "
                                     "{id}, {cycle}, {voltage}, {state} are read from the file name, e.g. "
                                     "raw/c{cycle}-{voltage}V.nxs ({voltage} also reads 2p65 as 2.65)")
    cycle: int = Field(1, description="cycle of a file whose name has no {cycle}")
    state: str = Field("operando", description="state of a file whose name has no {state} and whose NeXus "
                                               "entry/sample/state is absent")
    complete: Literal["stable", "marker"] = "stable"
    stable_seconds: float = Field(10.0, ge=0, description="seconds a file must stay unchanged (complete: stable)")
    marker: str = Field(".done", min_length=1, description="suffix of the sidecar marker (complete: marker)")
    timeout: float = Field(3600.0, gt=0, description="seconds after which a file that never completes is reported")
    warn_every: float = Field(300.0, gt=0, description="seconds between warnings that the pattern matches nothing")
    refresh: int = Field(30, ge=1, description="seconds between reloads of the HTML report in a browser")

    @field_validator("pattern")
    @classmethod
    def _fields_known(cls, value: str) -> str:
        from xrdscale.campaign.watch import template_fields

        template_fields(value)  # raises ValueError naming an unknown field
        return value


class CampaignSpec(_Model):
    """A whole campaign (the campaign spec of the README).

    Paths are stored as given; :func:`load_spec` resolves them against the YAML's folder.
    """

    version: Literal[1]
    campaign: str = Field(min_length=1)
    workspace: str
    geometry: Geometry | None = Field(None, description="needed by XRD-CT datasets (cycles)")
    phases: str | None = None
    model: str | None = None
    job_store: str | None = Field(None, description="SQLAlchemy URL; default a SQLite file in the workspace")
    cluster: ClusterSpec = LocalCluster()
    pipeline: Pipeline = Pipeline()
    runner: RunnerConfig = RunnerConfig()
    cycles: list[Cycle] = Field(default_factory=list)
    cdi: list[CdiSeries] = Field(default_factory=list, description="Bragg CDI series (charge states of one "
                                                                   "crystal)")
    xcs: list[XcsCell] = Field(default_factory=list, description="cells imaged by Compton scattering and CT "
                                                                 "(states of charge of one cell)")
    watch: WatchConfig | None = Field(None, description="live mode: pick up datasets as their raw files land")

    @model_validator(mode="after")
    def _something_to_do(self) -> CampaignSpec:
        if not self.cycles and not self.cdi and not self.xcs and self.watch is None:
            raise ValueError("a campaign needs cycles (XRD-CT datasets), cdi (Bragg CDI series), xcs (Compton "
                             "imaging cells) or watch (datasets that land during a beamtime); it has none")
        if (self.cycles or self.watch is not None) and self.geometry is None:
            raise ValueError("geometry (a PONI file) is needed by the XRD-CT datasets of cycles")
        ids = [d.id for d in self.datasets()] + [c.id for c in self.cdi] + [c.id for c in self.xcs]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"ids must be unique across datasets, cdi series and xcs cells; repeated: {repeated}")
        return self

    def datasets(self) -> list[Dataset]:
        """Every dataset of every cycle, in spec order."""
        return [d for c in self.cycles for d in c.datasets]


def _duplicate_ids(raw: Any) -> list[str]:
    problems: list[str] = []
    seen: dict[str, str] = {}
    cycles = raw.get("cycles") if isinstance(raw, dict) else None
    for i, cycle in enumerate(cycles if isinstance(cycles, list) else []):
        datasets = cycle.get("datasets") if isinstance(cycle, dict) else None
        for j, ds in enumerate(datasets if isinstance(datasets, list) else []):
            did = ds.get("id") if isinstance(ds, dict) else None
            if not isinstance(did, str):
                continue
            here = f"cycles[{i}].datasets[{j}].id"
            if did in seen:
                problems.append(f"{here}: duplicate dataset id {did!r} (first used at {seen[did]}); ids must be unique")
            else:
                seen[did] = here
    return problems


def validate_spec(raw: Any, source: str = "<spec>") -> CampaignSpec:
    """Validate a parsed YAML document; raise one :class:`ConfigError` listing every problem.

    Parameters
    ----------
    raw : Any
        The parsed YAML.
    source : str
        Where it came from, for the message.

    Returns
    -------
    CampaignSpec
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a campaign spec is a YAML mapping, got {type(raw).__name__}")
    problems: list[str] = []
    spec = None
    if raw.get("version") not in (None, SPEC_VERSION):
        raise ConfigError(
            f"{source}: version: spec version {raw.get('version')!r} is not supported; this xrdscale reads "
            f"version {SPEC_VERSION}"
        )
    try:
        spec = CampaignSpec.model_validate(raw)
    except ValidationError as exc:
        problems += format_errors(exc, CampaignSpec, skip=("local", "address", "kubernetes"))
    problems += _duplicate_ids(raw)
    if problems:
        lines = "\n  ".join(problems)
        raise ConfigError(f"{source}: {len(problems)} problem(s) in the campaign spec:\n  {lines}")
    assert spec is not None
    return spec


def resolve_paths(spec: CampaignSpec, base_dir: str | None) -> CampaignSpec:
    """Return a copy of ``spec`` with every path resolved against ``base_dir``."""

    def r(p: str | None) -> str | None:
        return None if p is None else storage.resolve(p, base_dir)

    cycles = [
        c.model_copy(update={"datasets": [d.model_copy(update={"raw": r(d.raw)}) for d in c.datasets]})
        for c in spec.cycles
    ]
    geometry = None if spec.geometry is None else spec.geometry.model_copy(
        update={"poni": r(spec.geometry.poni), "mask": r(spec.geometry.mask)})
    cdi = [c.model_copy(update={"mask": r(c.mask),
                                "states": [st.model_copy(update={"data": r(st.data)}) for st in c.states]})
           for c in spec.cdi]
    xcs = [c.model_copy(update={"mask": r(c.mask), "calibration": r(c.calibration),
                                "states": [st.model_copy(update={"data": ",".join(r(p) or "" for p in
                                                                                  st.data.split(",")),
                                                                 "ct": r(st.ct)}) for st in c.states]})
           for c in spec.xcs]
    absorption = spec.pipeline.absorption.model_copy(update={"mu_map": r(spec.pipeline.absorption.mu_map),
                                                             "maps": r(spec.pipeline.absorption.maps)})
    pipeline = spec.pipeline.model_copy(update={"absorption": absorption})
    watch = None if spec.watch is None else spec.watch.model_copy(update={"pattern": r(spec.watch.pattern)})
    job_store = spec.job_store
    if job_store is not None and job_store.startswith("sqlite:///") and not job_store.startswith("sqlite:////"):
        job_store = "sqlite:///" + storage.resolve(job_store.removeprefix("sqlite:///"), base_dir)
    return spec.model_copy(update={
        "workspace": r(spec.workspace), "phases": r(spec.phases), "model": r(spec.model),
        "geometry": geometry, "cycles": cycles, "job_store": job_store, "pipeline": pipeline, "cdi": cdi,
        "xcs": xcs, "watch": watch,
    })


def _model_q(spec: CampaignSpec) -> tuple[tuple[float, float], str] | None:
    """The q range a model needs, and where it comes from (the model entry or the phase library)."""
    if spec.model:
        from xrdscale.pqnet.registry import open_entry

        try:
            q = open_entry(spec.model).q
        except Exception:  # noqa: BLE001 - a missing or unreadable model is reported by the run
            return None
        return (float(q[0]), float(q[-1])), f"model {storage.redact(spec.model)}"
    if spec.phases and storage.exists(spec.phases):
        try:
            grid = yaml.safe_load(storage.read_bytes(spec.phases).decode("utf-8")).get("q_grid") or {}
            return (float(grid["min"]), float(grid["max"])), f"phase library {storage.redact(spec.phases)}"
        except Exception:  # noqa: BLE001 - the library's own validation reports its problems
            return None
    return None


def check_consistency(spec: CampaignSpec) -> list[str]:
    """Problems between sections of a resolved spec, found without reading any data.

    Today: the integration q range must cover the q grid of the model (or of the phase
    library it is trained from). The range is the outer edges of pyFAI's bins, and the
    library's grid runs edge to edge, so the same range in both places is consistent.
    """
    problems: list[str] = []
    q_range = spec.pipeline.integrate.q_range
    needed = _model_q(spec) if q_range is not None else None
    if needed is not None and q_range is not None:
        (lo, hi), source = needed
        tol = 1e-9 * max(abs(hi), 1.0)
        if lo < q_range[0] - tol or hi > q_range[1] + tol:
            problems.append(
                f"pipeline.integrate.q_range: [{q_range[0]}, {q_range[1]}] 1/Å does not cover the q grid "
                f"[{lo}, {hi}] 1/Å of the {source}; widen q_range to at least [{lo}, {hi}] (or leave it unset "
                "for the detector's whole range)")
    return problems


def load_spec(url: str, *, workspace: str | None = None) -> CampaignSpec:
    """Read, validate and resolve a campaign spec from a path or fsspec URL.

    Parameters
    ----------
    url : str
        The YAML file.
    workspace : str, optional
        Overrides the spec's workspace (``--workspace``); relative to the current directory.

    Returns
    -------
    CampaignSpec
        With every path resolved against the YAML's folder.

    Raises
    ------
    ConfigError
        Unreadable YAML or any invalid field (all problems listed at once).
    StorageError
        The file cannot be read.
    """
    import os
    import posixpath

    text = storage.read_bytes(url).decode("utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{storage.redact(url)}: not valid YAML: {exc}") from exc
    spec = validate_spec(raw, storage.redact(url))
    base = posixpath.dirname(url) if storage.is_remote(url) else os.path.dirname(os.path.abspath(url))
    spec = resolve_paths(spec, base)
    problems = check_consistency(spec)
    if problems:
        lines = "\n  ".join(problems)
        raise ConfigError(f"{storage.redact(url)}: {len(problems)} problem(s) in the campaign spec:\n  {lines}")
    if workspace is not None:
        ws = workspace if storage.is_remote(workspace) else os.path.abspath(workspace)
        spec = spec.model_copy(update={"workspace": ws})
    return spec
