"""Follow a campaign ``batch/v1`` Job on Kubernetes to its end, with clear errors.

``kubectl apply -k infra/`` starts the campaign Job and returns; what goes wrong next shows
only in pod states. A pod whose image cannot be found waits forever in ``ErrImagePull`` /
``ImagePullBackOff`` / ``ErrImageNeverPull`` and the Job never fails on its own. This module
reads the Job and its pods, and says in one line what stops them, naming the image.

:func:`job_state` is a pure function of the Job's and pods' JSON (as ``kubectl get -o json``
prints them); :func:`follow_job` polls the API server with the ``kubernetes`` client
(``pip install 'xrdscale[k8s]'``) until the Job succeeds, fails, cannot start, or times out.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from xrdscale.exceptions import ConfigError, StageFailed, XrdscaleError

logger = logging.getLogger(__name__)

#: container waiting reasons that mean the image cannot be had (they never clear by themselves)
IMAGE_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName"})
#: waiting reasons that mean the pod's spec cannot run as written
CONFIG_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})


class ImageNotFoundError(XrdscaleError):
    """A Job's pod cannot start because its container image cannot be found or pulled."""


@dataclasses.dataclass(frozen=True)
class JobState:
    """Where a Job stands.

    Attributes
    ----------
    phase : str
        ``succeeded``, ``failed``, ``blocked`` (a pod cannot start: see ``message``) or ``running``
        (pending pods included).
    message : str
        One line for the user: what the pods do, or what stops them.
    pods : dict
        Pod name → its phase (with the waiting reason of a waiting container, if any).
    cause : str
        For ``blocked``: ``image`` (the image cannot be had) or ``config`` (the container cannot be
        created as specified); else empty.
    """

    phase: str
    message: str
    pods: dict[str, str]
    cause: str = ""


def _containers(pod: Mapping[str, Any]) -> list[tuple[dict, dict]]:
    """(spec, status) pairs of a pod's init and main containers, matched by name."""
    spec = pod.get("spec", {})
    status = pod.get("status", {})
    out = []
    for kind in ("initContainers", "containers"):
        by_name = {c.get("name"): c for c in spec.get(kind) or []}
        for st in status.get("initContainerStatuses" if kind == "initContainers" else "containerStatuses") or []:
            out.append((by_name.get(st.get("name"), {}), st))
    return out


def _image_hint(reason: str) -> str:
    if reason == "ErrImageNeverPull":
        return ("the pod's imagePullPolicy is Never, so the image must already be on the node: build or load it "
                "there (docker build -t IMAGE .), or push it to a registry and drop imagePullPolicy: Never")
    if reason == "InvalidImageName":
        return "the image reference is malformed: fix `images:` in infra/kustomization.yaml"
    return ("check the image's name and tag, that a registry the nodes can reach has it, and the pull secret; "
            "set the image with `images:` in infra/kustomization.yaml")


def job_state(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> JobState:
    """Classify a Job from its JSON and its pods' JSON.

    Parameters
    ----------
    job : mapping
        The Job as the API returns it (``kubectl get job NAME -o json``).
    pods : sequence of mapping
        Its pods (label ``job-name=NAME``), as the API returns them.

    Returns
    -------
    JobState
        ``blocked`` as soon as a container waits for an image that cannot be had
        (:data:`IMAGE_REASONS`) or for a spec that cannot run (:data:`CONFIG_REASONS`); the
        message names the pod, the container, the image and the reason.
    """
    name = job.get("metadata", {}).get("name", "?")
    states: dict[str, str] = {}
    blocked: list[tuple[str, str]] = []
    for pod in pods:
        pname = pod.get("metadata", {}).get("name", "?")
        phase = pod.get("status", {}).get("phase", "Unknown")
        states[pname] = phase
        for cspec, cstatus in _containers(pod):
            waiting = (cstatus.get("state") or {}).get("waiting") or {}
            reason = waiting.get("reason", "")
            if not reason:
                continue
            states[pname] = f"{phase} ({reason})"
            image = cspec.get("image") or cstatus.get("image") or "?"
            detail = waiting.get("message", "").strip()
            detail = f": {detail}" if detail else ""
            if reason in IMAGE_REASONS:
                blocked.append(("image", f"the Job {name}'s pod {pname} cannot start: its container "
                                f"{cstatus.get('name')!r} has image {image!r}, which cannot be found "
                                f"({reason}{detail}); {_image_hint(reason)}"))
            elif reason in CONFIG_REASONS:
                blocked.append(("config", f"the Job {name}'s pod {pname} cannot start its container "
                                f"{cstatus.get('name')!r} (image {image!r}): {reason}{detail}; "
                                f"check the Secret and ConfigMap it uses"))
    status = job.get("status", {})
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    summary = ", ".join(f"{p} {s}" for p, s in sorted(states.items())) or "no pods yet"
    if int(status.get("succeeded") or 0) >= 1 or "Complete" in conditions:
        return JobState("succeeded", f"the Job {name} completed ({summary})", states)
    if "Failed" in conditions:
        cond = conditions["Failed"]
        return JobState("failed", f"the Job {name} failed: {cond.get('reason', '')} {cond.get('message', '')}".strip()
                        + f" ({summary}); read the driver's log: kubectl logs job/{name}", states)
    if blocked:
        cause, message = blocked[0]
        return JobState("blocked", message, states, cause)
    return JobState("running", f"the Job {name}: {summary}", states)


def _api(kubeconfig: str | None) -> tuple[Any, Any, Any]:
    try:
        from kubernetes import client, config
    except ImportError as exc:
        raise ConfigError("following a Kubernetes Job needs the kubernetes client; "
                          "install it with: pip install 'xrdscale[k8s]'") from exc
    try:
        if kubeconfig is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
        else:
            config.load_kube_config(config_file=kubeconfig)
    except (config.ConfigException, OSError) as exc:
        raise ConfigError(f"no Kubernetes configuration found ({exc}); set KUBECONFIG or pass --kubeconfig") from exc
    api = client.ApiClient()
    return api, client.BatchV1Api(api), client.CoreV1Api(api)


def read_job(name: str, namespace: str, *, kubeconfig: str | None = None) -> tuple[dict, list[dict]]:
    """The Job ``name`` and its pods as JSON-like dicts (camelCase keys, as kubectl prints them)."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    api, batch, core = _api(kubeconfig)
    try:
        job = batch.read_namespaced_job(name, namespace)
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
    except ApiException as exc:
        if exc.status == 404:
            raise ConfigError(f"there is no Job {name!r} in namespace {namespace!r}: "
                              f"apply it first (kubectl apply -k infra/) or check the name") from exc
        raise ConfigError(f"the Kubernetes API refused to read the Job {name!r} in {namespace!r}: "
                          f"{exc.status} {exc.reason}") from exc
    except (OSError, HTTPError) as exc:
        raise ConfigError(f"the Kubernetes API server cannot be reached ({exc}); check KUBECONFIG") from exc
    return api.sanitize_for_serialization(job), [api.sanitize_for_serialization(p) for p in pods]


def follow_job(name: str, namespace: str = "xrdscale", *, timeout: float = 3600.0, poll: float = 5.0,
               kubeconfig: str | None = None, on_change: Callable[[JobState], None] | None = None,
               read: Callable[[], tuple[dict, list[dict]]] | None = None) -> JobState:
    """Poll a Job until it succeeds; raise with a clear message when it fails, cannot start or times out.

    Parameters
    ----------
    name, namespace : str
        The Job.
    timeout : float
        Seconds to wait for the Job to complete.
    poll : float
        Seconds between reads.
    kubeconfig : str, optional
        Kubeconfig file; default: in-cluster configuration, else ``KUBECONFIG`` / ``~/.kube/config``.
    on_change : callable, optional
        Called with the new :class:`JobState` whenever the pods' states change.
    read : callable, optional
        Returns ``(job, pods)`` JSON; default :func:`read_job`.

    Returns
    -------
    JobState
        The state of the succeeded Job.

    Raises
    ------
    ImageNotFoundError
        A pod's image cannot be found; the message names it.
    StageFailed
        The Job failed, a pod cannot start its container, or the Job did not complete in ``timeout``.
    """
    reader = read or (lambda: read_job(name, namespace, kubeconfig=kubeconfig))
    t0 = time.monotonic()
    last: dict[str, str] | None = None
    while True:
        state = job_state(*reader())
        if state.pods != last:
            last = dict(state.pods)
            logger.info("%s", state.message)
            if on_change is not None:
                on_change(state)
        if state.phase == "succeeded":
            return state
        if state.phase == "blocked":
            if state.cause == "image":
                raise ImageNotFoundError(state.message)
            raise StageFailed(state.message)
        if state.phase == "failed":
            raise StageFailed(state.message)
        if time.monotonic() - t0 > timeout:
            raise StageFailed(f"the Job {name} did not complete within {timeout:.0f} s ({state.message}); "
                              f"it keeps running: kubectl -n {namespace} get pods -l job-name={name}")
        time.sleep(poll)
