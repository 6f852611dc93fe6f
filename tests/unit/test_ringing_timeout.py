"""The SIP trunk bounds how long a call rings when no agent joins (no worker registered)."""

from __future__ import annotations

import dataclasses

from voicefleet_operator import telephony
from voicefleet_operator.telephony import RINGING_TIMEOUT_SECONDS, TelephonyTarget


def target() -> TelephonyTarget:
    return TelephonyTarget(
        namespace="acme",
        name="support",
        created="2025-01-01T00:00:00Z",
        dispatch_name="acme--support",
        numbers=("+15551230001",),
    )


def test_the_trunk_rings_for_a_bounded_time() -> None:
    trunk = telephony.render_inbound_trunk(target())
    assert trunk.ringing_timeout.seconds == RINGING_TIMEOUT_SECONDS == 30


def test_a_trunk_with_livekits_default_ringing_is_updated() -> None:
    desired = telephony.render_inbound_trunk(target())
    existing = telephony.render_inbound_trunk(target())
    existing.ClearField("ringing_timeout")  # created before the bound: livekit-sip's 3 minutes
    assert telephony.trunk_differs(existing, desired)
    assert not telephony.trunk_differs(telephony.render_inbound_trunk(target()), desired)


def test_a_platform_waking_fleets_for_longer_rings_longer() -> None:
    """The trunk rings 5 s longer than the operator holds a waking fleet's caller (wake.py),
    never less than the 30 s bound."""
    assert telephony.ringing_timeout_for(25) == RINGING_TIMEOUT_SECONDS
    assert telephony.ringing_timeout_for(60) == 65
    assert telephony.ringing_timeout_for(60.2) == 66
    longer = dataclasses.replace(target(), ringing_timeout_seconds=65)
    assert telephony.render_inbound_trunk(longer).ringing_timeout.seconds == 65
    assert telephony.trunk_differs(
        telephony.render_inbound_trunk(target()), telephony.render_inbound_trunk(longer)
    )
