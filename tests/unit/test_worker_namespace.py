"""The tenant's worker namespace (worker_namespace.py and the reconcile's use of it): children in
`vf-<tenant>`, only the referenced tenant values copied there, the observer RBAC mirrored from
the tenant's RoleBindings, the old children (the LiveKit key's copy) removed from the tenant
namespace, and the finalizer deleting the children and the namespace with the last VoiceAgent.

The reconcile runs for real against an in-memory API (apply, get, list, delete, status
merge-patch); the real API server is covered by tests/integration/test_operator.py and
tests/e2e/test_tenant_isolation.py.
"""

from __future__ import annotations

import asyncio
import base64
import copy
from collections.abc import Iterator
from typing import Any, cast

import pytest
import yaml
from voicefleet_operator import handlers, render, worker_namespace
from voicefleet_operator.context import OperatorContext
from voicefleet_operator.kube import Kube, NotFound
from voicefleet_operator.settings import PlatformSettings

TENANT = "acme"
PLATFORM = "voicefleet-system"
LIVEKIT_KEY = base64.b64encode(b"platform-key").decode()
LIVEKIT_SECRET = base64.b64encode(b"platform-secret-value").decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _matches(obj: dict[str, Any], selector: str | None) -> bool:
    if not selector:
        return True
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in (p.split("=", 1) for p in selector.split(",")))


class FakeKube:
    """Objects in memory, keyed (kind, namespace, name); apply replaces (the operator owns every
    field of its children)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.version = 0

    def add(self, obj: dict[str, Any]) -> None:
        self.version += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.version)
        key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        self.objects[key] = obj

    def in_namespace(self, namespace: str) -> dict[tuple[str, str], dict[str, Any]]:
        return {(k, n): o for (k, ns, n), o in self.objects.items() if ns == namespace}

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        found = self.objects.get((kind, namespace or "", name))
        return copy.deepcopy(found) if found is not None else None

    async def list(
        self,
        kind: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        *,
        metadata_only: bool = False,
    ) -> list[dict[str, Any]]:
        # metadata_only: as the API server's PartialObjectMetadataList, the metadata alone.
        return [
            {"metadata": copy.deepcopy(o["metadata"])} if metadata_only else copy.deepcopy(o)
            for (k, ns, _), o in self.objects.items()
            if k == kind and (namespace is None or ns == namespace) and _matches(o, label_selector)
        ]

    async def apply(self, obj: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        self.add(obj)
        return copy.deepcopy(obj)

    async def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        return self.objects.pop((kind, namespace or "", name), None) is not None

    async def merge_patch(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        patch: dict[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        obj = self.objects.get((kind, namespace or "", name))
        if obj is None:
            raise NotFound("PATCH", name, 404, "NotFound", "not found")
        if subresource == "status":
            status = obj.setdefault("status", {})
            for key, value in (patch.get("status") or {}).items():
                if value is None:
                    status.pop(key, None)
                else:
                    status[key] = copy.deepcopy(value)
        return copy.deepcopy(obj)


SPEC: dict[str, Any] = {
    "agents": [{"name": "assistant", "instructions": "Be brief."}],
    "entry": "assistant",
    "pipeline": {
        "stt": {"provider": "openai", "model": "gpt-4o-transcribe"},
        "llm": {"provider": "openai"},
        "tts": {"provider": "openai", "voice": "alloy"},
    },
    "secretRefs": [{"name": "provider-keys"}],
    "tools": [
        {
            "name": "lookup",
            "description": "Look an order up.",
            "http": {
                "url": "http://orders:8080/lookup",
                "headers": [
                    {
                        "name": "Authorization",
                        "valueFrom": {"secretKeyRef": {"name": "orders-api", "key": "token"}},
                    }
                ],
            },
        }
    ],
}


def voiceagent(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "voicefleet.dev/v1alpha1",
        "kind": "VoiceAgent",
        "metadata": {"name": name, "namespace": TENANT, "uid": uid, "generation": 1},
        "spec": copy.deepcopy(SPEC),
    }


def secret(namespace: str, name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "data": {k: b64(v) for k, v in data.items()},
    }


def role_binding(name: str, role: str, subjects: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": TENANT},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": subjects,
    }


@pytest.fixture
def world() -> Iterator[tuple[FakeKube, OperatorContext]]:
    kube = FakeKube()
    kube.add(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "voicefleet-livekit", "namespace": PLATFORM},
            "data": {"LIVEKIT_API_KEY": LIVEKIT_KEY, "LIVEKIT_API_SECRET": LIVEKIT_SECRET},
        }
    )
    kube.add(secret(TENANT, "provider-keys", {"OPENAI_API_KEY": "sk-tenant"}))
    kube.add(secret(TENANT, "orders-api", {"token": "Bearer t0ken", "other": "not referenced"}))
    kube.add(secret(TENANT, "unrelated", {"password": "never copied"}))
    kube.add(
        role_binding(
            "admins",
            "admin",
            [
                {"kind": "ServiceAccount", "name": "tenant-admin"},
                {"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"},
            ],
        )
    )
    kube.add(role_binding("viewers", "view", [{"kind": "Group", "name": "acme-support"}]))
    kube.add(role_binding("other", "some-custom-role", [{"kind": "User", "name": "mallory"}]))
    settings = PlatformSettings(
        livekit_url="ws://livekit.voicefleet-system.svc:7880",
        livekit_secret_namespace=PLATFORM,
        livekit_secret_name="voicefleet-livekit",
        runtime_image="voicefleet/runtime:0.1.0",
        platform_namespace=PLATFORM,
    )
    ctx = OperatorContext(settings=settings, kube=cast(Kube, kube))
    yield kube, ctx


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_reconcile_puts_every_child_in_the_worker_namespace(
    world: tuple[FakeKube, OperatorContext],
) -> None:
    kube, ctx = world
    kube.add(voiceagent("support", "uid-1"))
    outcome = run(handlers.reconcile(ctx, TENANT, "support"))
    assert outcome.applied, outcome
    workers = kube.in_namespace("vf-acme")
    assert {
        ("ServiceAccount", "support"),
        ("Secret", "support-livekit"),
        ("Secret", "support-secrets"),
        ("ConfigMap", "support-config"),
        ("Service", "support-metrics"),
        ("PodDisruptionBudget", "support"),
        ("NetworkPolicy", "support"),
        ("Deployment", "support"),
    } <= set(workers)
    # Nothing of the VoiceAgent's in the tenant namespace: no LiveKit key there.
    tenant_kinds = {kind for kind, _ in kube.in_namespace(TENANT)}
    assert tenant_kinds == {"Secret", "RoleBinding", "VoiceAgent"}
    for (kind, _), obj in kube.in_namespace(TENANT).items():
        if kind == "Secret":
            assert LIVEKIT_KEY not in obj["data"].values()
            assert LIVEKIT_SECRET not in obj["data"].values()
    # The namespace: the tenant's label, restricted pods.
    namespace = kube.objects[("Namespace", "", "vf-acme")]
    labels = namespace["metadata"]["labels"]
    assert labels[render.LABEL_TENANT] == TENANT
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    # Only the referenced values were copied (a header's key, every key of a secretRefs one).
    copied = workers[("Secret", "support-secrets")]["data"]
    variable = render.header_env_var("orders-api", "token")
    assert copied == {"OPENAI_API_KEY": b64("sk-tenant"), variable: b64("Bearer t0ken")}
    agent = kube.objects[("VoiceAgent", TENANT, "support")]
    assert agent["status"]["workerNamespace"] == "vf-acme"
    # The workers' Deployment reads only the worker namespace's Secrets.
    pod = workers[("Deployment", "support")]["spec"]["template"]["spec"]
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in pod["containers"][0]["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {"support-livekit", "support-secrets"}


def test_tenant_admins_editors_and_viewers_may_observe_but_not_read_secrets(
    world: tuple[FakeKube, OperatorContext],
) -> None:
    kube, ctx = world
    kube.add(voiceagent("support", "uid-1"))
    run(handlers.reconcile(ctx, TENANT, "support"))
    role = kube.objects[("Role", "vf-acme", worker_namespace.OBSERVER_ROLE)]
    granted = {
        (group, resource): set(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert granted[("", "pods/log")] == {"get", "list", "watch"}
    assert ("", "secrets") not in granted
    assert not {r for _, r in granted if r in ("pods/exec", "pods/attach", "pods/portforward")}
    assert all(verbs == {"get", "list", "watch"} for verbs in granted.values())
    binding = kube.objects[("RoleBinding", "vf-acme", worker_namespace.OBSERVER_ROLE)]
    assert binding["roleRef"]["name"] == worker_namespace.OBSERVER_ROLE
    assert binding["subjects"] == [
        {"kind": "Group", "name": "acme-support", "apiGroup": "rbac.authorization.k8s.io"},
        {"kind": "ServiceAccount", "name": "tenant-admin", "namespace": TENANT},
        {"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"},
    ]
    # Mirrored on each reconcile: a binding removed in the tenant namespace goes here too.
    del kube.objects[("RoleBinding", TENANT, "viewers")]
    run(handlers.reconcile(ctx, TENANT, "support"))
    binding = kube.objects[("RoleBinding", "vf-acme", worker_namespace.OBSERVER_ROLE)]
    assert [s["name"] for s in binding["subjects"]] == ["tenant-admin", "alice"]


def test_a_rotated_tenant_secret_is_copied_again_and_rolls_the_workers(
    world: tuple[FakeKube, OperatorContext],
) -> None:
    kube, ctx = world
    kube.add(voiceagent("support", "uid-1"))
    run(handlers.reconcile(ctx, TENANT, "support"))

    def template_hash() -> str:
        deployment = kube.objects[("Deployment", "vf-acme", "support")]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        return str(annotations[render.ANNOTATION_SECRETS_HASH])

    before = template_hash()
    kube.add(secret(TENANT, "orders-api", {"token": "Bearer rotated", "other": "x"}))
    run(handlers.reconcile(ctx, TENANT, "support"))
    copied = kube.objects[("Secret", "vf-acme", "support-secrets")]["data"]
    assert copied[render.header_env_var("orders-api", "token")] == b64("Bearer rotated")
    assert template_hash() != before


def test_upgrade_removes_the_children_left_in_the_tenant_namespace(
    world: tuple[FakeKube, OperatorContext],
) -> None:
    kube, ctx = world
    agent = voiceagent("support", "uid-1")
    kube.add(agent)
    # The controller reference an older operator put on the children it made there.
    owner = {
        "apiVersion": "voicefleet.dev/v1alpha1",
        "kind": "VoiceAgent",
        "name": "support",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    legacy = [
        ("Secret", "support-livekit"),
        ("Deployment", "support"),
        ("ConfigMap", "support-config"),
        ("ServiceAccount", "support"),
    ]
    for kind, name in legacy:
        kube.add(
            {
                "kind": kind,
                "metadata": {"name": name, "namespace": TENANT, "ownerReferences": [owner]},
            }
        )
    # A tenant object of the same name but not the VoiceAgent's stays.
    kube.add({"kind": "Service", "metadata": {"name": "support-metrics", "namespace": TENANT}})
    assert run(handlers.reconcile(ctx, TENANT, "support")).applied
    left = set(kube.in_namespace(TENANT))
    assert not set(legacy) & left
    assert ("Service", "support-metrics") in left
    assert ("Secret", "support-livekit") in set(kube.in_namespace("vf-acme"))


def test_a_name_taken_in_the_worker_namespace_is_not_taken_over(
    world: tuple[FakeKube, OperatorContext],
) -> None:
    kube, ctx = world
    kube.add(voiceagent("support", "uid-1"))
    run(handlers.reconcile(ctx, TENANT, "support"))
    # The same name, another VoiceAgent (uid): a NameConflict, nothing applied over it.
    kube.objects[("VoiceAgent", TENANT, "support")]["metadata"]["uid"] = "uid-2"
    outcome = run(handlers.reconcile(ctx, TENANT, "support"))
    assert (outcome.applied, outcome.reason) == (False, "NameConflict")


def test_a_foreign_namespace_of_the_worker_name_is_never_used(
    world: tuple[FakeKube, OperatorContext],
) -> None:
    kube, ctx = world
    kube.add({"kind": "Namespace", "metadata": {"name": "vf-acme", "labels": {"team": "x"}}})
    kube.add(voiceagent("support", "uid-1"))
    outcome = run(handlers.reconcile(ctx, TENANT, "support"))
    assert (outcome.applied, outcome.reason) == (False, "NamespaceConflict")
    assert not kube.in_namespace("vf-acme")
    status = kube.objects[("VoiceAgent", TENANT, "support")]["status"]
    reconciled = next(c for c in status["conditions"] if c["type"] == "Reconciled")
    assert "vf-acme" in reconciled["message"] and "voicefleet.dev/tenant" in reconciled["message"]


def test_the_finalizer_deletes_children_and_the_namespace_with_the_last_voiceagent(
    world: tuple[FakeKube, OperatorContext],
) -> None:
    kube, ctx = world
    kube.add(voiceagent("support", "uid-1"))
    kube.add(voiceagent("sales", "uid-2"))
    run(handlers.reconcile(ctx, TENANT, "support"))
    run(handlers.reconcile(ctx, TENANT, "sales"))

    def names_in_workers() -> set[str]:
        return {name for kind, name in kube.in_namespace("vf-acme") if kind != "Role"}

    # support goes: its children go, sales' stay, and so does the namespace.
    kube.objects[("VoiceAgent", TENANT, "support")]["metadata"]["deletionTimestamp"] = "now"
    run(handlers.finalize(ctx, TENANT, "support", "uid-1"))
    del kube.objects[("VoiceAgent", TENANT, "support")]
    left = names_in_workers()
    assert not {n for n in left if n.startswith("support")}
    assert {"sales", "sales-livekit", "sales-secrets"} <= left
    assert ("Namespace", "", "vf-acme") in kube.objects
    # sales, the last one, goes: the namespace (with the key's copies) goes too.
    kube.objects[("VoiceAgent", TENANT, "sales")]["metadata"]["deletionTimestamp"] = "now"
    run(handlers.finalize(ctx, TENANT, "sales", "uid-2"))
    assert ("Namespace", "", "vf-acme") not in kube.objects


def test_a_tenant_namespace_too_long_for_its_worker_namespace_is_refused_naming_it() -> None:
    body = voiceagent("support", "uid-1")
    body["metadata"]["namespace"] = "n" * 61
    spec, problems = handlers.validate_spec(body)
    assert spec is None
    assert problems[0].reason == "NamespaceTooLong"
    assert problems[0].message.startswith("metadata.namespace:")
    body["metadata"]["namespace"] = "n" * 60
    assert handlers.validate_spec(body)[1] == []


def test_observer_subjects_mirror_only_admin_edit_and_view() -> None:
    bindings = [
        role_binding("a", "edit", [{"kind": "ServiceAccount", "name": "ci", "namespace": "ci"}]),
        role_binding("b", "cluster-admin", [{"kind": "User", "name": "root"}]),
        {
            **role_binding("c", "view", [{"kind": "User", "name": "bob"}]),
            "roleRef": {"kind": "Role", "name": "view", "apiGroup": "rbac.authorization.k8s.io"},
        },
    ]
    assert worker_namespace.observer_subjects(bindings) == [
        {"kind": "ServiceAccount", "name": "ci", "namespace": "ci"}
    ]


def test_the_worker_namespace_documents_render_as_yaml() -> None:
    for document in (
        worker_namespace.render_namespace(TENANT),
        worker_namespace.render_observer_role(TENANT),
        worker_namespace.render_observer_binding(TENANT, []),
    ):
        assert yaml.safe_load(render.dump_yaml(document)) == document
