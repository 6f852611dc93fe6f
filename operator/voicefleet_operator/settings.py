"""Platform settings: what the platform team configures (Helm values -> operator environment).

Tenants never see these; they shape every VoiceAgent's workers: where LiveKit is, which image the
workers run, which namespaces the operator serves.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "VOICEFLEET_"
LIVEKIT_API_KEY = "LIVEKIT_API_KEY"
LIVEKIT_API_SECRET = "LIVEKIT_API_SECRET"
LIVEKIT_SECRET_KEYS = (LIVEKIT_API_KEY, LIVEKIT_API_SECRET)
"""Keys the platform's LiveKit Secret must hold (and the copy in each tenant namespace holds)."""

DEFAULT_INTERNAL_CIDRS = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "fc00::/7",
    "fe80::/10",
)
"""Private, shared and link-local ranges (RFC 1918, RFC 6598, cloud metadata at 169.254.169.254,
IPv6 ULA and link-local): where pod, Service and node addresses usually are, so workers may not
reach them except where the platform or the VoiceAgent says."""


class SettingsError(Exception):
    """Invalid or missing platform settings; the message names the environment variable."""


class PlatformSettings(BaseModel):
    """Operator configuration, read from VOICEFLEET_* environment variables."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    livekit_url: Annotated[str, Field(pattern=r"^(wss?|https?)://")]
    """VOICEFLEET_LIVEKIT_URL: the LiveKit server URL the workers connect to (ws:// or wss://)."""

    livekit_api_url: Annotated[str | None, Field(pattern=r"^(wss?|https?)://")] = None
    """VOICEFLEET_LIVEKIT_API_URL: the URL the operator itself uses for LiveKit's server API
    (SIP trunks, dispatch rules); defaults to livekit_url."""

    livekit_cloud: bool = False
    """VOICEFLEET_LIVEKIT_CLOUD (Helm value livekit.cloud): the LiveKit server is LiveKit Cloud.
    Features only LiveKit Cloud serves (enhanced noise cancellation, spec.pipeline.
    noiseCancellation.mode bvc / bvc-telephony) are refused otherwise (platform_features.py)."""

    livekit_secret_name: Annotated[str, Field(min_length=1)] = "voicefleet-livekit"
    """VOICEFLEET_LIVEKIT_SECRET_NAME: Secret holding LIVEKIT_API_KEY and LIVEKIT_API_SECRET."""

    livekit_secret_namespace: Annotated[str, Field(min_length=1)]
    """VOICEFLEET_LIVEKIT_SECRET_NAMESPACE: namespace of that Secret (defaults to the
    operator's own namespace, POD_NAMESPACE)."""

    runtime_image: Annotated[str, Field(min_length=1)]
    """VOICEFLEET_RUNTIME_IMAGE: default worker image; a VoiceAgent may override it."""

    runtime_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """VOICEFLEET_RUNTIME_IMAGE_PULL_POLICY."""

    allowed_image_repositories: tuple[str, ...] = ()
    """VOICEFLEET_ALLOWED_IMAGE_REPOSITORIES: comma-separated repositories whose images (any tag
    or digest) a VoiceAgent may run as spec.worker.image, besides runtime_image."""

    allowed_image_digests: tuple[str, ...] = ()
    """VOICEFLEET_ALLOWED_IMAGE_DIGESTS: comma-separated digests (sha256:<hex>); an image
    pinned to one of them (<repository>@<digest>) is allowed whatever its repository."""

    watch_namespaces: tuple[str, ...] = ()
    """VOICEFLEET_WATCH_NAMESPACES: comma-separated namespaces to serve; empty means all."""

    platform_namespace: str | None = None
    """VOICEFLEET_PLATFORM_NAMESPACE: the platform's own namespace (defaults to POD_NAMESPACE);
    its pods may reach the workers' metrics port (the operator reads /report and pushes
    /admission). Unset (an operator running outside the cluster): no such rule."""

    monitoring_namespace_selector: dict[str, str] | None = None
    """VOICEFLEET_MONITORING_NAMESPACE_SELECTOR: labels (key=value,key=value) of the namespaces
    whose monitoring pods may scrape the workers' metrics port; unset: no scraping from pods
    (the node's own traffic, e.g. a Prometheus on the host, is always allowed)."""

    monitoring_pod_selector: dict[str, str] = {}
    """VOICEFLEET_MONITORING_POD_SELECTOR: labels (key=value,key=value) of those monitoring
    pods (none: every pod of the selected namespaces)."""

    internal_cidrs: tuple[str, ...] = DEFAULT_INTERNAL_CIDRS
    """VOICEFLEET_INTERNAL_CIDRS: comma-separated ranges of the cluster and its private
    network; workers reach them only for DNS, LiveKit, their own namespace, what the platform
    allows (egress_allowed_cidrs) and what their VoiceAgent declares."""

    egress_allowed_cidrs: tuple[str, ...] = ()
    """VOICEFLEET_EGRESS_ALLOWED_CIDRS: comma-separated ranges every worker may reach although
    they are internal (e.g. LiveKit's media addresses when its URL is a name that resolves to a
    private address, a shared provider gateway)."""

    cluster_domain: Annotated[str, Field(min_length=1)] = "cluster.local"
    """VOICEFLEET_CLUSTER_DOMAIN: the cluster's DNS domain, to recognise in-cluster URLs
    (<service>.<namespace>.svc.<domain>) in a VoiceAgent."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """VOICEFLEET_LOG_LEVEL."""

    resync_seconds: Annotated[float, Field(gt=0)] = 300.0
    """VOICEFLEET_RESYNC_SECONDS: every VoiceAgent is reconciled about this often (at most 1.5
    times this apart: a resync is skipped within half of it after another reconcile), which puts
    back children changed behind the operator's back. Not more often: a resync costs ~20 API
    calls, so every 60 s at 1000 VoiceAgents was ~330 calls a second, about all a small API
    server serves (`make bench ONLY=scale`'s floor); the Deployment and the Secrets are watched,
    so a deleted Deployment or a rotated Secret is acted on at once, not at the resync."""

    recheck_invalid_seconds: Annotated[float, Field(gt=0)] = 5.0
    """VOICEFLEET_RECHECK_INVALID_SECONDS: how often a VoiceAgent with ConfigValid=False is
    re-checked, so that it recovers soon after a missing Secret appears."""

    liveness_port: Annotated[int, Field(ge=1, le=65535)] = 8080
    """VOICEFLEET_LIVENESS_PORT: port of the operator's own /healthz endpoint."""

    namespace_call_limits: dict[str, Annotated[int, Field(ge=0)]] = {}
    """VOICEFLEET_NAMESPACE_CALL_LIMITS: the platform's cap on concurrent calls per tenant
    namespace, `namespace=calls` comma-separated (Helm `tenantLimits.namespaces`); tenants
    cannot raise it. Shared by the namespace's VoiceAgents."""

    default_namespace_call_limit: Annotated[int | None, Field(ge=0)] = None
    """VOICEFLEET_DEFAULT_NAMESPACE_CALL_LIMIT: the cap for namespaces not listed (Helm
    `tenantLimits.defaultMaxConcurrentCalls`); empty means none."""

    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9090
    """VOICEFLEET_METRICS_PORT: port of the operator's Prometheus /metrics; 0 disables it."""

    leader_election: bool = False
    """VOICEFLEET_LEADER_ELECTION: run as one of several replicas, of which the holder of a
    coordination.k8s.io Lease is the only active one (election.py); the chart turns it on."""

    lease_name: Annotated[str, Field(min_length=1)] = "voicefleet-operator"
    """VOICEFLEET_LEASE_NAME: the Lease the replicas compete for."""

    lease_namespace: str | None = None
    """VOICEFLEET_LEASE_NAMESPACE: its namespace (defaults to POD_NAMESPACE, then to the
    LiveKit Secret's namespace)."""

    lease_seconds: Annotated[float, Field(gt=0)] = 15.0
    """VOICEFLEET_LEASE_SECONDS: a standby takes over after the leader has not renewed the
    Lease for this long (the bound on takeover after a leader's crash)."""

    lease_renew_seconds: Annotated[float, Field(gt=0)] = 10.0
    """VOICEFLEET_LEASE_RENEW_SECONDS: a leader that could not renew for this long stops
    (exits) before a standby may take over; must be less than lease_seconds."""

    lease_retry_seconds: Annotated[float, Field(gt=0)] = 2.0
    """VOICEFLEET_LEASE_RETRY_SECONDS: how often the leader renews and a standby tries."""

    wake_timeout_seconds: Annotated[float, Field(ge=1, le=300)] = 25.0
    """VOICEFLEET_WAKE_TIMEOUT_SECONDS: how long a caller of a VoiceAgent scaled to zero
    (minReplicas 0) waits for its first worker to start before the operator gives the
    treatment it can give without a worker (wake.py): a phone call is ended (486 Busy Here),
    a WebRTC caller gets the `voicefleet.overflow=wake_timeout` attribute. The SIP trunks ring
    5 s longer than this (at least 30 s; telephony.ringing_timeout_for), after which
    livekit-sip would end the call itself."""

    desk_url: Annotated[str | None, Field(pattern=r"^https?://")] = None
    """VOICEFLEET_DESK_URL: the platform desk (`python -m voicefleet_runtime desk`; the chart's
    desk Service), which says spec.overflow.holdMessage to a caller held while a fleet wakes
    (wake.py). Unset: no desk; held phone callers hear ringing."""

    @field_validator(
        "watch_namespaces",
        "internal_cidrs",
        "egress_allowed_cidrs",
        "allowed_image_repositories",
        "allowed_image_digests",
        mode="before",
    )
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("internal_cidrs", "egress_allowed_cidrs")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr)
            except ValueError as error:
                raise ValueError(f"{cidr!r} is not a CIDR ({error})") from None
        return value

    @field_validator("allowed_image_digests")
    @classmethod
    def _digests(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for digest in value:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                raise ValueError(f"{digest!r} is not a digest (sha256:<64 hex digits>)")
        return value

    @field_validator("monitoring_namespace_selector", "monitoring_pod_selector", mode="before")
    @classmethod
    def _label_map(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        labels: dict[str, str] = {}
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            key, sep, label_value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"{part!r} is not key=value")
            labels[key.strip()] = label_value.strip()
        return labels

    @model_validator(mode="after")
    def _lease_timing(self) -> PlatformSettings:
        if not self.lease_retry_seconds < self.lease_renew_seconds < self.lease_seconds:
            raise ValueError(
                "VOICEFLEET_LEASE_RETRY_SECONDS < VOICEFLEET_LEASE_RENEW_SECONDS < "
                f"VOICEFLEET_LEASE_SECONDS must hold (got {self.lease_retry_seconds:g}, "
                f"{self.lease_renew_seconds:g}, {self.lease_seconds:g})"
            )
        return self

    @field_validator("namespace_call_limits", mode="before")
    @classmethod
    def _namespace_limits(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        limits: dict[str, str] = {}
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            namespace, sep, calls = part.partition("=")
            if not sep or not namespace.strip():
                raise ValueError(f"{part!r} is not namespace=calls")
            limits[namespace.strip()] = calls.strip()
        return limits

    def namespace_call_limit(self, namespace: str) -> int | None:
        """The platform's cap for `namespace`, or None."""
        return self.namespace_call_limits.get(namespace, self.default_namespace_call_limit)

    @property
    def effective_lease_namespace(self) -> str:
        return self.lease_namespace or self.livekit_secret_namespace

    @property
    def effective_livekit_api_url(self) -> str:
        url = self.livekit_api_url or self.livekit_url
        # livekit-api speaks HTTP(S); workers use the WebSocket scheme of the same server.
        return url.replace("wss://", "https://", 1).replace("ws://", "http://", 1)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> PlatformSettings:
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name in cls.model_fields:
            key = ENV_PREFIX + name.upper()
            if key in environ and environ[key] != "":
                values[name] = environ[key]
        for defaulted in ("livekit_secret_namespace", "lease_namespace", "platform_namespace"):
            if defaulted not in values and environ.get("POD_NAMESPACE"):
                values[defaulted] = environ["POD_NAMESPACE"]
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            lines = []
            for item in error.errors():
                if not item["loc"]:  # a rule across fields: the message names them
                    lines.append(str(item["msg"]).removeprefix("Value error, "))
                    continue
                field = str(item["loc"][0])
                variable = ENV_PREFIX + field.upper()
                message = item["msg"]
                if item["type"] == "missing":
                    message = "is required; set it (Helm values set it for you)"
                if field == "livekit_secret_namespace" and item["type"] == "missing":
                    message += " or POD_NAMESPACE"
                lines.append(f"{variable}: {message}")
            raise SettingsError("invalid operator settings:\n" + "\n".join(lines)) from None
