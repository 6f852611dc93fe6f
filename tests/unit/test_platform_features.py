"""Cloud-only features: the platform setting and the operator's refusal naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from voicefleet_operator.api import parse_spec
from voicefleet_operator.platform_features import platform_problems, platform_warnings
from voicefleet_operator.settings import PlatformSettings

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "voiceagent.yaml"
BASE = {
    "VOICEFLEET_LIVEKIT_URL": "ws://lk:7880",
    "VOICEFLEET_RUNTIME_IMAGE": "r:1",
    "POD_NAMESPACE": "p",
}


def spec_with_noise_cancellation(mode: str) -> Any:
    spec: dict[str, Any] = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text())["spec"])
    spec["pipeline"]["noiseCancellation"] = {"mode": mode}
    return parse_spec(spec)


def test_the_platform_is_self_hosted_unless_it_says_otherwise() -> None:
    assert PlatformSettings.from_environment(BASE).livekit_cloud is False
    cloud = PlatformSettings.from_environment({**BASE, "VOICEFLEET_LIVEKIT_CLOUD": "true"})
    assert cloud.livekit_cloud is True


@pytest.mark.parametrize("mode", ["bvc", "bvc-telephony"])
def test_enhanced_noise_cancellation_needs_livekit_cloud(mode: str) -> None:
    spec = spec_with_noise_cancellation(mode)
    [problem] = platform_problems(spec, PlatformSettings.from_environment(BASE))
    assert problem.startswith(f"spec.pipeline.noiseCancellation.mode: {mode!r} needs LiveKit Cloud")
    assert "livekit.cloud" in problem and "use mode none" in problem
    cloud = PlatformSettings.from_environment({**BASE, "VOICEFLEET_LIVEKIT_CLOUD": "true"})
    assert platform_problems(spec, cloud) == []


def test_no_noise_cancellation_is_fine_anywhere() -> None:
    spec = spec_with_noise_cancellation("none")
    assert platform_problems(spec, PlatformSettings.from_environment(BASE)) == []


def test_a_holding_message_without_the_platform_desk_is_a_warning_naming_the_field() -> None:
    spec: dict[str, Any] = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text())["spec"])
    spec["overflow"] = {"holdMessage": "One moment please."}
    parsed = parse_spec(spec)
    without_desk = PlatformSettings.from_environment(BASE)
    (warning,) = platform_warnings(parsed, without_desk)
    assert warning.startswith("spec.overflow.holdMessage: this platform runs no desk")
    assert "desk.enabled" in warning
    with_desk = PlatformSettings.from_environment(
        BASE | {"VOICEFLEET_DESK_URL": "http://vf-desk.voicefleet-system.svc:8095"}
    )
    assert platform_warnings(parsed, with_desk) == []
    assert platform_problems(parsed, without_desk) == []  # it still runs
    spec.pop("overflow")
    assert platform_warnings(parse_spec(spec), without_desk) == []
