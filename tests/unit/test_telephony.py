"""Rendering of SIP trunk and dispatch rule requests, and who gets a contested number."""

from __future__ import annotations

import json

import pytest
from livekit.protocol.sip import SIPInboundTrunkInfo
from voicefleet_operator import telephony, telephony_handlers
from voicefleet_operator.telephony import (
    Claim,
    NumberConflict,
    ProvisionResult,
    SipAuth,
    TelephonyTarget,
)

NUMBER_A = "+15551230001"
NUMBER_B = "+15551230002"


def target(**overrides: object) -> TelephonyTarget:
    fields: dict[str, object] = {
        "namespace": "tenant-a",
        "name": "support",
        "created": "2025-01-02T03:04:05Z",
        "dispatch_name": "tenant-a--support",
        "numbers": (NUMBER_A,),
    }
    fields.update(overrides)
    return TelephonyTarget(**fields)  # type: ignore[arg-type]


def foreign_trunk(trunk_id: str, name: str, numbers: list[str]) -> SIPInboundTrunkInfo:
    return SIPInboundTrunkInfo(sip_trunk_id=trunk_id, name=name, numbers=numbers)


# --- names ----------------------------------------------------------------------------------


def test_object_name_round_trips_to_its_owner() -> None:
    name = telephony.object_name("tenant-a", "support")
    assert name == "voicefleet:tenant-a/support"
    assert telephony.owner_of(name) == "tenant-a/support"
    assert telephony.owner_of("someone-else's trunk") is None
    assert telephony.owner_of("voicefleet:no-slash") is None


def test_room_prefix_is_unambiguous_between_namespace_and_name() -> None:
    # "a-b"/"c" and "a"/"b-c" would collide if joined with "-".
    assert telephony.room_prefix("a-b", "c") != telephony.room_prefix("a", "b-c")
    assert telephony.room_prefix("tenant-a", "support") == "call_tenant-a_support"


@pytest.mark.parametrize(
    ("raw", "normal"),
    [("+15551230001", "+15551230001"), ("15551230001", "+15551230001"), ("+1 555-123", "+1555123")],
)
def test_normalize_number_matches_livekit(raw: str, normal: str) -> None:
    assert telephony.normalize_number(raw) == normal


# --- rendering ------------------------------------------------------------------------------


def test_trunk_carries_numbers_addresses_and_auth() -> None:
    trunk = telephony.render_inbound_trunk(
        target(
            numbers=(NUMBER_A, NUMBER_B),
            allowed_addresses=("10.0.0.0/8", "192.0.2.7"),
            auth=SipAuth("carrier", "s3cret"),
        )
    )
    assert trunk.sip_trunk_id == ""
    assert trunk.name == "voicefleet:tenant-a/support"
    assert list(trunk.numbers) == [NUMBER_A, NUMBER_B]
    assert list(trunk.allowed_addresses) == ["10.0.0.0/8", "192.0.2.7"]
    assert (trunk.auth_username, trunk.auth_password) == ("carrier", "s3cret")
    assert json.loads(trunk.metadata) == {
        "managedBy": "voicefleet",
        "voiceAgent": "tenant-a/support",
        "claimed": "2025-01-02T03:04:05Z",
    }


def test_trunk_without_auth_leaves_credentials_empty() -> None:
    trunk = telephony.render_inbound_trunk(target())
    assert (trunk.auth_username, trunk.auth_password) == ("", "")
    assert list(trunk.allowed_addresses) == []


def test_trunk_serves_only_the_numbers_given() -> None:
    trunk = telephony.render_inbound_trunk(target(numbers=(NUMBER_A, NUMBER_B)), [NUMBER_B])
    assert list(trunk.numbers) == [NUMBER_B]


def test_a_trunk_without_numbers_is_never_rendered() -> None:
    # An empty numbers list would make the trunk match every dialled number.
    with pytest.raises(ValueError, match="at least one number"):
        telephony.render_inbound_trunk(target(numbers=()))
    with pytest.raises(ValueError, match="at least one number"):
        telephony.render_inbound_trunk(target(), [])


def test_password_is_not_in_repr() -> None:
    auth = SipAuth("carrier", "s3cret")
    assert "s3cret" not in repr(auth)
    assert "s3cret" not in repr(target(auth=auth))


def test_dispatch_rule_gives_each_call_its_own_room_and_dispatches_the_agent() -> None:
    rule = telephony.render_dispatch_rule(target(), "ST_abc")
    assert rule.sip_dispatch_rule_id == ""
    assert rule.name == "voicefleet:tenant-a/support"
    assert list(rule.trunk_ids) == ["ST_abc"]
    assert rule.rule.WhichOneof("rule") == "dispatch_rule_individual"
    assert rule.rule.dispatch_rule_individual.room_prefix == "call_tenant-a_support"
    assert rule.rule.dispatch_rule_individual.pin == ""
    assert [a.agent_name for a in rule.room_config.agents] == ["tenant-a--support"]
    metadata = json.loads(rule.metadata)
    assert metadata == {
        "managedBy": "voicefleet",
        "voiceAgent": "tenant-a/support",
        "tenant": "tenant-a",
        "dispatchName": "tenant-a--support",
        "source": "sip",
    }
    assert json.loads(rule.room_config.agents[0].metadata) == metadata
    assert dict(rule.attributes) == {"voicefleet.dev/voiceAgent": "tenant-a/support"}


def test_rendering_is_deterministic() -> None:
    assert telephony.render_inbound_trunk(target()) == telephony.render_inbound_trunk(target())
    assert telephony.render_dispatch_rule(target(), "ST_1") == telephony.render_dispatch_rule(
        target(), "ST_1"
    )


def test_trunk_differs_on_numbers_addresses_and_credentials_but_not_ids() -> None:
    desired = telephony.render_inbound_trunk(target(auth=SipAuth("u", "p")))
    existing = SIPInboundTrunkInfo()
    existing.CopyFrom(desired)
    existing.sip_trunk_id = "ST_1"
    existing.created_at.FromSeconds(1_700_000_000)
    assert not telephony.trunk_differs(existing, desired)
    for changed in (
        target(numbers=(NUMBER_A, NUMBER_B), auth=SipAuth("u", "p")),
        target(allowed_addresses=("192.0.2.1",), auth=SipAuth("u", "p")),
        target(auth=SipAuth("u", "rotated")),
        target(auth=None),
    ):
        assert telephony.trunk_differs(existing, telephony.render_inbound_trunk(changed))


def test_rule_differs_on_trunk_and_dispatch_name() -> None:
    desired = telephony.render_dispatch_rule(target(), "ST_1")
    existing = telephony.render_dispatch_rule(target(), "ST_1")
    existing.sip_dispatch_rule_id = "SDR_1"
    assert not telephony.rule_differs(existing, desired)
    assert telephony.rule_differs(existing, telephony.render_dispatch_rule(target(), "ST_2"))
    renamed = telephony.render_dispatch_rule(target(dispatch_name="other"), "ST_1")
    assert telephony.rule_differs(existing, renamed)


# --- conflicts ------------------------------------------------------------------------------


def test_no_competition_serves_every_number() -> None:
    resolution = telephony.resolve_numbers(target(numbers=(NUMBER_A, NUMBER_B)), [], [])
    assert resolution.in_service == (NUMBER_A, NUMBER_B)
    assert resolution.conflicts == ()


def test_a_number_on_another_voiceagents_trunk_stays_there() -> None:
    other = foreign_trunk("ST_other", "voicefleet:tenant-b/sales", [NUMBER_A])
    resolution = telephony.resolve_numbers(target(numbers=(NUMBER_A, NUMBER_B)), [other], [])
    assert resolution.in_service == (NUMBER_B,)
    assert resolution.conflicts == (
        NumberConflict(NUMBER_A, "VoiceAgent tenant-b/sales (SIP trunk ST_other)"),
    )


def test_the_trunk_holder_wins_even_against_an_older_claimant() -> None:
    # tenant-b was created later but has held the number in LiveKit: it keeps it.
    holder = foreign_trunk("ST_b", "voicefleet:tenant-b/sales", [NUMBER_A])
    newer = Claim("tenant-b", "sales", "2030-01-01T00:00:00Z", (NUMBER_A,))
    resolution = telephony.resolve_numbers(target(), [holder], [newer])
    assert resolution.in_service == ()
    assert resolution.conflicts[0].number == NUMBER_A


def test_a_trunk_not_managed_by_voicefleet_also_keeps_its_number() -> None:
    manual = foreign_trunk("ST_manual", "carrier trunk", ["15551230001"])  # no '+': same number
    resolution = telephony.resolve_numbers(target(), [manual], [])
    assert resolution.in_service == ()
    assert "ST_manual" in resolution.conflicts[0].holder
    assert "does not manage" in resolution.conflicts[0].holder


def test_own_trunk_is_not_a_conflict() -> None:
    mine = foreign_trunk("ST_mine", "voicefleet:tenant-a/support", [NUMBER_A])
    resolution = telephony.resolve_numbers(target(), [mine], [target().claim])
    assert resolution.in_service == (NUMBER_A,)
    assert resolution.conflicts == ()


def test_among_unprovisioned_claims_the_oldest_wins() -> None:
    older = Claim("tenant-b", "sales", "2024-12-31T23:59:59Z", (NUMBER_A,))
    newer = Claim("tenant-c", "help", "2025-06-01T00:00:00Z", (NUMBER_A,))
    me = target()
    resolution = telephony.resolve_numbers(me, [], [older, newer, me.claim])
    assert resolution.in_service == ()
    assert resolution.conflicts == (
        NumberConflict(
            NUMBER_A, "VoiceAgent tenant-b/sales, which claimed it first (2024-12-31T23:59:59Z)"
        ),
    )
    # The older claimant, resolving with the same facts, keeps it.
    older_target = target(namespace="tenant-b", name="sales", created=older.created)
    assert telephony.resolve_numbers(older_target, [], [older, newer, me.claim]).in_service == (
        NUMBER_A,
    )


def test_simultaneous_claims_tie_break_on_namespace_then_name() -> None:
    same_second = "2025-01-02T03:04:05Z"
    a = target(namespace="alpha", name="x", created=same_second)
    b = target(namespace="beta", name="x", created=same_second)
    claims = [a.claim, b.claim]
    assert telephony.resolve_numbers(a, [], claims).in_service == (NUMBER_A,)
    assert telephony.resolve_numbers(b, [], claims).in_service == ()


def test_simultaneous_claims_in_one_namespace_tie_break_on_name() -> None:
    same_second = "2025-01-02T03:04:05Z"
    a = target(namespace="acme", name="alpha", created=same_second)
    b = target(namespace="acme", name="beta", created=same_second)
    claims = [b.claim, a.claim]
    assert telephony.resolve_numbers(a, [], claims).in_service == (NUMBER_A,)
    assert telephony.resolve_numbers(b, [], claims).in_service == ()


def test_the_namespace_decides_a_tie_before_the_name() -> None:
    same_second = "2025-01-02T03:04:05Z"
    first = target(namespace="alpha", name="zulu", created=same_second)
    second = target(namespace="beta", name="able", created=same_second)
    claims = [second.claim, first.claim]
    assert telephony.resolve_numbers(first, [], claims).in_service == (NUMBER_A,)
    assert telephony.resolve_numbers(second, [], claims).in_service == ()


def test_exactly_one_claimant_wins_whatever_the_order_of_facts() -> None:
    claimants = [
        target(namespace=f"t{i}", name="agent", created=f"2025-01-0{i}T00:00:00Z")
        for i in (3, 1, 2)
    ]
    claims = [c.claim for c in claimants]
    winners = [c.key for c in claimants if telephony.resolve_numbers(c, [], claims).in_service]
    assert winners == ["t1/agent"]


def test_a_later_claim_does_not_block_an_older_one() -> None:
    newer = Claim("tenant-z", "later", "2026-01-01T00:00:00Z", (NUMBER_A,))
    assert telephony.resolve_numbers(target(), [], [newer]).in_service == (NUMBER_A,)


def test_partial_conflict_keeps_the_free_numbers() -> None:
    other = foreign_trunk("ST_o", "voicefleet:tenant-b/sales", [NUMBER_B])
    resolution = telephony.resolve_numbers(target(numbers=(NUMBER_A, NUMBER_B)), [other], [])
    assert resolution.in_service == (NUMBER_A,)
    assert [c.number for c in resolution.conflicts] == [NUMBER_B]


# --- condition and status -------------------------------------------------------------------


def test_condition_when_provisioned_names_numbers_and_ids() -> None:
    result = ProvisionResult("ST_1", "SDR_1", (NUMBER_A,))
    condition = telephony.ready_condition(result, "tenant-a--support")
    assert (condition.status, condition.reason) == ("True", "Provisioned")
    assert NUMBER_A in condition.message and "ST_1" in condition.message
    assert "SDR_1" in condition.message
    assert result.status() == {"trunkID": "ST_1", "dispatchRuleID": "SDR_1", "numbers": [NUMBER_A]}


def test_condition_on_conflict_names_the_number_and_holder() -> None:
    conflict = NumberConflict(NUMBER_A, "VoiceAgent tenant-b/sales (SIP trunk ST_b)")
    result = ProvisionResult(None, None, (), (conflict,))
    condition = telephony.ready_condition(result, "d")
    assert (condition.status, condition.reason) == ("False", "NumberConflict")
    assert f"{NUMBER_A} is already served by VoiceAgent tenant-b/sales" in condition.message
    assert "no number in service" in condition.message
    assert result.status() == {"trunkID": None, "dispatchRuleID": None, "numbers": []}


def test_condition_without_numbers() -> None:
    condition = telephony.ready_condition(ProvisionResult(None, None, ()), "d")
    assert (condition.status, condition.reason) == ("True", "NoNumbers")


def test_error_condition_says_when_it_retries() -> None:
    error = telephony.TelephonyError("LiveKit SIP API: list SIP inbound trunks failed: boom")
    condition = telephony.error_condition(error, 20)
    assert (condition.status, condition.reason) == ("False", "LiveKitError")
    assert condition.message.endswith("boom; retrying in 20s")


def test_retry_delay_backs_off_and_caps() -> None:
    delays = [telephony.retry_delay(n) for n in range(10)]
    assert delays[:4] == [5.0, 10.0, 20.0, 40.0]
    assert delays == sorted(delays)
    assert max(delays) == 300.0
    assert telephony.retry_delay(10_000) == 300.0


def test_auth_secret_errors_name_the_missing_key() -> None:
    auth = telephony.read_auth_secret({"username": "u", "password": "p"}, "sip-auth")
    assert auth == SipAuth("u", "p")
    with pytest.raises(ValueError, match=r"authSecretRef: Secret 'sip-auth' has no .*'password'"):
        telephony.read_auth_secret({"username": "u"}, "sip-auth")


# --- what the kopf glue decides from a VoiceAgent body --------------------------------------


def body(spec: dict[str, object], status: dict[str, object] | None = None, **meta: object) -> dict:
    metadata = {
        "namespace": "tenant-a",
        "name": "support",
        "creationTimestamp": "2025-01-02T03:04:05Z",
        **meta,
    }
    return {"metadata": metadata, "spec": spec, "status": status or {}}


def test_claim_of_a_voiceagent_with_numbers() -> None:
    claim = telephony_handlers.claim_of(body({"telephony": {"numbers": [NUMBER_A, NUMBER_B]}}))
    assert claim == Claim("tenant-a", "support", "2025-01-02T03:04:05Z", (NUMBER_A, NUMBER_B))


def test_no_claim_without_numbers_or_while_deleting() -> None:
    assert telephony_handlers.claim_of(body({})) is None
    assert telephony_handlers.claim_of(body({"telephony": {"numbers": []}})) is None
    deleting = body(
        {"telephony": {"numbers": [NUMBER_A]}}, deletionTimestamp="2025-02-01T00:00:00Z"
    )
    assert telephony_handlers.claim_of(deleting) is None


def test_finalizer_needed_while_numbers_are_asked_for_or_still_provisioned() -> None:
    assert telephony_handlers.has_telephony(body({"telephony": {"numbers": [NUMBER_A]}}))
    # Numbers removed from the spec, trunk not yet deleted: the finalizer must stay.
    leftover = body({}, {"telephony": {"trunkID": "ST_1", "dispatchRuleID": None, "numbers": []}})
    assert telephony_handlers.has_telephony(leftover)
    assert not telephony_handlers.has_telephony(body({}))
    assert not telephony_handlers.has_telephony(body({}, {"telephony": None}))


# --- what the mutation run found unguarded (issue 18) ---------------------------------------


def test_condition_messages_in_full() -> None:
    provisioned = telephony.ready_condition(
        ProvisionResult("ST_1", "SDR_1", (NUMBER_A, NUMBER_B)), "tenant-a--support"
    )
    assert provisioned.message == (
        f"{NUMBER_A}, {NUMBER_B} dispatched to agent 'tenant-a--support' "
        "(SIP trunk ST_1, dispatch rule SDR_1)"
    )
    assert telephony.ready_condition(ProvisionResult(None, None, ()), "d").message == (
        "spec.telephony.numbers is empty: no SIP trunk is needed"
    )
    first = NumberConflict(NUMBER_A, "VoiceAgent tenant-b/sales (SIP trunk ST_b)")
    second = NumberConflict(NUMBER_B, "VoiceAgent tenant-c/desk (SIP trunk ST_c)")
    partial = telephony.ready_condition(
        ProvisionResult("ST_1", "SDR_1", ("+15551230003", "+15551230004"), (first, second)), "d"
    )
    assert partial.message == (
        f"{first.describe()}; {second.describe()} (the first claimant keeps a number); "
        "serving +15551230003, +15551230004"
    )
    none_left = telephony.ready_condition(ProvisionResult(None, None, (), (first,)), "d")
    assert none_left.message == (
        f"{first.describe()} (the first claimant keeps a number); no number in service"
    )


def test_trunk_and_rule_differ_on_each_field_alone() -> None:
    desired = telephony.render_inbound_trunk(target(auth=SipAuth("u", "p")))
    for field, value in (("name", "other"), ("metadata", "{}"), ("auth_username", "x")):
        existing = SIPInboundTrunkInfo()
        existing.CopyFrom(desired)
        setattr(existing, field, value)
        assert telephony.trunk_differs(existing, desired), field

    rule = telephony.render_dispatch_rule(target(), "ST_1")
    for change in ("name", "metadata", "attributes", "room_config", "rule", "inbound_numbers"):
        existing_rule = telephony.render_dispatch_rule(target(), "ST_1")
        if change in ("name", "metadata"):
            setattr(existing_rule, change, "other")
        elif change == "attributes":
            existing_rule.attributes["extra"] = "1"
        elif change == "room_config":
            existing_rule.room_config.agents.add(agent_name="someone-else")
        elif change == "rule":
            existing_rule.rule.dispatch_rule_individual.room_prefix = "elsewhere-"
        else:
            existing_rule.inbound_numbers.append(NUMBER_B)
        assert telephony.rule_differs(existing_rule, rule), change


def test_claim_precedence_reads_utc_timestamps() -> None:
    early = target(created="2025-01-02T03:04:05Z").claim
    late = target(namespace="tenant-b", created="2025-01-02T03:04:06+00:00").claim
    assert early.precedence < late.precedence
    assert early.precedence[0].utcoffset() is not None


def test_a_number_without_digits_is_left_as_written() -> None:
    assert telephony.normalize_number("ext") == "ext"


def test_the_error_names_every_missing_key() -> None:
    with pytest.raises(ValueError, match=r"no non-empty key 'username', 'password'; add it"):
        telephony.read_auth_secret({}, "sip-auth")


def test_retry_delay_stays_capped_for_huge_retry_counts() -> None:
    assert telephony.retry_delay(17) == telephony.retry_delay(16) == 300.0


def test_own_trunk_does_not_hide_the_trunks_after_it() -> None:
    # LiveKit lists trunks in any order; ours (ST_a) sorts first, a foreign one holds NUMBER_B.
    mine = foreign_trunk("ST_a", "voicefleet:tenant-a/support", [NUMBER_A])
    other = foreign_trunk("ST_b", "voicefleet:tenant-b/sales", [NUMBER_B])
    resolution = telephony.resolve_numbers(target(numbers=(NUMBER_A, NUMBER_B)), [other, mine], [])
    assert resolution.in_service == (NUMBER_A,)
    assert resolution.conflicts == (
        NumberConflict(NUMBER_B, "VoiceAgent tenant-b/sales (SIP trunk ST_b)"),
    )


def test_a_number_written_twice_is_resolved_once() -> None:
    # The same number with and without '+', then another: one line each in the result.
    resolution = telephony.resolve_numbers(
        target(numbers=(NUMBER_A, NUMBER_A.lstrip("+"), NUMBER_B)), [], []
    )
    assert resolution.in_service == (NUMBER_A, NUMBER_B)
    held = foreign_trunk("ST_b", "voicefleet:tenant-b/sales", [NUMBER_A])
    conflicted = telephony.resolve_numbers(
        target(numbers=(NUMBER_A, NUMBER_A.lstrip("+"))), [held], []
    )
    assert [c.number for c in conflicted.conflicts] == [NUMBER_A]
