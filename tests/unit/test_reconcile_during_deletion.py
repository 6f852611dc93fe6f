"""A reconcile that fails because its VoiceAgent is being deleted (the tenant's worker namespace
terminating under it) is the deletion's doing: no ApplyFailed status, no error counted. Any other
failure is reported."""

from __future__ import annotations

import asyncio

from voicefleet_operator import handlers, metrics, render
from voicefleet_operator.api import CONDITION_CONFIG_VALID, CONDITION_RECONCILED
from voicefleet_operator.status import ConditionUpdate, find_condition

from tests.unit.test_operator_lean import CountingKube, make_context, voiceagent

TERMINATING = (
    'applying ConfigMap "support-config" failed: 403 Forbidden: unable to create new content '
    "in namespace vf-acme because it is being terminated"
)


def not_reconciled(kube: CountingKube) -> handlers.Outcome:
    ctx = make_context(kube)
    ref = render.VoiceAgentRef("support", "acme", "uid-1")
    valid = ConditionUpdate.true(CONDITION_CONFIG_VALID, "Valid", "the configuration is valid")
    status_of = {"generation": 1, "observed_generation": 1, "uid": "uid-1"}
    return asyncio.run(
        handlers._not_reconciled(ctx, ref, status_of, valid, "ApplyFailed", TERMINATING)
    )


def errors_counted() -> float:
    labels = {"tenant": "acme", "agent": "support", "reason": "ApplyFailed"}
    value = metrics.REGISTRY.get_sample_value("voicefleet_operator_reconcile_errors_total", labels)
    return value or 0.0


def test_a_failure_while_the_voiceagent_is_being_deleted_is_not_reported() -> None:
    kube = CountingKube()
    deleting = voiceagent()
    deleting["metadata"]["deletionTimestamp"] = "2026-11-30T11:44:00Z"
    kube.add(deleting)
    before = errors_counted()
    assert not_reconciled(kube) == handlers.Outcome(False, "Gone")
    assert ("patch", "VoiceAgent") not in kube.calls
    assert errors_counted() == before

    kube = CountingKube()  # already gone
    assert not_reconciled(kube) == handlers.Outcome(False, "Gone")
    assert ("patch", "VoiceAgent") not in kube.calls


def test_a_failure_of_a_live_voiceagent_is_in_its_status() -> None:
    kube = CountingKube()
    kube.add(voiceagent())
    before = errors_counted()
    assert not_reconciled(kube) == handlers.Outcome(False, "ApplyFailed")
    status = kube.objects[("VoiceAgent", "acme", "support")]["status"]
    reconciled = find_condition(status["conditions"], CONDITION_RECONCILED) or {}
    assert (reconciled.get("status"), reconciled.get("reason")) == ("False", "ApplyFailed")
    assert "being terminated" in reconciled.get("message", "")
    assert errors_counted() == before + 1
