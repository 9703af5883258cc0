"""The campaign runner: every dataset through every stage, resumable, several at once.

The runner plans the stage graph of each dataset (:mod:`xrdscale.campaign.stages`), hashes
each stage's config and inputs (a chain: a stage's input hash covers its upstream hashes
and the identity of raw files), and then walks the datasets concurrently on driver threads
that submit their array work to the shared Dask client. A stage is skipped when its store
is complete (marker written last) and carries the same hashes; a failed stage is retried
and then fails its dataset without stopping the others. Every run is recorded in the job
store, so a campaign interrupted anywhere — a worker, a Ray actor, the driver itself —
resumes where it stopped when run again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from xrdscale.campaign.stages import CAMPAIGN, MODEL, Stage, StageCall, default_stages, input_identity
from xrdscale.campaign.store import JobStore, default_url
from xrdscale.exceptions import ConfigError, InputError, StageFailed, StorageError, XrdscaleError
from xrdscale.io import storage

logger = logging.getLogger(__name__)

#: File the runner writes into a finished store: the hashes it was made for.
HASH_FILE = ".xrdscale-campaign.json"


@dataclass(frozen=True)
class Task:
    """One planned (dataset, stage) run."""

    stage: Stage
    dataset: Any
    inputs: dict[str, str]
    out: str
    config: dict
    config_hash: str
    input_hash: str

    @property
    def dataset_id(self) -> str:
        return CAMPAIGN if self.dataset is None else self.dataset.id


@dataclass
class RunResult:
    """What a run did: per-dataset outcome and the report location."""

    invocation: str
    failed: dict[str, str] = field(default_factory=dict)
    maps: dict[str, str] = field(default_factory=dict)
    series: dict[str, str] = field(default_factory=dict)  #: CDI series / XCS cell id → its (first) store
    report: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def store_url(workspace: str, dataset_id: str, stage: Stage) -> str:
    """Where the output of ``stage`` for ``dataset_id`` lives in the workspace."""
    if stage.scope == "model":
        return storage.join(workspace, "model", stage.name + stage.suffix)
    if stage.scope == "report":
        return storage.join(workspace, "report")
    if stage.scope == "series":  # workspace/cdi/<series>.zarr, workspace/xcs/<cell>.zarr, workspace/ct/<cell>
        return storage.join(workspace, stage.name, dataset_id + stage.suffix)
    return storage.join(workspace, "datasets", dataset_id, stage.name + stage.suffix)


class Plan:
    """The hashed stage graph of a campaign.

    Parameters
    ----------
    spec : CampaignSpec
        A resolved spec.
    stages : sequence of Stage, optional
        The stage table (default: :func:`~xrdscale.campaign.stages.default_stages`).
    """

    def __init__(self, spec: Any, stages: Sequence[Stage] | None = None) -> None:
        self.spec = spec
        table = list(stages if stages is not None else default_stages())
        self.stages = {s.name: s for s in table if s.enabled(spec)}
        self.disabled = {s.name: s for s in table if not s.enabled(spec)}
        self._identity: dict[str, dict] = {}
        self.model_tasks: list[Task] = []
        self.model_url: str | None = spec.model
        model_key: str = ""
        # a CDI-only campaign needs no model; a live one trains it before its first dataset lands
        if spec.model is None and (spec.datasets() or getattr(spec, "watch", None) is not None):
            done: dict[str, Task] = {}
            for s in self.stages.values():
                if s.scope == "model":
                    done[s.name] = t = self._task(s, None, done)
                    self.model_tasks.append(t)
            if self.model_tasks:
                self.model_url = self.model_tasks[-1].out
                model_key = self.model_tasks[-1].input_hash + self.model_tasks[-1].config_hash
        elif spec.model is not None:
            model_key = _hash(self._ident(spec.model))
        self._model_key = model_key
        self.dataset_tasks: dict[str, list[Task]] = {}
        for ds in spec.datasets():
            done = {}
            for s in self.stages.values():
                if s.scope == "dataset":
                    done[s.name] = self._task(s, ds, done)
            self.dataset_tasks[ds.id] = list(done.values())
        #: CDI series / XCS cell id → its tasks, in order (stages of scope ``series``, one per item of
        #: the spec list the stage names in ``collection``; no model, no upstream)
        self.series_tasks: dict[str, list[Task]] = {}
        for s in self.stages.values():
            if s.scope != "series":
                continue
            for item in getattr(spec, s.collection):
                if s.applies(item):
                    self.series_tasks.setdefault(item.id, []).append(self._task(s, item, {}))
        self.report_stage = next((s for s in self.stages.values() if s.scope == "report"), None)

    def _ident(self, url: str) -> dict:
        if url not in self._identity:
            self._identity[url] = input_identity(url)
        return self._identity[url]

    def _resolve_need(self, name: str) -> list[str]:
        if name in self.stages or name == MODEL:
            return [name]
        if name in self.disabled:
            return [n for need in self.disabled[name].needs for n in self._resolve_need(need)]
        raise ConfigError(f"stage table: unknown upstream stage {name!r}")

    def _resolve_reads(self, name: str) -> list[str]:
        """Like :meth:`_resolve_need` for :attr:`Stage.reads`: a stage the table lacks is left out."""
        if name in self.stages or name == MODEL or name in self.disabled:
            try:
                return self._resolve_need(name)
            except ConfigError:
                return []
        return []

    def _task(self, stage: Stage, ds: Any, done: dict[str, Task]) -> Task:
        did = CAMPAIGN if ds is None else ds.id
        inputs: dict[str, str] = {}
        upstream: dict[str, str] = {}
        needs = [n for raw in stage.needs for n in self._resolve_need(raw)]
        needs += [n for raw in stage.reads for n in self._resolve_reads(raw) if n not in needs]
        for need in needs:
            if need == MODEL:
                if self.model_url is None:
                    raise ConfigError("the spec names neither a model nor a phase library to train one from; "
                                      "set `model:` or `phases:`")
                inputs[MODEL] = self.model_url
                upstream[MODEL] = self._model_key
            else:
                t = done[need]
                inputs[need] = t.out
                upstream[need] = t.config_hash + t.input_hash
        external = {k: self._ident(v) for k, v in stage.external(self.spec, ds).items() if v}
        config = stage.config(self.spec)
        return Task(stage, ds, inputs, store_url(self.spec.workspace, did, stage), config,
                    _hash({"stage": stage.name, "config": config}), _hash({"up": upstream, "ext": external}))

    def maps_task(self, did: str) -> Task:
        """The task whose output is dataset ``did``'s result: its last stage that is not a check."""
        return [t for t in self.dataset_tasks[did] if not t.stage.check][-1]

    def check_tasks(self, did: str) -> list[Task]:
        """The dataset's check stages (the fit), which run after its maps."""
        return [t for t in self.dataset_tasks[did] if t.stage.check]

    def report_task(self, maps: dict[str, Task], series: dict[str, list[Task]] | None = None) -> Task | None:
        """The report over the finished ``analyse`` tasks (dataset id → task) and series (id → tasks).

        A series task's output is the input ``<stage>:<id>`` (``cdi:…``, ``xcs:…``, ``ct:…``).
        """
        series = series or {}
        if self.report_stage is None or not (maps or series):
            return None
        s = self.report_stage
        inputs = {f"analyse:{k}": t.out for k, t in sorted(maps.items())}
        done = {f"{t.stage.name}:{k}": t for k, ts in sorted(series.items()) for t in ts}
        done.update({f"{t.stage.name}:{k}": t for k in sorted(maps) if k in self.dataset_tasks
                     for t in self.check_tasks(k) if is_done(t)})
        inputs.update({k: t.out for k, t in done.items()})
        if self.model_url and maps:
            inputs[MODEL] = self.model_url
        upstream = {k: t.config_hash + t.input_hash for k, t in sorted({**maps, **done}.items())}
        config = s.config(self.spec)
        return Task(s, None, inputs, store_url(self.spec.workspace, CAMPAIGN, s), config,
                    _hash({"stage": s.name, "config": config}), _hash({"up": upstream}))

    def all_tasks(self) -> list[Task]:
        """Model, dataset and CDI series tasks (the report is planned once they finish)."""
        return self.model_tasks + [t for ts in self.dataset_tasks.values() for t in ts] + \
            [t for ts in self.series_tasks.values() for t in ts]


def check_inputs(spec: Any) -> None:
    """Raise one :class:`InputError` listing every raw file, PONI, mask, library or model that is missing."""
    urls = []
    if spec.datasets():
        urls.append(("geometry.poni", spec.geometry.poni))
        if spec.geometry.mask:
            urls.append(("geometry.mask", spec.geometry.mask))
        if spec.model:
            urls.append(("model", spec.model))
        elif spec.phases:
            urls.append(("phases", spec.phases))
        else:
            raise ConfigError("the spec names neither `model:` nor `phases:`; give a model registry URL or a phase "
                              "library to train one from")
    urls += [(f"dataset {d.id}: raw", d.raw) for d in spec.datasets()]
    for series in spec.cdi:
        urls += [(f"cdi {series.id}: state {st.label}", st.data) for st in series.states]
        if series.mask:
            urls.append((f"cdi {series.id}: mask", series.mask))
    if spec.cdi and spec.pipeline.cdi.init == "cnn" and spec.pipeline.cdi.cnn_model:
        urls.append(("pipeline.cdi.cnn_model", spec.pipeline.cdi.cnn_model))
    for cell in spec.xcs:
        for st in cell.states:
            urls += [(f"xcs {cell.id}: state {st.label}", part) for part in st.data.split(",")]
            if st.ct:
                urls.append((f"xcs {cell.id}: state {st.label} CT", st.ct))
        urls += [(f"xcs {cell.id}: {what}", url) for what, url in (("mask", cell.mask),
                                                                   ("calibration", cell.calibration)) if url]
    missing = [f"{what}: {storage.redact(url)}" for what, url in urls if not storage.exists(url)]
    if missing:
        lines = "\n  ".join(missing)
        raise InputError(f"{len(missing)} input(s) of campaign {spec.campaign!r} do not exist:\n  {lines}\n"
                         "check the paths (relative to the spec file) and that the files were copied; nothing was run")


def is_done(task: Task) -> bool:
    """True when ``task.out`` is complete and was made for the task's hashes."""
    if not storage.is_complete(task.out):
        return False
    try:
        recorded = json.loads(storage.read_bytes(storage.join(task.out, HASH_FILE)))
    except (XrdscaleError, ValueError):
        return False
    return recorded == {"config_hash": task.config_hash, "input_hash": task.input_hash}


Callback = Callable[[str, str, str], None]


class Runner:
    """Run a campaign's plan against a job store.

    Parameters
    ----------
    plan : Plan
        The hashed stage graph.
    store : JobStore
        Where every run is recorded.
    ray : RayHandle, optional
        Handed to the stages that host models.
    on_event : callable, optional
        ``on_event(dataset_id, stage, status)`` for progress displays.
    retry_delay : float
        Seconds before the first retry (doubled each time).
    """

    def __init__(self, plan: Plan, store: JobStore, *, ray: Any = None, on_event: Callback | None = None,
                 retry_delay: float = 2.0) -> None:
        self.plan = plan
        self.spec = plan.spec
        self.store = store
        self.ray = ray
        self.on_event = on_event or (lambda d, s, st: None)
        self.retry_delay = retry_delay
        self.invocation = ""

    def _event(self, task: Task, status: str, **kw: Any) -> None:
        self.store.update(self.invocation, task.dataset_id, task.stage.name, status=status, **kw)
        self.on_event(task.dataset_id, task.stage.name, status)

    def run_task(self, task: Task) -> str:
        """Run one task (or skip it when its output is done); returns its output URL.

        Raises
        ------
        StageFailed
            Every attempt failed.
        """
        s = self.spec
        self.store.begin(self.invocation, s.campaign, task.dataset_id, task.stage.name,
                         config_hash=task.config_hash, input_hash=task.input_hash, output_url=task.out)
        if is_done(task):
            self._event(task, "skipped")
            logger.info("%s/%s: complete for the same hashes, skipped", task.dataset_id, task.stage.name)
            return task.out
        call = StageCall(s, task.dataset, task.inputs, task.out, task.config, self.ray)
        attempts = 1 + s.runner.retries
        for attempt in range(1, attempts + 1):
            self._event(task, "running", attempt=True)
            try:
                task.stage.run(call)
                if not storage.is_complete(task.out):
                    raise StorageError(f"stage {task.stage.name} returned without marking {storage.redact(task.out)} "
                                       "complete")
                storage.write_bytes(storage.join(task.out, HASH_FILE), json.dumps(
                    {"config_hash": task.config_hash, "input_hash": task.input_hash}).encode())
            except Exception as exc:  # any failure of a stage is recorded, retried, then reported
                final = attempt == attempts or isinstance(exc, (ConfigError, InputError))
                err = f"{type(exc).__name__}: {exc}"
                logger.warning("%s/%s attempt %d/%d failed: %s", task.dataset_id, task.stage.name, attempt,
                               attempts, err)
                if final:
                    self._event(task, "failed", error=err)
                    raise StageFailed(f"{task.dataset_id}: stage {task.stage.name} failed after {attempt} "
                                      f"attempt(s): {err}") from exc
                self.store.update(self.invocation, task.dataset_id, task.stage.name, status="running", error=err)
                time.sleep(self.retry_delay * 2 ** (attempt - 1))
            else:
                self._event(task, "done")
                return task.out
        raise StageFailed(f"{task.dataset_id}: stage {task.stage.name} was not attempted (retries < 0?)")

    def _run_chain(self, tasks: list[Task], model: Future | None) -> str:
        out = ""
        for task in tasks:
            if MODEL in task.inputs and model is not None:
                try:
                    model.result()
                except StageFailed as exc:
                    self.store.begin(self.invocation, self.spec.campaign, task.dataset_id, task.stage.name,
                                     config_hash=task.config_hash, input_hash=task.input_hash, output_url=task.out)
                    self._event(task, "failed", error=f"model unavailable: {exc}")
                    raise StageFailed(f"{task.dataset_id}: no model ({exc})") from exc
            try:
                out = self.run_task(task)
            except StageFailed as exc:
                if task.stage.check and task is not tasks[0]:
                    # the maps before it are finished (their task returned): they stay the result
                    raise _CheckFailed(str(exc)) from exc
                raise
        return out

    def run(self) -> RunResult:
        """Run the whole plan; returns the per-dataset outcome (failures are reported, not raised)."""
        plan, spec = self.plan, self.spec
        self.invocation = self.store.start_invocation(spec.campaign)
        result = RunResult(self.invocation)
        finished_ok = False
        if self.ray is not None and any(t.stage.ray and not is_done(t) for t in plan.all_tasks()):
            # Connect Ray from this long-lived thread: the processes of a local Ray die with the
            # thread that started them (parent-death signal), and the stage threads end early.
            self.ray.ensure()
        try:
            with ThreadPoolExecutor(max_workers=spec.runner.concurrency + 1,
                                    thread_name_prefix="xrdscale-campaign") as pool:
                model = pool.submit(self._run_chain, plan.model_tasks, None) if plan.model_tasks else None
                futures = {did: pool.submit(self._run_chain, tasks, model)
                           for did, tasks in plan.dataset_tasks.items()}
                series_futures = {sid: pool.submit(self._run_chain, tasks, None)
                                  for sid, tasks in plan.series_tasks.items()}
                finished: dict[str, Task] = {}
                for did, fut in futures.items():
                    try:
                        maps = fut.result()
                    except _CheckFailed as exc:   # the fit failed, the maps did not: they are reported
                        result.failed[did] = str(exc)
                        finished[did] = plan.maps_task(did)
                        result.maps[did] = finished[did].out
                        continue
                    except StageFailed as exc:
                        result.failed[did] = str(exc)
                        continue
                    del maps  # the chain's last output may be a check's (the fit); the maps are the result
                    finished[did] = plan.maps_task(did)
                    result.maps[did] = finished[did].out
                series_done: dict[str, list[Task]] = {}
                for sid, sfut in series_futures.items():
                    try:
                        sfut.result()
                        result.series[sid] = plan.series_tasks[sid][0].out
                    except StageFailed as exc:
                        result.failed[sid] = str(exc)
                        continue
                    series_done[sid] = plan.series_tasks[sid]
                if model is not None and model.exception() is not None:
                    result.failed[CAMPAIGN] = str(model.exception())
            report = plan.report_task(finished, series_done)
            if report is not None:
                try:
                    result.report = self.run_task(report)
                except StageFailed as exc:
                    result.failed[CAMPAIGN] = str(exc)
            finished_ok = result.ok
        finally:
            self.store.end_invocation(self.invocation, "done" if finished_ok else "failed")
        return result


class _CheckFailed(StageFailed):
    """A check stage (the fit) of a dataset failed after the dataset's maps were finished."""


def open_job_store(spec: Any) -> JobStore:
    """The job store of ``spec``: its ``job_store`` URL, else the default for its workspace."""
    return JobStore(spec.job_store or default_url(spec.workspace))


def probe_job_store(spec: Any) -> None:
    """Open and close the job store of ``spec`` when it is a database server (PostgreSQL).

    A wrong URL or password is then one error before any cluster starts. A SQLite store
    (a file in the workspace) is left alone: creating it would leave a workspace behind a
    run that starts nothing; :func:`xrdscale.io.storage.check_writable` covers it.
    """
    url = spec.job_store or default_url(spec.workspace)
    if not url.startswith("sqlite"):
        JobStore(url).close()


def run_campaign(spec: Any, *, stages: Sequence[Stage] | None = None, on_event: Callback | None = None,
                 on_connect: Callable[[Any, Plan], None] | None = None, retry_delay: float = 2.0) -> RunResult:
    """Check the inputs, connect the cluster, and run every stage of ``spec``.

    Parameters
    ----------
    spec : CampaignSpec
        A resolved spec (:func:`~xrdscale.campaign.spec.load_spec`).
    stages : sequence of Stage, optional
        The stage table (default: xrdscale's stages).
    on_event : callable, optional
        ``on_event(dataset_id, stage, status)`` after each change of a stage's status.
    on_connect : callable, optional
        ``on_connect(client, plan)`` once the cluster is connected (e.g. to show the dashboard link).
    retry_delay : float
        Seconds before the first retry of a failed stage.

    Returns
    -------
    RunResult

    Raises
    ------
    InputError, ConfigError, StorageError
        Missing inputs, an invalid plan or an unreachable cluster or job store — raised
        before any stage starts.
    """
    from xrdscale.runtime.cluster import connect

    check_inputs(spec)
    plan = Plan(spec, stages)
    for stage in plan.stages.values():
        stage.preflight(spec)  # e.g. a PONI pyFAI cannot use fails here, not in every integrate task
    storage.check_writable(spec.workspace, "the workspace")
    probe_job_store(spec)  # a wrong URL or password fails here, before the cluster starts
    with connect(spec.cluster) as (client, ray_handle):
        store = open_job_store(spec)
        try:
            if on_connect is not None:
                on_connect(client, plan)
            return Runner(plan, store, ray=ray_handle, on_event=on_event, retry_delay=retry_delay).run()
        finally:
            store.close()
