"""Rendering of every child object: golden files, plus the properties the children must keep.

Golden files live in tests/unit/golden/render/<case>/<Kind>.yaml. After an intended change,
regenerate them with `UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_render.py` and review the
diff like code.
"""

from __future__ import annotations

import base64
import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from voicefleet_operator import render
from voicefleet_operator.api import VoiceAgentSpec, parse_spec
from voicefleet_operator.render import VoiceAgentRef
from voicefleet_operator.settings import PlatformSettings
from voicefleet_runtime.config import load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden" / "render"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

SETTINGS = PlatformSettings(
    livekit_url="ws://livekit.voicefleet-system.svc:7880",
    livekit_secret_namespace="voicefleet-system",
    runtime_image="voicefleet/runtime:0.1.0",
    platform_namespace="voicefleet-system",
    monitoring_namespace_selector={"kubernetes.io/metadata.name": "monitoring"},
    monitoring_pod_selector={"app.kubernetes.io/name": "prometheus"},
)
LIVEKIT_DATA = {
    "LIVEKIT_API_KEY": base64.b64encode(b"devkey").decode(),
    "LIVEKIT_API_SECRET": base64.b64encode(b"not-a-real-secret").decode(),
}
REF = VoiceAgentRef(
    name="acme-support", namespace="acme", uid="0b3c1f7e-1111-4222-8333-444455556666"
)
TENANT_SECRETS = {
    "provider-keys": {"OPENAI_API_KEY": base64.b64encode(b"sk-tenant").decode()},
    "acme-orders-api": {
        "authorization": base64.b64encode(b"Bearer t0ken").decode(),
        "unused": base64.b64encode(b"never copied").decode(),
    },
    "unrelated": {"password": base64.b64encode(b"not referenced").decode()},
}

MINIMAL_SPEC: dict[str, Any] = {
    "agents": [{"name": "assistant", "instructions": "Be helpful and brief."}],
    "entry": "assistant",
    "pipeline": {
        "stt": {"provider": "openai", "model": "gpt-4o-transcribe"},
        "llm": {"provider": "openai"},
        "tts": {"provider": "openai", "voice": "alloy"},
    },
    "secretRefs": [{"name": "openai"}],
}


def example_spec() -> dict[str, Any]:
    document = yaml.safe_load((REPO / "examples" / "voiceagent.yaml").read_text())
    return dict(document["spec"])


def rendered(spec: dict[str, Any], replicas: int = 1, ref: VoiceAgentRef = REF) -> render.Rendered:
    return render.render_all(
        ref,
        parse_spec(spec),
        SETTINGS,
        livekit_data=LIVEKIT_DATA,
        secrets_hash="0123456789abcdef",
        replicas=replicas,
        secrets=TENANT_SECRETS,
    )


CASES = {"example": example_spec, "minimal": lambda: copy.deepcopy(MINIMAL_SPEC)}
KINDS = [
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "Service",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "Deployment",
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_child_matches_golden_file(case: str, kind: str) -> None:
    child = rendered(CASES[case]()).child(kind)
    text = render.dump_yaml(child)
    path = GOLDEN / case / f"{kind}.yaml"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), (
        f"{kind} of case {case!r} differs from {path}; if the change is intended, "
        "regenerate with UPDATE_GOLDEN=1 and review the diff"
    )


def test_children_are_applied_in_dependency_order() -> None:
    children = rendered(example_spec()).children
    kinds = [child["kind"] for child in children]
    # The Deployment last: everything it mounts exists before it.
    assert kinds == [*KINDS[:2], "Secret", *KINDS[2:]]
    assert [c["metadata"]["name"] for c in children if c["kind"] == "Secret"] == [
        "acme-support-livekit",
        "acme-support-secrets",
    ]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_child_is_in_the_worker_namespace_labelled_with_its_voiceagent(case: str) -> None:
    """Children live in vf-<tenant>, out of the tenant's reach; owner references cannot
    cross namespaces, so the VoiceAgent's namespace, name and uid are labels."""
    for child in rendered(CASES[case]()).children:
        metadata = child["metadata"]
        assert metadata["namespace"] == "vf-acme" == REF.worker_namespace
        assert "ownerReferences" not in metadata
        assert metadata["labels"][render.LABEL_VOICE_AGENT] == REF.name
        assert metadata["labels"][render.LABEL_VOICE_AGENT_NAMESPACE] == REF.namespace
        assert metadata["labels"][render.LABEL_VOICE_AGENT_UID] == REF.uid
        assert metadata["labels"][render.LABEL_MANAGED_BY] == "voicefleet-operator"
        assert render.owned_by(child, REF)
        assert not render.owned_by(child, VoiceAgentRef(REF.name, REF.namespace, "other-uid"))
        assert render.owner_of(child) == (REF.namespace, REF.name, REF.uid)
        assert len(metadata["name"]) <= 63
    pod_labels = rendered(CASES[case]()).child("Deployment")["spec"]["template"]["metadata"]
    assert pod_labels["labels"][render.LABEL_VOICE_AGENT_UID] == REF.uid


def test_the_tenant_secrets_copy_holds_only_the_referenced_values() -> None:
    result = rendered(example_spec())
    [_, copy_] = [c for c in result.children if c["kind"] == "Secret"]
    variable = render.header_env_var("acme-orders-api", "authorization")
    assert copy_["metadata"]["name"] == "acme-support-secrets"
    # secretRefs: every key (envFrom); a header's reference: that key under its variable.
    assert copy_["data"] == {
        "OPENAI_API_KEY": TENANT_SECRETS["provider-keys"]["OPENAI_API_KEY"],
        variable: TENANT_SECRETS["acme-orders-api"]["authorization"],
    }
    # The platform's key is never in the tenant values' copy, nor tenant values in its copy.
    livekit = result.child("Secret")
    assert set(livekit["data"]) == {"LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"}
    for value in LIVEKIT_DATA.values():
        assert value not in copy_["data"].values()


def test_a_later_secret_ref_wins_a_shared_key_as_env_from_does() -> None:
    spec = parse_spec({**MINIMAL_SPEC, "secretRefs": [{"name": "a"}, {"name": "b"}]})
    data = render.tenant_secret_data(
        spec, {"a": {"K": "YQ==", "A_ONLY": "eA=="}, "b": {"K": "Yg=="}}
    )
    assert data == {"K": "Yg==", "A_ONLY": "eA=="}


def test_workers_resolve_bare_service_names_in_the_tenant_namespace() -> None:
    pod = rendered(example_spec()).child("Deployment")["spec"]["template"]["spec"]
    assert pod["dnsConfig"] == {"searches": ["acme.svc.cluster.local"]}


def test_worker_namespace_names() -> None:
    assert render.worker_namespace("acme") == "vf-acme"
    assert render.TENANT_NAMESPACE_MAX_LENGTH == 60


def test_config_map_holds_a_valid_runtime_config_without_secrets(tmp_path: Path) -> None:
    result = rendered(example_spec())
    text = result.child("ConfigMap")["data"][render.CONFIG_KEY]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(text)
    config = load_config(config_file)  # what the runtime does at start-up
    assert config.tenant == "acme"
    assert config.name == "acme-support"
    assert config.dispatch_name == "acme.acme-support"
    header = config.tools[0].http.headers[0]
    assert header.value is None
    assert header.value_from_env == render.header_env_var("acme-orders-api", "authorization")
    # The SIP trunk's inbound settings are the operator's, never the workers'.
    assert "inbound" not in text
    assert "allowedAddresses" not in text
    for value in LIVEKIT_DATA.values():
        assert value not in text
    assert "not-a-real-secret" not in yaml.safe_dump(result.children[2:])


def test_secret_header_reaches_the_worker_as_env_from_the_secret_key() -> None:
    deployment = rendered(example_spec()).child("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item for item in container["env"]}
    variable = render.header_env_var("acme-orders-api", "authorization")
    # From the worker namespace's copy (the workers cannot read the tenant namespace).
    assert env[variable]["valueFrom"] == {
        "secretKeyRef": {"name": "acme-support-secrets", "key": variable}
    }
    assert env["VOICEFLEET_CONFIG"]["value"] == "/etc/voicefleet/config.yaml"
    assert env["LIVEKIT_URL"]["value"] == SETTINGS.livekit_url
    for key in ("LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "acme-support-livekit", "key": key}
    assert container["envFrom"] == [{"secretRef": {"name": "acme-support-secrets"}}]


def test_header_env_vars_are_distinct_per_secret_key() -> None:
    # The readable parts collide ("a-b"+"c" and "a"+"b-c"); the hash suffix keeps them apart.
    first = render.header_env_var("a-b", "c")
    second = render.header_env_var("a", "b-c")
    assert first != second
    assert first.startswith("VOICEFLEET_SECRET_A_B_C_")
    parse_config(  # both are valid variable names for the runtime's schema
        {
            "tenant": "t",
            "name": "n",
            "dispatchName": "t.n",
            "agents": [{"name": "a", "instructions": "x"}],
            "entry": "a",
            "mcpServers": [
                {
                    "name": "m",
                    "url": "http://m",
                    "headers": [
                        {"name": "A", "valueFromEnv": first},
                        {"name": "B", "valueFromEnv": second},
                    ],
                }
            ],
        }
    )


def test_config_change_changes_hash_and_pod_template() -> None:
    before = rendered(example_spec())
    changed_spec = example_spec()
    changed_spec["agents"][0]["greeting"] = "Hello from Acme!"
    after = rendered(changed_spec)
    assert before.config_hash != after.config_hash
    template = after.child("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert template[render.ANNOTATION_CONFIG_HASH] == after.config_hash
    config_map = after.child("ConfigMap")
    assert config_map["metadata"]["annotations"][render.ANNOTATION_CONFIG_HASH] == after.config_hash


def test_scaling_change_does_not_roll_the_workers() -> None:
    before = rendered(example_spec())
    changed_spec = example_spec()
    changed_spec["scaling"]["maxReplicas"] = 20
    after = rendered(changed_spec)
    assert before.config_hash == after.config_hash
    assert (
        before.child("Deployment")["spec"]["template"]
        == after.child("Deployment")["spec"]["template"]
    )


def test_rendering_is_deterministic() -> None:
    assert rendered(example_spec()).children == rendered(example_spec()).children


def test_pod_passes_the_restricted_pod_security_standard() -> None:
    """The checks of the `restricted` profile (Kubernetes Pod Security Standards, v1.34)."""
    pod = rendered(example_spec()).child("Deployment")["spec"]["template"]["spec"]
    pod_context = pod["securityContext"]
    assert pod_context["runAsNonRoot"] is True
    assert pod_context["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod_context.get("runAsUser", 1) != 0
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key)
    for volume in pod["volumes"]:
        # restricted allows only these volume types
        assert set(volume) - {"name"} <= {
            "configMap",
            "emptyDir",
            "projected",
            "secret",
            "downwardAPI",
            "persistentVolumeClaim",
            "ephemeral",
            "csi",
        }
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert not context["capabilities"].get("add")
        assert context.get("privileged") is not True
        assert context["runAsNonRoot"] is True
        assert context.get("runAsUser", 1) != 0
        assert context["seccompProfile"]["type"] == "RuntimeDefault"
        assert context["readOnlyRootFilesystem"] is True
        assert not any(port.get("hostPort") for port in container["ports"])
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/tmp", render.METRICS_DIR, render.CONFIG_DIR} <= mounts
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["PROMETHEUS_MULTIPROC_DIR"] == render.METRICS_DIR


def test_workers_drain_before_they_are_killed_and_rollouts_never_cut_calls() -> None:
    spec = example_spec()
    spec["worker"]["drainTimeoutSeconds"] = 600
    deployment = rendered(spec).child("Deployment")
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > 600
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0
    assert rolling["maxSurge"] not in (0, "0%")
    pdb = rendered(spec).child("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1


def test_probes_and_prometheus_annotations_use_the_configured_ports() -> None:
    spec = example_spec()
    spec["worker"]["healthPort"] = 8181
    spec["worker"]["metricsPort"] = 9191
    result = rendered(spec)
    template = result.child("Deployment")["spec"]["template"]
    container = template["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8181, "metrics": 9191}
    # Alive: livekit-agents' own health endpoint. Ready: registered with LiveKit, not draining.
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/", "port": "health", "scheme": "HTTP"}
    ready = {"path": "/ready", "port": "metrics", "scheme": "HTTP"}
    assert container["readinessProbe"]["httpGet"] == ready
    assert template["metadata"]["annotations"]["prometheus.io/port"] == "9191"
    assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert result.child("Service")["spec"]["ports"][0]["port"] == 9191
    from_platform, from_monitoring = result.child("NetworkPolicy")["spec"]["ingress"]
    assert [p["port"] for p in from_platform["ports"]] == [9191]  # the report and the push
    assert [p["port"] for p in from_monitoring["ports"]] == [9191]


def test_resources_are_derived_from_job_capacity() -> None:
    spec = parse_spec(example_spec())
    derived = render.derived_resources(spec.worker)
    # 10 jobs + 2 warm processes at half of 500 MB, plus the 512 MiB base.
    assert derived["requests"]["memory"] == "3512Mi"
    # Every process may reach its 1000 MB kill limit before the kernel steps in.
    assert derived["limits"]["memory"] == "12512Mi"
    assert derived["requests"]["cpu"] == "1100m"
    assert "cpu" not in derived["limits"]

    small = parse_spec({**example_spec(), "worker": {"jobsPerWorker": 2, "idleProcesses": 0}})
    assert render.derived_resources(small.worker)["requests"] == {"cpu": "300m", "memory": "1012Mi"}


def test_without_a_job_memory_limit_each_process_may_reach_twice_its_warning() -> None:
    unlimited = parse_spec({**example_spec(), "worker": {"jobMemoryLimitMB": 0}})
    derived = render.derived_resources(unlimited.worker)
    # 10 jobs + 2 warm processes at 2 x 500 MB, plus the 512 MiB base.
    assert derived["limits"]["memory"] == f"{512 + 12 * 1000}Mi"
    warn_300 = {"jobMemoryLimitMB": 0, "jobMemoryWarnMB": 300, "jobsPerWorker": 2}
    small = parse_spec({**example_spec(), "worker": {**warn_300, "idleProcesses": 0}})
    assert render.derived_resources(small.worker)["limits"]["memory"] == f"{512 + 2 * 600}Mi"


def test_resources_override_field_by_field() -> None:
    spec_dict = example_spec()
    spec_dict["worker"]["resources"] = {"requests": {"cpu": "2"}, "limits": {"memory": "4Gi"}}
    spec: VoiceAgentSpec = parse_spec(spec_dict)
    resources = render.derived_resources(spec.worker)
    assert resources["requests"] == {"cpu": "2", "memory": "3512Mi"}
    assert resources["limits"] == {"memory": "4Gi"}


def test_image_comes_from_settings_unless_the_voiceagent_overrides_it() -> None:
    container = rendered(example_spec()).child("Deployment")["spec"]["template"]["spec"]
    assert container["containers"][0]["image"] == SETTINGS.runtime_image
    spec = example_spec()
    spec["worker"]["image"] = "registry.example/acme/runtime:custom"
    container = rendered(spec).child("Deployment")["spec"]["template"]["spec"]
    assert container["containers"][0]["image"] == "registry.example/acme/runtime:custom"


def test_service_account_mounts_no_token_and_service_is_headless() -> None:
    result = rendered(example_spec())
    assert result.child("ServiceAccount")["automountServiceAccountToken"] is False
    pod = result.child("Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "acme-support"
    assert result.child("Service")["spec"]["clusterIP"] == "None"


def test_network_policy_admits_only_the_platform_and_its_monitoring() -> None:
    policy = rendered(example_spec()).child("NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["podSelector"] == {"matchLabels": render.selector_labels(REF.name)}
    assert [rule["from"] for rule in policy["ingress"]] == [
        [
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": "voicefleet-system"}
                }
            }
        ],
        [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
            }
        ],
    ]
    # No egress rule allows everything: each one names ports or peers.
    assert all(rule for rule in policy["egress"])


def test_replicas_are_rendered_as_given() -> None:
    assert rendered(example_spec(), replicas=3).child("Deployment")["spec"]["replicas"] == 3


def test_livekit_secret_copies_only_the_two_keys() -> None:
    secret = render.render_livekit_secret(REF, {**LIVEKIT_DATA, "OTHER": "eA=="})
    assert secret["data"] == LIVEKIT_DATA
    with pytest.raises(ValueError, match="LIVEKIT_API_SECRET"):
        render.render_livekit_secret(REF, {"LIVEKIT_API_KEY": "eA=="})


def test_dispatch_names_are_unique_across_tenants() -> None:
    # Namespaces and names are DNS labels (no dots): the dot is an unambiguous separator.
    pairs = [("a", "b-c"), ("a-b", "c"), ("acme", "support"), ("acme-support", "x")]
    names = {render.dispatch_name(namespace, name) for namespace, name in pairs}
    assert len(names) == len(pairs)
    other = VoiceAgentRef(name="acme-support", namespace="globex", uid="u")
    assert rendered(example_spec(), ref=other).config.dispatch_name == "globex.acme-support"


def test_secrets_hash_follows_secret_data_only() -> None:
    first = render.secrets_hash({"a": {"k": "dg=="}, "b": {"x": "eQ=="}})
    assert first == render.secrets_hash({"b": {"x": "eQ=="}, "a": {"k": "dg=="}})
    assert first != render.secrets_hash({"a": {"k": "dw=="}, "b": {"x": "eQ=="}})


def test_an_object_without_metadata_is_no_ones_child() -> None:
    """Watch events and listings may carry objects without metadata or labels: they belong to
    no VoiceAgent (and do not crash the lookup)."""
    objects: list[dict[str, Any]] = [{}, {"kind": "Pod"}, {"metadata": {}}]
    for obj in [*objects, {"metadata": {"labels": None}}]:
        assert render.owned_by(obj, REF) is False
        assert render.owner_of(obj) is None
    child = rendered(example_spec()).child("Deployment")
    assert render.owned_by(child, REF) is True
    assert render.owner_of(child) == (REF.namespace, REF.name, REF.uid)


def test_the_tenant_secrets_copy_is_an_opaque_secret_in_the_worker_namespace() -> None:
    [_, copy_] = [c for c in rendered(example_spec()).children if c["kind"] == "Secret"]
    assert {key: copy_[key] for key in ("apiVersion", "kind", "type")} == {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
    }
    assert copy_["metadata"] == {
        "name": "acme-support-secrets",
        "namespace": "vf-acme",
        "labels": render.child_labels(REF),
    }


def test_in_hpa_mode_the_hpa_is_named_after_the_deployment_it_scales() -> None:
    spec = {**example_spec(), "scaling": {"mode": "hpa", "minReplicas": 2, "maxReplicas": 6}}
    result = rendered(spec)
    hpa = result.child("HorizontalPodAutoscaler")
    deployment = result.child("Deployment")
    assert hpa["metadata"] == {
        "name": deployment["metadata"]["name"],
        "namespace": "vf-acme",
        "labels": render.child_labels(REF),
    }
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "acme-support",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    pinned = {**spec, "scaling": {**spec["scaling"], "replicas": 3}}
    assert [c for c in rendered(pinned).children if c["kind"] == "HorizontalPodAutoscaler"] == []


def test_each_secret_key_reaches_the_worker_once_however_many_headers_use_it() -> None:
    """Two tools sending the same Secret key share its variable (one env entry, as Kubernetes
    wants unique names); a key used after that shared one still gets its own."""
    spec = example_spec()
    first = spec["tools"][0]
    shared = {**copy.deepcopy(first), "name": "cancel_order"}
    other = copy.deepcopy(first) | {"name": "track_parcel"}
    other["http"]["headers"] = [
        {"name": "X-Token", "valueFrom": {"secretKeyRef": {"name": "parcels", "key": "token"}}}
    ]
    spec["tools"] = [first, shared, other]
    container = rendered(spec).child("Deployment")["spec"]["template"]["spec"]["containers"][0]
    from_copy = [
        item["name"]
        for item in container["env"]
        if item.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "acme-support-secrets"
    ]
    assert from_copy == [
        render.header_env_var("acme-orders-api", "authorization"),
        render.header_env_var("parcels", "token"),
    ]


def _with_mcp_server(spec: dict[str, Any]) -> dict[str, Any]:
    spec["tools"][0]["http"]["headers"].insert(0, {"name": "X-Api-Version", "value": "2"})
    spec["mcpServers"] = [
        {
            "name": "crm",
            "url": "http://crm.acme.svc:8080/mcp",
            "headers": [
                {"name": "X-Client", "value": "voicefleet"},
                {
                    "name": "Authorization",
                    "valueFrom": {"secretKeyRef": {"name": "crm", "key": "token"}},
                },
            ],
        }
    ]
    return spec


def test_secret_keys_are_named_by_the_field_that_refers_to_them() -> None:
    """A missing Secret or key is reported on ConfigValid by the field that names it."""
    uses = render.secret_key_uses(parse_spec(_with_mcp_server(example_spec())))
    assert [(use.secret, use.key, use.field) for use in uses] == [
        (
            "acme-orders-api",
            "authorization",
            "spec.tools[0].http.headers[1].valueFrom.secretKeyRef",
        ),
        ("crm", "token", "spec.mcpServers[0].headers[1].valueFrom.secretKeyRef"),
    ]


def test_literal_headers_reach_the_runtime_config_as_written() -> None:
    config = rendered(_with_mcp_server(example_spec())).config.wire()
    assert config["tools"][0]["http"]["headers"] == [
        {"name": "X-Api-Version", "value": "2"},
        {
            "name": "Authorization",
            "valueFromEnv": render.header_env_var("acme-orders-api", "authorization"),
        },
    ]
    assert config["mcpServers"][0]["headers"] == [
        {"name": "X-Client", "value": "voicefleet"},
        {"name": "Authorization", "valueFromEnv": render.header_env_var("crm", "token")},
    ]


def test_a_livekit_secret_without_its_keys_names_them_all() -> None:
    with pytest.raises(ValueError) as raised:
        render.render_livekit_secret(REF, {"OTHER": "eA=="})
    assert str(raised.value) == (
        "the platform LiveKit Secret lacks key(s) LIVEKIT_API_KEY, LIVEKIT_API_SECRET"
    )


@pytest.mark.parametrize(
    ("secret", "key", "readable"),
    [("orders", ".token-", "ORDERS_TOKEN"), ("xray", "max", "XRAY_MAX"), ("a", "b", "A_B")],
)
def test_header_env_vars_read_as_the_secret_and_key(secret: str, key: str, readable: str) -> None:
    """The variable shows which Secret key it carries (in `kubectl describe pod`): the Secret's
    and key's letters and digits, one `_` between runs, none leading or trailing."""
    variable = render.header_env_var(secret, key)
    assert re.fullmatch(f"VOICEFLEET_SECRET_{readable}_[0-9A-F]{{6}}", variable), variable


def test_the_config_map_keeps_non_ascii_text_readable() -> None:
    """Instructions in any language read in the ConfigMap as the tenant wrote them."""
    spec = example_spec()
    spec["agents"][0]["instructions"] = "Réponds en français, s'il te plaît. 日本語も可。"
    text = render.config_yaml(rendered(spec).config)
    assert "Réponds en français, s'il te plaît. 日本語も可。" in text
    assert yaml.safe_load(text)["agents"][0]["instructions"] == spec["agents"][0]["instructions"]


def test_the_workers_pod_settings_stay_out_of_the_runtime_config() -> None:
    """worker.image and worker.resources shape the pod; the runtime's config (which refuses
    unknown fields) gets the rest of worker."""
    spec = example_spec()
    spec["worker"] = {
        **spec.get("worker", {}),
        "image": "registry.example/runtime:1",
        "resources": {"requests": {"cpu": "2"}, "limits": {"memory": "4Gi"}},
    }
    result = rendered(spec)
    worker = result.config.wire()["worker"]
    assert "image" not in worker and "resources" not in worker
    assert worker["jobsPerWorker"] == parse_spec(spec).worker.jobs_per_worker
    container = result.child("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/runtime:1"
    assert container["resources"]["requests"]["cpu"] == "2"
    assert container["resources"]["limits"]["memory"] == "4Gi"
