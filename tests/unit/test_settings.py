"""Platform settings from the operator's environment (what the Helm chart sets)."""

from __future__ import annotations

import pytest
from voicefleet_operator.settings import PlatformSettings, SettingsError

BASE = {
    "VOICEFLEET_LIVEKIT_URL": "wss://livekit.example.com",
    "VOICEFLEET_RUNTIME_IMAGE": "voicefleet/runtime:0.1.0",
    "POD_NAMESPACE": "voicefleet-system",
}


def test_defaults_and_operator_namespace() -> None:
    settings = PlatformSettings.from_environment(BASE)
    assert settings.livekit_secret_namespace == "voicefleet-system"
    assert settings.livekit_secret_name == "voicefleet-livekit"
    assert settings.watch_namespaces == ()
    assert settings.log_level == "INFO"
    assert settings.effective_livekit_api_url == "https://livekit.example.com"


def test_every_setting_from_its_variable() -> None:
    settings = PlatformSettings.from_environment(
        {
            **BASE,
            "VOICEFLEET_LIVEKIT_API_URL": "http://livekit.internal:7880",
            "VOICEFLEET_LIVEKIT_SECRET_NAME": "lk",
            "VOICEFLEET_LIVEKIT_SECRET_NAMESPACE": "platform",
            "VOICEFLEET_RUNTIME_IMAGE_PULL_POLICY": "Never",
            "VOICEFLEET_WATCH_NAMESPACES": "acme, globex,,",
            "VOICEFLEET_LOG_LEVEL": "DEBUG",
            "VOICEFLEET_RESYNC_SECONDS": "30",
            "VOICEFLEET_RECHECK_INVALID_SECONDS": "2",
            "VOICEFLEET_LIVENESS_PORT": "8081",
            "VOICEFLEET_METRICS_PORT": "0",
        }
    )
    assert settings.livekit_secret_name == "lk"
    assert settings.livekit_secret_namespace == "platform"
    assert settings.watch_namespaces == ("acme", "globex")
    assert settings.runtime_image_pull_policy == "Never"
    assert settings.effective_livekit_api_url == "http://livekit.internal:7880"
    assert (settings.resync_seconds, settings.recheck_invalid_seconds) == (30.0, 2.0)
    assert (settings.liveness_port, settings.metrics_port) == (8081, 0)


def test_errors_name_the_variable() -> None:
    with pytest.raises(SettingsError) as error:
        PlatformSettings.from_environment({"VOICEFLEET_LIVEKIT_URL": "livekit:7880"})
    text = str(error.value)
    assert "VOICEFLEET_LIVEKIT_URL" in text
    assert "VOICEFLEET_RUNTIME_IMAGE: is required" in text
    assert "VOICEFLEET_LIVEKIT_SECRET_NAMESPACE: is required" in text and "POD_NAMESPACE" in text


def test_leader_election_settings() -> None:
    settings = PlatformSettings.from_environment(BASE)
    assert not settings.leader_election  # one process, as in tests and `python -m` by hand
    assert settings.effective_lease_namespace == "voicefleet-system"  # POD_NAMESPACE
    elected = PlatformSettings.from_environment(
        {
            **BASE,
            "VOICEFLEET_LEADER_ELECTION": "true",
            "VOICEFLEET_LEASE_NAME": "vf-voicefleet",
            "VOICEFLEET_LEASE_SECONDS": "8",
            "VOICEFLEET_LEASE_RENEW_SECONDS": "5",
            "VOICEFLEET_LEASE_RETRY_SECONDS": "1",
        }
    )
    assert elected.leader_election and elected.lease_name == "vf-voicefleet"
    assert (elected.lease_seconds, elected.lease_renew_seconds) == (8.0, 5.0)
    with pytest.raises(SettingsError) as error:
        PlatformSettings.from_environment({**BASE, "VOICEFLEET_LEASE_RENEW_SECONDS": "20"})
    assert "VOICEFLEET_LEASE_RENEW_SECONDS < VOICEFLEET_LEASE_SECONDS" in str(error.value)
