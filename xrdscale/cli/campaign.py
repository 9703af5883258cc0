"""``xrdscale campaign run|watch|status|report|follow``: run a campaign or follow one live, see where it stands,
report, follow its Kubernetes Job."""

from __future__ import annotations

import logging

import typer
from rich.console import Console
from rich.table import Table

from xrdscale.campaign.stages import CAMPAIGN
from xrdscale.io import storage

logger = logging.getLogger(__name__)

app = typer.Typer(help="Run a campaign (every cycle's datasets), follow it, and write its report.",
                  no_args_is_help=True)

SPEC_ARG = typer.Argument(..., help="Campaign spec YAML (path or fsspec URL), e.g. jobs/demo.yaml.")
WORKSPACE_OPT = typer.Option(None, "--workspace", "-w", help="Override the spec's workspace (path or s3://…).")


def _load(spec_url: str, workspace: str | None):
    from xrdscale.campaign.spec import load_spec

    return load_spec(spec_url, workspace=workspace)


@app.command("run")
def run_cmd(
    spec_url: str = SPEC_ARG,
    workspace: str | None = WORKSPACE_OPT,
    cluster: str | None = typer.Option(
        None, "--cluster", "-c",
        help="local, kubernetes, or a Dask scheduler address (tcp://host:8786[,ray://host:10001]); "
             "default: the spec's cluster section."),
    retries: int | None = typer.Option(None, "--retries", min=0, help="Extra attempts of a failed stage."),
    concurrency: int | None = typer.Option(None, "--concurrency", min=1, help="Datasets processed at once."),
) -> None:
    """Run every stage of every dataset, skipping what is already complete, and write the report."""
    from xrdscale.runtime.cluster import cluster_from_option

    spec = _load(spec_url, workspace)
    update = {}
    if cluster is not None:
        update["cluster"] = cluster_from_option(cluster, spec.cluster)
    runner_cfg = {k: v for k, v in {"retries": retries, "concurrency": concurrency}.items() if v is not None}
    if runner_cfg:
        update["runner"] = spec.runner.model_copy(update=runner_cfg)
    spec = spec.model_copy(update=update)
    run_and_print(spec)


def run_and_print(spec, *, note: str | None = None) -> None:
    """Run ``spec`` with live progress, print where the maps and the report are; exit 1 on failures."""
    from xrdscale.campaign.progress import CampaignProgress
    from xrdscale.campaign.runner import run_campaign

    console = Console(stderr=True)
    with CampaignProgress(console) as progress:
        result = run_campaign(spec, on_event=progress.event, on_connect=progress.connected)
    out = Console()
    for did, maps in result.maps.items():
        out.print(f"maps of {did}: {storage.redact(maps)}", highlight=False, soft_wrap=True)
    for sid, url in result.series.items():
        kind = "Bragg CDI series" if sid in {c.id for c in spec.cdi} else "Compton imaging cell"
        out.print(f"{kind} {sid}: {storage.redact(url)}", highlight=False, soft_wrap=True)
    if result.report:
        out.print(f"report: {storage.redact(storage.join(result.report, 'report.html'))}", highlight=False,
                  soft_wrap=True)
    if note:
        out.print(note, highlight=False, soft_wrap=True)
    if not result.ok:
        for did, err in result.failed.items():
            console.print(f"[bold red]failed[/] {did}: {err}", highlight=False, soft_wrap=True)
        console.print(f"{len(result.failed)} failure(s); fix the cause and run the same command again to resume")
        raise typer.Exit(1)


@app.command("watch")
def watch_cmd(
    spec_url: str = SPEC_ARG,
    workspace: str | None = WORKSPACE_OPT,
    poll: float = typer.Option(10.0, "--poll", min=0.1, help="Seconds between listings of the watched files."),
    cluster: str | None = typer.Option(None, "--cluster", "-c", help="As for `campaign run`."),
    max_datasets: int | None = typer.Option(None, "--max-datasets", min=1,
                                            help="Stop after this many new datasets (default: run until Ctrl-C)."),
) -> None:
    """Live mode: process each dataset as its raw file lands (the spec's `watch:` section), until Ctrl-C."""
    from xrdscale.runtime.cluster import cluster_from_option

    spec = _load(spec_url, workspace)
    if cluster is not None:
        spec = spec.model_copy(update={"cluster": cluster_from_option(cluster, spec.cluster)})
    watch_and_print(spec, poll=poll, max_datasets=max_datasets)


def watch_and_print(spec, *, poll: float, max_datasets: int | None = None, stop=None, on_processed=None) -> None:
    """Watch ``spec`` with live progress; print each dataset's latency; exit 130 on Ctrl-C."""
    from xrdscale.campaign.progress import CampaignProgress
    from xrdscale.campaign.watch import watch_campaign

    console = Console(stderr=True)
    out = Console()

    def landed(did: str, latency: float | None, report: str | None) -> None:
        if latency is None:
            console.print(f"[bold red]failed[/] {did} (see above); the watch goes on", highlight=False)
        else:
            where = storage.redact(storage.join(report, "report.html")) if report else "-"
            out.print(f"{did}: maps in the report {latency:.0f} s after its file landed ({where})", highlight=False,
                      soft_wrap=True)
        if on_processed is not None:
            on_processed(did)

    try:
        with CampaignProgress(console) as progress:
            result = watch_campaign(spec, poll=poll, max_datasets=max_datasets, stop=stop, on_event=progress.event,
                                    on_connect=progress.connected, on_dataset=landed)
    except KeyboardInterrupt:
        console.print("stopped (Ctrl-C); stages that were running are not marked complete, and the same command "
                      "resumes them")
        raise typer.Exit(130) from None
    for url, why in result.refused.items():
        console.print(f"[yellow]not analysed[/] {storage.redact(url)}: {why}", highlight=False, soft_wrap=True)
    if result.latency:
        values = sorted(result.latency.values())
        out.print(f"{len(values)} dataset(s); landing to report: median {values[len(values) // 2]:.0f} s, "
                  f"max {values[-1]:.0f} s", highlight=False)
    if result.failed:
        for did, err in result.failed.items():
            console.print(f"[bold red]failed[/] {did}: {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command("status")
def status_cmd(spec_url: str = SPEC_ARG, workspace: str | None = WORKSPACE_OPT) -> None:
    """Show the latest status, attempts, times and errors of every (dataset, stage) from the job store."""
    from xrdscale.campaign.runner import open_job_store

    spec = _load(spec_url, workspace)
    store = open_job_store(spec)
    try:
        latest = store.latest(spec.campaign)
        runs = len(store.invocation_ids(spec.campaign))
    finally:
        store.close()
    out = Console()
    if not latest:
        out.print(f"campaign {spec.campaign!r} has not been run yet (job store {store.display_url})",
                  soft_wrap=True, highlight=False)
        return
    table = Table(title=f"campaign {spec.campaign} — {runs} run(s)")
    for col in ("dataset", "stage", "status", "attempts", "ended", "error"):
        table.add_column(col)
    order = [CAMPAIGN] + [d.id for d in spec.datasets()] + [c.id for c in spec.cdi] + [c.id for c in spec.xcs]
    for (did, stage), r in sorted(latest.items(), key=lambda kv: order.index(kv[0][0]) if kv[0][0] in order else 0):
        ended = r.ended_at.strftime("%Y-%m-%d %H:%M:%S") if r.ended_at else ""
        table.add_row(did, stage, r.status, str(r.attempts), ended, (r.error or "")[:120])
    out.print(table)


@app.command("report")
def report_cmd(spec_url: str = SPEC_ARG, workspace: str | None = WORKSPACE_OPT) -> None:
    """Write the campaign report from the datasets whose maps are complete, and print where it is."""
    from xrdscale.campaign.runner import Plan, Runner, is_done, open_job_store
    from xrdscale.exceptions import InputError

    spec = _load(spec_url, workspace)
    plan = Plan(spec)
    finished = {did: plan.maps_task(did) for did in plan.dataset_tasks if is_done(plan.maps_task(did))}
    series = {sid: ts for sid, ts in plan.series_tasks.items() if all(is_done(t) for t in ts)}
    task = plan.report_task(finished, series)
    if task is None:
        raise InputError(f"campaign {spec.campaign!r}: nothing is complete yet (maps, CDI series or XCS cells); run "
                         f"`xrdscale campaign run {spec_url}` first")
    store = open_job_store(spec)
    try:
        runner = Runner(plan, store)
        runner.invocation = store.start_invocation(spec.campaign)
        status = "failed"
        try:
            url = runner.run_task(task)
            status = "done"
        finally:
            store.end_invocation(runner.invocation, status)
    finally:
        store.close()
    Console().print(f"report of {len(finished)} dataset(s): {storage.redact(storage.join(url, 'report.html'))}",
                    highlight=False, soft_wrap=True)


@app.command("follow")
def follow_cmd(
    job: str = typer.Argument("xrdscale-campaign", help="Name of the campaign's batch/v1 Job."),
    namespace: str = typer.Option("xrdscale", "--namespace", "-n", help="Its namespace."),
    timeout: float = typer.Option(3600.0, "--timeout", min=1, help="Seconds to wait for the Job to complete."),
    poll: float = typer.Option(5.0, "--poll", min=0.1, help="Seconds between reads of the Job."),
    kubeconfig: str | None = typer.Option(None, "--kubeconfig", help="Kubeconfig (default: in-cluster, "
                                          "else KUBECONFIG or ~/.kube/config)."),
) -> None:
    """Follow a campaign Job on Kubernetes until it completes; exit 1 with the reason when it cannot.

    A pod whose image cannot be found, a container that cannot be created, a failed Job or a
    timeout each end it with one line naming the cause (the image, for a missing image).
    """
    from xrdscale.runtime.kubejob import follow_job

    console = Console(stderr=True)
    state = follow_job(job, namespace, timeout=timeout, poll=poll, kubeconfig=kubeconfig,
                       on_change=lambda s: console.print(s.message, highlight=False, soft_wrap=True))
    Console().print(state.message, highlight=False, soft_wrap=True)


def register(root: typer.Typer) -> None:
    """Add the ``campaign`` sub-app to the root app."""
    root.add_typer(app, name="campaign")

