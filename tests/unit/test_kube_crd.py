"""The CRD says what the shared pydantic spec says: same fields, defaults, bounds and enums.

The API server validates with ``crds/analysisrun.yaml``; the operator, the CLI and the worker
validate with ``analysisq.spec.AnalysisRunSpec``. A spec the server accepts must parse, and a
spec it refuses must not, so both are normalised to one shape and compared field by field.
The few rules pydantic states as validators rather than schema keywords (DNS-label target
names, http(s) endpoints, unique names, ``http`` needs an endpoint) are checked by behaviour.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from analysisq.errors import SpecError
from analysisq.spec import AnalysisRunSpec, Target, parse_spec

pytestmark = pytest.mark.unit

CRD_PATH = Path(__file__).parents[2] / "crds" / "analysisrun.yaml"
_KEYWORDS = (
    "type",
    "format",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "maxProperties",
    "pattern",
    "enum",
    "default",
)
# Rules pydantic keeps in validators (tested below by behaviour), not in its JSON schema.
_VALIDATOR_PATTERNS = {("targets", "[]", "name"), ("targets", "[]", "endpoint")}


def crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CRD_PATH.read_text())
    return loaded


def crd_version() -> dict[str, Any]:
    (version,) = crd()["spec"]["versions"]
    return dict(version)


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        node = {
            **defs[node["$ref"].rsplit("/", 1)[1]],
            **{k: v for k, v in node.items() if k != "$ref"},
        }
    options = node.get("anyOf")
    if options and any(o.get("type") == "null" for o in options):
        (real,) = [o for o in options if o.get("type") != "null"]
        node = {**_resolve(real, defs), **{k: v for k, v in node.items() if k != "anyOf"}}
        if node.get("default", "absent") is None:
            del node["default"]
    return node


def normalise(node: dict[str, Any], defs: dict[str, Any], path: tuple[str, ...] = ()) -> Any:
    """The validation-relevant part of a schema node, with pydantic's spellings mapped to the
    API server's (numeric ``exclusiveMinimum``, integer bounds, int-or-string quantities)."""
    node = _resolve(node, defs)
    if node.get("x-kubernetes-int-or-string") or (
        "anyOf" in node and {o.get("type") for o in node["anyOf"]} == {"integer", "string"}
    ):
        pattern = node.get("pattern") or next(
            o.get("pattern") for o in node["anyOf"] if o.get("type") == "string"
        )
        return {"int-or-string": pattern.strip()}
    out: dict[str, Any] = {k: node[k] for k in _KEYWORDS if k in node}
    excl = node.get("exclusiveMinimum")
    if excl is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    elif excl is not None and excl is not False:
        out["exclusiveMinimum"] = excl
    if out.get("type") == "integer" and "exclusiveMinimum" in out:
        out["minimum"] = out.pop("exclusiveMinimum") + 1
    if out.get("type") == "array" and "x-kubernetes-list-map-keys" not in node:
        out.pop("default", None)
    if out.get("type") == "object" and out.get("default") == {}:
        out["default"] = {}
    if out.get("format") == "int64":
        del out["format"]
    if "pattern" in out:
        out["pattern"] = out["pattern"].strip()
    if path in _VALIDATOR_PATTERNS:
        out.pop("pattern", None)
    if "properties" in node:
        out["properties"] = {
            name: normalise(child, defs, (*path, name))
            for name, child in node["properties"].items()
            if name not in ("apiVersion", "kind", "metadata")
        }
        out["required"] = sorted(node.get("required", []))
    if "items" in node:
        out["items"] = normalise(node["items"], defs, (*path, "[]"))
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and extra:
        out["values"] = normalise(extra, defs, (*path, "{}"))
    return out


def pydantic_schema() -> Any:
    schema = AnalysisRunSpec.model_json_schema(by_alias=True)
    # A sub-model made by default_factory is the CRD's `default: {}` (all its own defaults),
    # at the top and inside a target.
    for model, node in ((AnalysisRunSpec, schema), (Target, schema["$defs"]["Target"])):
        for name, info in model.model_fields.items():
            factory = info.default_factory
            if isinstance(factory, type) and issubclass(factory, BaseModel):
                node["properties"][info.alias or name]["default"] = {}
    return normalise(schema, schema.get("$defs", {}))


def crd_schema() -> Any:
    spec = crd_version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return normalise(spec, {})


def _walk(a: Any, b: Any, path: str = "spec") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        problems = []
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                side = "CRD" if key in a else "pydantic"
                problems.append(f"{path}.{key}: only in the {side} ({a.get(key, b.get(key))!r})")
            else:
                problems += _walk(a[key], b[key], f"{path}.{key}")
        return problems
    return [] if a == b else [f"{path}: CRD {a!r} != pydantic {b!r}"]


def test_the_crd_schema_and_the_pydantic_spec_agree() -> None:
    assert _walk(crd_schema(), pydantic_schema()) == []


def test_the_crd_names_and_versions() -> None:
    doc = crd()
    names = doc["spec"]["names"]
    assert doc["metadata"]["name"] == "analysisruns.analysisq.io"
    assert doc["spec"]["scope"] == "Namespaced"
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "AnalysisRun",
        "analysisruns",
        ["ar"],
    )
    assert "analysisq" in names["categories"]
    version = crd_version()
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_printer_columns_are_the_resource_contract() -> None:
    columns = crd_version()["additionalPrinterColumns"]
    default = [c["name"] for c in columns if not c.get("priority")]
    wide = [c["name"] for c in columns if c.get("priority") == 1]
    assert default == [
        "Phase",
        "Total",
        "Pending",
        "Processing",
        "Completed",
        "Failed",
        "Progress",
        "Age",
    ]
    assert {"Retrying", "Stuck", "Workers", "Message"} <= set(wide)
    status = crd_version()["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for column in columns:
        parts = column["jsonPath"].lstrip(".").split(".")
        if parts[0] != "status":
            continue
        node: dict[str, Any] = {"properties": status}
        for part in parts[1:]:
            node = node["properties"][part]
        assert node["type"] == column["type"], column


def test_status_holds_what_the_contract_names() -> None:
    status = crd_version()["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert set(status["counts"]["properties"]) == {
        "total",
        "pending",
        "processing",
        "completed",
        "failed",
        "retrying",
        "stuck",
    }
    assert set(status["workers"]["properties"]) == {"desired", "ready"}
    assert status["phase"]["enum"] == [
        "Pending",
        "Filling",
        "Running",
        "Suspended",
        "Paused",
        "Succeeded",
        "Failed",
    ]
    condition = status["conditions"]["items"]
    assert set(condition["required"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
    }
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    assert {"observedGeneration", "startedAt", "finishedAt", "lastStuckReset"} <= set(status)


def test_every_cel_rule_has_a_message() -> None:
    found = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations", []):
                found.append(rule)
                assert rule.get("message") or rule.get("messageExpression"), rule
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(crd_version()["schema"])
    assert len(found) >= 7


def _spec(**target: Any) -> dict[str, Any]:
    return {"targets": [{"name": "a", "provider": "echo", "model": "m", **target}]}


@pytest.mark.parametrize(
    ("target", "pattern"),
    [
        ({"name": "Bad_Name"}, r"DNS label"),
        ({"provider": "http"}, r"needs an endpoint"),
        ({"endpoint": "ftp://x"}, r"http:// or https://"),
    ],
)
def test_rules_pydantic_keeps_in_validators_hold(target: dict[str, Any], pattern: str) -> None:
    version = crd_version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    target_schema = version["targets"]["items"]["properties"]
    assert re.match(target_schema["name"]["pattern"], "bad_name") is None
    assert re.match(target_schema["endpoint"]["pattern"], "ftp://x") is None
    with pytest.raises(SpecError, match=pattern):
        parse_spec(_spec(**target))


def test_duplicate_target_names_are_refused_by_both() -> None:
    targets = crd_version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "targets"
    ]
    assert targets["x-kubernetes-list-type"] == "map"
    assert targets["x-kubernetes-list-map-keys"] == ["name"]
    spec = _spec()
    spec["targets"].append(dict(spec["targets"][0]))
    with pytest.raises(SpecError, match="unique"):
        parse_spec(spec)
