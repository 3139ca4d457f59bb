"""The JSON schema of docker/k8s/kserve/inferenceservice.schema.json, derived from KServe's CRD.

KServe publishes the ``InferenceService`` custom resource definition with an
``openAPIV3Schema`` per version. This module cuts from the ``v1beta1`` schema the fields our
manifests use (every manifest key must exist there: an unknown one is an error here, not
silently dropped) and turns it into a strict JSON schema (draft 2020-12) for an offline check:

- objects keep only the properties used, with ``additionalProperties: false`` (a misspelt or
  unknown field fails, which the API server would silently prune); their ``required`` lists,
  ``type``, ``format``, ``enum`` and ``pattern`` are the CRD's;
- maps (``additionalProperties`` schemas, e.g. ``resources.limits``) keep their value schema;
  ``x-kubernetes-int-or-string`` becomes ``anyOf`` integer / string;
- ``apiVersion``, ``kind`` and ``metadata.name`` are pinned (the CRD leaves ObjectMeta open).

Regenerate after changing a manifest's fields::

    python -m tests.support.kserve_schema CRD.yaml docker/k8s/kserve/*.yaml \\
        > docker/k8s/kserve/inferenceservice.schema.json

with ``CRD.yaml`` KServe's ``config/crd/full/serving.kserve.io_inferenceservices.yaml``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

KEPT = ("type", "format", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems")



def prune(schema: dict, values: list, where: str = "") -> dict:
    """``schema`` cut down to what ``values`` (instances at this place in the manifests) use."""
    out: dict = {k: schema[k] for k in KEPT if k in schema}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in schema:
        used = sorted({key for v in values if isinstance(v, dict) for key in v})
        unknown = [k for k in used if k not in schema["properties"]]
        if unknown:
            raise KeyError(f"{where or '/'}: {unknown} not in the CRD schema")
        out["properties"] = {k: prune(schema["properties"][k], [v[k] for v in values if isinstance(v, dict) and k in v],
                                      f"{where}/{k}") for k in used}
        out["additionalProperties"] = False
        if schema.get("required"):
            out["required"] = list(schema["required"])
    elif isinstance(schema.get("additionalProperties"), dict):
        inner = [x for v in values if isinstance(v, dict) for x in v.values()]
        out["additionalProperties"] = prune(schema["additionalProperties"], inner, f"{where}/*")
    if "items" in schema:
        inner = [x for v in values if isinstance(v, list) for x in v]
        out["items"] = prune(schema["items"], inner, f"{where}[]")
    return out


def derive(crd: dict, manifests: list[dict]) -> dict:
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    root = version["schema"]["openAPIV3Schema"]
    spec = prune(root["properties"]["spec"], [m["spec"] for m in manifests], "/spec")
    meta_keys = sorted({k for m in manifests for k in m["metadata"]})
    metadata = {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    }}
    unknown = [k for k in meta_keys if k not in metadata["properties"]]
    if unknown:
        raise KeyError(f"/metadata: {unknown} not checked by this schema")
    group = crd["spec"]["group"]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"InferenceService {group}/v1beta1: the fields used by docker/k8s/kserve (strict)",
        "description": "Derived by tests/support/kserve_schema.py from the openAPIV3Schema of KServe's "
                       "InferenceService CRD (v1beta1); regenerate it when the manifests use new fields.",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {"apiVersion": {"const": f"{group}/v1beta1"}, "kind": {"const": "InferenceService"},
                       "metadata": metadata, "spec": spec},
    }


def main(argv: list[str]) -> None:
    crd = yaml.safe_load(Path(argv[0]).read_text())
    manifests = [d for p in argv[1:] for d in yaml.safe_load_all(Path(p).read_text()) if d]
    json.dump(derive(crd, manifests), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
