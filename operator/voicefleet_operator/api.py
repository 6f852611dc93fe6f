"""The VoiceAgent API (`voicefleet.dev/v1alpha1`): the single source of truth for the CRD.

`python -m voicefleet_operator.crd` turns these models into the CustomResourceDefinition; the
operator parses each VoiceAgent's spec with them. The agents, pipeline, tools and worker fields
reuse the runtime config models (`voicefleet_runtime.config`), so the spec a tenant writes and the
config the runtime loads cannot drift apart. Only the Kubernetes-specific shapes live here:
headers whose values come from Secrets, Secret references, the inbound SIP trunk, pod resources,
scaling and the status.

Every cross-field rule exists twice, as a pydantic validator (the operator checks it) and as CEL
in `x-kubernetes-validations` (the API server rejects a bad manifest before it is stored); they sit
next to each other so they stay in step. Lists carry maxItems and strings maxLength so the API
server can bound the cost of the CEL rules.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Final, Literal, Self, cast

from pydantic import (
    AfterValidator,
    Field,
    JsonValue,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic.config import ConfigDict, JsonDict
from voicefleet_runtime.admission import OverflowOptions, worker_capacity
from voicefleet_runtime.config import (
    AgentsSection,
    CallRecordingBase,
    CallRecordWebhookBase,
    HttpEndpoint,
    McpServerConfig,
    Model,
    TelephonyOptions,
    WebhookTool,
    WorkerSettings,
    all_errors,
    cel,
    describe_validation_error,
    validate_tool_references,
)

GROUP: Final = "voicefleet.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "VoiceAgent"
PLURAL: Final = "voiceagents"
SINGULAR: Final = "voiceagent"
SHORT_NAMES: Final = ("va",)
CATEGORIES: Final = ("voicefleet",)

DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
HEADER_NAME = r"^[A-Za-z0-9-]+$"
# resource.Quantity's grammar (k8s.io/apimachinery), as kubebuilder writes it into CRDs.
QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
IMAGE_REFERENCE = r"^[^\s]+$"
# metav1.Condition's own validation.
CONDITION_TYPE = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
CONDITION_REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"

NAME_MAX_LENGTH: Final = 50
"""VoiceAgent names are DNS-1035 labels short enough that every child's name (the VoiceAgent's
name plus a suffix such as `-metrics`) is still a valid Service name (63 characters)."""

# Keys of x-kubernetes-* list semantics: a `map` list has unique keys (the API server rejects
# duplicates) and merges item by item under server-side apply; a `set` has unique scalars.
LIST_TYPE: Final = "x-kubernetes-list-type"
LIST_MAP_KEYS: Final = "x-kubernetes-list-map-keys"
VALIDATIONS: Final = "x-kubernetes-validations"


def _list_semantics(
    maps: Mapping[str, str] | None = None, sets: tuple[str, ...] = ()
) -> dict[str, Any]:
    """json_schema_extra for a model whose list properties are keyed maps or sets."""
    extra: dict[str, Any] = {}
    for prop, key in (maps or {}).items():
        extra[prop] = {LIST_TYPE: "map", LIST_MAP_KEYS: [key]}
    for prop in sets:
        extra[prop] = {LIST_TYPE: "set"}
    return extra


def _schema_extra(
    lists: dict[str, Any], rules: list[JsonDict] | None = None
) -> Any:  # the callable form pydantic accepts for json_schema_extra
    def apply(schema: JsonDict, _cls: Any) -> None:
        properties = schema.get("properties")
        assert isinstance(properties, dict)
        for prop, semantics in lists.items():
            target = properties[prop]
            assert isinstance(target, dict)
            target.update(semantics)
        if rules:
            schema[VALIDATIONS] = list(rules)

    return apply


def _unique(values: list[str], what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{what} {value!r} appears twice; each must be unique")
        seen.add(value)


def _ip_or_cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address or CIDR range (e.g. 10.0.0.0/8, 192.0.2.10)"
        ) from None
    return value


# --- references to Secrets --------------------------------------------------------------------


class SecretReference(Model):
    """A Secret in the VoiceAgent's namespace."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)]
    """Name of the Secret."""


class SecretKeySelector(Model):
    """One key of a Secret in the VoiceAgent's namespace."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)]
    """Name of the Secret."""
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=SECRET_KEY)]
    """Key within the Secret whose value is used."""


class HeaderValueSource(Model):
    """Where a secret header value comes from."""

    secret_key_ref: SecretKeySelector
    """The Secret key holding the value; the operator passes it to the workers as an
    environment variable, never through the ConfigMap."""


# --- tools and MCP servers --------------------------------------------------------------------


class HttpHeaderSpec(Model):
    """One HTTP header: a literal `value`, or `valueFrom` a Secret key for credentials."""

    name: Annotated[str, Field(min_length=1, max_length=256, pattern=HEADER_NAME)]
    """Header name, e.g. Authorization."""
    value: Annotated[str | None, Field(max_length=4096)] = None
    """Literal value; stored in the runtime ConfigMap, so never put a credential here."""
    value_from: HeaderValueSource | None = None
    """Read the value from a Secret key (for credentials)."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Self:
        if (self.value is None) == (self.value_from is None):
            raise ValueError(f"header {self.name!r}: set exactly one of value or valueFrom")
        return self

    model_config = ConfigDict(
        json_schema_extra={
            VALIDATIONS: [
                cel(
                    "has(self.value) != has(self.valueFrom)",
                    "set exactly one of value or valueFrom",
                )
            ]
        }
    )


class HttpEndpointSpec(HttpEndpoint):
    """Where and how a webhook tool is called."""

    headers: Annotated[list[HttpHeaderSpec], Field(max_length=32)] = []  # type: ignore[assignment]
    """Extra headers; take credentials from a Secret with valueFrom.secretKeyRef."""


class WebhookToolSpec(WebhookTool):
    """A tenant webhook exposed to the LLM as a function tool."""

    http: HttpEndpointSpec
    """The webhook to call."""


class McpServerSpec(McpServerConfig):
    """A Model Context Protocol server whose tools are offered to every agent."""

    headers: Annotated[list[HttpHeaderSpec], Field(max_length=32)] = []  # type: ignore[assignment]
    """Extra headers; take credentials from a Secret with valueFrom.secretKeyRef."""


# --- call records -----------------------------------------------------------------------------


class CallRecordWebhookSpec(CallRecordWebhookBase):
    """Where each call's record is delivered: one signed POST per call (the record's fields are
    listed under "Call records" in the API reference)."""

    signing_secret_ref: SecretKeySelector
    """The Secret key whose bytes sign each delivery: X-VoiceFleet-Signature is sha256=<hex
    HMAC-SHA256 of the raw request body>. Passed to the workers as an environment variable,
    never through the ConfigMap."""


RECORDING_ACCESS_KEY_ID: Final = "accessKeyId"
RECORDING_SECRET_ACCESS_KEY: Final = "secretAccessKey"


class CallRecordingSpec(CallRecordingBase):
    """Where call recordings go: an S3-compatible bucket. Each call's audio (Ogg/Opus, stereo:
    the caller left, the agent right) is uploaded as <prefix><recordId>.ogg when the call ends;
    its key and duration are in the call's record."""

    credentials_secret_ref: SecretReference
    """Secret with keys accessKeyId and secretAccessKey of a principal allowed to PutObject in
    the bucket; passed to the workers as environment variables, never through the ConfigMap."""


class CallRecordsSpec(Model):
    """Call records: one record per call (who called, when, which agents, the transcript, tool
    calls, usage, how it ended), delivered to the tenant, and optionally its recording."""

    webhook: CallRecordWebhookSpec | None = None
    """Deliver each call's record to this webhook (at least once, deduplicate on recordId)."""
    recording: CallRecordingSpec | None = None
    """Record each call's audio and upload it to this bucket; omit to record nothing."""


# --- telephony --------------------------------------------------------------------------------

IpOrCidr = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        json_schema_extra={
            VALIDATIONS: [
                cel(
                    "isIP(self) || isCIDR(self)",
                    "must be an IP address or a CIDR range, e.g. 10.0.0.0/8",
                )
            ]
        },
    ),
    AfterValidator(_ip_or_cidr),
]


class InboundSpec(Model):
    """Who may send calls to this agent's numbers (the inbound SIP trunk)."""

    allowed_addresses: Annotated[list[IpOrCidr], Field(max_length=64)] = []
    """Source IP addresses or CIDR ranges of the SIP provider allowed to call in; empty allows
    any address (then set authSecretRef)."""
    auth_secret_ref: SecretReference | None = None
    """Secret with keys `username` and `password` that the SIP provider must authenticate
    with (digest auth); omit for no authentication."""

    @model_validator(mode="after")
    def _unique_addresses(self) -> Self:
        _unique(self.allowed_addresses, "allowedAddresses entry")
        return self

    model_config = ConfigDict(
        json_schema_extra=_schema_extra(_list_semantics(sets=("allowedAddresses",)))
    )


class TelephonySpec(TelephonyOptions):
    """Phone numbers that reach the agent, who may call in, and the human transfer target."""

    inbound: InboundSpec | None = None
    """Inbound SIP trunk restrictions; omit to accept calls for the numbers from any address
    without authentication (development only)."""

    @model_validator(mode="after")
    def _numbers(self) -> Self:
        _unique(self.numbers, "telephony number")
        if self.inbound is not None and not self.numbers:
            raise ValueError("inbound is set but numbers is empty; add at least one number")
        return self

    model_config = ConfigDict(
        json_schema_extra=_schema_extra(
            _list_semantics(sets=("numbers",)),
            [
                cel(
                    "!has(self.inbound) || (has(self.numbers) && size(self.numbers) > 0)",
                    "inbound is set but numbers is empty; add at least one number",
                    ".numbers",
                )
            ],
        )
    )


# --- worker pods ------------------------------------------------------------------------------


def _quantity(value: object) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and len(value) <= 64 and re.match(QUANTITY, value):
        return value
    raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 1.5Gi, 512Mi)")


# resource.Quantity is int-or-string in CRDs; one validator gives one clear error, not one per
# union member.
Quantity = Annotated[
    int | str,
    PlainValidator(_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY,
            "x-kubernetes-int-or-string": True,
        }
    ),
]


class ResourceQuantities(Model):
    """Amounts of compute resources."""

    cpu: Quantity | None = None
    """CPU, e.g. 500m or 2."""
    memory: Quantity | None = None
    """Memory, e.g. 2Gi."""
    ephemeral_storage: Annotated[Quantity | None, Field(alias="ephemeral-storage")] = None
    """Local ephemeral storage, e.g. 1Gi."""


class ResourceRequirementsSpec(Model):
    """Compute resources of each worker container (Kubernetes ResourceRequirements)."""

    requests: ResourceQuantities | None = None
    """Minimum resources the scheduler reserves; fields left out are derived from
    jobsPerWorker and the job memory limits."""
    limits: ResourceQuantities | None = None
    """Maximum resources; fields left out are derived from jobsPerWorker and the job memory
    limits."""


class WorkerSpec(WorkerSettings):
    """How each worker pod takes calls: capacity, memory limits, drain, image and resources."""

    image: Annotated[str | None, Field(min_length=1, max_length=512, pattern=IMAGE_REFERENCE)] = (
        None
    )
    """Runtime container image for this VoiceAgent; omit to use the platform's default
    runtime image."""
    resources: ResourceRequirementsSpec | None = None
    """Override the worker container's resources; by default they are derived from
    jobsPerWorker and the job memory limits."""


# --- scaling ----------------------------------------------------------------------------------


class ScalingSpec(Model):
    """How many worker pods run: autoscaled on call load, or pinned by hand."""

    mode: Literal["operator", "hpa"] = "operator"
    """operator: the operator scales on worker load and keeps spareJobs free call slots, and
    scales down only idle pods; hpa: a HorizontalPodAutoscaler scales on the load metric."""
    replicas: Annotated[int | None, Field(ge=0, le=1000)] = None
    """Pin the number of worker pods; while set, autoscaling is suspended. Omit to autoscale."""
    min_replicas: Annotated[int, Field(ge=0, le=1000)] = 1
    """Fewest worker pods when autoscaling (0 lets an idle agent scale to zero; new calls
    then wait for a pod to start or are dropped)."""
    max_replicas: Annotated[int, Field(ge=1, le=1000)] = 10
    """Most worker pods when autoscaling."""
    target_load: Annotated[float, Field(gt=0, le=1)] = 0.7
    """Average worker load (active calls / jobsPerWorker) the autoscaler aims for."""
    spare_jobs: Annotated[int, Field(ge=0, le=10000)] = 2
    """Free call slots kept available at all times so that a new call always finds a worker."""
    scale_down_delay_seconds: Annotated[int, Field(ge=0, le=86400)] = 300
    """How long load must stay low before pods are removed."""

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas ({self.min_replicas}) must not exceed maxReplicas "
                f"({self.max_replicas})"
            )
        if self.mode == "hpa" and self.min_replicas < 1:
            raise ValueError("mode hpa needs minReplicas >= 1 (HPAs do not scale to zero)")
        return self

    model_config = ConfigDict(
        json_schema_extra={
            VALIDATIONS: [
                cel(
                    "self.minReplicas <= self.maxReplicas",
                    "minReplicas must not exceed maxReplicas",
                    ".minReplicas",
                ),
                cel(
                    "self.mode != 'hpa' || self.minReplicas >= 1",
                    "mode hpa needs minReplicas >= 1 (HPAs do not scale to zero)",
                    ".minReplicas",
                ),
            ]
        }
    )


class LimitsSpec(Model):
    """Caps on this VoiceAgent's calls, set by the tenant. The platform may set a lower cap per
    namespace (operator settings); the lower of the two applies."""

    max_concurrent_calls: Annotated[int | None, Field(ge=1, le=100000)] = None
    """Most calls the agents answer at once, across all worker pods of this VoiceAgent; the
    callers beyond it get spec.overflow. Omit for no cap but the fleet's capacity
    (maxReplicas x floor(jobsPerWorker x loadThreshold))."""


def minimum_capacity(spec: VoiceAgentSpec) -> int:
    """Calls the fleet takes at its smallest: its fewest pods x floor(jobsPerWorker x
    loadThreshold)."""
    pods = spec.scaling.replicas if spec.scaling.replicas is not None else spec.scaling.min_replicas
    return pods * worker_capacity(spec.worker.jobs_per_worker, spec.worker.load_threshold)


# --- the spec ---------------------------------------------------------------------------------

# CEL twins of AgentsSection's and validate_tool_references' checks (agent names' uniqueness is
# the list-map semantics of `agents`).
SPEC_RULES: Final[list[JsonDict]] = [
    {
        "rule": "self.agents.exists(a, a.name == self.entry)",
        "messageExpression": "'entry ' + self.entry + ' is not the name of any of spec.agents'",
        "fieldPath": ".entry",
    },
    cel(
        "self.agents.all(a, !has(a.handoffs) || "
        "a.handoffs.all(h, self.agents.exists(b, b.name == h)))",
        "every name in an agent's handoffs must be the name of one of spec.agents",
        ".agents",
    ),
    cel(
        "self.agents.all(a, !has(a.handoffs) || !(a.name in a.handoffs))",
        "an agent must not list itself in its handoffs",
        ".agents",
    ),
    cel(
        "self.agents.all(a, !has(a.tools) || a.tools.all(t, "
        "has(self.tools) && self.tools.exists(d, d.name == t)))",
        "every name in an agent's tools must be the name of one of spec.tools",
        ".agents",
    ),
    # Twin of VoiceAgentSpec._dtmf_needs_telephony.
    cel(
        "!has(self.dtmf) || has(self.telephony)",
        "spec.dtmf: DTMF (phone keypad digits) needs phone calls; set spec.telephony "
        "(numbers, inbound) or remove spec.dtmf",
        ".dtmf",
    ),
    # Twin of VoiceAgentSpec._target_within_threshold; omitted fields take their defaults.
    cel(
        "(has(self.scaling) && has(self.scaling.targetLoad) ? self.scaling.targetLoad : "
        f"{ScalingSpec().target_load}) <= (has(self.worker) && has(self.worker.loadThreshold) "
        f"? self.worker.loadThreshold : {WorkerSpec().load_threshold})",
        "scaling.targetLoad must not exceed worker.loadThreshold: a worker reports itself full "
        "at loadThreshold, so the fleet could never reach a higher target; lower "
        "scaling.targetLoad or raise worker.loadThreshold",
        ".scaling.targetLoad",
    ),
    # Twin of VoiceAgentSpec._cap_covers_minimum_capacity (minimum_capacity, defaults filled in).
    cel(
        "!has(self.limits) || !has(self.limits.maxConcurrentCalls) || "
        "self.limits.maxConcurrentCalls >= "
        "(has(self.scaling) && has(self.scaling.replicas) ? self.scaling.replicas : "
        f"(has(self.scaling) && has(self.scaling.minReplicas) ? self.scaling.minReplicas : "
        f"{ScalingSpec().min_replicas})) * "
        "(int((has(self.worker) && has(self.worker.jobsPerWorker) ? "
        f"double(self.worker.jobsPerWorker) : {float(WorkerSpec().jobs_per_worker)}) * "
        "(has(self.worker) && has(self.worker.loadThreshold) ? self.worker.loadThreshold : "
        f"{WorkerSpec().load_threshold}) + 0.000000001) < 1 ? 1 : "
        "int((has(self.worker) && has(self.worker.jobsPerWorker) ? "
        f"double(self.worker.jobsPerWorker) : {float(WorkerSpec().jobs_per_worker)}) * "
        "(has(self.worker) && has(self.worker.loadThreshold) ? self.worker.loadThreshold : "
        f"{WorkerSpec().load_threshold}) + 0.000000001))",
        "limits.maxConcurrentCalls is below the fleet's minimum capacity (minReplicas, or the "
        "pinned replicas, x floor(jobsPerWorker x loadThreshold)): pods would run that may "
        "never take a call; raise the cap or lower minReplicas or jobsPerWorker",
        ".limits.maxConcurrentCalls",
    ),
]


class VoiceAgentSpec(AgentsSection):
    """Desired state of a VoiceAgent: its LLM agents, speech pipeline, tools, phone numbers,
    worker pods and scaling."""

    tools: Annotated[list[WebhookToolSpec], Field(max_length=64)] = []
    """Webhook tools; an agent may call the ones it lists in its `tools`."""
    mcp_servers: Annotated[list[McpServerSpec], Field(max_length=16)] = []
    """MCP servers whose tools every agent may call."""
    telephony: TelephonySpec | None = None
    """Phone numbers and SIP settings; omit for an agent reached only through LiveKit rooms."""
    secret_refs: Annotated[list[SecretReference], Field(max_length=16)] = []
    """Secrets whose keys become environment variables of the workers, e.g. OPENAI_API_KEY,
    DEEPGRAM_API_KEY and ELEVEN_API_KEY for the pipeline's providers."""
    worker: WorkerSpec = WorkerSpec()
    """Worker pods: call capacity, memory limits, drain, image and resources."""
    scaling: ScalingSpec = ScalingSpec()
    """Number of worker pods: autoscaled on call load, or pinned."""
    call_records: CallRecordsSpec | None = None
    """Call records: each call's record delivered to the tenant's webhook; omit for none."""
    limits: LimitsSpec = LimitsSpec()
    """Caps on concurrent calls (the platform's per-namespace cap applies on top)."""
    overflow: OverflowOptions = OverflowOptions()
    """What a caller beyond capacity gets (a cap reached, or no worker with a free slot): a
    spoken message for WebRTC callers; a SIP rejection, the message, or a transfer for phone
    calls."""

    @model_validator(mode="after")
    def _spec_references(self) -> Self:
        validate_tool_references(self.agents, [tool.name for tool in self.tools])
        _unique([server.name for server in self.mcp_servers], "MCP server name")
        _unique([ref.name for ref in self.secret_refs], "secretRefs name")
        for index, agent in enumerate(self.agents):
            _unique(agent.tools, f"agents[{index}].tools entry")
            _unique(agent.handoffs, f"agents[{index}].handoffs entry")
        return self

    @model_validator(mode="after")
    def _dtmf_needs_telephony(self) -> Self:
        if self.dtmf is not None and self.telephony is None:
            raise ValueError(
                "spec.dtmf: DTMF (phone keypad digits) needs phone calls; set spec.telephony "
                "(numbers, inbound) or remove spec.dtmf"
            )
        return self

    @model_validator(mode="after")
    def _cap_covers_minimum_capacity(self) -> Self:
        cap = self.limits.max_concurrent_calls
        if cap is not None and cap < minimum_capacity(self):
            raise ValueError(
                f"limits.maxConcurrentCalls ({cap}) is below the fleet's minimum capacity "
                f"({minimum_capacity(self)}: minReplicas, or the pinned replicas, x "
                "floor(jobsPerWorker x loadThreshold)): pods would run that may never take a "
                "call; raise the cap or lower minReplicas or jobsPerWorker"
            )
        return self

    @model_validator(mode="after")
    def _target_within_threshold(self) -> Self:
        if self.scaling.target_load > self.worker.load_threshold:
            raise ValueError(
                f"scaling.targetLoad ({self.scaling.target_load}) must not exceed "
                f"worker.loadThreshold ({self.worker.load_threshold}): a worker reports itself "
                "full at loadThreshold, so the fleet could never reach a higher target; lower "
                "scaling.targetLoad or raise worker.loadThreshold"
            )
        return self

    model_config = ConfigDict(
        json_schema_extra=_schema_extra(
            _list_semantics(
                maps={
                    "agents": "name",
                    "tools": "name",
                    "mcpServers": "name",
                    "secretRefs": "name",
                }
            ),
            SPEC_RULES,
        )
    )


# The per-agent `tools` and `handoffs` lists are sets; AgentConfig is the runtime's model, so the
# CRD generator applies these (see crd.py) rather than the runtime module knowing about CRDs.
AGENT_LIST_SETS: Final = ("tools", "handoffs")


# --- status -----------------------------------------------------------------------------------

Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]
ConditionStatus = Literal["True", "False", "Unknown"]

CONDITION_READY: Final = "Ready"
CONDITION_CONFIG_VALID: Final = "ConfigValid"
CONDITION_RECONCILED: Final = "Reconciled"
CONDITION_WORKERS_AVAILABLE: Final = "WorkersAvailable"
CONDITION_TELEPHONY_READY: Final = "TelephonyReady"
CONDITION_SCALING_ACTIVE: Final = "ScalingActive"
CONDITION_CAPACITY_LIMITED: Final = "CapacityLimited"
CONDITION_TYPES: Final = (
    CONDITION_READY,
    CONDITION_CONFIG_VALID,
    CONDITION_RECONCILED,
    CONDITION_WORKERS_AVAILABLE,
    CONDITION_TELEPHONY_READY,
    CONDITION_SCALING_ACTIVE,
    CONDITION_CAPACITY_LIMITED,
)


class Condition(Model):
    """One aspect of the VoiceAgent's state (the metav1.Condition shape)."""

    type: Annotated[str, Field(min_length=1, max_length=316, pattern=CONDITION_TYPE)]
    """Condition type: Ready, ConfigValid, Reconciled, WorkersAvailable, TelephonyReady,
    ScalingActive or CapacityLimited."""
    status: ConditionStatus
    """Whether the condition holds: True, False or Unknown."""
    reason: Annotated[str, Field(min_length=1, max_length=1024, pattern=CONDITION_REASON)]
    """Machine-readable CamelCase reason for the last transition."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """Human-readable details; names the field to fix when the configuration is invalid."""
    observed_generation: Annotated[int | None, Field(ge=0)] = None
    """metadata.generation of the VoiceAgent this condition was computed from."""
    last_transition_time: datetime
    """When the status last changed."""


class TelephonyStatus(Model):
    """LiveKit-side SIP resources the operator created for this VoiceAgent."""

    trunk_id: Annotated[str | None, Field(alias="trunkID", max_length=256)] = None
    """ID of the inbound SIP trunk in LiveKit."""
    dispatch_rule_id: Annotated[str | None, Field(alias="dispatchRuleID", max_length=256)] = None
    """ID of the SIP dispatch rule that routes calls to this agent."""
    numbers: Annotated[list[str], Field(max_length=100)] = []
    """Numbers the trunk currently answers."""


class VoiceAgentStatus(Model):
    """Observed state of a VoiceAgent, written by the operator."""

    phase: Phase | None = None
    """Summary: Pending, Progressing, Ready, Degraded or Failed."""
    conditions: Annotated[list[Condition], Field(max_length=16)] = []
    """Ready, ConfigValid, Reconciled (children applied), WorkersAvailable, TelephonyReady,
    ScalingActive and CapacityLimited (callers get spec.overflow because the fleet cannot grow:
    PodsUnschedulable, MaxReplicasReached, TenantLimitReached)."""
    observed_generation: Annotated[int | None, Field(ge=0)] = None
    """metadata.generation the operator last acted on."""
    replicas: Annotated[int | None, Field(ge=0)] = None
    """Worker pods that exist."""
    ready_replicas: Annotated[int | None, Field(ge=0)] = None
    """Worker pods that are ready to take calls."""
    desired_replicas: Annotated[int | None, Field(ge=0)] = None
    """Worker pods the operator (or the pinned spec.scaling.replicas) asks for."""
    active_jobs: Annotated[int | None, Field(ge=0)] = None
    """Calls in progress across all workers."""
    load: Annotated[float | None, Field(ge=0)] = None
    """Average worker load (active calls / jobsPerWorker)."""
    dispatch_name: Annotated[str | None, Field(max_length=128)] = None
    """Agent name the workers register with LiveKit (unique across tenants)."""
    worker_namespace: Annotated[str | None, Field(max_length=63)] = None
    """The platform-owned namespace where the workers run (`vf-<namespace>`): tenants read
    their pods, logs and events there (`kubectl -n vf-<namespace> logs deploy/<name>`), never
    its Secrets."""
    config_hash: Annotated[str | None, Field(max_length=128)] = None
    """Hash of the rendered runtime config on the worker pod template."""
    numbers: Annotated[str | None, Field(max_length=2048)] = None
    """The answered phone numbers, comma-separated (for `kubectl get`)."""
    telephony: TelephonyStatus | None = None
    """SIP trunk and dispatch rule in LiveKit."""

    model_config = ConfigDict(
        json_schema_extra=_schema_extra(_list_semantics(maps={"conditions": "type"}))
    )


# --- the resource -----------------------------------------------------------------------------

ROOT_RULES: Final[list[JsonDict]] = [
    {
        "rule": (
            f"size(self.metadata.name) <= {NAME_MAX_LENGTH} && "
            f"self.metadata.name.matches('{DNS1035_LABEL}')"
        ),
        "message": (
            f"metadata.name must be a DNS-1035 label of at most {NAME_MAX_LENGTH} characters "
            "(lowercase letters, digits and '-', starting with a letter)"
        ),
        # No fieldPath: it may only name fields of the schema, and metadata's are implicit.
        "reason": "FieldValueInvalid",
    }
]


class VoiceAgent(Model):
    """A tenant's voice agent: LLM agents with handoffs, one speech pipeline and optional phone
    numbers, run as an autoscaled fleet of LiveKit workers."""

    api_version: Literal["voicefleet.dev/v1alpha1"] = "voicefleet.dev/v1alpha1"
    """APIVersion of this object: voicefleet.dev/v1alpha1."""
    kind: Literal["VoiceAgent"] = "VoiceAgent"
    """Kind of this object: VoiceAgent."""
    metadata: dict[str, Any] = {}
    """Standard object metadata (name, namespace, labels, ...)."""
    spec: VoiceAgentSpec
    """Desired state of the voice agent."""
    status: VoiceAgentStatus | None = None
    """Observed state, written by the operator."""

    @model_validator(mode="after")
    def _name(self) -> Self:
        name = self.metadata.get("name")
        if name is not None and (len(name) > NAME_MAX_LENGTH or not re.match(DNS1035_LABEL, name)):
            raise ValueError(ROOT_RULES[0]["message"])
        return self

    model_config = ConfigDict(json_schema_extra={VALIDATIONS: cast(JsonValue, ROOT_RULES)})


# --- parsing ----------------------------------------------------------------------------------


class SpecError(ValueError):
    """An invalid VoiceAgent spec; one line per problem, `spec.field.path: message`."""


def parse_spec(spec: Mapping[str, Any]) -> VoiceAgentSpec:
    """Validate a VoiceAgent's spec (as stored by the API server, defaults applied)."""
    try:
        return VoiceAgentSpec.model_validate(spec)
    except ValidationError as error:
        errors = all_errors(VoiceAgentSpec, spec, error)
        raise SpecError(describe_validation_error(errors, prefix="spec")) from None


def parse_status(status: Mapping[str, Any] | None) -> VoiceAgentStatus:
    """Read the status subresource (empty when the operator has not written it yet)."""
    return VoiceAgentStatus.model_validate(status or {})
