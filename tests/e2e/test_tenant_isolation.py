"""The platform's LiveKit key out of a tenant admin's hands (issue 13), on the local cluster with
the chart installed and the real livekit-server.

A tenant namespace's admin (a ServiceAccount bound to the `admin` ClusterRole in its namespace
only; the test acts as it through impersonation) collects every value it can reach in its
namespace and in its worker namespace (`vf-<tenant>`): every Secret it can read, the environment
of every pod it can exec into, every ConfigMap, pod spec, log, event, Deployment, ReplicaSet,
Service and the VoiceAgent with its status. Each value is then tried against livekit-server as an
API key (with any secret; livekit-server answers "invalid API key" when it knows no such key,
before looking at the signature) and, for any key it does know, with every value as the secret;
JWT-looking values are tried as bearer tokens as they are. Every attempt must be refused.

The checks that make this fail if the key were readable: the same classifier recognises the
platform's key (a wrong secret is "invalid authorization token", not "invalid API key") and the
platform's pair lists rooms and SIP trunks; the whole procedure run on a planted copy of the
key finds it and gets in; the collector finds the tenant's own Secret values
and the environment of the tenant's own pod (so "nothing found" is not a broken collector); the
platform's key and secret are asserted absent from what was found. And the tenant still works:
it reads its workers' logs in `vf-<tenant>` (`kubectl -n vf-<tenant> logs deploy/<name>`), the
worker registers and answers a call.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from livekit import api
from voicefleet_localdev import chart, paths
from voicefleet_localdev.livekit import LiveKitEndpoint
from voicefleet_localdev.pytest_plugin import ClusterHandle, installed_chart
from voicefleet_operator import render
from voicefleet_testkit.participant import TestParticipant, participant_token
from voicefleet_testkit.providers import ProviderServer, openai_pipeline
from voicefleet_testkit.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

RELEASE = "vf-tenancy"
AGENT = "support"
ADMIN = "tenant-admin"
PROVIDER_KEY = "sk-tenant-isolation-key"
EXEC_MARKER = "tenant-exec-marker-" + secrets.token_hex(6)
GREETING = "Hello, this is the isolated tenant's agent."
UNKNOWN_KEY = "invalid API key"
"""livekit-server's answer (pkg/service/auth.go, ErrInvalidAPIKey) when no secret is known for
the token's issuer: the signature is never looked at, so no secret can make that key work."""
TWIRP_LIST_ROOMS = "/twirp/livekit.RoomService/ListRooms"
TWIRP_LIST_TRUNKS = "/twirp/livekit.SIP/ListSIPInboundTrunk"


@pytest.fixture(scope="module")
def namespaces(cluster_with_node: ClusterHandle) -> Iterator[dict[str, str]]:
    suffix = secrets.token_hex(3)
    names = {"platform": f"vf-ten-system-{suffix}", "tenant": f"ten-{suffix}"}
    for namespace in names.values():
        cluster_with_node.kubectl("create", "namespace", namespace)
    # The tenant's own pods follow the restricted Pod Security Standard, as a tenant's would.
    cluster_with_node.kubectl(
        "label", "namespace", names["tenant"], "pod-security.kubernetes.io/enforce=restricted"
    )
    yield names
    for namespace in (*names.values(), render.worker_namespace(names["tenant"])):
        with contextlib.suppress(AssertionError):
            cluster_with_node.kubectl(
                "delete", "namespace", namespace, "--wait=false", "--ignore-not-found"
            )


@pytest.fixture(scope="module")
def release(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    project_images: dict[str, str],
    namespaces: dict[str, str],
) -> Iterator[str]:
    values = chart.local_values(watch_namespaces=[namespaces["tenant"]], livekit=livekit)
    with installed_chart(
        cluster_with_node,
        RELEASE,
        namespaces["platform"],
        values,
        tenants=[namespaces["tenant"]],
        skip_crds=True,
    ):
        yield namespaces["platform"]


def _apply(cluster: ClusterHandle, obj: dict[str, Any], *as_user: str) -> None:
    manifest = paths.state_dir() / f"tenancy-e2e-{secrets.token_hex(4)}.json"
    manifest.write_text(json.dumps(obj))
    try:
        cluster.kubectl(*as_user, "apply", "--server-side", "-f", str(manifest))
    finally:
        manifest.unlink(missing_ok=True)


def _json(cluster: ClusterHandle, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json"))


# --- the tenant admin ------------------------------------------------------------------------


def _make_tenant_admin(cluster: ClusterHandle, tenant: str) -> list[str]:
    """A ServiceAccount bound to the `admin` ClusterRole in `tenant` only; the kubectl flags
    that act as it."""
    _apply(cluster, {
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": ADMIN, "namespace": tenant},
    })  # fmt: skip
    _apply(cluster, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": f"{ADMIN}-is-admin", "namespace": tenant},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "admin"},
        "subjects": [{"kind": "ServiceAccount", "name": ADMIN, "namespace": tenant}],
    })  # fmt: skip
    return [
        f"--as=system:serviceaccount:{tenant}:{ADMIN}",
        "--as-group=system:serviceaccounts",
        f"--as-group=system:serviceaccounts:{tenant}",
    ]


@dataclass
class Collected:
    """What the tenant admin reached: values (with where each was first seen), and what it was
    refused."""

    values: dict[str, str] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)

    def add(self, where: str, text: str) -> None:
        whole = text.strip()
        candidates = [whole] if 3 <= len(whole) <= 4096 else []
        candidates += [t for t in re.split(r"[\s\"'`=,;{}\[\]()<>|]+", text) if 3 <= len(t) <= 512]
        # "key: value" lines and URLs' user:password parts split on ':' too.
        candidates += [t for c in list(candidates) for t in c.split(":") if 3 <= len(t) <= 512]
        for value in candidates:
            self.values.setdefault(value, where)


class AsAdmin:
    """kubectl as the tenant admin; every call recorded as allowed or refused."""

    def __init__(self, cluster: ClusterHandle, flags: list[str], found: Collected) -> None:
        self.cluster, self.flags, self.found = cluster, flags, found

    def __call__(self, what: str, *args: str) -> str | None:
        try:
            out = self.cluster.kubectl(*self.flags, *args, timeout=120)
        except AssertionError as error:
            text = str(error)
            assert "forbidden" in text.lower(), f"{what}: failed other than forbidden: {text}"
            self.found.refused.append(what)
            return None
        self.found.allowed.append(what)
        return out

    def items(self, what: str, namespace: str, kind: str) -> list[dict[str, Any]] | None:
        out = self(what, "-n", namespace, "get", kind, "-o", "json")
        return None if out is None else list(json.loads(out)["items"])


def collect(cluster: ClusterHandle, flags: list[str], tenant: str) -> Collected:
    """Everything the tenant admin can read, exec into or list in `tenant` and its worker
    namespace."""
    found = Collected()
    admin = AsAdmin(cluster, flags, found)
    for namespace in (tenant, render.worker_namespace(tenant)):
        secrets_ = admin.items(f"list secrets in {namespace}", namespace, "secrets")
        for secret in secrets_ or []:
            for key, value in (secret.get("data") or {}).items():
                decoded = base64.b64decode(value).decode("utf-8", "replace")
                found.add(f"Secret {namespace}/{secret['metadata']['name']}[{key}]", decoded)
        if namespace != tenant:
            # By name too: the children's names are public (the Deployment's env says them).
            for name in render.ChildNames.of(AGENT).livekit_secret, f"{AGENT}-secrets":
                out = admin(f"get secret {namespace}/{name}", "-n", namespace, "get", "secret",
                            name, "-o", "json")  # fmt: skip
                if out is not None:
                    found.add(f"Secret {namespace}/{name}", out)
                    for value in (json.loads(out).get("data") or {}).values():
                        found.add(f"Secret {namespace}/{name}", base64.b64decode(value).decode())
        for kind in ("configmaps", "events", "deployments", "replicasets", "services",
                     "voiceagents", "serviceaccounts", "rolebindings", "roles"):  # fmt: skip
            for item in admin.items(f"list {kind} in {namespace}", namespace, kind) or []:
                where = f"{kind} {namespace}/{item['metadata']['name']}"
                found.add(where, json.dumps(item))
                for value in (item.get("data") or {}).values():
                    found.add(where, str(value))
        for pod in admin.items(f"list pods in {namespace}", namespace, "pods") or []:
            name = pod["metadata"]["name"]
            found.add(f"pod {namespace}/{name}", json.dumps(pod))
            for container in pod["spec"]["containers"]:
                out = admin(f"exec into {namespace}/{name}", "-n", namespace, "exec", name,
                            "-c", container["name"], "--", "env")  # fmt: skip
                if out is not None:
                    found.add(f"env of {namespace}/{name}", out)
                    for line in out.splitlines():
                        found.add(f"env of {namespace}/{name}", line.partition("=")[2])
                logs = admin(f"logs of {namespace}/{name}", "-n", namespace, "logs", name,
                             "-c", container["name"], "--tail=-1")  # fmt: skip
                if logs is not None:
                    found.add(f"logs of {namespace}/{name}", logs)
            if namespace != tenant:
                # Attaching is the other way into a pod (port-forward: `auth can-i` above).
                admin(f"attach to {namespace}/{name}", "-n", namespace, "attach", name,
                      "--request-timeout=10s")  # fmt: skip
    return found


# --- LiveKit ---------------------------------------------------------------------------------


def _token(key: str, secret: str) -> str:
    return (
        api.AccessToken(key, secret)
        .with_grants(api.VideoGrants(room_list=True, room_admin=True, room_create=True))
        .with_sip_grants(api.SIPGrants(admin=True))
        .to_jwt()
    )


async def _call_api(
    session: aiohttp.ClientSession, base: str, path: str, bearer: str
) -> tuple[int, str]:
    async with session.post(
        base + path, json={}, headers={"Authorization": f"Bearer {bearer}"}
    ) as response:
        return response.status, await response.text()


@dataclass
class Attempts:
    tried: int = 0
    accepted: list[str] = field(default_factory=list)
    known_keys: list[str] = field(default_factory=list)


async def try_against_livekit(http_url: str, found: Collected) -> Attempts:
    """Every value as an API key; every value as the secret of a key livekit-server knows;
    every JWT-looking value as a bearer token. What was accepted (must be nothing)."""
    attempts = Attempts()
    limit = asyncio.Semaphore(16)
    values = list(found.values)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(bearer: str, label: str, path: str = TWIRP_LIST_ROOMS) -> tuple[int, str]:
            async with limit:
                status, text = await _call_api(session, http_url, path, bearer)
            attempts.tried += 1
            if status == 200:
                attempts.accepted.append(label)
            return status, text

        async def as_key(value: str) -> None:
            status, text = await one(_token(value, "x" * 32), f"key {value!r}")
            if status != 200 and UNKNOWN_KEY not in text:
                attempts.known_keys.append(value)

        await asyncio.gather(*(as_key(v) for v in values))
        for key in attempts.known_keys:
            await asyncio.gather(
                *(
                    one(_token(key, secret), f"pair ({key!r}, {secret!r}) {path}", path)
                    for secret in values
                    for path in (TWIRP_LIST_ROOMS, TWIRP_LIST_TRUNKS)
                )
            )
        jwts = [v for v in values if v.startswith("eyJ") and v.count(".") == 2]
        await asyncio.gather(
            *(
                one(v, f"token from {found.values[v]}", p)
                for v in jwts
                for p in (TWIRP_LIST_ROOMS, TWIRP_LIST_TRUNKS)
            )
        )
    return attempts


async def _classifier_knows_the_platform_key(http_url: str, livekit: LiveKitEndpoint) -> None:
    """The checks above would catch the platform's key: its pair lists rooms and trunks, a wrong
    secret with its key is not "invalid API key", an unknown key is."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for path in (TWIRP_LIST_ROOMS, TWIRP_LIST_TRUNKS):
            status, text = await _call_api(
                session, http_url, path, _token(livekit.api_key, livekit.api_secret)
            )
            assert status == 200, (path, status, text)
        status, text = await _call_api(
            session, http_url, TWIRP_LIST_ROOMS, _token(livekit.api_key, "x" * 32)
        )
        assert status == 401 and UNKNOWN_KEY not in text, (status, text)
        status, text = await _call_api(
            session,
            http_url,
            TWIRP_LIST_ROOMS,
            _token("no-such-key-" + secrets.token_hex(4), "x" * 32),
        )
        assert status == 401 and UNKNOWN_KEY in text, (status, text)


# --- the test --------------------------------------------------------------------------------


# Values tried as secrets are often short (HMAC keys below 32 bytes): that is the point.
@pytest.mark.filterwarnings("ignore:The HMAC key is")
async def test_a_tenant_admin_holds_nothing_that_authenticates_to_livekit(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    release: str,
    namespaces: dict[str, str],
    pod_providers: ProviderServer,
    project_images: dict[str, str],
) -> None:
    cluster = cluster_with_node
    tenant = namespaces["tenant"]
    workers = render.worker_namespace(tenant)
    flags = _make_tenant_admin(cluster, tenant)

    # What a tenant admin does: its provider key, its own pod, its VoiceAgent.
    _apply(cluster, {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "provider-keys", "namespace": tenant},
        "stringData": {"OPENAI_API_KEY": PROVIDER_KEY},
    }, *flags)  # fmt: skip
    _apply(cluster, {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "exec-marker", "namespace": tenant},
        "stringData": {"MARKER": EXEC_MARKER},
    }, *flags)  # fmt: skip
    restricted = {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True, "runAsUser": render.RUN_AS_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }  # fmt: skip
    _apply(cluster, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "tenant-tools", "namespace": tenant},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "tools", "image": project_images["runtime"], "imagePullPolicy": "Never",
                "command": ["python", "-c", "import time; time.sleep(86400)"],
                "env": [{"name": "MARKER", "valueFrom": {
                    "secretKeyRef": {"name": "exec-marker", "key": "MARKER"}}}],
                "securityContext": restricted,
                "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}},
            }],
        },
    }, *flags)  # fmt: skip
    _apply(cluster, {
        "apiVersion": "voicefleet.dev/v1alpha1", "kind": "VoiceAgent",
        "metadata": {"name": AGENT, "namespace": tenant},
        "spec": {
            "agents": [{"name": "front", "instructions": "You answer isolation tests.",
                        "greeting": GREETING}],
            "entry": "front",
            "pipeline": openai_pipeline(pod_providers.base_url),
            "secretRefs": [{"name": "provider-keys"}],
            "worker": {"jobsPerWorker": 1, "idleProcesses": 0,
                       "resources": {"requests": {"cpu": "100m"}}},
            "scaling": {"minReplicas": 1, "maxReplicas": 1, "spareJobs": 0},
        },
    }, *flags)  # fmt: skip

    def ready() -> dict[str, Any] | None:
        agent = _json(cluster, "-n", tenant, "get", "va", AGENT)
        conditions = (agent.get("status") or {}).get("conditions") or []
        is_ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        tools = _json(cluster, "-n", tenant, "get", "pod", "tenant-tools")["status"]
        return agent if is_ready and tools.get("phase") == "Running" else None

    agent = wait_for(
        "the VoiceAgent Ready and the tenant's pod running", ready, timeout=400, interval=3,
        describe=lambda: cluster.diagnostics(workers),
    )  # fmt: skip
    assert agent["status"]["workerNamespace"] == workers

    # The tenant observes its workers where the docs say, and cannot write there.
    admin = AsAdmin(cluster, flags, Collected())
    logs = admin("logs", "-n", workers, "logs", f"deploy/{AGENT}", "--tail=-1")
    assert logs is not None and "registered with LiveKit" in logs, logs
    can_i = {
        check: _can_i(cluster, flags, workers, check)
        for check in (
            "get pods", "list pods", "get pods --subresource=log", "list events",
            "get deployments", "get secrets", "list secrets", "create pods --subresource=exec",
            "create pods --subresource=attach", "create pods --subresource=portforward",
            "create pods", "patch deployments", "create rolebindings", "delete configmaps",
        )
    }  # fmt: skip
    assert can_i == {
        "get pods": True, "list pods": True, "get pods --subresource=log": True,
        "list events": True, "get deployments": True, "get secrets": False,
        "list secrets": False, "create pods --subresource=exec": False,
        "create pods --subresource=attach": False,
        "create pods --subresource=portforward": False, "create pods": False,
        "patch deployments": False, "create rolebindings": False, "delete configmaps": False,
    }, can_i  # fmt: skip

    # Everything it can reach.
    found = collect(cluster, flags, tenant)
    # The collector works: the tenant's own Secret values and its own pod's environment.
    assert PROVIDER_KEY in found.values, sorted(found.values)[:50]
    assert f"exec into {tenant}/tenant-tools" in found.allowed
    assert found.values.get(EXEC_MARKER, "").startswith(("Secret", "env of")), found.values.get(
        EXEC_MARKER
    )
    # ... and the worker namespace refuses Secrets and every way into its pods.
    assert f"list secrets in {workers}" in found.refused
    assert f"get secret {workers}/{AGENT}-livekit" in found.refused
    worker_pods = [w for w in found.allowed if w.startswith(f"logs of {workers}/")]
    assert worker_pods, found.allowed
    assert not [w for w in found.allowed if w.startswith((f"exec into {workers}/",
                                                         f"attach to {workers}/"))]  # fmt: skip
    # The platform's key and secret are nowhere in it.
    for platform_value in (livekit.api_key, livekit.api_secret):
        assert platform_value not in found.values, (
            f"the tenant admin can read a LiveKit credential: {found.values[platform_value]}"
        )

    # Every value, against the real livekit-server: all refused.
    http_url = livekit.url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
    await _classifier_knows_the_platform_key(http_url, livekit)
    # ... and the whole procedure finds the key where it is readable (a planted copy).
    planted = Collected()
    planted.add("planted", f"LIVEKIT_API_KEY={livekit.api_key}\nX={livekit.api_secret}\nY=z12")
    caught = await try_against_livekit(http_url, planted)
    assert caught.known_keys == [livekit.api_key] and caught.accepted, caught
    attempts = await try_against_livekit(http_url, found)
    assert attempts.tried >= len(found.values)
    assert not attempts.accepted, attempts.accepted[:20]
    assert not attempts.known_keys, [found.values[k] for k in attempts.known_keys]
    print(
        f"tenant isolation: {len(found.values)} values collected "
        f"({len(found.allowed)} reads allowed, {len(found.refused)} refused); "
        f"{attempts.tried} LiveKit attempts, all refused"
    )

    # And the tenant's calls work: its worker answers with the greeting.
    token = participant_token(
        livekit.api_key, livekit.api_secret, f"tenancy-{secrets.token_hex(4)}",
        identity="caller", dispatch_agent=render.dispatch_name(tenant, AGENT),
    )  # fmt: skip
    caller = TestParticipant(livekit.url, token)
    await caller.join()
    try:
        await caller.wait_for_participant(agent=True, timeout_s=90)
        await caller.wait_for_audio(timeout_s=60)
    finally:
        await caller.leave()


def _can_i(cluster: ClusterHandle, flags: list[str], namespace: str, check: str) -> bool:
    """`kubectl auth can-i` as the tenant admin (exit 1 and "no" when not allowed)."""
    try:
        out = cluster.kubectl(*flags, "auth", "can-i", *check.split(), "-n", namespace)
    except AssertionError as error:
        assert "no" in str(error), error
        return False
    return out.strip() == "yes"
