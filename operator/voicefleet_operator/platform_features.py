"""What a VoiceAgent may use on this platform's kind of LiveKit (settings.livekit_cloud).

Enhanced noise cancellation (spec.pipeline.noiseCancellation.mode `bvc`, `bvc-telephony`) runs
in the worker (livekit-plugins-noise-cancellation ships the models and a native filter), but the
filter asks the LiveKit server whether the connection may use it. Measured with
livekit-plugins-noise-cancellation 0.3.2 against a self-hosted livekit-server 1.13.5: the
server answers 404, the filter logs `noise cancellation is not authorized for this connection`
(status=404) and `noise cancellation unavailable` for every audio stream, and the caller's audio
goes through unfiltered (tests/integration/test_noise_cancellation.py). So on a self-hosted
LiveKit the mode would silently do nothing; the operator refuses it (ConfigValid=False naming
the field) unless the platform says its LiveKit is LiveKit Cloud (Helm value livekit.cloud).
"""

from __future__ import annotations

from voicefleet_operator.api import VoiceAgentSpec
from voicefleet_operator.settings import PlatformSettings

CLOUD_ONLY_NOISE_CANCELLATION = ("bvc", "bvc-telephony")


def platform_problems(spec: VoiceAgentSpec, settings: PlatformSettings) -> list[str]:
    """One message per field that asks for what this platform's LiveKit does not serve."""
    mode = spec.pipeline.noise_cancellation.mode
    if mode in CLOUD_ONLY_NOISE_CANCELLATION and not settings.livekit_cloud:
        return [
            f"spec.pipeline.noiseCancellation.mode: {mode!r} needs LiveKit Cloud (its enhanced "
            "noise cancellation asks the LiveKit server for authorization, which a self-hosted "
            "livekit-server refuses: the audio would go through unfiltered); this platform's "
            "LiveKit is self-hosted (Helm value livekit.cloud: false); use mode none"
        ]
    return []


def platform_warnings(spec: VoiceAgentSpec, settings: PlatformSettings) -> list[str]:
    """What a spec asks for that this platform gives in a lesser form: posted as Warning Events,
    the VoiceAgent still runs."""
    if spec.overflow.hold_message and not settings.desk_url:
        return [
            "spec.overflow.holdMessage: this platform runs no desk (Helm desk.enabled: false), so "
            "a caller held while the fleet wakes hears ringing, not the message; ask the "
            "platform team to enable the desk, or remove the field"
        ]
    return []
