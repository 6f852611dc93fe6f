"""The workers' NetworkPolicy: what may reach a tenant's workers and what they may reach.

Ingress (nothing else; the pod's own node is always allowed by NetworkPolicy implementations,
which is how kubelet probes and a Prometheus on the host get through):
  - pods of the platform namespace -> the metrics port (the operator reads /report and pushes
    /admission there; the health port is livekit-agents' own, for kubelet's probes only);
  - the platform's monitoring pods (namespace and pod selectors from the chart) -> metrics port.

Egress:
  - DNS (port 53, UDP and TCP, any resolver);
  - LiveKit: its URL's address, every port (media ports are LiveKit's choice); an in-cluster
    LiveKit (<svc>.<ns>.svc...) is its namespace;
  - the worker namespace the policy lives in and the tenant's namespace (its own in-cluster
    webhooks, by Service name or ClusterIP; a bare Service name resolves in the tenant's
    namespace: the workers' DNS search list has it);
  - what the VoiceAgent declares (tool, MCP, provider base URLs, call record webhook, recording
    endpoint): an IP address on the URL's port, an in-cluster name as its namespace;
  - ranges the platform allows every worker (egress_allowed_cidrs);
  - everything else outside the internal ranges (public providers, public webhooks).
So other tenants' namespaces, Services and the cluster's internal addresses (the API server,
the kubelets, cloud metadata) are out of reach unless declared.

NetworkPolicies see connections after Service translation (pod IP and target port), hence
in-cluster destinations are allowed as namespaces, every port, not as ClusterIP:port.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from voicefleet_operator.api import VoiceAgentSpec
from voicefleet_operator.settings import PlatformSettings

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def declared_urls(spec: VoiceAgentSpec) -> list[tuple[str, str]]:
    """(field path, URL) of every endpoint the VoiceAgent says its workers call."""
    urls: list[tuple[str, str]] = []
    for i, tool in enumerate(spec.tools):
        urls.append((f"spec.tools[{i}].http.url", tool.http.url))
    for i, server in enumerate(spec.mcp_servers):
        urls.append((f"spec.mcpServers[{i}].url", server.url))
    for stage in ("stt", "llm", "tts"):
        base_url = getattr(getattr(spec.pipeline, stage), "base_url", None)
        if base_url:
            urls.append((f"spec.pipeline.{stage}.baseUrl", base_url))
    records = spec.call_records
    if records is not None:
        if records.webhook is not None:
            urls.append(("spec.callRecords.webhook.url", records.webhook.url))
        recording = getattr(records, "recording", None)
        if recording is not None:
            urls.append(("spec.callRecords.recording.endpoint", recording.endpoint))
    return urls


def in_cluster_namespace(host: str, own_namespace: str, cluster_domain: str) -> str | None:
    """The namespace a Service host name points into, or None for a name outside the cluster.

    `svc` (a bare Service name) is in the caller's own namespace; `svc.ns.svc` and
    `svc.ns.svc.<cluster domain>` in `ns`. Anything else (even `svc.ns`, which may be a public
    name) is outside the cluster."""
    labels = host.lower().rstrip(".").split(".")
    if len(labels) == 1:
        return own_namespace
    suffixes = (["svc"], ["svc", *cluster_domain.lower().split(".")])
    if len(labels) >= 3 and labels[2:] in suffixes:
        return labels[1]
    return None


def _namespace_peer(namespace: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}}}


def _ip_block(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> dict[str, Any]:
    return {"ipBlock": {"cidr": f"{address}/{address.max_prefixlen}"}}


def egress_rule_for_url(
    url: str, own_namespace: str, settings: PlatformSettings, *, any_port: bool = False
) -> dict[str, Any] | None:
    """The egress rule that lets a worker reach `url`, or None when the public rule (or the
    own-namespace rule) already covers it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        namespace = in_cluster_namespace(host, own_namespace, settings.cluster_domain)
        if namespace is None or namespace == own_namespace:
            return None
        return {"to": [_namespace_peer(namespace)]}
    rule: dict[str, Any] = {"to": [_ip_block(address)]}
    if not any_port:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 443)
        rule["ports"] = [{"protocol": "TCP", "port": port}]
    return rule


def _public_rule(settings: PlatformSettings) -> dict[str, Any]:
    internal = [ipaddress.ip_network(c, strict=False) for c in settings.internal_cidrs]
    peers = []
    for everything in (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")):
        excepted = sorted(
            {str(n) for n in internal if n.version == everything.version and n != everything}
        )
        if any(n == everything for n in internal):
            continue  # the whole family is internal: nothing of it is public
        block: dict[str, Any] = {"cidr": str(everything)}
        if excepted:
            block["except"] = excepted
        peers.append({"ipBlock": block})
    return {"to": peers}


def network_policy_spec(
    namespace: str,
    pod_selector: dict[str, str],
    spec: VoiceAgentSpec,
    settings: PlatformSettings,
) -> dict[str, Any]:
    """The NetworkPolicy's spec for tenant `namespace`'s workers selected by `pod_selector` (in
    the tenant's worker namespace, where the policy lives)."""
    metrics = {"protocol": "TCP", "port": spec.worker.metrics_port}
    ingress: list[dict[str, Any]] = []
    if settings.platform_namespace:
        ingress.append({"from": [_namespace_peer(settings.platform_namespace)], "ports": [metrics]})
    if settings.monitoring_namespace_selector is not None:
        peer: dict[str, Any] = {
            "namespaceSelector": {"matchLabels": dict(settings.monitoring_namespace_selector)}
        }
        if settings.monitoring_pod_selector:
            peer["podSelector"] = {"matchLabels": dict(settings.monitoring_pod_selector)}
        ingress.append({"from": [peer], "ports": [metrics]})

    egress: list[dict[str, Any]] = [
        {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
        # The policy's own namespace (the tenant's worker namespace) and the tenant namespace
        # (its own in-cluster webhooks).
        {"to": [{"podSelector": {}}, _namespace_peer(namespace)]},
    ]
    livekit = egress_rule_for_url(settings.livekit_url, namespace, settings, any_port=True)
    declared = [egress_rule_for_url(url, namespace, settings) for _, url in declared_urls(spec)]
    for rule in [livekit, *declared]:
        if rule is not None and rule not in egress:
            egress.append(rule)
    if settings.egress_allowed_cidrs:
        egress.append(
            {"to": [{"ipBlock": {"cidr": cidr}} for cidr in settings.egress_allowed_cidrs]}
        )
    egress.append(_public_rule(settings))
    policy: dict[str, Any] = {
        "podSelector": {"matchLabels": pod_selector},
        "policyTypes": ["Ingress", "Egress"],
        "egress": egress,
    }
    # No rule at all (no platform namespace, no monitoring) still means "no ingress" under
    # policyTypes Ingress. The key is left out then: the API server drops an empty list, so
    # applying `ingress: []` would differ from what it stored and rewrite the object on every
    # reconcile.
    if ingress:
        policy["ingress"] = ingress
    return policy
