"""The Kubernetes manifests parse and keep herd's security rules (no cluster needed)."""
from pathlib import Path

import yaml

from herd.deploy import DeployConfig

K8S = Path(__file__).resolve().parents[2] / "k8s"


def docs():
    out = []
    for f in sorted(K8S.glob("*.yaml")):
        out += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def containers(doc):
    spec = doc.get("spec", {})
    templates = []
    if doc["kind"] == "Deployment":
        templates.append(spec["template"])
    if doc["kind"] == "RayCluster":
        templates.append(spec["headGroupSpec"]["template"])
        templates += [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for t in templates for c in t["spec"]["containers"]]


def test_every_object_is_namespaced_and_kinds_are_present():
    kinds = {d["kind"] for d in docs()}
    assert {"Deployment", "Service", "RayCluster", "NetworkPolicy", "ConfigMap", "PersistentVolumeClaim"} <= kinds
    assert all(d["metadata"].get("namespace") == "herd" for d in docs() if d["kind"] != "Namespace")


def test_no_secret_values_and_secrets_come_from_secret_refs():
    for d in docs():
        assert d["kind"] != "Secret"
        for c in containers(d):
            for env in c.get("env", []):
                if any(w in env["name"] for w in ("PASSWORD", "TOKEN")):
                    assert "secretKeyRef" in env.get("valueFrom", {}), env


def test_ray_runs_with_token_auth_and_its_ports_are_not_services():
    ray = [d for d in docs() if d["kind"] == "RayCluster"]
    assert ray
    for c in containers(ray[0]):
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
    workers = ray[0]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == 1
    for svc in (d for d in docs() if d["kind"] == "Service"):
        assert not ({p["port"] for p in svc["spec"]["ports"]}
                    & {8265, 10001, 6379 if svc["metadata"]["name"] != "redis" else 0})


def test_default_deny_and_grpc_probes():
    policies = [d for d in docs() if d["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and "ingress" not in p["spec"] for p in policies)
    for d in docs():
        if d["kind"] == "Deployment" and d["metadata"]["name"] in ("router", "attention"):
            (c,) = containers(d)
            assert "grpc" in c["readinessProbe"] and "grpc" in c["livenessProbe"]


def test_the_shipped_deploy_config_is_valid(tmp_path):
    cm = next(d for d in docs() if d["kind"] == "ConfigMap")
    path = tmp_path / "deploy.yaml"
    path.write_text(cm["data"]["deploy.yaml"])
    cfg = DeployConfig.load(path)
    assert cfg.device == "cuda" and cfg.gpus_per_worker == 1 and cfg.host == "0.0.0.0"
