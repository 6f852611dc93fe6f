"""The VoiceAgent API models: the example is accepted, bad input is rejected naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ConfigDict
from voicefleet_operator.api import (
    SecretReference,
    SpecError,
    VoiceAgent,
    VoiceAgentSpec,
    _list_semantics,
    _schema_extra,
    parse_spec,
    parse_status,
)
from voicefleet_runtime.config import (
    AgentsSection,
    Model,
    TelephonyOptions,
    WorkerSettings,
    cel,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example() -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / "voiceagent.yaml").read_text())


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_is_valid(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        if document and document.get("kind") == "VoiceAgent":
            agent = VoiceAgent.model_validate(document)
            assert agent.spec.agents, path


def test_example_parses_with_expected_values() -> None:
    spec = parse_spec(example()["spec"])
    assert [agent.name for agent in spec.agents] == ["receptionist", "billing"]
    assert spec.entry == "receptionist"
    assert spec.tools[0].http.headers[0].value_from is not None
    assert spec.tools[0].http.headers[0].value_from.secret_key_ref.key == "authorization"
    assert spec.telephony is not None and spec.telephony.numbers == ["+15551230001"]
    assert spec.telephony.inbound is not None
    assert spec.telephony.inbound.auth_secret_ref is not None
    assert spec.secret_refs[0].name == "provider-keys"
    assert (spec.scaling.min_replicas, spec.scaling.max_replicas) == (1, 10)


def test_spec_reuses_runtime_models_so_they_cannot_drift() -> None:
    assert issubclass(VoiceAgentSpec, AgentsSection)
    spec = parse_spec(example()["spec"])
    assert isinstance(spec.worker, WorkerSettings)
    assert isinstance(spec.telephony, TelephonyOptions)


def test_defaults_of_a_minimal_spec() -> None:
    spec = parse_spec({"agents": [{"name": "a", "instructions": "Be brief."}], "entry": "a"})
    wire = spec.wire()
    assert wire["scaling"] == {
        "mode": "operator",
        "minReplicas": 1,
        "maxReplicas": 10,
        "targetLoad": 0.7,
        "spareJobs": 2,
        "scaleDownDelaySeconds": 300,
    }
    assert wire["worker"]["jobsPerWorker"] == 10
    assert wire["pipeline"]["stt"]["provider"] == "deepgram"
    assert "telephony" not in wire and wire["tools"] == [] and wire["secretRefs"] == []


def _mutate(path: str, value: Any) -> dict[str, Any]:
    """The example's spec with one value replaced; path like `agents.0.name`."""
    spec = copy.deepcopy(example()["spec"])
    parts = path.split(".")
    node: Any = spec
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return spec


_DELETE = object()

INVALID: list[tuple[str, Any, str]] = [
    ("telephony.numbers", ["5551230001"], "spec.telephony.numbers[0]"),
    ("telephony.numbers", ["+15551230001", "+15551230001"], "telephony number"),
    ("telephony.transferTo", "555-HUMAN", "spec.telephony.transferTo"),
    ("telephony.inbound.allowedAddresses", ["10.0.0.300"], "allowedAddresses[0]"),
    (
        "telephony.inbound.allowedAddresses",
        ["10.0.0.0/8", "192.0.2.10", "10.0.0.0/8"],
        "spec.telephony.inbound: allowedAddresses entry '10.0.0.0/8' appears twice",
    ),
    ("agents.0.name", "Receptionist", "spec.agents[0].name"),
    ("agents.0.instructions", "", "spec.agents[0].instructions"),
    ("entry", "nobody", "entry 'nobody' names no agent"),
    ("agents.0.tools", ["undefined_tool"], "agents[0].tools"),
    ("agents.0.handoffs", ["nobody"], "agents[0].handoffs"),
    ("agents.1.handoffs", ["billing"], "lists itself in handoffs"),
    ("agents", _DELETE, "spec.agents"),
    ("agents", [], "spec.agents"),
    ("scaling.minReplicas", 11, "minReplicas (11) must not exceed maxReplicas"),
    ("scaling.mode", "keda", "spec.scaling.mode"),
    ("scaling.targetLoad", 0.9, "scaling.targetLoad (0.9) must not exceed worker.loadThreshold"),
    ("worker.jobMemoryWarnMB", 2000, "jobMemoryWarnMB (2000) must not exceed jobMemoryLimitMB"),
    ("worker.jobsPerWorker", 0, "spec.worker.jobsPerWorker"),
    ("worker.loadThreshold", 1.5, "spec.worker.loadThreshold"),
    ("worker.image", "bad image", "spec.worker.image"),
    ("worker.resources", {"limits": {"memory": "lots"}}, "spec.worker.resources.limits.memory"),
    ("pipeline.stt.provider", "whisper", "spec.pipeline.stt.provider"),
    ("tools.0.http.url", "ftp://orders", "spec.tools[0].http.url"),
    ("tools.0.http.headers.0.value", "Bearer x", "set exactly one of value or valueFrom"),
    ("secretRefs", [{"name": "Provider_Keys"}], "spec.secretRefs[0].name"),
    ("secretRefs", [{"name": "a"}, {"name": "a"}], "secretRefs name 'a' appears twice"),
    ("bogusField", 1, "spec.bogusField: unknown field"),
]


@pytest.mark.parametrize(("path", "value", "expected"), INVALID, ids=[i[0] for i in INVALID])
def test_invalid_spec_is_rejected_naming_the_field(path: str, value: Any, expected: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec(_mutate(path, value))
    assert expected in str(raised.value)


def test_too_many_agents() -> None:
    agents = [{"name": f"a{i}", "instructions": "x"} for i in range(17)]
    with pytest.raises(SpecError, match=r"spec\.agents: List should have at most 16 items"):
        parse_spec({"agents": agents, "entry": "a0"})


def test_metadata_name_must_fit_child_names() -> None:
    document = example()
    document["metadata"]["name"] = "9-starts-with-a-digit"
    with pytest.raises(ValueError, match="DNS-1035 label"):
        VoiceAgent.model_validate(document)
    document["metadata"]["name"] = "a" * 51
    with pytest.raises(ValueError, match="at most 50 characters"):
        VoiceAgent.model_validate(document)
    document["metadata"]["name"] = "a" * 50  # the longest name that still fits
    assert VoiceAgent.model_validate(document).metadata["name"] == "a" * 50
    assert (
        "size(self.metadata.name) <= 50 "
        in VoiceAgent.model_json_schema()["x-kubernetes-validations"][0]["rule"]
    )


def test_job_memory_limit_zero_disables_the_limit_and_its_order_check() -> None:
    spec = _mutate("worker.jobMemoryLimitMB", 0)
    spec["worker"]["jobMemoryWarnMB"] = 2000  # above any limit, but there is none
    worker = parse_spec(spec).worker
    assert (worker.job_memory_warn_mb, worker.job_memory_limit_mb) == (2000, 0)


def test_status_round_trip_uses_kubernetes_spelling() -> None:
    status = parse_status(
        {
            "phase": "Ready",
            "observedGeneration": 3,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "WorkersAvailable",
                    "message": "2 of 2 workers ready",
                    "observedGeneration": 3,
                    "lastTransitionTime": "2025-01-02T03:04:05Z",
                }
            ],
            "readyReplicas": 2,
            "telephony": {"trunkID": "ST_abc", "dispatchRuleID": "SDR_def", "numbers": ["+1555"]},
        }
    )
    wire = status.wire()
    assert wire["telephony"] == {
        "trunkID": "ST_abc",
        "dispatchRuleID": "SDR_def",
        "numbers": ["+1555"],
    }
    assert wire["conditions"][0]["lastTransitionTime"] == "2025-01-02T03:04:05Z"
    assert parse_status(None).wire() == {"conditions": []}


def test_status_rejects_an_unknown_phase() -> None:
    with pytest.raises(ValueError, match="phase"):
        parse_status({"phase": "Running"})


def test_a_field_error_does_not_hide_the_cross_field_checks() -> None:
    spec = _mutate("worker.jobsPerWorker", 0)
    spec["entry"] = "nobody"
    spec["agents"][0]["tools"] = ["undefined_tool"]
    with pytest.raises(SpecError) as raised:
        parse_spec(spec)
    lines = str(raised.value).splitlines()
    assert lines[0].startswith("spec.worker.jobsPerWorker: Input should be greater than or equal")
    assert any("entry 'nobody' names no agent" in line for line in lines), lines


def test_allowed_addresses_take_a_cidr_with_host_bits_as_the_api_server_does() -> None:
    """The API server's `isCIDR` accepts `10.0.0.1/8` (host bits set); the operator must not
    refuse what the API server stored, or a stored VoiceAgent would turn ConfigValid=False."""
    spec = parse_spec(
        _mutate("telephony.inbound.allowedAddresses", ["10.0.0.1/8", "2001:db8::1/32"])
    )
    assert spec.telephony is not None and spec.telephony.inbound is not None
    assert spec.telephony.inbound.allowed_addresses == ["10.0.0.1/8", "2001:db8::1/32"]


def test_a_bad_allowed_address_is_named_with_an_example_of_the_fix() -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec(_mutate("telephony.inbound.allowedAddresses", ["10.0.0.0/8", "office"]))
    assert (
        "spec.telephony.inbound.allowedAddresses[1]: 'office' is not an IP address or CIDR "
        "range (e.g. 10.0.0.0/8, 192.0.2.10)"
    ) in str(raised.value)


@pytest.mark.parametrize("value", [1, 2, "500m", "1.5Gi", "1" * 64])
def test_resource_quantities_kubernetes_accepts(value: Any) -> None:
    spec = parse_spec(_mutate("worker.resources", {"requests": {"cpu": value}}))
    assert spec.worker.resources is not None and spec.worker.resources.requests is not None
    assert spec.worker.resources.requests.cpu == value


@pytest.mark.parametrize(
    ("value", "shown"),
    [(True, "True"), (1.5, "1.5"), ("1" * 65, repr("1" * 65)), ("lots", "'lots'")],
    ids=["boolean", "float", "65-characters", "word"],
)
def test_resource_quantities_kubernetes_refuses_are_named(value: Any, shown: str) -> None:
    """A YAML `true` is not the quantity 1, and a number of more than 64 characters is not one
    the API server would store; the error names the field, the value and examples."""
    with pytest.raises(SpecError) as raised:
        parse_spec(_mutate("worker.resources", {"requests": {"cpu": value}}))
    assert (
        f"spec.worker.resources.requests.cpu: {shown} is not a Kubernetes quantity "
        "(e.g. 500m, 2, 1.5Gi, 512Mi)"
    ) in str(raised.value)


def test_list_semantics_and_rules_are_written_into_a_models_schema() -> None:
    """The CRD generator's helpers: keyed lists become `map` lists with their key, scalar lists
    `set`s (the API server then rejects duplicates and server-side apply merges item by item),
    and the model's CEL rules its `x-kubernetes-validations`. Applied to a model built here, as
    the API models are built when the module is imported."""
    rule = cel("size(self.items) > 0", "add an item", ".items")

    class Lists(Model):
        items: list[SecretReference] = []
        tags: list[str] = []
        notes: list[str] = []

        model_config = ConfigDict(
            json_schema_extra=_schema_extra(
                _list_semantics(maps={"items": "name"}, sets=("tags",)), [rule]
            )
        )

    class Plain(Model):
        tags: list[str] = []

        model_config = ConfigDict(json_schema_extra=_schema_extra(_list_semantics()))

    schema = Lists.model_json_schema(by_alias=True)
    properties = schema["properties"]
    assert properties["items"]["x-kubernetes-list-type"] == "map"
    assert properties["items"]["x-kubernetes-list-map-keys"] == ["name"]
    assert properties["tags"]["x-kubernetes-list-type"] == "set"
    assert properties["tags"]["items"] == {"type": "string"}  # the property's own schema kept
    assert "x-kubernetes-list-type" not in properties["notes"]
    assert schema["x-kubernetes-validations"] == [rule]
    plain = Plain.model_json_schema(by_alias=True)
    assert "x-kubernetes-list-type" not in plain["properties"]["tags"]
    assert "x-kubernetes-validations" not in plain
