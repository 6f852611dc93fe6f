"""The generated CRD: deterministic, checked in, structural, described, with CEL rules."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import yaml
from voicefleet_operator import crd
from voicefleet_operator.api import ScalingSpec, WorkerSpec
from voicefleet_runtime.config import PipelineConfig


@functools.cache
def schema() -> dict[str, Any]:
    return crd.custom_resource_definition()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (`.spec.agents[].name`)."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def node(path: str) -> dict[str, Any]:
    return dict(walk(schema()))[path]


def test_generation_is_deterministic() -> None:
    assert crd.render() == crd.render()


def test_checked_in_crd_chart_copy_and_reference_match_a_fresh_generation() -> None:
    files = crd.outputs()
    assert set(files) == {*crd.CRD_PATHS, crd.REFERENCE_PATH}
    for path, fresh in files.items():
        assert path.exists(), f"{path} is missing; run `make generate`"
        assert path.read_text() == fresh, f"{path} is out of date; run `make generate`"
    assert crd.main(["--check"]) == 0


def test_reference_lists_every_spec_field() -> None:
    text = crd.reference()
    for path, _ in walk(schema()):
        if path.startswith((".spec.", ".status.")) and not path.endswith("[]"):
            assert f"| `{path[1:]}` |" in text, path


def test_rendered_yaml_is_the_crd_object() -> None:
    assert yaml.safe_load(crd.render()) == crd.custom_resource_definition()


def test_names_scope_and_subresources() -> None:
    document = crd.custom_resource_definition()
    spec = document["spec"]
    assert document["apiVersion"] == "apiextensions.k8s.io/v1"
    assert document["metadata"]["name"] == "voiceagents.voicefleet.dev"
    assert spec["group"] == "voicefleet.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "VoiceAgent",
        "listKind": "VoiceAgentList",
        "plural": "voiceagents",
        "singular": "voiceagent",
        "shortNames": ["va"],
        "categories": ["voicefleet"],
    }
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_printer_columns() -> None:
    columns = crd.custom_resource_definition()["spec"]["versions"][0]["additionalPrinterColumns"]
    default_view = [c["name"] for c in columns if not c.get("priority")]
    assert default_view == ["Ready", "Replicas", "Jobs", "Capacity", "Numbers", "Age"]
    by_name = {c["name"]: c for c in columns}
    assert by_name["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert (
        by_name["Capacity"]["jsonPath"] == '.status.conditions[?(@.type=="CapacityLimited")].reason'
    )
    # Every column reads a field the schema defines.
    paths = dict(walk(schema()))
    for column in columns:
        field = column["jsonPath"].split("[")[0]
        assert field.startswith(".metadata") or field in paths, column


def test_every_property_has_a_description() -> None:
    missing = [
        f"{path}.{name}"
        for path, item in walk(schema())
        for name, prop in item.get("properties", {}).items()
        if not prop.get("description", "").strip() and f"{path}.{name}" != ".metadata"
    ]
    assert missing == []
    # Objects inside lists are described too (kubectl explain shows them).
    for path, item in walk(schema()):
        if item.get("type") == "object" and "properties" in item:
            assert item.get("description"), path


def test_schema_is_structural() -> None:
    for path, item in walk(schema()):
        assert "$ref" not in item and "allOf" not in item and "oneOf" not in item, path
        assert "title" not in item and "const" not in item, path
        if "anyOf" in item:  # only int-or-string, as Kubernetes' own quantities
            assert item["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            assert item["x-kubernetes-int-or-string"] is True, path
        elif not item.get("x-kubernetes-preserve-unknown-fields"):  # any JSON value
            assert "type" in item, path
        assert {"type": "null"} not in item.get("anyOf", []), path
        if "additionalProperties" in item:
            assert isinstance(item["additionalProperties"], dict), path
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            if key in item:
                assert item[key] is True, path


def test_patterns_enums_defaults_and_bounds() -> None:
    assert node(".spec.telephony.numbers[]")["pattern"] == r"^\+[1-9][0-9]{6,14}$"
    assert node(".spec.agents[].name")["pattern"] == "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    assert node(".spec.pipeline.turnDetection.mode")["enum"] == [
        "multilingual",
        "english",
        "vad",
        "stt",
        "manual",
    ]
    assert node(".spec.pipeline.llm.provider")["enum"] == ["openai"]
    assert node(".spec.scaling.mode") | {} == {
        "default": "operator",
        "description": node(".spec.scaling.mode")["description"],
        "enum": ["operator", "hpa"],
        "type": "string",
    }
    load = node(".spec.worker.loadThreshold")
    assert (load["minimum"], load["exclusiveMinimum"], load["maximum"]) == (0, True, 1)
    assert node(".spec.worker.jobsPerWorker")["minimum"] == 1
    assert node(".spec.agents")["minItems"] == 1 and node(".spec.agents")["maxItems"] == 16
    assert node(".spec.agents[].instructions")["minLength"] == 1
    # Model-valued defaults are written in full (the API server checks them against CEL as is).
    assert node(".spec.scaling")["default"] == ScalingSpec().wire()
    assert node(".spec.pipeline")["default"] == PipelineConfig().wire()
    assert node(".spec.worker")["default"] == WorkerSpec().wire()
    assert node(".spec.scaling.minReplicas")["default"] == 1
    # Optional-with-a-default stays nullable, so it can still be turned off.
    assert node(".spec.pipeline.userAwayTimeoutSeconds")["nullable"] is True
    # The tool's free-form JSON schema is kept as written.
    assert node(".spec.tools[].parameters")["x-kubernetes-preserve-unknown-fields"] is True
    assert node(".spec")["required"] == ["agents", "entry"]
    assert schema()["required"] == ["spec"]


def test_list_semantics() -> None:
    for path in (".spec.agents", ".spec.tools", ".spec.mcpServers", ".spec.secretRefs"):
        assert node(path)["x-kubernetes-list-type"] == "map", path
        assert node(path)["x-kubernetes-list-map-keys"] == ["name"], path
    assert node(".status.conditions")["x-kubernetes-list-map-keys"] == ["type"]
    for path in (".spec.agents[].tools", ".spec.agents[].handoffs", ".spec.telephony.numbers"):
        assert node(path)["x-kubernetes-list-type"] == "set", path


def test_cel_rules_for_cross_field_constraints() -> None:
    def rules(path: str) -> list[str]:
        return [rule["rule"] for rule in node(path).get("x-kubernetes-validations", [])]

    spec_rules = " ".join(rules(".spec"))
    assert "self.agents.exists(a, a.name == self.entry)" in spec_rules
    assert "a.handoffs.all(h, self.agents.exists(b, b.name == h))" in spec_rules
    assert "self.tools.exists(d, d.name == t)" in spec_rules
    assert "self.minReplicas <= self.maxReplicas" in rules(".spec.scaling")
    assert any("jobMemoryWarnMB <= self.jobMemoryLimitMB" in r for r in rules(".spec.worker"))
    assert "has(self.value) != has(self.valueFrom)" in rules(".spec.tools[].http.headers[]")
    assert "isIP(self) || isCIDR(self)" in rules(".spec.telephony.inbound.allowedAddresses[]")
    assert any("self.metadata.name" in r for r in rules(""))


def test_cel_rules_are_bounded() -> None:
    """The API server estimates CEL cost from maxItems/maxLength; every list needs a bound."""
    for path, item in walk(schema()):
        if item.get("type") == "array" and not path.startswith(".status"):
            assert "maxItems" in item, path
