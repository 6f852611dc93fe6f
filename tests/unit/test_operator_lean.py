"""What keeps the operator lean at 1000 VoiceAgents (issue 15 item 5): reads shared between
handlers, the autoscaler resting while a fleet is idle at zero, status written from the body
just read, a worker namespace prepared once per tenant while nothing changed, and kopf letting
daemons end without waiting a minute. The figures are `make bench ONLY=scale`'s."""

from __future__ import annotations

import asyncio
import copy
from typing import Any, cast

import kopf
import pytest
from voicefleet_operator import __main__ as operator_main
from voicefleet_operator import autoscaler, context, handlers, reporting, worker_namespace
from voicefleet_operator.api import CONDITION_SCALING_ACTIVE
from voicefleet_operator.context import OperatorContext
from voicefleet_operator.kube import METADATA_ONLY, Conflict, Kube
from voicefleet_operator.scaling import Decision, FleetLoad, Reason, WorkerReading, WorkerState
from voicefleet_operator.settings import PlatformSettings
from voicefleet_operator.status import ConditionUpdate, find_condition

PLATFORM = "voicefleet-system"


class CountingKube:
    """Objects in memory; counts every call by (verb, kind)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.version = 0
        self.fail_get: Exception | None = None
        self.conflicts = 0

    def add(self, obj: dict[str, Any]) -> None:
        self.version += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.version)
        key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        self.objects[key] = obj

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", kind))
        await asyncio.sleep(0)
        if self.fail_get is not None:
            raise self.fail_get
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
        self.calls.append(("list", kind))
        return [copy.deepcopy(o) for (k, ns, _), o in self.objects.items() if k == kind]

    async def apply(self, obj: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        self.calls.append(("apply", obj["kind"]))
        self.add(obj)
        return copy.deepcopy(obj)

    async def merge_patch(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        patch: dict[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        self.calls.append(("patch", kind))
        obj = self.objects[(kind, namespace or "", name)]
        if (
            self.conflicts
            or patch["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]
        ):
            self.conflicts = max(self.conflicts - 1, 0)
            raise Conflict("PATCH", name, 409, "Conflict", "the object has been modified")
        obj = copy.deepcopy(obj)
        obj["status"] = {k: v for k, v in patch["status"].items() if v is not None}
        self.add(obj)
        return obj


def make_context(kube: CountingKube) -> OperatorContext:
    settings = PlatformSettings(
        livekit_url="ws://livekit.voicefleet-system.svc:7880",
        livekit_secret_namespace=PLATFORM,
        livekit_secret_name="voicefleet-livekit",
        runtime_image="voicefleet/runtime:0.1.0",
        platform_namespace=PLATFORM,
    )
    return OperatorContext(settings=settings, kube=cast(Kube, kube))


def livekit_secret(key: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "voicefleet-livekit", "namespace": PLATFORM},
        "data": {"LIVEKIT_API_KEY": key, "LIVEKIT_API_SECRET": "c2VjcmV0"},
    }


# --- the platform's LiveKit Secret: one read for every handler ----------------------------------


def test_concurrent_handlers_share_one_read_of_the_platform_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kube = CountingKube()
    kube.add(livekit_secret("a2V5"))
    ctx = make_context(kube)
    now = [100.0]
    monkeypatch.setattr(context.time, "monotonic", lambda: now[0])

    async def many() -> list[Any]:
        return await asyncio.gather(*(ctx.livekit_credentials() for _ in range(50)))

    found = asyncio.run(many())
    assert {f for f in found} == {(ctx.settings.effective_livekit_api_url, "key", "secret")}
    assert kube.calls == [("get", "Secret")]
    # A rotated key is read again once PLATFORM_SECRET_SECONDS have passed.
    kube.add(livekit_secret("cm90YXRlZA=="))
    now[0] += context.PLATFORM_SECRET_SECONDS
    rotated = asyncio.run(ctx.livekit_credentials())
    assert rotated is not None and rotated[1] == "rotated"
    assert kube.calls == [("get", "Secret")] * 2


def test_a_failed_read_of_the_platform_secret_is_not_remembered() -> None:
    kube = CountingKube()
    kube.add(livekit_secret("a2V5"))
    ctx = make_context(kube)
    kube.fail_get = OSError("connection refused")
    with pytest.raises(OSError):
        asyncio.run(ctx.platform_livekit_secret())
    kube.fail_get = None
    assert asyncio.run(ctx.platform_livekit_secret()) is not None
    assert kube.calls == [("get", "Secret")] * 2


# --- status from the body just read -------------------------------------------------------------


def voiceagent(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "voicefleet.dev/v1alpha1",
        "kind": "VoiceAgent",
        "metadata": {"name": "support", "namespace": "acme", "uid": "uid-1", "generation": 1},
        "spec": {},
        "status": status or {},
    }


def test_status_is_written_from_the_given_body_without_reading_it_again() -> None:
    kube = CountingKube()
    kube.add(voiceagent())
    ctx = make_context(kube)
    body = kube.objects[("VoiceAgent", "acme", "support")]
    update = ConditionUpdate.true(CONDITION_SCALING_ACTIVE, "Steady", "steady")
    result = asyncio.run(
        reporting.write_status(ctx, "acme", "support", updates=[update], uid="uid-1", body=body)
    )
    assert result is not None
    assert kube.calls == [("patch", "VoiceAgent")]
    written = kube.objects[("VoiceAgent", "acme", "support")]["status"]
    assert (find_condition(written["conditions"], CONDITION_SCALING_ACTIVE) or {})[
        "reason"
    ] == "Steady"


def test_a_stale_body_costs_a_conflict_and_a_fresh_read_never_a_lost_update() -> None:
    kube = CountingKube()
    kube.add(voiceagent())
    ctx = make_context(kube)
    stale = copy.deepcopy(kube.objects[("VoiceAgent", "acme", "support")])
    kube.add(voiceagent({"activeJobs": 3}))  # written since: a new resourceVersion
    update = ConditionUpdate.true(CONDITION_SCALING_ACTIVE, "Steady", "steady")
    asyncio.run(
        reporting.write_status(ctx, "acme", "support", updates=[update], uid="uid-1", body=stale)
    )
    assert kube.calls == [("patch", "VoiceAgent"), ("get", "VoiceAgent"), ("patch", "VoiceAgent")]
    written = kube.objects[("VoiceAgent", "acme", "support")]["status"]
    assert written["activeJobs"] == 3
    assert (find_condition(written["conditions"], CONDITION_SCALING_ACTIVE) or {})[
        "reason"
    ] == "Steady"


# --- the autoscaler rests while a fleet is idle at zero -----------------------------------------


def evaluation(
    *, replicas: int, before: int, pods: int = 0, hpa: bool = False
) -> autoscaler.Evaluation:
    decision = None if hpa else Decision(replicas, replicas, Reason.STEADY, "steady")
    workers = tuple(WorkerReading(f"p{i}", WorkerState.STARTING) for i in range(pods))
    return autoscaler.Evaluation(
        ConditionUpdate.true(CONDITION_SCALING_ACTIVE, "Steady", "steady"),
        decision=decision,
        fleet=FleetLoad(workers),
        replicas_before=before,
    )


def test_idle_at_zero_only_with_no_replica_no_pod_and_nobody_waiting() -> None:
    assert handlers.idle_at_zero(evaluation(replicas=0, before=0), waiting=0)
    assert not handlers.idle_at_zero(evaluation(replicas=0, before=0), waiting=1)
    assert not handlers.idle_at_zero(evaluation(replicas=1, before=0), waiting=0)
    assert not handlers.idle_at_zero(evaluation(replicas=0, before=1), waiting=0)
    assert not handlers.idle_at_zero(evaluation(replicas=0, before=0, pods=1), waiting=0)
    assert not handlers.idle_at_zero(evaluation(replicas=0, before=0, hpa=True), waiting=0)
    assert handlers.IDLE_INTERVAL_SECONDS > autoscaler.INTERVAL_SECONDS


def test_a_nudge_reaches_only_an_autoscaler_that_runs() -> None:
    ctx = make_context(CountingKube())
    ctx.nudge_autoscaler("acme", "support")  # no daemon yet: nothing is created
    assert ("acme", "support") not in ctx._wakes
    state = ctx.wake("acme", "support")
    ctx.nudge_autoscaler("acme", "support")
    assert state.nudge.is_set()


# --- the worker namespace: prepared once per tenant while nothing changed -----------------------


def role_binding(name: str, user: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": "acme"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}],
    }


def test_a_tenants_worker_namespace_is_prepared_once_until_its_bindings_change() -> None:
    kube = CountingKube()
    kube.add(role_binding("viewers", "alice"))
    ctx = make_context(kube)

    async def reconciles(count: int) -> None:
        await asyncio.gather(
            *(handlers._ensure_worker_namespace(ctx, "acme") for _ in range(count))
        )

    asyncio.run(reconciles(20))
    applies = [kind for verb, kind in kube.calls if verb == "apply"]
    assert applies == ["Namespace", "Role", "RoleBinding"]
    # Every reconcile still reads the tenant's RoleBindings: a change is mirrored at once.
    kube.calls.clear()
    kube.add(role_binding("viewers-2", "bob"))
    asyncio.run(reconciles(1))
    binding = kube.objects[("RoleBinding", "vf-acme", worker_namespace.OBSERVER_ROLE)]
    assert [s["name"] for s in binding["subjects"]] == ["alice", "bob"]
    # A failed reconcile (or the namespace's deletion) forgets it: prepared again next time.
    ctx.mark_worker_namespace("acme", None)
    kube.calls.clear()
    asyncio.run(reconciles(1))
    assert [kind for verb, kind in kube.calls if verb == "apply"] == [
        "Namespace",
        "Role",
        "RoleBinding",
    ]


# --- the finalizer's list of the tenant's VoiceAgents: metadata only ----------------------------


def test_a_metadata_only_list_asks_for_partial_metadata_and_reads_an_empty_one() -> None:
    seen: list[dict[str, Any]] = []

    async def request(method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        seen.append({"method": method, "path": path, **kwargs})
        # What the API server answers for an empty PartialObjectMetadataList.
        return {"kind": "PartialObjectMetadataList", "items": None}

    kube = Kube.__new__(Kube)
    kube.request = request  # type: ignore[method-assign]
    assert asyncio.run(kube.list("VoiceAgent", "acme", metadata_only=True)) == []
    assert seen[0]["accept"] == METADATA_ONLY
    assert seen[0]["path"] == "/apis/voicefleet.dev/v1alpha1/namespaces/acme/voiceagents"
    asyncio.run(kube.list("VoiceAgent", "acme"))
    assert seen[1]["accept"] is None


# --- kopf lets deleted VoiceAgents' daemons end without waiting a minute ------------------------


def test_kopf_waits_briefly_for_daemons_and_polls_exiting_timers_every_second() -> None:
    settings = kopf.OperatorSettings()
    operator_main.configure_kopf(settings, make_context(CountingKube()).settings)
    assert settings.background.instant_exit_timeout == 1.0
    assert settings.background.cancellation_polling == 1.0
