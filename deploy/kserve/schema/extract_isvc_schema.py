"""Build the JSON schema of a KServe InferenceService (serving.kserve.io/v1beta1) from KServe's own
generated API models, for offline validation of deploy/kserve/*.yaml. See SOURCE.md.

    pip download --no-deps kserve==0.21.0 -d /tmp/kserve
    python deploy/kserve/schema/extract_isvc_schema.py /tmp/kserve/kserve-0.21.0-py3-none-any.whl \
        > deploy/kserve/schema/inferenceservice-v1beta1.json

The KServe Python SDK (the `kserve` wheel on PyPI) ships one class per type of KServe's OpenAPI
document (openapi-generator output: `kserve/models/v1beta1_*.py`), each with `openapi_types`
(attribute -> type), `attribute_map` (attribute -> JSON key) and a ValueError for every required
field. This script reads those files from the wheel without importing them (no dependencies) and
writes a draft 2020-12 schema: every KServe object type is closed (additionalProperties: false, as
the API server's structural-schema pruning would drop unknown fields), required fields are required,
and Kubernetes types (V1Container, V1ObjectMeta, ...) are $refs into the Kubernetes definitions that
the kubernetes-validate package ships (https://kubernetes.io/api/_definitions.json, its $id), so the
pod-level parts are checked against the Kubernetes schema of the chosen version. `status` is left
open: the controller writes it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path

K8S_DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/"
ROOT = "V1beta1InferenceService"
SCALARS = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "object": {},
    "datetime": {"type": "string"},
}
# Python-client names of Kubernetes types -> Kubernetes OpenAPI definition names.
SPECIAL = {"ResourceQuantity": "io.k8s.apimachinery.pkg.api.resource.Quantity"}
K8S_PREFERENCE = ["io.k8s.api.core.", "io.k8s.apimachinery.pkg.apis.meta.", "io.k8s.api."]


def read_models(wheel: Path) -> dict[str, dict]:
    """class name -> {"types": {attr: type}, "keys": {attr: json key}, "required": [attr]}."""
    models: dict[str, dict] = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            if not re.fullmatch(r"kserve/models/[a-z0-9_]+\.py", name) or name.endswith("__init__.py"):
                continue
            source = archive.read(name).decode()
            for node in ast.parse(source).body:
                if not isinstance(node, ast.ClassDef):
                    continue
                found = {}
                for item in node.body:
                    if (
                        isinstance(item, ast.Assign)
                        and len(item.targets) == 1
                        and isinstance(item.targets[0], ast.Name)
                    ) and item.targets[0].id in ("openapi_types", "attribute_map"):
                        found[item.targets[0].id] = ast.literal_eval(item.value)
                if "openapi_types" in found:
                    required = re.findall(r"Invalid value for `(\w+)`, must not be `None`", source)
                    models[node.name] = {
                        "types": found["openapi_types"],
                        "keys": found["attribute_map"],
                        "required": sorted(set(required)),
                        "file": name,
                    }
    return models


def k8s_definition(name: str, k8s: dict) -> str | None:
    if name in SPECIAL:
        return SPECIAL[name]
    match = re.fullmatch(r"K8sIoApi([A-Z][a-z]+)(V\d+(?:(?:alpha|beta)\d+)?)([A-Z]\w*)", name)
    if match:
        group, version, kind = match.groups()
        key = f"io.k8s.api.{group.lower()}.{version.lower()}.{kind}"
        return key if key in k8s else None
    match = re.fullmatch(r"(V\d+(?:(?:alpha|beta)\d+)?)([A-Z]\w*)", name)
    if not match:
        return None
    version, kind = match.group(1).lower(), match.group(2)
    candidates = [k for k in k8s if k.endswith(f".{version}.{kind}")]
    for prefix in K8S_PREFERENCE:
        preferred = [k for k in candidates if k.startswith(prefix)]
        if len(preferred) == 1:
            return preferred[0]
        if len(preferred) > 1:
            raise SystemExit(f"{name}: ambiguous Kubernetes type {preferred}")
    return None


def build(wheel: Path, k8s_definitions: Path) -> dict:
    models = read_models(wheel)
    k8s = json.loads(k8s_definitions.read_text())["$defs"]
    defs: dict[str, dict] = {}
    unresolved: set[str] = set()

    def schema(type_name: str) -> dict:
        type_name = type_name.strip()
        if type_name in SCALARS:
            return dict(SCALARS[type_name])
        if type_name.startswith("list[") and type_name.endswith("]"):
            return {"type": "array", "items": schema(type_name[5:-1])}
        if type_name.startswith("dict(") and type_name.endswith(")"):
            _key, _, value = type_name[5:-1].partition(",")
            return {"type": "object", "additionalProperties": schema(value)}
        if type_name.startswith(("V1beta1", "V1alpha1", "V1alpha2")) and type_name in models:
            visit(type_name)
            return {"$ref": f"#/$defs/{type_name}"}
        definition = k8s_definition(type_name, k8s)
        if definition is not None:
            return {"$ref": K8S_DEFS + definition}
        unresolved.add(type_name)
        return {"description": f"{type_name}: not checked (no schema for it)"}

    def visit(name: str) -> None:
        if name in defs:
            return
        model = models[name]
        defs[name] = {}  # placeholder against cycles
        properties = {}
        for attr, type_name in model["types"].items():
            key = model["keys"][attr]
            if name == ROOT and key == "status":
                properties[key] = {"type": "object", "description": "written by the controller; not checked"}
                continue
            properties[key] = schema(type_name)
        definition = {
            "type": "object",
            "properties": properties,
            "additionalProperties": False,
            "x-kserve-sdk-model": model["file"],
        }
        required = [model["keys"][a] for a in model["required"] if a in model["keys"]]
        if required:
            definition["required"] = required
        defs[name] = definition

    visit(ROOT)
    root = defs.pop(ROOT)
    root["required"] = sorted(set(root.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    root["properties"]["apiVersion"] = {"const": "serving.kserve.io/v1beta1"}
    root["properties"]["kind"] = {"const": "InferenceService"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:model-serving:kserve:inferenceservice-v1beta1",
        "title": "KServe InferenceService serving.kserve.io/v1beta1",
        "x-source": {
            "wheel": wheel.name,
            "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
            "kubernetes_definitions": str(k8s_definitions.parent.name),
            "unresolved_types": sorted(unresolved),
        },
        **root,
        "$defs": dict(sorted(defs.items())),
    }


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    wheel = Path(sys.argv[1])
    if len(sys.argv) == 3:
        definitions = Path(sys.argv[2])
    else:
        import kubernetes_validate

        base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
        definitions = base / "v1.37.0-local-strict" / "_definitions.json"
    print(json.dumps(build(wheel, definitions), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
