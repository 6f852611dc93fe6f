"""Which Secrets a VoiceAgent names (the index the Secret watch looks rotations up in)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from voicefleet_operator.secret_watch import referenced_secrets

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "voiceagent.yaml"


def example_spec() -> dict[str, Any]:
    return dict(copy.deepcopy(yaml.safe_load(EXAMPLE.read_text())["spec"]))


def test_secret_refs_and_header_secret_key_refs_are_named() -> None:
    spec = example_spec()
    spec["secretRefs"] = [{"name": "provider-keys"}]
    # the example's order-lookup tool sends a header from Secret acme-orders-api
    assert referenced_secrets(spec) == {"provider-keys", "acme-orders-api"}
    for agent in spec["agents"]:
        agent.pop("tools", None)
    spec.pop("tools", None)
    assert referenced_secrets(spec) == {"provider-keys"}


def test_an_invalid_spec_still_names_its_secret_refs() -> None:
    # The Secret a tenant is about to create is often what the VoiceAgent waits for.
    spec = {"secretRefs": [{"name": "provider-keys"}, {"bogus": 1}], "agents": "not a list"}
    assert referenced_secrets(spec) == {"provider-keys"}
    assert referenced_secrets({}) == set()
