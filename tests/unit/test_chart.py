"""The Helm chart: `helm lint`, `helm template` golden files, and the properties it must keep.

Needs the pinned helm binary (`make infra` builds it). Golden files: tests/unit/golden/chart/;
regenerate after an intended change with `UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_chart.py`
and review the diff.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from voicefleet_operator import worker_namespace
from voicefleet_testkit import observability

CHART = observability.CHART
GOLDEN = Path(__file__).resolve().parent / "golden" / "chart"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
NAMESPACE = "voicefleet-system"

CASES: dict[str, list[str]] = {
    # The quickstart: credentials given inline, every namespace served.
    "default": [
        "--set",
        "livekit.url=wss://livekit.example.com",
        "--set",
        "livekit.apiKey=devkey",
        "--set",
        "livekit.apiSecret=devsecret",
        "--set",
        "desk.apiKey=sk-desk",
    ],
    # A production-like install: an existing Secret, chosen namespaces, pinned images.
    "namespaced": [
        "--set",
        "livekit.url=ws://livekit.livekit.svc:7880",
        "--set",
        "livekit.apiUrl=http://livekit.livekit.svc:7880",
        "--set",
        "livekit.existingSecret=livekit-keys",
        "--set",
        "watchNamespaces={acme,globex}",
        "--set",
        "image.repository=registry.example/voicefleet/operator",
        "--set",
        "image.tag=1.2.3",
        "--set",
        "runtime.image.repository=registry.example/voicefleet/runtime",
        "--set",
        "runtime.image.tag=1.2.3",
        "--set",
        "logLevel=DEBUG",
        "--set",
        "desk.existingSecret=desk-tts",
        "--set",
        "desk.tts.provider=elevenlabs",
        "--set",
        "desk.tts.voice=Rachel",
    ],
}


def helm_binary() -> Path:
    try:
        return observability.helm()
    except observability.ToolMissing as missing:
        pytest.fail(str(missing), pytrace=False)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(helm_binary()), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}{proc.stdout}")
    return proc


def template(case: str) -> str:
    return helm("template", "vf", str(CHART), "--namespace", NAMESPACE, *CASES[case]).stdout


def documents(case: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(template(case)) if d]


def by_name(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (match,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return match


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def test_helm_lint_passes() -> None:
    proc = helm("lint", str(CHART), "--strict", *CASES["default"])
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


def test_install_without_livekit_url_fails_naming_the_value() -> None:
    proc = helm("template", "vf", str(CHART), check=False)
    assert proc.returncode != 0
    assert "livekit.url is required" in proc.stderr


def test_values_schema_rejects_bad_values_naming_them() -> None:
    proc = helm(
        "template", "vf", str(CHART), *CASES["default"], "--set", "logLevel=LOUD", check=False
    )
    assert proc.returncode != 0
    assert "logLevel" in proc.stderr
    proc = helm("template", "vf", str(CHART), *CASES["default"], "--set", "replicas=2", check=False)
    assert proc.returncode != 0
    assert "replicas" in proc.stderr  # unknown values are typos, not silently ignored


@pytest.mark.parametrize("case", sorted(CASES))
def test_helm_template_matches_golden_file(case: str) -> None:
    text = template(case)
    path = GOLDEN / f"{case}.yaml"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), (
        f"`helm template` ({case}) differs from {path}; if intended, regenerate with "
        "UPDATE_GOLDEN=1 and review the diff"
    )


def test_operator_deployment_is_two_elected_restricted_pods() -> None:
    deployment = by_name(documents("default"), "Deployment", "vf-voicefleet")
    spec = deployment["spec"]
    # Two replicas, one active (the Lease holder): a rollout never leaves none.
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    anti = spec["template"]["spec"]["affinity"]["podAntiAffinity"]
    (preferred,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["readOnlyRootFilesystem"] is True
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VOICEFLEET_LIVEKIT_URL"] == "wss://livekit.example.com"
    assert env["VOICEFLEET_LIVEKIT_SECRET_NAME"] == "vf-voicefleet-livekit"
    assert env["VOICEFLEET_LIVEKIT_SECRET_NAMESPACE"] == NAMESPACE
    assert env["VOICEFLEET_RUNTIME_IMAGE"] == "voicefleet/runtime:0.1.0"
    assert env["VOICEFLEET_LEADER_ELECTION"] == "true"
    assert env["VOICEFLEET_LEASE_NAME"] == "vf-voicefleet"
    pod_name = next(e for e in container["env"] if e["name"] == "POD_NAME")
    assert pod_name["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_operator_settings_from_the_chart_are_valid() -> None:
    """The env the chart sets parses as the operator's settings (the chart and settings.py
    agree on every variable name)."""
    from voicefleet_operator.settings import PlatformSettings

    for case in CASES:
        container = by_name(documents(case), "Deployment", "vf-voicefleet")["spec"]["template"][
            "spec"
        ]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        env["POD_NAMESPACE"] = NAMESPACE
        settings = PlatformSettings.from_environment(env)
        if case == "namespaced":
            assert settings.watch_namespaces == ("acme", "globex")
            assert settings.livekit_secret_name == "livekit-keys"
            assert settings.runtime_image == "registry.example/voicefleet/runtime:1.2.3"
            assert settings.log_level == "DEBUG"
        # The kubelet expands the desk Service's variables (no cluster DNS needed).
        assert env["VOICEFLEET_DESK_URL"] == (
            "http://$(VF_VOICEFLEET_DESK_SERVICE_HOST):$(VF_VOICEFLEET_DESK_SERVICE_PORT)"
        )


def test_rbac_has_no_wildcards_and_exactly_the_operators_verbs() -> None:
    docs = documents("default")
    role = by_name(docs, "ClusterRole", "vf-voicefleet")
    granted = {
        (group, resource): sorted(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    pairs = [
        (group, resource)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    ]
    assert len(pairs) == len(set(pairs)), "a resource is granted by two rules"
    for (group, resource), verbs in granted.items():
        assert "*" not in verbs and resource != "*" and group != "*"
    # Each line is a use in the code (see operator/README.md, "RBAC").
    assert granted == {
        ("voicefleet.dev", "voiceagents"): ["get", "list", "patch", "watch"],
        ("voicefleet.dev", "voiceagents/status"): ["patch"],
        # (No voiceagents/finalizers: no child carries an owner reference, so no
        # blockOwnerDeletion; kopf patches its finalizer through voiceagents.)
        # Children in the worker namespaces (vf-<tenant>): applied, deleted by the finalizer.
        ("", "configmaps"): ["create", "delete", "get", "list", "patch", "watch"],
        # list/watch: rotated Secrets are watched (secret_watch.py), not polled.
        ("", "secrets"): ["create", "delete", "get", "list", "patch", "watch"],
        ("", "services"): ["create", "delete", "get", "list", "patch", "watch"],
        ("", "serviceaccounts"): ["create", "delete", "get", "patch"],
        ("apps", "deployments"): ["create", "delete", "get", "list", "patch", "watch"],
        ("policy", "poddisruptionbudgets"): ["create", "delete", "get", "patch"],
        ("networking.k8s.io", "networkpolicies"): ["create", "delete", "get", "patch"],
        ("", "pods"): ["get", "list", "patch", "watch"],
        ("autoscaling", "horizontalpodautoscalers"): ["create", "delete", "get", "patch"],
        ("", "events"): ["create", "get", "list", "watch"],
        ("apiextensions.k8s.io", "customresourcedefinitions"): ["list", "watch"],
        # The worker namespaces and their observer RBAC.
        ("", "namespaces"): ["create", "delete", "get", "patch"],
        ("rbac.authorization.k8s.io", "roles"): ["create", "get", "patch"],
        ("rbac.authorization.k8s.io", "rolebindings"): ["create", "get", "list", "patch"],
        # Held only to grant them in the observer Role (no bind/escalate).
        ("", "pods/log"): ["get", "list", "watch"],
        ("apps", "replicasets"): ["get", "list", "watch"],
        ("events.k8s.io", "events"): ["get", "list", "watch"],
    }
    # No one may be impersonated, and RBAC is never escalated: the operator grants tenants only
    # what it holds itself (and never Secrets: see the observer rules below).
    assert ("rbac.authorization.k8s.io", "clusterroles") not in granted
    for verbs in granted.values():
        assert not {"bind", "escalate", "impersonate"} & set(verbs)
    assert all("secrets" not in rule["resources"] for rule in worker_namespace.OBSERVER_RULES)
    for rule in worker_namespace.OBSERVER_RULES:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert set(rule["verbs"]) <= set(granted[(group, resource)]), (group, resource)
    binding = by_kind(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "vf-voicefleet", "namespace": NAMESPACE}
    ]
    # Leader election: the Lease in the release namespace only.
    election = by_kind(docs, "Role")
    assert election["metadata"]["namespace"] == NAMESPACE
    assert election["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "create", "update"],
        }
    ]
    role_binding = by_kind(docs, "RoleBinding")
    assert role_binding["roleRef"]["name"] == election["metadata"]["name"]
    assert role_binding["subjects"] == binding["subjects"]
    # Watching chosen namespaces makes kopf follow namespaces too.
    namespaced_role = by_name(documents("namespaced"), "ClusterRole", "vf-voicefleet")
    assert {
        "apiGroups": [""],
        "resources": ["namespaces"],
        "verbs": ["get", "create", "patch", "delete", "list", "watch"],
    } in namespaced_role["rules"]


def test_tenant_admins_manage_voiceagents_through_aggregated_roles() -> None:
    """A namespace's admin/edit holders manage its VoiceAgents, view holders read them: nothing
    else (what tenants see of their workers is the operator's observer Role in vf-<tenant>)."""
    docs = documents("default")
    edit = by_name(docs, "ClusterRole", "vf-voicefleet-tenant-edit")
    view = by_name(docs, "ClusterRole", "vf-voicefleet-tenant-view")
    labels = edit["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    for role in (edit, view):
        assert {g for rule in role["rules"] for g in rule["apiGroups"]} == {"voicefleet.dev"}
        assert {r for rule in role["rules"] for r in rule["resources"]} <= {
            "voiceagents",
            "voiceagents/status",
        }
    assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in view["rules"])
    off = helm("template", "vf", str(CHART), *CASES["default"], "--set", "rbac.tenantRoles=false")
    assert "tenant-edit" not in off.stdout


def test_livekit_secret_is_created_only_without_an_existing_one() -> None:
    secret = by_name(documents("default"), "Secret", "vf-voicefleet-livekit")
    assert set(secret["stringData"]) == {"LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"}
    assert not [d for d in documents("namespaced") if d["kind"] == "Secret"]


def test_the_desk_runs_the_runtime_image_without_credentials_reached_only_by_the_operator() -> None:
    docs = documents("default")
    desk = by_name(docs, "Deployment", "vf-voicefleet-desk")["spec"]["template"]
    pod = desk["spec"]
    assert pod["automountServiceAccountToken"] is False  # no Kubernetes API access
    (container,) = pod["containers"]
    assert container["image"] == "voicefleet/runtime:0.1.0"
    assert container["args"] == ["desk"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["VOICEFLEET_DESK_LIVEKIT_URL"] == "wss://livekit.example.com"
    assert json.loads(env["VOICEFLEET_DESK_TTS"]) == {"provider": "openai"}
    # Only the TTS key: never the LiveKit Secret (the operator mints a token per room).
    assert container["envFrom"] == [{"secretRef": {"name": "vf-voicefleet-desk-tts"}}]
    secret = by_name(docs, "Secret", "vf-voicefleet-desk-tts")
    assert secret["stringData"] == {"OPENAI_API_KEY": "sk-desk"}
    # Its holds live in one replica's memory: the active operator's requests stick to it.
    assert by_name(docs, "Service", "vf-voicefleet-desk")["spec"]["sessionAffinity"] == "ClientIP"
    policy = by_name(docs, "NetworkPolicy", "vf-voicefleet-desk")
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert selected == {
        "app.kubernetes.io/name": "voicefleet-desk",
        "app.kubernetes.io/instance": "vf",
    }
    assert selected.items() <= desk["metadata"]["labels"].items()
    (ingress,) = policy["spec"]["ingress"]
    operator_pods, monitoring = ingress["from"]
    assert operator_pods == {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "voicefleet-operator",
                "app.kubernetes.io/instance": "vf",
            }
        }
    }
    assert monitoring["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
    }
    # An ElevenLabs voice with the platform's existing Secret.
    namespaced = documents("namespaced")
    container = by_name(namespaced, "Deployment", "vf-voicefleet-desk")["spec"]["template"]["spec"][
        "containers"
    ][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert json.loads(env["VOICEFLEET_DESK_TTS"]) == {"provider": "elevenlabs", "voice": "Rachel"}
    assert container["envFrom"] == [{"secretRef": {"name": "desk-tts"}}]


def test_the_desk_without_a_key_fails_naming_the_value_and_can_be_turned_off() -> None:
    base = CASES["default"][:-2]  # without desk.apiKey
    proc = helm("template", "vf", str(CHART), *base, check=False)
    assert proc.returncode != 0
    assert "desk.existingSecret is required" in proc.stderr
    docs = [
        d
        for d in yaml.safe_load_all(
            helm("template", "vf", str(CHART), *base, "--set", "desk.enabled=false").stdout
        )
        if d
    ]
    assert not [d for d in docs if "desk" in d["metadata"]["name"]]
    operator = by_name(docs, "Deployment", "vf-voicefleet")["spec"]["template"]["spec"]
    env = {e["name"] for e in operator["containers"][0]["env"]}
    assert "VOICEFLEET_DESK_URL" not in env


def test_chart_ships_the_generated_crd() -> None:
    chart_crd = CHART / "crds" / "voiceagents.voicefleet.dev.yaml"
    assert chart_crd.exists()
    assert chart_crd.read_text() == (observability.REPO_ROOT / "crds" / chart_crd.name).read_text()
