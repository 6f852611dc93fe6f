"""Crash consistency of the telephony glue with LiveKit, with in-memory stand-ins.

The operator may die (or a status write may fail) between creating a SIP trunk or dispatch rule
and recording it in the status. Whatever happens next to the spec, removal must find LiveKit's
objects by name, so nothing is left to hold a number. The integration test runs the same
sequence against a real kube-apiserver and livekit-server; these cover the logic cheaply,
including the failed status write.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from livekit.protocol.sip import (
    CreateSIPDispatchRuleRequest,
    CreateSIPInboundTrunkRequest,
    DeleteSIPDispatchRuleRequest,
    DeleteSIPTrunkRequest,
    ListSIPDispatchRuleRequest,
    ListSIPDispatchRuleResponse,
    ListSIPInboundTrunkRequest,
    ListSIPInboundTrunkResponse,
    SIPDispatchRuleInfo,
    SIPInboundTrunkInfo,
)
from voicefleet_operator import telephony, telephony_handlers
from voicefleet_operator.context import OperatorContext
from voicefleet_operator.kube import Conflict, KubeError, NotFound
from voicefleet_operator.settings import PlatformSettings
from voicefleet_operator.telephony_handlers import LIVEKIT_OBJECTS_ANNOTATION

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "voiceagent.yaml"
NUMBER = "+15557770001"


class Killed(BaseException):
    """The operator process dies here: no handler code after this point runs."""


# --- stand-ins ------------------------------------------------------------------------------


def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """JSON merge patch (RFC 7386)."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class FakeKube:
    """VoiceAgents in memory with the API server's merge-patch rules the glue relies on."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.failing_status_writes = 0
        self._versions = itertools.count(1)

    def add(self, obj: dict[str, Any]) -> None:
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
        self.objects[(obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj

    def voiceagent(self, namespace: str, name: str) -> dict[str, Any]:
        return self.objects[("VoiceAgent", namespace, name)]

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = self.objects.get((kind, str(namespace), name))
        return copy.deepcopy(obj) if obj is not None else None

    async def merge_patch(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        patch: dict[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        path = f"{kind}/{namespace}/{name}" + (f"/{subresource}" if subresource else "")
        obj = self.objects.get((kind, str(namespace), name))
        if obj is None:
            raise NotFound("PATCH", path, 404, "NotFound", "not found")
        if subresource == "status" and self.failing_status_writes:
            self.failing_status_writes -= 1
            raise KubeError("PATCH", path, 500, "InternalError", "etcdserver: request timed out")
        metadata = dict(patch.get("metadata") or {})
        version = metadata.pop("resourceVersion", None)
        if version is not None and version != obj["metadata"]["resourceVersion"]:
            raise Conflict("PATCH", path, 409, "Conflict", "the object has been modified")
        uid = metadata.pop("uid", None)
        if uid is not None and uid != obj["metadata"]["uid"]:
            raise KubeError("PATCH", path, 422, "Invalid", "metadata.uid: field is immutable")
        if subresource == "status":
            merge(obj, {"status": patch.get("status")})
        else:
            merge(obj, {key: value for key, value in patch.items() if key != "status"})
            merge(obj["metadata"], metadata)
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
        return copy.deepcopy(obj)


class FakeSip:
    """livekit-server's SIP API in memory: trunks and rules by ID, a number on one trunk only."""

    def __init__(self) -> None:
        self.trunks: dict[str, SIPInboundTrunkInfo] = {}
        self.rules: dict[str, SIPDispatchRuleInfo] = {}
        self.calls: list[str] = []
        self.kill_after: str | None = None
        """Name of a call after which the operator dies (the call itself takes effect)."""
        self._ids = itertools.count(1)

    def _done(self, call: str) -> None:
        self.calls.append(call)
        if call == self.kill_after:
            self.kill_after = None
            raise Killed(call)

    async def list_inbound_trunk(self, request: ListSIPInboundTrunkRequest) -> Any:
        self._done("list_inbound_trunk")
        return ListSIPInboundTrunkResponse(items=list(self.trunks.values()))

    async def list_dispatch_rule(self, request: ListSIPDispatchRuleRequest) -> Any:
        self._done("list_dispatch_rule")
        return ListSIPDispatchRuleResponse(items=list(self.rules.values()))

    def _check_numbers(self, trunk: SIPInboundTrunkInfo, trunk_id: str) -> None:
        for other in self.trunks.values():
            if other.sip_trunk_id != trunk_id and set(other.numbers) & set(trunk.numbers):
                raise RuntimeError("Conflicting inbound SIP Trunks")

    async def create_inbound_trunk(self, request: CreateSIPInboundTrunkRequest) -> Any:
        trunk = SIPInboundTrunkInfo()
        trunk.CopyFrom(request.trunk)
        trunk.sip_trunk_id = f"ST_{next(self._ids)}"
        self._check_numbers(trunk, trunk.sip_trunk_id)
        self.trunks[trunk.sip_trunk_id] = trunk
        self._done("create_inbound_trunk")
        return trunk

    async def update_inbound_trunk(self, trunk_id: str, desired: SIPInboundTrunkInfo) -> Any:
        trunk = SIPInboundTrunkInfo()
        trunk.CopyFrom(desired)
        trunk.sip_trunk_id = trunk_id
        self._check_numbers(trunk, trunk_id)
        self.trunks[trunk_id] = trunk
        self._done("update_inbound_trunk")
        return trunk

    async def create_dispatch_rule(self, request: CreateSIPDispatchRuleRequest) -> Any:
        rule = SIPDispatchRuleInfo()
        rule.CopyFrom(request.dispatch_rule)
        rule.sip_dispatch_rule_id = f"SDR_{next(self._ids)}"
        self.rules[rule.sip_dispatch_rule_id] = rule
        self._done("create_dispatch_rule")
        return rule

    async def update_dispatch_rule(self, rule_id: str, desired: SIPDispatchRuleInfo) -> Any:
        rule = SIPDispatchRuleInfo()
        rule.CopyFrom(desired)
        rule.sip_dispatch_rule_id = rule_id
        self.rules[rule_id] = rule
        self._done("update_dispatch_rule")
        return rule

    async def delete_trunk(self, request: DeleteSIPTrunkRequest) -> Any:
        self.trunks.pop(request.sip_trunk_id)
        self._done("delete_trunk")
        return SIPInboundTrunkInfo()

    async def delete_dispatch_rule(self, request: DeleteSIPDispatchRuleRequest) -> Any:
        self.rules.pop(request.sip_dispatch_rule_id)
        self._done("delete_dispatch_rule")
        return SIPDispatchRuleInfo()

    def named(self, namespace: str, name: str) -> tuple[list[str], list[str]]:
        wanted = telephony.object_name(namespace, name)
        return (
            [t.sip_trunk_id for t in self.trunks.values() if t.name == wanted],
            [r.sip_dispatch_rule_id for r in self.rules.values() if r.name == wanted],
        )


class FakeClients:
    """What telephony_handlers.LiveKitClients gives: a provisioner over the (fake) SIP API."""

    def __init__(self, sip: FakeSip) -> None:
        self.sip = sip

    async def provisioner(self) -> telephony.TelephonyProvisioner:
        return telephony.TelephonyProvisioner(cast(Any, self))

    async def close(self) -> None:
        pass


# --- helpers --------------------------------------------------------------------------------


def voiceagent(namespace: str, name: str, uid: str, numbers: list[str] | None) -> dict[str, Any]:
    spec = yaml.safe_load(EXAMPLE.read_text())["spec"]
    if numbers is None:
        spec.pop("telephony", None)
    else:
        spec["telephony"] = {"numbers": numbers, "inbound": {"allowedAddresses": ["10.0.0.0/8"]}}
    return {
        "apiVersion": "voicefleet.dev/v1alpha1",
        "kind": "VoiceAgent",
        "metadata": {
            "namespace": namespace,
            "name": name,
            "uid": uid,
            "generation": 1,
            "creationTimestamp": f"2025-01-02T03:04:0{uid[-1]}Z",
        },
        "spec": spec,
    }


def claims(kube: FakeKube) -> list[telephony.Claim]:
    found = (telephony_handlers.claim_of(obj) for obj in kube.objects.values())
    return [claim for claim in found if claim is not None]


def remove_numbers(kube: FakeKube, namespace: str, name: str) -> None:
    """The tenant removes spec.telephony (while the operator is down)."""
    obj = kube.voiceagent(namespace, name)
    obj["spec"].pop("telephony")
    obj["metadata"]["generation"] += 1


class Operator:
    """One operator run: a fresh context (locks) and LiveKit client, as after a restart."""

    def __init__(self, kube: FakeKube, sip: FakeSip) -> None:
        settings = PlatformSettings(
            livekit_url="ws://livekit.invalid:7880",
            livekit_secret_namespace="voicefleet-system",
            runtime_image="runtime:test",
        )
        self.kube = kube
        self.ctx = OperatorContext(settings=settings, kube=cast(Any, kube))
        self.clients = cast(telephony_handlers.LiveKitClients, FakeClients(sip))

    async def sync(self, namespace: str, name: str) -> telephony_handlers.SyncOutcome:
        return await telephony_handlers.sync(
            self.ctx, self.clients, namespace, name, claims(self.kube)
        )


@pytest.fixture
def world() -> Iterator[tuple[FakeKube, FakeSip]]:
    kube = FakeKube()
    kube.add(voiceagent("tenant-a", "first", "uid-1", [NUMBER]))
    yield kube, FakeSip()


def annotation(kube: FakeKube, namespace: str, name: str) -> str | None:
    annotations = kube.voiceagent(namespace, name)["metadata"].get("annotations") or {}
    return cast(str | None, annotations.get(LIVEKIT_OBJECTS_ANNOTATION))


async def assert_number_free_for_another(kube: FakeKube, sip: FakeSip) -> None:
    """A VoiceAgent that asks for the number later gets it (no NumberConflict)."""
    kube.add(voiceagent("tenant-b", "second", "uid-2", [NUMBER]))
    outcome = await Operator(kube, sip).sync("tenant-b", "second")
    assert outcome.result is not None and outcome.result.numbers == (NUMBER,)
    assert outcome.result.conflicts == ()
    condition = kube.voiceagent("tenant-b", "second")["status"]["conditions"]
    ready = next(c for c in condition if c["type"] == "TelephonyReady")
    assert (ready["status"], ready["reason"]) == ("True", "Provisioned")
    trunks, rules = sip.named("tenant-b", "second")
    assert len(trunks) == 1 and len(rules) == 1


# --- tests ----------------------------------------------------------------------------------


async def test_the_annotation_is_written_before_livekit_holds_anything(
    world: tuple[FakeKube, FakeSip],
) -> None:
    kube, sip = world
    annotated_at_create: list[str | None] = []
    create = sip.create_inbound_trunk

    async def create_seen(request: CreateSIPInboundTrunkRequest) -> Any:
        annotated_at_create.append(annotation(kube, "tenant-a", "first"))
        return await create(request)

    sip.create_inbound_trunk = create_seen  # type: ignore[method-assign]
    outcome = await Operator(kube, sip).sync("tenant-a", "first")
    assert outcome.result is not None and outcome.result.trunk_id is not None
    assert annotated_at_create == ["voicefleet:tenant-a/first"]
    assert kube.voiceagent("tenant-a", "first")["status"]["telephony"]["numbers"] == [NUMBER]


@pytest.mark.parametrize("killed_after", ["create_inbound_trunk", "create_dispatch_rule"])
async def test_killed_before_the_status_records_it_then_numbers_removed(
    world: tuple[FakeKube, FakeSip], killed_after: str
) -> None:
    kube, sip = world
    sip.kill_after = killed_after
    with pytest.raises(Killed):
        await Operator(kube, sip).sync("tenant-a", "first")
    assert "telephony" not in (kube.voiceagent("tenant-a", "first").get("status") or {})
    trunks, _ = sip.named("tenant-a", "first")
    assert len(trunks) == 1  # created, never recorded
    # While the operator is down the tenant drops the numbers; before the fix the orphan
    # kept the number for good.
    remove_numbers(kube, "tenant-a", "first")
    assert telephony_handlers.has_telephony(kube.voiceagent("tenant-a", "first"))

    outcome = await Operator(kube, sip).sync("tenant-a", "first")  # restarted operator

    assert outcome.result is not None and outcome.result.trunk_id is None
    assert sip.named("tenant-a", "first") == ([], [])
    assert annotation(kube, "tenant-a", "first") is None
    assert not telephony_handlers.has_telephony(kube.voiceagent("tenant-a", "first"))
    await assert_number_free_for_another(kube, sip)


async def test_a_failed_status_write_after_provisioning_then_numbers_removed(
    world: tuple[FakeKube, FakeSip],
) -> None:
    kube, sip = world
    kube.failing_status_writes = 1
    with pytest.raises(KubeError, match="500"):
        await Operator(kube, sip).sync("tenant-a", "first")
    trunks, rules = sip.named("tenant-a", "first")
    assert len(trunks) == 1 and len(rules) == 1
    assert "telephony" not in (kube.voiceagent("tenant-a", "first").get("status") or {})

    remove_numbers(kube, "tenant-a", "first")
    await Operator(kube, sip).sync("tenant-a", "first")

    assert sip.named("tenant-a", "first") == ([], [])
    assert annotation(kube, "tenant-a", "first") is None
    await assert_number_free_for_another(kube, sip)


async def test_deletion_removes_by_name_what_the_status_never_recorded(
    world: tuple[FakeKube, FakeSip],
) -> None:
    kube, sip = world
    sip.kill_after = "create_dispatch_rule"
    with pytest.raises(Killed):
        await Operator(kube, sip).sync("tenant-a", "first")
    remove_numbers(kube, "tenant-a", "first")
    deleting = kube.voiceagent("tenant-a", "first")
    deleting["metadata"]["deletionTimestamp"] = "2025-02-01T00:00:00Z"
    # The on.delete handler's filter: the annotation alone keeps it (and the finalizer) in play.
    assert telephony_handlers.has_telephony(deleting)
    operator = Operator(kube, sip)
    await telephony_handlers.remove(operator.ctx, operator.clients, "tenant-a", "first")
    assert sip.named("tenant-a", "first") == ([], [])


async def test_a_voiceagent_that_never_had_numbers_costs_no_livekit_call() -> None:
    kube, sip = FakeKube(), FakeSip()
    kube.add(voiceagent("tenant-a", "plain", "uid-3", None))
    outcome = await Operator(kube, sip).sync("tenant-a", "plain")
    assert outcome.result is not None and outcome.result.trunk_id is None
    assert sip.calls == []
    assert not telephony_handlers.has_telephony(kube.voiceagent("tenant-a", "plain"))


async def test_the_annotation_outlives_a_failed_removal() -> None:
    kube, sip = FakeKube(), FakeSip()
    kube.add(voiceagent("tenant-a", "first", "uid-1", [NUMBER]))
    await Operator(kube, sip).sync("tenant-a", "first")
    remove_numbers(kube, "tenant-a", "first")
    sip.kill_after = "delete_dispatch_rule"  # dies mid-removal
    with pytest.raises(Killed):
        await Operator(kube, sip).sync("tenant-a", "first")
    assert annotation(kube, "tenant-a", "first") == "voicefleet:tenant-a/first"
    await Operator(kube, sip).sync("tenant-a", "first")
    assert sip.named("tenant-a", "first") == ([], [])
    assert annotation(kube, "tenant-a", "first") is None


def test_the_annotation_alone_means_livekit_may_hold_objects() -> None:
    plain = voiceagent("tenant-a", "plain", "uid-3", None)
    assert not telephony_handlers.has_telephony(plain)
    plain["metadata"]["annotations"] = {LIVEKIT_OBJECTS_ANNOTATION: "voicefleet:tenant-a/plain"}
    assert telephony_handlers.may_own_livekit_objects(plain)
    assert telephony_handlers.has_telephony(plain)
