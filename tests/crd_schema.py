"""Custom resources checked as the Kubernetes API server checks them against a CRD's structural
schema, with strict field validation (``fieldValidation=Strict``, kubectl's default since 1.27):
a field the schema does not declare is an error, and so is a wrong type, a missing required
field or a value outside an enum. What the real server does, read from kubernetes/apiextensions-
apiserver (``pkg/apiserver/schema``: pruning, ``x-kubernetes-preserve-unknown-fields``,
``x-kubernetes-int-or-string``, ``x-kubernetes-embedded-resource``) at v1.33; the CRDs
themselves are the real projects' files at a pinned tag, kept in tests/fixtures/crds/ as
``<project>-<tag>.<plural>.yaml``.

``unknown_fields(obj, schema)`` lists what the server prunes without strict validation (so a
field that a CRD version lacks is silently dropped: Trainer v2.0/v2.1 and ``runtimePatches``).
"""

from __future__ import annotations

import functools
import os

import yaml

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "crds")
# what each supported version's CRDs are, by the projects' own tags
PYTORCHJOB_CRD = "training-operator-v1.9.4.pytorchjobs.yaml"
TRAINJOB_CRDS = {"v2.2.1": "trainer-v2.2.1.trainjobs.yaml", "v2.3.0": "trainer-v2.3.0.trainjobs.yaml"}
TRAINJOB_CRD_UNSUPPORTED = {"v2.1.0": "trainer-v2.1.0.trainjobs.yaml"}
KATIB_EXPERIMENT_CRD = "katib-v0.19.0.experiments.yaml"


@functools.lru_cache(maxsize=None)
def crd(file: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(os.path.join(FIXTURES, file)) as f:
        return next(d for d in yaml.load_all(f, Loader=loader) if d and d.get("kind") == "CustomResourceDefinition")


def schema_of(file: str, version: str | None = None) -> dict:
    doc = crd(file)
    versions = doc["spec"]["versions"]
    v = next(v for v in versions if v["name"] == version) if version else next(v for v in versions if v["storage"])
    return v["schema"]["openAPIV3Schema"]


def resource_of(file: str) -> tuple[str, str, str, str]:
    """(group, served version, plural, kind) of a CRD file."""
    doc = crd(file)
    version = next(v["name"] for v in doc["spec"]["versions"] if v["storage"])
    return doc["spec"]["group"], version, doc["spec"]["names"]["plural"], doc["spec"]["names"]["kind"]


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float)}


def errors(obj, schema: dict, path: str = "") -> list[str]:
    """Every way ``obj`` breaks ``schema`` under strict validation, as ``path: reason``."""
    out: list[str] = []
    _check(obj, schema, path, out, root=True)
    return out


def unknown_fields(obj, schema: dict) -> list[str]:
    return [e.split(": ", 1)[0] for e in errors(obj, schema) if e.endswith(": unknown field")]


def prune(obj, schema: dict):
    """``obj`` as the API server stores it without strict validation: undeclared fields dropped."""
    if isinstance(obj, dict) and schema.get("type") == "object" and not schema.get(
            "x-kubernetes-preserve-unknown-fields"):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is None and isinstance(extra, dict):
            return {k: prune(v, extra) for k, v in obj.items()}
        if props is None:
            return obj
        return {k: prune(v, props[k]) for k, v in obj.items() if k in props or k in ("apiVersion", "kind")}
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [prune(v, schema["items"]) for v in obj]
    return obj


def _check(obj, schema: dict, path: str, out: list[str], root: bool = False) -> None:
    where = path or "<root>"
    if obj is None:
        if not schema.get("nullable"):
            out.append(f"{where}: null is not allowed")
        return
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(obj, (int, str)) or isinstance(obj, bool):
            out.append(f"{where}: must be an integer or a string")
        return
    kind = schema.get("type")
    if kind:
        expected = _TYPES[kind]
        if not isinstance(obj, expected) or (isinstance(obj, bool) and kind in ("integer", "number")):
            out.append(f"{where}: must be of type {kind}, got {type(obj).__name__}")
            return
    if "enum" in schema and obj not in schema["enum"]:
        out.append(f"{where}: {obj!r} is not one of {schema['enum']}")
    if isinstance(obj, dict):
        for key in schema.get("required", []):
            if key not in obj:
                out.append(f"{path}.{key}: required" if path else f"{key}: required")
        if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
            return
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            child = f"{path}.{key}" if path else key
            if root and key in ("apiVersion", "kind", "metadata"):
                continue   # the API server's own fields (metadata has its own validation)
            if schema.get("x-kubernetes-embedded-resource") and key in ("apiVersion", "kind", "metadata"):
                continue
            if props is not None and key in props:
                _check(value, props[key], child, out)
            elif isinstance(extra, dict):
                _check(value, extra, child, out)
            elif extra is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                continue
            else:
                out.append(f"{child}: unknown field")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            _check(item, schema["items"], f"{path}[{i}]", out)
