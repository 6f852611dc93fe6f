"""Worker images: the operator's rule (image_policy) and the chart's admission policy."""

from __future__ import annotations

from typing import Any

import pytest
from voicefleet_operator import image_policy
from voicefleet_operator.api import parse_spec
from voicefleet_operator.settings import PlatformSettings, SettingsError
from voicefleet_testkit import observability

DIGEST = "sha256:" + "0f" * 32
SETTINGS = PlatformSettings(
    livekit_url="ws://livekit.example:7880",
    livekit_secret_namespace="voicefleet-system",
    runtime_image="voicefleet/runtime:0.1.0",
    allowed_image_repositories=("registry.example:5000/voice/runtime",),
    allowed_image_digests=(DIGEST,),
)
SPEC: dict[str, Any] = {
    "agents": [{"name": "a", "instructions": "Be brief."}],
    "entry": "a",
    "pipeline": {"llm": {"provider": "openai"}},
}


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("voicefleet/runtime:0.1.0", True),
        ("voicefleet/runtime:0.2.0", False),
        ("registry.example:5000/voice/runtime", True),
        ("registry.example:5000/voice/runtime:v7", True),
        (f"registry.example:5000/voice/runtime@{DIGEST}", True),
        ("registry.example:5000/voice/runtime2:v7", False),
        ("registry.example:5000/voice/runtime-x@sha256:" + "00" * 32, False),
        (f"anywhere.example/some/image@{DIGEST}", True),
        (f"anywhere.example/some/image:{DIGEST}", False),
    ],
)
def test_image_allowed(image: str, allowed: bool) -> None:
    assert image_policy.image_allowed(image, SETTINGS) is allowed


def test_problem_names_the_field_and_the_allowed_images() -> None:
    assert image_policy.image_problems(parse_spec(SPEC), SETTINGS) == []
    spec = parse_spec({**SPEC, "worker": {"image": "evil.example/miner:1"}})
    (problem,) = image_policy.image_problems(spec, SETTINGS)
    assert problem.startswith("spec.worker.image: 'evil.example/miner:1' is not an image")
    assert "voicefleet/runtime:0.1.0" in problem and DIGEST in problem


def test_digests_must_be_digests() -> None:
    environ = {
        "VOICEFLEET_LIVEKIT_URL": "ws://lk:7880",
        "VOICEFLEET_RUNTIME_IMAGE": "img",
        "VOICEFLEET_LIVEKIT_SECRET_NAMESPACE": "p",
        "VOICEFLEET_ALLOWED_IMAGE_DIGESTS": "sha256:abc",
    }
    with pytest.raises(SettingsError, match="VOICEFLEET_ALLOWED_IMAGE_DIGESTS"):
        PlatformSettings.from_environment(environ)


def _policy(*set_args: str) -> tuple[dict[str, Any], dict[str, Any]]:
    docs = observability.render_chart(*set_args)
    policy = next(d for d in docs if d["kind"] == "ValidatingAdmissionPolicy")
    binding = next(d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding")
    return policy, binding


def test_chart_policy_carries_the_allow_list_and_serves_only_watched_namespaces() -> None:
    policy, binding = _policy(
        "--set", "watchNamespaces={acme,globex}",
        "--set", "runtime.allowedImages.repositories={registry.example/voice/runtime}",
        "--set", f"runtime.allowedImages.digests={{{DIGEST}}}",
    )  # fmt: skip
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    assert variables["repositories"] == '["registry.example/voice/runtime"]'
    assert variables["digests"] == f'["{DIGEST}"]'
    assert variables["runtimeImage"].startswith('"voicefleet/runtime:')
    assert policy["spec"]["failurePolicy"] == "Fail"
    rule = policy["spec"]["matchConstraints"]["resourceRules"][0]
    assert rule["resources"] == ["voiceagents"] and rule["operations"] == ["CREATE", "UPDATE"]
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    expression = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]
    assert expression["values"] == ["acme", "globex"]


def test_chart_policy_defaults_and_switch() -> None:
    policy, binding = _policy()
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    assert variables["repositories"] == "[]" and variables["digests"] == "[]"
    assert "matchResources" not in binding["spec"]  # every namespace when all are served
    docs = observability.render_chart("--set", "runtime.allowedImages.admissionPolicy=false")
    assert not [d for d in docs if d["kind"].startswith("ValidatingAdmissionPolicy")]
