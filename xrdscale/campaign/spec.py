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
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xrdscale.io import storage
from xrdscale.exceptions import ConfigError
from xrdscale.runtime.cluster import AddressCluster, ClusterSpec, KubernetesCluster, LocalCluster

logger = logging.getLogger(__name__)

SPEC_VERSION = 1
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


from xrdscale.config import Model as _Model  # noqa: E402


class Geometry(_Model):
    """Detector geometry: a pyFAI PONI file and an optional mask image."""

    poni: str
    mask: str | None = None


class IntegrateConfig(_Model):
    npt: int = Field(1000, ge=16)
    q_range: tuple[float, float] | None = None
    method: Literal["trimmed_mean", "mean", "median"] = "trimmed_mean"
    percentile: tuple[float, float] = (10.0, 90.0)


class SinogramConfig(_Model):
    center: Literal["auto"] | float = "auto"


class AbsorptionConfig(_Model):
    enabled: bool = False
    mu_map: str | None = Field(None, description="linear attenuation map [1/mm] (y, x): .npy or store with `mu`")

    @model_validator(mode="after")
    def _needs_mu(self) -> AbsorptionConfig:
        if self.enabled and not self.mu_map:
            raise ValueError("absorption is enabled but no mu_map is given; set mu_map to a .npy file or a store "
                             "with a `mu` (y, x) variable in 1/mm")
        return self


class ReconstructConfig(_Model):
    algorithm: Literal["fbp", "sirt"] = "fbp"
    iterations: int = Field(100, ge=1)
    filter: str = "ram-lak"


class DenoiseConfig(_Model):
    enabled: bool = False


class TrainConfig(_Model):
    n: int = Field(200_000, ge=10)
    ensemble: int = Field(10, ge=1)
    epochs: int = Field(35, ge=1)
    seed: int = 0
    outputs: list[str] | None = Field(None, description="outputs to predict (e.g. [scale, NCA.a, NCA.c]); "
                                      "default: every label of the phase library")


class AnalyseConfig(_Model):
    ensemble: int = Field(10, ge=1, description="members used for prediction")
    actors: int = Field(1, ge=1, description="Ray actors serving the ensemble")
    batch: int = Field(4096, ge=1)


class ReportConfig(_Model):
    rois: dict[str, dict] | None = Field(None, description="ROI spec of the report (xrdscale.analysis.roi); "
                                         "default: the report's own; {} for none")


class Pipeline(_Model):
    """Per-stage settings; every key optional, defaults are the package's."""

    integrate: IntegrateConfig = IntegrateConfig()
    sinogram: SinogramConfig = SinogramConfig()
    absorption: AbsorptionConfig = AbsorptionConfig()
    reconstruct: ReconstructConfig = ReconstructConfig()
    denoise: DenoiseConfig = DenoiseConfig()
    train: TrainConfig = TrainConfig()
    analyse: AnalyseConfig = AnalyseConfig()
    report: ReportConfig = ReportConfig()


class RunnerConfig(_Model):
    """How the runner schedules work."""

    concurrency: int = Field(2, ge=1, description="datasets processed at once")
    retries: int = Field(2, ge=0, description="extra attempts of a failed stage")


class Dataset(_Model):
    """One XRD-CT dataset: a raw NeXus file recorded at one state of charge."""

    id: str
    state: str
    voltage: float
    raw: str

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        if "/" in value or "\\" in value or ".." in value or not _ID_RE.match(value):
            raise ValueError(
                f"dataset id {value!r} must be a plain name (letters, digits, '.', '_', '-'; "
                "no '/', no '..'): it names the dataset's folder in the workspace"
            )
        return value


class Cycle(_Model):
    cycle: int
    datasets: list[Dataset] = Field(min_length=1)


class CampaignSpec(_Model):
    """A whole campaign; see shared/DESIGN.md "Campaign spec".

    Paths are stored as given; :func:`load_spec` resolves them against the YAML's folder.
    """

    version: Literal[1]
    campaign: str = Field(min_length=1)
    workspace: str
    geometry: Geometry
    phases: str | None = None
    model: str | None = None
    job_store: str | None = Field(None, description="SQLAlchemy URL; default a SQLite file in the workspace")
    cluster: ClusterSpec = LocalCluster()
    pipeline: Pipeline = Pipeline()
    runner: RunnerConfig = RunnerConfig()
    cycles: list[Cycle] = Field(min_length=1)

    def datasets(self) -> list[Dataset]:
        """Every dataset of every cycle, in spec order."""
        return [d for c in self.cycles for d in c.datasets]


def _loc(parts: tuple[Any, ...]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("local", "address", "kubernetes") and out.endswith("cluster"):
            continue  # the discriminated union's tag adds no information to the path
        else:
            out += f".{p}" if out else str(p)
    return out or "(top level)"


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
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see shared/DESIGN.md 'Campaign spec')"
            problems.append(f"{_loc(err['loc'])}: {msg}")
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
    geometry = spec.geometry.model_copy(update={"poni": r(spec.geometry.poni), "mask": r(spec.geometry.mask)})
    absorption = spec.pipeline.absorption.model_copy(update={"mu_map": r(spec.pipeline.absorption.mu_map)})
    pipeline = spec.pipeline.model_copy(update={"absorption": absorption})
    job_store = spec.job_store
    if job_store is not None and job_store.startswith("sqlite:///") and not job_store.startswith("sqlite:////"):
        job_store = "sqlite:///" + storage.resolve(job_store.removeprefix("sqlite:///"), base_dir)
    return spec.model_copy(update={
        "workspace": r(spec.workspace), "phases": r(spec.phases), "model": r(spec.model),
        "geometry": geometry, "cycles": cycles, "job_store": job_store, "pipeline": pipeline,
    })


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
    if workspace is not None:
        ws = workspace if storage.is_remote(workspace) else os.path.abspath(workspace)
        spec = spec.model_copy(update={"workspace": ws})
    return spec
