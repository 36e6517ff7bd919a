"""Validate a KubeRay RayJob manifest as the Kubernetes API server would, without a Kubernetes.

The schema is KubeRay's own: the `v1` openAPIV3Schema of its RayJob CRD, stored unchanged in
cluster/k8s/schema/ (SOURCE.md says from which commit). Kubernetes' structural schemas are JSON Schema plus
a few extensions, read here as the API server reads them:

- `x-kubernetes-int-or-string: true`: an integer or a string (the CRD pairs it with an `anyOf` of both);
- `nullable: true`: null is allowed besides the declared type;
- an object with `properties` accepts no other field (the API server prunes unknown fields and
  `kubectl apply --validate=strict` rejects them: a misspelt field is never silently ignored here),
  unless it says `x-kubernetes-preserve-unknown-fields: true`;
- `metadata` at the top is an ObjectMeta, which the CRD leaves as `type: object`: its `name` is checked
  as the API server checks it (an RFC 1123 subdomain, at most 253 characters), the rest is not.

Not checked: `x-kubernetes-validations` (CEL rules the API server evaluates) and value formats such as
int32 ranges; what the operator itself refuses at reconcile time.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
from pathlib import Path

import jsonschema

SCHEMA = Path(__file__).resolve().parents[1] / "cluster" / "k8s" / "schema" / "rayjob.ray.io_v1.json.gz"
API_VERSION, KIND = "ray.io/v1", "RayJob"
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _structural(node):
    """A copy of a Kubernetes structural schema node rewritten as plain, strict JSON Schema (module docstring)."""
    if isinstance(node, list):
        return [_structural(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _structural(value) for key, value in node.items()
           if key not in ("x-kubernetes-validations", "default")}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


@functools.cache
def _validator() -> jsonschema.Draft7Validator:
    schema = _structural(json.loads(gzip.decompress(SCHEMA.read_bytes())))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(copy.deepcopy(schema))


def _where(path) -> str:
    """`spec.rayClusterSpec.workerGroupSpecs[0].template` from jsonschema's absolute path."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "(top level)"


def validate_rayjob(manifest: dict) -> list[str]:
    """Every way `manifest` fails the RayJob v1 schema, one line each as `path: message`; empty when it is valid."""
    errors = []
    if (manifest.get("apiVersion"), manifest.get("kind")) != (API_VERSION, KIND):
        errors.append(f"apiVersion/kind: expected {API_VERSION} {KIND}, "
                      f"got {manifest.get('apiVersion')} {manifest.get('kind')}")
    name = (manifest.get("metadata") or {}).get("name")
    if not isinstance(name, str) or len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name):
        errors.append(f"metadata.name: {name!r} is not a lower-case RFC 1123 subdomain of at most 253 characters")
    for error in sorted(_validator().iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path))):
        errors.append(f"{_where(error.absolute_path)}: {error.message}")
    return errors
