"""The workers' NetworkPolicy (voicefleet_operator.netpol): who may reach them, what they reach."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from voicefleet_operator import netpol
from voicefleet_operator.api import parse_spec
from voicefleet_operator.settings import PlatformSettings, SettingsError

BASE = {
    "livekit_url": "ws://10.20.0.5:7880",
    "livekit_secret_namespace": "voicefleet-system",
    "runtime_image": "voicefleet/runtime:0.1.0",
}
SPEC: dict[str, Any] = {
    "agents": [{"name": "assistant", "instructions": "Be brief.", "tools": ["lookup"]}],
    "entry": "assistant",
    "tools": [
        {
            "name": "lookup",
            "description": "Look an order up.",
            "http": {"url": "http://orders.shared-tools.svc.cluster.local:8080/lookup"},
        }
    ],
    "mcpServers": [{"name": "docs", "url": "https://mcp.example.com/sse"}],
    "pipeline": {
        "stt": {"provider": "openai", "baseUrl": "http://192.168.7.9:9000/v1"},
        "llm": {"provider": "openai", "baseUrl": "https://api.openai.com/v1"},
    },
}


def settings(**overrides: Any) -> PlatformSettings:
    return PlatformSettings(**{**BASE, **overrides})


def policy(spec: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    parsed = parse_spec(copy.deepcopy(spec or SPEC))
    return netpol.network_policy_spec("tenant-a", {"app": "w"}, parsed, settings(**overrides))


def test_no_ingress_without_platform_namespace_or_monitoring() -> None:
    # An operator outside the cluster and a Prometheus on the nodes need no rule: node traffic.
    # Policy type Ingress with no rule admits nothing; the key is left out, not [] (the API
    # server drops an empty list, and applying one would rewrite the object each reconcile).
    rendered = policy()
    assert "Ingress" in rendered["policyTypes"] and "ingress" not in rendered


def test_ingress_from_platform_namespace_and_selected_monitoring_pods_only() -> None:
    rules = policy(
        platform_namespace="voicefleet-system",
        monitoring_namespace_selector={"team": "observability"},
        monitoring_pod_selector={"app": "prometheus"},
    )["ingress"]
    platform, monitoring = rules
    assert platform["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "voicefleet-system"}}}
    ]
    # the metrics port only: the report and the budget push (the health port is for kubelet)
    assert [p["port"] for p in platform["ports"]] == [9100]
    assert monitoring == {
        "from": [
            {
                "namespaceSelector": {"matchLabels": {"team": "observability"}},
                "podSelector": {"matchLabels": {"app": "prometheus"}},
            }
        ],
        "ports": [{"protocol": "TCP", "port": 9100}],
    }
    every_pod = policy(monitoring_namespace_selector={"team": "observability"})["ingress"]
    assert "podSelector" not in every_pod[0]["from"][0]


def test_egress_dns_own_namespace_livekit_declared_and_public() -> None:
    egress = policy()["egress"]
    assert egress[0] == {
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    }
    # The worker namespace the policy lives in, and the tenant's namespace (its webhooks).
    tenant = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "tenant-a"}}}
    assert egress[1] == {"to": [{"podSelector": {}}, tenant]}
    # LiveKit: every port of its address (media ports are LiveKit's choice).
    assert {"to": [{"ipBlock": {"cidr": "10.20.0.5/32"}}]} in egress
    # The in-cluster tool: its namespace (after Service translation the port is the target's).
    namespace = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shared-tools"}}
    }
    assert {"to": [namespace]} in egress
    # The provider on a private address: that address and port only.
    private_stt = {
        "to": [{"ipBlock": {"cidr": "192.168.7.9/32"}}],
        "ports": [{"protocol": "TCP", "port": 9000}],
    }
    assert private_stt in egress
    public = egress[-1]["to"]
    assert public[0] == {
        "ipBlock": {
            "cidr": "0.0.0.0/0",
            "except": sorted(c for c in settings().internal_cidrs if ":" not in c),
        }
    }
    assert public[1]["ipBlock"]["cidr"] == "::/0"
    # Public names add no rule of their own (the public rule covers them); nothing is "any".
    assert len(egress) == 6
    assert all(rule for rule in egress)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("orders", "tenant-a"),
        ("orders.acme.svc", "acme"),
        ("orders.acme.svc.cluster.local", "acme"),
        ("orders.acme.svc.cluster.local.", "acme"),
        ("orders.acme", None),  # may be a public name
        ("orders.acme.svc.other.domain", None),
        ("api.openai.com", None),
    ],
)
def test_in_cluster_names(host: str, expected: str | None) -> None:
    assert netpol.in_cluster_namespace(host, "tenant-a", "cluster.local") == expected


def test_url_rules_default_ports_and_ipv6() -> None:
    s = settings()
    assert netpol.egress_rule_for_url("https://10.1.2.3/hook", "t", s) == {
        "to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}],
        "ports": [{"protocol": "TCP", "port": 443}],
    }
    assert netpol.egress_rule_for_url("http://[fd00::7]:81/", "t", s) == {
        "to": [{"ipBlock": {"cidr": "fd00::7/128"}}],
        "ports": [{"protocol": "TCP", "port": 81}],
    }
    assert netpol.egress_rule_for_url("https://hooks.example.com/x", "t", s) is None
    assert netpol.egress_rule_for_url("http://svc.t.svc:80/", "t", s) is None  # own namespace


def test_call_record_webhook_is_declared() -> None:
    spec = copy.deepcopy(SPEC)
    spec["callRecords"] = {
        "webhook": {
            "url": "http://10.9.9.9:8443/records",
            "signingSecretRef": {"name": "records", "key": "key"},
        }
    }
    assert {
        "to": [{"ipBlock": {"cidr": "10.9.9.9/32"}}],
        "ports": [{"protocol": "TCP", "port": 8443}],
    } in policy(spec)["egress"]
    fields = [field for field, _ in netpol.declared_urls(parse_spec(spec))]
    assert "spec.callRecords.webhook.url" in fields


def test_platform_allowed_ranges_and_internal_ranges_are_settings() -> None:
    egress = policy(egress_allowed_cidrs=("10.50.0.0/16",), internal_cidrs=("10.0.0.0/8",))[
        "egress"
    ]
    assert {"to": [{"ipBlock": {"cidr": "10.50.0.0/16"}}]} in egress
    assert egress[-1]["to"] == [
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}},
        {"ipBlock": {"cidr": "::/0"}},
    ]


def test_in_cluster_livekit_is_its_namespace() -> None:
    egress = policy(livekit_url="ws://livekit.media.svc:7880")["egress"]
    namespace = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "media"}}}
    assert {"to": [namespace]} in egress


def test_settings_from_environment() -> None:
    environ = {
        "VOICEFLEET_LIVEKIT_URL": "ws://lk:7880",
        "VOICEFLEET_RUNTIME_IMAGE": "img",
        "POD_NAMESPACE": "platform",
        "VOICEFLEET_MONITORING_NAMESPACE_SELECTOR": "kubernetes.io/metadata.name=mon",
        "VOICEFLEET_MONITORING_POD_SELECTOR": "app=prometheus, tier=scrape",
        "VOICEFLEET_INTERNAL_CIDRS": "10.0.0.0/8, 172.16.0.0/12",
        "VOICEFLEET_EGRESS_ALLOWED_CIDRS": "10.96.0.10/32",
    }
    parsed = PlatformSettings.from_environment(environ)
    assert parsed.platform_namespace == "platform"
    assert parsed.monitoring_namespace_selector == {"kubernetes.io/metadata.name": "mon"}
    assert parsed.monitoring_pod_selector == {"app": "prometheus", "tier": "scrape"}
    assert parsed.internal_cidrs == ("10.0.0.0/8", "172.16.0.0/12")
    assert parsed.egress_allowed_cidrs == ("10.96.0.10/32",)
    with pytest.raises(SettingsError, match="VOICEFLEET_INTERNAL_CIDRS"):
        PlatformSettings.from_environment({**environ, "VOICEFLEET_INTERNAL_CIDRS": "10.0.0.1/8"})
    with pytest.raises(SettingsError, match="VOICEFLEET_MONITORING_POD_SELECTOR"):
        PlatformSettings.from_environment({**environ, "VOICEFLEET_MONITORING_POD_SELECTOR": "app"})
