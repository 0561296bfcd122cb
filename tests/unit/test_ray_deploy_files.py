"""The Ray and KubeRay files read as data: Ray's own config schema, a JSON schema of the RayService
fields the manifest uses, and the rules the manifest must keep (secrets, GPU, volumes, readiness)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from csmserve.config import Settings
from csmserve.scaleout.options import ReplicaOptions

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
SCHEMA = ROOT / "deploy" / "kuberay" / "rayservice.schema.json"


def rayservice() -> dict:
    (service,) = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc["kind"] == "RayService"]
    return service


def workers(service: dict) -> dict:
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_rayservice_manifest_validates_against_the_crd_schema():
    """Every field of the RayService is one the CRD has, with the right type."""
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator().iter_errors(rayservice())]
    assert errors == []


def test_the_schema_refuses_a_misspelt_field():
    """A typo (workerGroupSpec) is an error, not a field the API server would silently drop."""
    service = rayservice()
    config = service["spec"]["rayClusterConfig"]
    config["workerGroupSpec"] = config.pop("workerGroupSpecs")
    assert not validator().is_valid(service)


@pytest.mark.parametrize("path", ["deploy/ray/serve.yaml", "deploy/ray/local.yaml", "kuberay"])
def test_serve_configs_are_valid_for_ray_and_for_csmserve(path):
    """Ray's own schema (what `serve run`/`serve deploy` check) and csmserve's args and settings accept them."""
    from ray.serve.schema import ServeDeploySchema

    text = rayservice()["spec"]["serveConfigV2"] if path == "kuberay" else (ROOT / path).read_text()
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    (app,) = config.applications
    assert app.import_path == "csmserve.ray_app:build"
    options = ReplicaOptions.model_validate(app.args)
    Settings(**options.replica_settings())


def test_the_manifest_serves_the_same_config_as_deploy_ray_serve_yaml():
    """serveConfigV2 is deploy/ray/serve.yaml: one config for a VM cluster and for Kubernetes."""
    embedded = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((ROOT / "deploy" / "ray" / "serve.yaml").read_text())


def test_secrets_come_from_a_kubernetes_secret_never_the_manifest():
    """HF_TOKEN and CSM_API_KEYS are secretKeyRefs on the GPU workers; no literal values anywhere."""
    service = rayservice()
    (container,) = workers(service)["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    for name in ("HF_TOKEN", "CSM_API_KEYS"):
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"] == "csmserve-secrets"
    assert not re.search(r"hf_[A-Za-z0-9]{8,}", MANIFEST.read_text())


def test_one_gpu_per_worker_pod_and_per_replica_with_the_model_cache_and_shared_voices_mounted():
    """Worker pods have one GPU each (a replica takes one), HF_HOME on the cache volume, and the voices
    folder on a ReadWriteMany claim that every replica mounts."""
    service = rayservice()
    group = workers(service)
    spec = group["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["num_gpus"] == 1 and args["max_replicas"] <= group["maxReplicas"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert mounts[env["HF_HOME"]] == "hf-cache"
    assert mounts[args["settings"]["voices_dir"]] == "shared"
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]}
    modes = {d["metadata"]["name"]: d["spec"]["accessModes"] for d in yaml.safe_load_all(MANIFEST.read_text()) if d["kind"] == "PersistentVolumeClaim"}
    assert modes[claims["shared"]] == ["ReadWriteMany"]
    assert container["readinessProbe"]["httpGet"]["port"] == 8000
    assert spec["terminationGracePeriodSeconds"] > args["graceful_shutdown_timeout_s"]


def test_the_ray_image_dockerfile_passes_hadolint():
    """hadolint finds nothing in deploy/ray/Dockerfile (the repo's .hadolint.yaml settings)."""
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "deploy/ray/Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
