"""The tenant's worker namespace: where a tenant's workers (and the platform's LiveKit key) live.

For tenant namespace `acme` the operator owns `vf-acme` (render.worker_namespace):
  - the Namespace, labelled `voicefleet.dev/tenant: acme`, PodSecurity `restricted` enforced;
  - every child of acme's VoiceAgents (render.py), with copies of the tenant Secrets' values
    they use and of the platform's LiveKit key;
  - an observer Role (read-only: pods, pods/log, events, deployments, replicasets, services,
    configmaps; no Secrets, no exec/attach/port-forward, no writes) bound to every subject that
    holds `admin`, `edit` or `view` in `acme` (mirrored from acme's RoleBindings on each
    reconcile), so tenants see their workers and their logs, never the key.

Tenants cannot reach the LiveKit key: it is not in their namespace, and in the worker namespace
they can neither read Secrets nor run code (exec, attach, pods of their own; images are
allow-listed). operator/README.md, "Tenant isolation", states the threat model.

Lifecycle: applied at every reconcile of one of the tenant's VoiceAgents (server-side apply,
idempotent); a VoiceAgent's finalizer deletes its children (`delete_children`), and the
namespace goes with the tenant's last VoiceAgent (`delete_if_unused`). Pure rendering here,
I/O in the async functions at the end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from voicefleet_operator import render
from voicefleet_operator.kube import Kube

log = logging.getLogger(__name__)

OBSERVER_ROLE = "voicefleet-tenant-observer"
"""Role and RoleBinding name in each worker namespace."""
MIRRORED_CLUSTER_ROLES = ("admin", "edit", "view")
"""Who holds one of these in the tenant namespace may observe its worker namespace."""
PSS_LEVEL = "restricted"

OBSERVER_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": [""],
        "resources": ["pods", "pods/log", "events", "services", "configmaps"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": ["apps"],
        "resources": ["deployments", "replicasets"],
        "verbs": ["get", "list", "watch"],
    },
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["get", "list", "watch"]},
]
"""What tenants may do in their worker namespace. The operator must hold every one of these
permissions itself (the API server refuses to let anyone grant what they do not hold): the
chart's ClusterRole has them."""


def _labels(tenant: str) -> dict[str, str]:
    return {
        render.LABEL_TENANT: tenant,
        render.LABEL_PART_OF: render.PART_OF,
        render.LABEL_MANAGED_BY: render.MANAGED_BY,
    }


def render_namespace(tenant: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": render.worker_namespace(tenant),
            "labels": {
                **_labels(tenant),
                "pod-security.kubernetes.io/enforce": PSS_LEVEL,
                "pod-security.kubernetes.io/enforce-version": "latest",
                "pod-security.kubernetes.io/warn": PSS_LEVEL,
                "pod-security.kubernetes.io/audit": PSS_LEVEL,
            },
        },
    }


def render_observer_role(tenant: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {
            "name": OBSERVER_ROLE,
            "namespace": render.worker_namespace(tenant),
            "labels": _labels(tenant),
        },
        "rules": [dict(rule) for rule in OBSERVER_RULES],
    }


def observer_subjects(role_bindings: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Subjects of the tenant namespace's RoleBindings to `admin`, `edit` or `view` (the
    ClusterRoles), deduplicated and sorted so the binding is stable. A ServiceAccount subject
    keeps its namespace (the tenant's, unless the binding said otherwise)."""
    found: dict[tuple[str, str, str], dict[str, Any]] = {}
    for binding in role_bindings:
        role = binding.get("roleRef") or {}
        if role.get("kind") != "ClusterRole" or role.get("name") not in MIRRORED_CLUSTER_ROLES:
            continue
        own_namespace = str(binding.get("metadata", {}).get("namespace", ""))
        for subject in binding.get("subjects") or []:
            kind = str(subject.get("kind", ""))
            name = str(subject.get("name", ""))
            if not kind or not name:
                continue
            copy: dict[str, Any] = {"kind": kind, "name": name}
            if kind == "ServiceAccount":
                copy["namespace"] = str(subject.get("namespace") or own_namespace)
            else:
                copy["apiGroup"] = "rbac.authorization.k8s.io"
            found[(kind, copy.get("namespace", ""), name)] = copy
    return [found[key] for key in sorted(found)]


def render_observer_binding(tenant: str, subjects: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {
            "name": OBSERVER_ROLE,
            "namespace": render.worker_namespace(tenant),
            "labels": _labels(tenant),
        },
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": OBSERVER_ROLE,
        },
        "subjects": subjects,
    }


# --- I/O -------------------------------------------------------------------------------------


class NamespaceTaken(Exception):
    """The worker namespace exists and is not this platform's (no tenant label for it)."""


async def ensure(kube: Kube, tenant: str, *, subjects: list[dict[str, Any]] | None = None) -> None:
    """The worker namespace exists, labelled, with the observer Role bound to the tenant's
    admins, editors and viewers as they are now (`subjects`: observer_subjects of the tenant's
    RoleBindings, when the caller has just read them). Raises NamespaceTaken, KubeError."""
    name = render.worker_namespace(tenant)
    existing = await kube.get("Namespace", None, name)
    if existing is not None:
        labels = existing.get("metadata", {}).get("labels") or {}
        if labels.get(render.LABEL_TENANT) != tenant:
            raise NamespaceTaken(
                f"namespace {name!r} exists and is not VoiceFleet's worker namespace for "
                f"{tenant!r} (no label {render.LABEL_TENANT}={tenant}); the platform team "
                "must delete or rename it"
            )
    await kube.apply(render_namespace(tenant))
    await kube.apply(render_observer_role(tenant))
    if subjects is None:
        subjects = observer_subjects(await kube.list("RoleBinding", tenant))
    await kube.apply(render_observer_binding(tenant, subjects))


def child_names(ref: render.VoiceAgentRef) -> list[tuple[str, str]]:
    """(kind, name) of every child render.py can render for `ref`, workers first."""
    names = render.ChildNames.of(ref.name)
    return [
        ("Deployment", names.deployment),
        ("HorizontalPodAutoscaler", names.deployment),
        ("PodDisruptionBudget", names.pod_disruption_budget),
        ("Service", names.service),
        ("NetworkPolicy", names.network_policy),
        ("ConfigMap", names.config_map),
        ("Secret", names.livekit_secret),
        ("Secret", names.tenant_secrets),
        ("ServiceAccount", names.service_account),
    ]


async def delete_children(kube: Kube, ref: render.VoiceAgentRef) -> list[str]:
    """Delete every child of `ref` in its worker namespace (by name, checked by the uid label:
    no list of Secrets needed); what was deleted."""
    wanted = child_names(ref)
    found = await asyncio.gather(
        *(kube.get(kind, ref.worker_namespace, name) for kind, name in wanted)
    )
    deleted: list[str] = []
    for (kind, name), obj in zip(wanted, found, strict=True):
        if obj is not None and render.owned_by(obj, ref):
            if await kube.delete(kind, ref.worker_namespace, name):
                deleted.append(f"{kind} {name}")
    return deleted


async def delete_if_unused(kube: Kube, tenant: str, leaving: str) -> bool:
    """Delete the worker namespace when no VoiceAgent of `tenant` but `leaving` (being deleted)
    is left. VoiceAgents being deleted themselves do not count (their finalizers run too);
    one created meanwhile finds the namespace terminating and retries until it can recreate
    it. True if the namespace was deleted."""
    staying = [
        item
        for item in await kube.list("VoiceAgent", tenant, metadata_only=True)
        if item["metadata"]["name"] != leaving and not item["metadata"].get("deletionTimestamp")
    ]
    if staying:
        return False
    return await kube.delete("Namespace", None, render.worker_namespace(tenant))


def secrets_copy(ref: render.VoiceAgentRef) -> str:
    return render.ChildNames.of(ref.name).tenant_secrets


async def remove_legacy_children(kube: Kube, ref: render.VoiceAgentRef) -> list[str]:
    """Children an older operator made in the tenant namespace (owner reference to `ref`),
    the LiveKit key's copy among them: deleted once their replacements in the worker namespace
    are applied (the old workers drain their calls). What was deleted."""
    wanted = [(kind, name) for kind, name in child_names(ref) if name != secrets_copy(ref)]
    found = await asyncio.gather(*(kube.get(kind, ref.namespace, name) for kind, name in wanted))
    deleted: list[str] = []
    for (kind, name), obj in zip(wanted, found, strict=True):
        owners = (obj or {}).get("metadata", {}).get("ownerReferences") or []
        if any(o.get("uid") == ref.uid and o.get("controller") for o in owners):
            if await kube.delete(kind, ref.namespace, name):
                deleted.append(f"{kind} {name}")
    return deleted
