"""The generated CRD on a real kube-apiserver: accepted, applies defaults, rejects bad manifests.

Every invalid manifest must be refused by the API server (HTTP 422) with the field's path in the
message, and by the pydantic models too: the CEL rules and the validators are twins.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from voicefleet_localdev.pytest_plugin import ClusterHandle
from voicefleet_operator import api, crd
from voicefleet_testkit.specs import check_accepted, check_refusal, mutated_specs
from voicefleet_testkit.waiting import wait_for

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "voiceagent.yaml"


def example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def _established(ext: k8s.ApiextensionsV1Api) -> bool:
    current = ext.read_custom_resource_definition(crd.CRD_NAME)
    assert current.status is not None
    conditions = {c.type: c for c in (current.status.conditions or [])}
    if "NamesAccepted" in conditions and conditions["NamesAccepted"].status == "False":
        raise AssertionError(f"CRD names not accepted: {conditions['NamesAccepted'].message}")
    return "Established" in conditions and conditions["Established"].status == "True"


@pytest.fixture(scope="module")
def installed_crd(control_plane: ClusterHandle) -> Iterator[ClusterHandle]:
    """The checked-in CRD applied (replaced if an older one is there) and Established."""
    ext = k8s.ApiextensionsV1Api(control_plane.api_client)
    body = yaml.safe_load(crd.CRD_PATHS[0].read_text())
    try:
        existing = ext.read_custom_resource_definition(crd.CRD_NAME)
    except ApiException as error:
        if error.status != 404:
            raise
        existing = None
    try:
        if existing is None:
            ext.create_custom_resource_definition(body, field_validation="Strict")
        else:
            assert existing.metadata is not None
            body["metadata"]["resourceVersion"] = existing.metadata.resource_version
            ext.replace_custom_resource_definition(crd.CRD_NAME, body, field_validation="Strict")
    except ApiException as error:
        pytest.fail(f"the API server refused the generated CRD:\n{error.body}", pytrace=False)
    wait_for("the VoiceAgent CRD to be Established", lambda: _established(ext), timeout=60)
    # Serving the new resource lags a moment behind Established.
    objects = k8s.CustomObjectsApi(control_plane.api_client)
    wait_for(
        "voiceagents to be served",
        lambda: objects.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL) is not None,
        timeout=60,
    )
    yield control_plane


@pytest.fixture(scope="module")
def namespace(installed_crd: ClusterHandle) -> Iterator[str]:
    core = k8s.CoreV1Api(installed_crd.api_client)
    name = f"validation-{secrets.token_hex(3)}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="module")
def objects(installed_crd: ClusterHandle) -> k8s.CustomObjectsApi:
    return k8s.CustomObjectsApi(installed_crd.api_client)


def create(objects: k8s.CustomObjectsApi, namespace: str, body: dict[str, Any]) -> Any:
    return objects.create_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, body, field_validation="Strict"
    )


def delete(objects: k8s.CustomObjectsApi, namespace: str, name: str) -> None:
    objects.delete_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)


# --- accepted manifests ---------------------------------------------------------------------


def test_example_is_accepted_and_stored_with_defaults(
    objects: k8s.CustomObjectsApi, namespace: str
) -> None:
    document = example()
    stored = create(objects, namespace, document)
    try:
        # What the API server stored (its defaults applied) is exactly what the operator's
        # models make of the manifest (theirs applied): the two sets of defaults agree.
        expected = api.VoiceAgent.model_validate(document).wire()["spec"]
        assert stored["spec"] == expected
        # Spot checks of defaults the manifest does not set.
        assert stored["spec"]["pipeline"]["endpointing"] == {
            "minDelaySeconds": 0.5,
            "maxDelaySeconds": 3,
        }
        assert stored["spec"]["pipeline"]["userAwayTimeoutSeconds"] == 15
        assert stored["spec"]["worker"]["healthPort"] == 8081
        assert stored["spec"]["scaling"]["mode"] == "operator"
        assert stored["spec"]["mcpServers"] == []
    finally:
        delete(objects, namespace, document["metadata"]["name"])


def test_caps_and_overflow_within_bounds_are_accepted(
    objects: k8s.CustomObjectsApi, namespace: str
) -> None:
    """The CEL twins evaluate on a real API server: a cap exactly at the fleet's minimum
    capacity, a transfer overflow with an E.164 number."""
    document = example()
    document["spec"]["limits"] = {"maxConcurrentCalls": 7}
    document["spec"]["overflow"] = {
        "message": "We are busy; transferring you to our partner.",
        "sip": {"action": "transfer", "transferTo": "+15559990000"},
    }
    stored = create(objects, namespace, document)
    try:
        assert stored["spec"]["limits"] == {"maxConcurrentCalls": 7}
        assert stored["spec"]["overflow"]["sip"] == {
            "action": "transfer",
            "status": 486,
            "transferTo": "+15559990000",
        }
        assert api.VoiceAgent.model_validate(document).wire()["spec"] == stored["spec"]
    finally:
        delete(objects, namespace, document["metadata"]["name"])


def example_voiceagents() -> list[dict[str, Any]]:
    return [
        document
        for path in sorted(EXAMPLE.parent.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document and document.get("kind") == api.KIND
    ]


@pytest.mark.parametrize(
    "document", example_voiceagents(), ids=lambda document: document["metadata"]["name"]
)
def test_every_example_is_accepted(
    objects: k8s.CustomObjectsApi, namespace: str, document: dict[str, Any]
) -> None:
    stored = create(objects, namespace, document)
    try:
        assert stored["spec"] == api.VoiceAgent.model_validate(document).wire()["spec"]
    finally:
        delete(objects, namespace, document["metadata"]["name"])


def test_minimal_manifest_gets_every_default(objects: k8s.CustomObjectsApi, namespace: str) -> None:
    document = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "minimal"},
        "spec": {"agents": [{"name": "solo", "instructions": "Be brief."}], "entry": "solo"},
    }
    stored = create(objects, namespace, document)
    try:
        assert stored["spec"] == api.VoiceAgent.model_validate(document).wire()["spec"]
        assert stored["spec"]["scaling"] == {
            "mode": "operator",
            "minReplicas": 1,
            "maxReplicas": 10,
            "targetLoad": 0.7,
            "spareJobs": 2,
            "scaleDownDelaySeconds": 300,
        }
    finally:
        delete(objects, namespace, "minimal")


def test_user_away_timeout_can_be_turned_off_with_null(
    objects: k8s.CustomObjectsApi, namespace: str
) -> None:
    document = example()
    document["metadata"]["name"] = "no-away-timeout"
    document["spec"]["pipeline"]["userAwayTimeoutSeconds"] = None
    stored = create(objects, namespace, document)
    try:
        assert stored["spec"]["pipeline"]["userAwayTimeoutSeconds"] is None
        assert api.parse_spec(stored["spec"]).pipeline.user_away_timeout_seconds is None
    finally:
        delete(objects, namespace, "no-away-timeout")


def test_status_subresource_and_printer_columns(
    installed_crd: ClusterHandle, objects: k8s.CustomObjectsApi, namespace: str
) -> None:
    document = example()
    name = document["metadata"]["name"] = "columns"
    create(objects, namespace, document)
    try:
        status = api.VoiceAgentStatus(
            phase="Ready",
            conditions=[
                api.Condition(
                    type=api.CONDITION_READY,
                    status="True",
                    reason="WorkersAvailable",
                    message="2 of 2 workers ready",
                    observed_generation=1,
                    last_transition_time="2025-01-02T03:04:05Z",
                ),
                api.Condition(
                    type=api.CONDITION_CAPACITY_LIMITED,
                    status="True",
                    reason="PodsUnschedulable",
                    message="1 worker pod(s) cannot be scheduled",
                    observed_generation=1,
                    last_transition_time="2025-01-02T03:04:05Z",
                ),
            ],
            replicas=2,
            ready_replicas=2,
            desired_replicas=2,
            active_jobs=3,
            load=0.15,
            dispatch_name=f"{namespace}--{name}",
            numbers="+15551230001",
            worker_namespace=f"vf-{namespace}",
        )
        patched: dict[str, Any] = objects.patch_namespaced_custom_object_status(  # type: ignore[assignment]
            api.GROUP, api.VERSION, namespace, api.PLURAL, name, {"status": status.wire()}
        )
        assert patched["status"]["conditions"][0]["type"] == "Ready"
        # A spec change through the status subresource is ignored, as the subresource promises.
        assert patched["spec"]["entry"] == "receptionist"

        table = installed_crd.kubectl("get", "va", "-n", namespace, name).splitlines()
        assert table[0].split() == [
            "NAME", "READY", "REPLICAS", "JOBS", "CAPACITY", "NUMBERS", "AGE"
        ]  # fmt: skip
        assert table[1].split()[:6] == [
            name, "True", "2", "3", "PodsUnschedulable", "+15551230001"
        ]  # fmt: skip
        wide = installed_crd.kubectl("get", "va", "-n", namespace, name, "-o", "wide")
        assert wide.splitlines()[0].split()[-6:] == [
            "PHASE", "DESIRED", "LOAD", "DISPATCH", "WORKERS", "AGE"
        ]  # fmt: skip
        assert wide.splitlines()[1].split()[-2] == f"vf-{namespace}"
        # Short name and category both find it.
        assert name in installed_crd.kubectl("get", "voicefleet", "-n", namespace)
    finally:
        delete(objects, namespace, name)


def test_kubectl_explain_reads_well(installed_crd: ClusterHandle) -> None:
    def explain() -> str | None:
        try:
            return installed_crd.kubectl("explain", "voiceagent.spec.agents")
        except AssertionError:  # the OpenAPI document is published a moment after Established
            return None

    text = wait_for("kubectl explain voiceagent.spec.agents", explain, timeout=60)
    assert "The LLM agents; `entry` names the one that takes the call." in text
    for field in ("name", "instructions", "greeting", "tools", "handoffs"):
        assert f"  {field}\t" in text or f"  {field} " in text, text
    assert "-required-" in text
    scaling = installed_crd.kubectl("explain", "va.spec.scaling.minReplicas")
    assert "Fewest worker pods when autoscaling" in scaling


# --- rejected manifests ---------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def set_path(path: str, value: Any) -> Mutation:
    """Set `spec.a.0.b` (list indices as numbers) to value; a missing leaf is created."""

    def mutate(document: dict[str, Any]) -> None:
        parts = path.split(".")
        node: Any = document
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value

    return mutate


def remove(path: str) -> Mutation:
    def mutate(document: dict[str, Any]) -> None:
        parts = path.split(".")
        node: Any = document
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[parts[-1]]

    return mutate


def agents(count: int) -> list[dict[str, str]]:
    return [{"name": f"agent{i}", "instructions": "Be brief."} for i in range(count)]


def both(*mutations: Mutation) -> Mutation:
    def mutate(document: dict[str, Any]) -> None:
        for mutation in mutations:
            mutation(document)

    return mutate


# (case id, mutation of the example, text that must appear in the API server's message)
INVALID: list[tuple[str, Mutation, str]] = [
    ("bad-e164-number", set_path("spec.telephony.numbers", ["5551230001"]),
     "spec.telephony.numbers[0]"),
    ("duplicate-number", set_path("spec.telephony.numbers", ["+15551230001"] * 2),
     "spec.telephony.numbers[1]: Duplicate value"),
    ("bad-transfer-to", set_path("spec.telephony.transferTo", "555-HUMAN"),
     "spec.telephony.transferTo"),
    ("bad-allowed-address", set_path("spec.telephony.inbound.allowedAddresses", ["10.0.0.300"]),
     "spec.telephony.inbound.allowedAddresses[0]"),
    ("inbound-without-numbers", set_path("spec.telephony.numbers", []),
     "spec.telephony.numbers"),
    ("bad-agent-name", set_path("spec.agents.1.name", "Billing_Team"), "spec.agents[1].name"),
    ("duplicate-agent-name", set_path("spec.agents.1.name", "receptionist"),
     "spec.agents[1]: Duplicate value"),
    ("empty-instructions", set_path("spec.agents.0.instructions", ""),
     "spec.agents[0].instructions"),
    ("missing-agents", remove("spec.agents"), "spec.agents: Required value"),
    ("no-agents", set_path("spec.agents", []), "spec.agents"),
    ("too-many-agents", both(set_path("spec.agents", agents(17)), set_path("spec.entry", "agent0")),
     "spec.agents: Too many"),
    ("entry-names-no-agent", set_path("spec.entry", "nobody"), "spec.entry"),
    ("undefined-tool", set_path("spec.agents.0.tools", ["refund_order"]), "spec.agents"),
    ("undefined-handoff", set_path("spec.agents.0.handoffs", ["sales"]), "spec.agents"),
    ("self-handoff", set_path("spec.agents.1.handoffs", ["billing"]), "spec.agents"),
    ("min-above-max-replicas", set_path("spec.scaling.minReplicas", 11),
     "spec.scaling.minReplicas"),
    ("hpa-scale-to-zero", both(set_path("spec.scaling.mode", "hpa"),
                               set_path("spec.scaling.minReplicas", 0)),
     "spec.scaling.minReplicas"),
    ("unknown-scaling-mode", set_path("spec.scaling.mode", "keda"), "spec.scaling.mode"),
    ("target-load-above-threshold", set_path("spec.scaling.targetLoad", 0.9),
     "spec.scaling.targetLoad"),
    # Omitted targetLoad takes its default (0.7), which is above this threshold.
    ("default-target-load-above-threshold", both(remove("spec.scaling.targetLoad"),
                                                 set_path("spec.worker.loadThreshold", 0.5)),
     "spec.scaling.targetLoad"),
    ("negative-spare-jobs", set_path("spec.scaling.spareJobs", -1), "spec.scaling.spareJobs"),
    ("memory-warn-above-limit", set_path("spec.worker.jobMemoryWarnMB", 2000),
     "spec.worker.jobMemoryWarnMB"),
    ("zero-jobs-per-worker", set_path("spec.worker.jobsPerWorker", 0),
     "spec.worker.jobsPerWorker"),
    ("load-threshold-above-one", set_path("spec.worker.loadThreshold", 1.5),
     "spec.worker.loadThreshold"),
    ("same-health-and-metrics-port", set_path("spec.worker.metricsPort", 8081), "spec.worker"),
    ("bad-memory-quantity", set_path("spec.worker.resources", {"limits": {"memory": "lots"}}),
     "spec.worker.resources.limits.memory"),
    ("unknown-stt-provider", set_path("spec.pipeline.stt.provider", "whisper"),
     "spec.pipeline.stt.provider"),
    ("unknown-turn-detection", set_path("spec.pipeline.turnDetection.mode", "smart"),
     "spec.pipeline.turnDetection.mode"),
    ("endpointing-min-above-max", set_path("spec.pipeline.endpointing",
                                           {"minDelaySeconds": 5, "maxDelaySeconds": 1}),
     "spec.pipeline.endpointing"),
    ("bad-url-scheme", set_path("spec.tools.0.http.url", "ftp://orders.acme/lookup"),
     "spec.tools[0].http.url"),
    ("header-value-and-secret", set_path("spec.tools.0.http.headers.0.value", "Bearer abc"),
     "spec.tools[0].http.headers[0]"),
    ("tool-without-http", remove("spec.tools.0.http"), "spec.tools[0].http: Required value"),
    # Tool parameters: the part of the function-calling subset OpenAPI and CEL can express.
    ("parameters-type-string", set_path("spec.tools.0.parameters.type", "string"),
     "spec.tools[0].parameters.type: Unsupported value"),
    ("parameters-properties-string", set_path("spec.tools.0.parameters.properties", "+1555"),
     "spec.tools[0].parameters.properties: Invalid value"),
    ("parameters-property-not-a-schema",
     set_path("spec.tools.0.parameters.properties", {"order_number": [1, "a"]}),
     "spec.tools[0].parameters.properties.order_number: Invalid value"),
    ("parameters-required-mapping", set_path("spec.tools.0.parameters.required", {}),
     "spec.tools[0].parameters.required: Invalid value"),
    ("parameters-required-unknown", set_path("spec.tools.0.parameters.required", ["order_id"]),
     "spec.tools[0].parameters.required: Invalid value"),
    ("parameters-required-twice",
     set_path("spec.tools.0.parameters.required", ["order_number", "order_number"]),
     "spec.tools[0].parameters.required[1]: Duplicate value"),
    ("parameters-top-level-any-of", set_path("spec.tools.0.parameters.anyOf", [{"type": "object"}]),
     "spec.tools[0].parameters.anyOf: Invalid value"),
    ("parameters-top-level-const", set_path("spec.tools.0.parameters.const", {}),
     "spec.tools[0].parameters.const: Invalid value"),
    ("empty-tts-model", set_path("spec.pipeline.tts.model", ""), "spec.pipeline.tts.model"),
    ("bad-secret-ref-name", set_path("spec.secretRefs", [{"name": "Provider_Keys"}]),
     "spec.secretRefs[0].name"),
    # Caps and overflow: minReplicas 1 x floor(10 x 0.7) = 7 calls at the fleet's smallest.
    ("cap-below-minimum-capacity", set_path("spec.limits", {"maxConcurrentCalls": 6}),
     "spec.limits.maxConcurrentCalls"),
    ("cap-below-pinned-capacity", both(set_path("spec.scaling.replicas", 3),
                                       set_path("spec.limits", {"maxConcurrentCalls": 20})),
     "spec.limits.maxConcurrentCalls"),
    ("zero-cap", set_path("spec.limits", {"maxConcurrentCalls": 0}),
     "spec.limits.maxConcurrentCalls"),
    ("overflow-number-not-e164",
     set_path("spec.overflow", {"sip": {"action": "transfer", "transferTo": "555-OVERFLOW"}}),
     "spec.overflow.sip.transferTo"),
    ("overflow-transfer-without-number", set_path("spec.overflow", {"sip": {"action": "transfer"}}),
     "spec.overflow.sip.transferTo"),
    ("overflow-unknown-sip-status", set_path("spec.overflow", {"sip": {"status": 404}}),
     "spec.overflow.sip.status"),
    ("overflow-empty-message", set_path("spec.overflow", {"message": ""}),
     "spec.overflow.message"),
    # Call records: an http(s) receiver, a signing key, a bucket name as S3 spells them.
    ("records-webhook-not-http",
     set_path("spec.callRecords", {"webhook": {"url": "ftp://crm.acme/calls",
                                               "signingSecretRef": {"name": "rec", "key": "k"}}}),
     "spec.callRecords.webhook.url"),
    ("records-webhook-without-signing-key",
     set_path("spec.callRecords", {"webhook": {"url": "https://crm.acme/calls"}}),
     "spec.callRecords.webhook.signingSecretRef: Required value"),
    ("records-bucket-not-a-bucket-name",
     set_path("spec.callRecords", {"recording": {"endpoint": "https://s3.acme", "bucket": "Acme",
                                                 "credentialsSecretRef": {"name": "s3"}}}),
     "spec.callRecords.recording.bucket"),
    ("records-endpoint-with-a-path",
     set_path("spec.callRecords", {"recording": {"endpoint": "https://s3.acme/calls",
                                                 "bucket": "calls",
                                                 "credentialsSecretRef": {"name": "s3"}}}),
     "spec.callRecords.recording.endpoint"),
    ("call-limit-leaves-no-room-before-the-warning",
     set_path("spec.callLimits", {"maxDurationSeconds": 40}),
     "spec.callLimits.maxDurationSeconds"),
    ("dtmf-without-telephony", both(remove("spec.telephony"), set_path("spec.dtmf", {})),
     "spec.dtmf"),
    ("realtime-and-a-customised-tts", set_path("spec.pipeline.realtime", {}),
     "spec.pipeline.realtime"),
    ("realtime-semantic-vad-with-silence",
     both(remove("spec.pipeline.tts"),
          set_path("spec.pipeline.realtime",
                   {"turnDetection": {"type": "semantic_vad", "silenceDurationMs": 300}})),
     "spec.pipeline.realtime.turnDetection"),
    ("realtime-unknown-option", set_path("spec.pipeline.realtime", {"temperature": 0.5}),
     'unknown field "spec.pipeline.realtime.temperature"'),
    # Strict field validation answers 400 Bad Request (not 422) for an unknown field.
    ("unknown-field", set_path("spec.worker.jobsPerPod", 4),
     'unknown field "spec.worker.jobsPerPod"'),
    ("name-not-dns-1035", set_path("metadata.name", "9-support"), "metadata.name"),
    ("name-too-long", set_path("metadata.name", "a" * 51), "metadata.name"),
    ("missing-spec", remove("spec"), "spec: Required value"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mutation", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_manifest_is_rejected_naming_the_field(
    objects: k8s.CustomObjectsApi, namespace: str, mutation: Mutation, field: str
) -> None:
    document = copy.deepcopy(example())
    mutation(document)

    with pytest.raises(ApiException) as raised:
        create(objects, namespace, document)
        delete(objects, namespace, document["metadata"]["name"])  # accepted: clean up, then fail
    error = raised.value
    expected_status = 400 if "unknown field" in field else 422
    assert error.status == expected_status, f"got {error.status}: {error.body}"
    message = json.loads(error.body or "{}")["message"]
    assert field in message, f"{field!r} not in the API server's message: {message}"

    # The operator's models refuse it too: the CEL rules and the validators agree.
    with pytest.raises(ValidationError):
        api.VoiceAgent.model_validate(document)


# --- random manifests -----------------------------------------------------------------------

# The API server names the field in its message: spec.a[0].b: ..., or unknown field "spec.x".
API_FIELD = re.compile(r'\bspec(\.[A-Za-z]|\[|: )|unknown field "spec\.')


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=mutated_specs())
def test_every_mutated_manifest_is_accepted_and_valid_or_refused_naming_a_field(
    objects: k8s.CustomObjectsApi, namespace: str, spec: dict[str, Any]
) -> None:
    """The example with random mutations (voicefleet_testkit.specs), created for real: the API
    server refuses it naming a field, or stores it and then the operator's models either accept
    it and it works or refuse it naming a field (the operator's ConfigValid=False)."""
    document = example()
    document["spec"] = spec
    document["metadata"]["name"] = f"prop-{secrets.token_hex(4)}"
    try:
        stored = create(objects, namespace, document)
    except ApiException as error:
        assert error.status in (400, 422), f"got {error.status}: {error.body}"
        message = json.loads(error.body or "{}")["message"]
        assert API_FIELD.search(message), f"names no field: {message}"
        event("refused by the API server")
        return
    try:
        try:
            parsed = api.parse_spec(stored["spec"])
        except api.SpecError as error:
            event("stored, ConfigValid=False")
            check_refusal(str(error))
            return
        event("stored and valid")
        check_accepted(parsed)
    finally:
        delete(objects, namespace, document["metadata"]["name"])
