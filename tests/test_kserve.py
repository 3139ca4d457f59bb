"""The KServe InferenceService manifests (docker/k8s/kserve/), checked offline.

1. Against the vendored JSON schema ``docker/k8s/kserve/inferenceservice.schema.json``, cut from
   the ``openAPIV3Schema`` of KServe's InferenceService CRD by ``tests/support/kserve_schema.py``
   (strict: an unknown field is an error; types, enums and required fields are the CRD's).
2. The pod part of the predictor (containers, volumes, security context, tolerations) as a Pod
   against the Kubernetes schemas bundled in ``kubernetes-validate`` (as tests/test_replicas.py).
3. What serving needs: the protocol's health endpoints as probes on the served port, the
   artifact claim of pvc.yaml, a CPU and a GPU variant.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

ROOT = Path(__file__).resolve().parents[1]
KSERVE = ROOT / "docker" / "k8s" / "kserve"
SCHEMA = json.loads((KSERVE / "inferenceservice.schema.json").read_text())
K8S_VERSION = "1.30"
POD_FIELDS = ("containers", "volumes", "securityContext", "tolerations", "terminationGracePeriodSeconds")


def _manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(KSERVE.glob("*.yaml"))}


def _errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in Draft202012Validator(SCHEMA).iter_errors(doc)]


def test_schema_is_a_valid_strict_json_schema():
    Draft202012Validator.check_schema(SCHEMA)
    predictor = SCHEMA["properties"]["spec"]["properties"]["predictor"]
    assert predictor["additionalProperties"] is False
    assert predictor["properties"]["scaleMetric"]["enum"] == ["cpu", "memory", "concurrency", "rps"]
    assert predictor["properties"]["containers"]["items"]["required"] == ["name"]


@pytest.mark.parametrize("name", sorted(_manifests()))
def test_every_inference_service_is_valid_against_the_kserve_crd_schema(name):
    assert _errors(_manifests()[name]) == []


def test_the_schema_check_catches_errors():
    doc = _manifests()["inferenceservice.yaml"]
    container = ("spec", "predictor", "containers", 0)

    def at(d, path):
        for p in path:
            d = d[p]
        return d

    predictor = ("spec", "predictor")
    cases = [  # (where, change: a value or None to delete, the one error expected)
        ((*predictor, "minReplicas"), "two", "spec/predictor/minReplicas: 'two' is not of type 'integer'"),
        ((*predictor, "scaleMetric"), "queue", "spec/predictor/scaleMetric: 'queue' is not one of"),
        ((*container, "imagePullPolicy2"), "Always", "spec/predictor/containers/0: Additional properties"),
        ((*container, "name"), None, "spec/predictor/containers/0: 'name' is a required property"),
        ((*container, "ports", 0, "containerPort"), "8000",
         "spec/predictor/containers/0/ports/0/containerPort: '8000' is not of type 'integer'"),
        ((*container, "resources", "limits", "memory"), "4 GB",
         "spec/predictor/containers/0/resources/limits/memory: '4 GB' does not match"),
        (("apiVersion",), "serving.kserve.io/v1alpha1", "apiVersion: 'serving.kserve.io/v1beta1' was expected"),
        (predictor, None, "spec: 'predictor' is a required property"),
    ]
    for path, value, message in cases:
        bad = copy.deepcopy(doc)
        parent = at(bad, path[:-1])
        if value is None:
            parent.pop(path[-1])
        else:
            parent[path[-1]] = value
        errors = _errors(bad)
        assert len(errors) == 1 and errors[0].startswith(message), (message, errors)


@pytest.mark.parametrize("name", sorted(_manifests()))
def test_the_predictor_pod_is_valid_against_the_kubernetes_schema(name):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (PyPI) not installed")
    predictor = _manifests()[name]["spec"]["predictor"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gga"},
           "spec": {k: predictor[k] for k in POD_FIELDS if k in predictor}}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_cpu_and_gpu_variants_serve_the_protocol_from_the_artifact_claim():
    docs = _manifests()
    assert set(docs) == {"inferenceservice.yaml", "inferenceservice-gpu.yaml"}
    (pvc,) = [d for d in yaml.safe_load_all((ROOT / "docker" / "k8s" / "pvc.yaml").read_text())
              if d and d["kind"] == "PersistentVolumeClaim"]
    devices = {}
    for name, doc in docs.items():
        assert doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
        predictor = doc["spec"]["predictor"]
        (container,) = predictor["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        (port,) = container["ports"]
        assert port["containerPort"] == int(env["GGA_PORT"]) == 8000 and env["GGA_HOST"] == "0.0.0.0"
        assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8000}
        assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}
        volumes = {v["name"]: v for v in predictor["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert env["GGA_ARTIFACT_DIR"] == "/data/artifacts" and "emptyDir" in volumes[mounts["/tmp"]]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert predictor["securityContext"]["runAsNonRoot"] is True
        devices[name] = (env["GGA_DEVICE"], container["resources"]["limits"].get("nvidia.com/gpu"))
    assert devices == {"inferenceservice.yaml": ("cpu", None), "inferenceservice-gpu.yaml": ("cuda", 1)}
