"""spec.callRecords, operator side: validation, the rendered runtime config (no secret), the
signing key through the pod's environment, the spool volume, and ConfigValid problems naming
the field when the signing Secret or its key is missing."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest
import yaml
from voicefleet_operator import handlers, render
from voicefleet_operator.api import SpecError, parse_spec
from voicefleet_operator.render import VoiceAgentRef
from voicefleet_operator.settings import PlatformSettings
from voicefleet_runtime import delivery

SETTINGS = PlatformSettings(
    livekit_url="ws://livekit.voicefleet-system.svc:7880",
    livekit_secret_namespace="voicefleet-system",
    runtime_image="voicefleet/runtime:0.1.0",
)
LIVEKIT_DATA = {
    "LIVEKIT_API_KEY": base64.b64encode(b"devkey").decode(),
    "LIVEKIT_API_SECRET": base64.b64encode(b"not-a-real-secret").decode(),
}
REF = VoiceAgentRef(name="support", namespace="acme", uid="0b3c1f7e-1111-4222-8333-444455556666")
SIGNING_KEY = "whsec-do-not-render-me"

SPEC: dict[str, Any] = {
    "agents": [{"name": "assistant", "instructions": "Be helpful and brief."}],
    "entry": "assistant",
    "pipeline": {
        "stt": {"provider": "openai", "model": "gpt-4o-transcribe"},
        "llm": {"provider": "openai"},
        "tts": {"provider": "openai", "voice": "alloy"},
    },
    "secretRefs": [{"name": "openai"}],
    "callRecords": {
        "webhook": {
            "url": "https://crm.example.com/voicefleet/calls",
            "timeoutSeconds": 5,
            "signingSecretRef": {"name": "records", "key": "signing-key"},
        }
    },
}


def spec_with(**webhook: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    spec["callRecords"]["webhook"].update(webhook)
    return {k: v for k, v in spec.items()}


def rendered(spec: dict[str, Any]) -> render.Rendered:
    return render.render_all(
        REF,
        parse_spec(spec),
        SETTINGS,
        livekit_data=LIVEKIT_DATA,
        secrets_hash="0123456789abcdef",
        replicas=1,
    )


def test_runtime_config_names_the_signing_key_variable_not_its_value() -> None:
    result = rendered(SPEC)
    env_var = render.header_env_var("records", "signing-key")
    webhook = result.config.records_webhook
    assert webhook is not None
    assert webhook.url == "https://crm.example.com/voicefleet/calls"
    assert webhook.timeout_seconds == 5 and webhook.retry_for_seconds == 3600
    assert webhook.signing_key_from_env == env_var
    text = result.child("ConfigMap")["data"]["config.yaml"]
    assert yaml.safe_load(text)["callRecords"]["webhook"]["signingKeyFromEnv"] == env_var
    assert "signingSecretRef" not in text and SIGNING_KEY not in text


def test_workers_get_the_signing_key_from_the_secret_and_a_spool_volume() -> None:
    deployment = rendered(SPEC).child("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    variable = render.header_env_var("records", "signing-key")
    key_env = env[variable]
    assert key_env["valueFrom"] == {"secretKeyRef": {"name": "support-secrets", "key": variable}}
    # The spool: the same variable the runtime reads, on an emptyDir volume.
    assert render.SPOOL_DIR_ENV == delivery.SPOOL_DIR_ENV
    assert env[render.SPOOL_DIR_ENV]["value"] == render.SPOOL_DIR
    assert {"name": "spool", "mountPath": render.SPOOL_DIR} in container["volumeMounts"]
    assert {"name": "spool", "emptyDir": {}} in pod["volumes"]


def test_no_call_records_no_spool_and_no_config_section() -> None:
    spec = copy.deepcopy(SPEC)
    del spec["callRecords"]
    result = rendered(spec)
    assert result.config.records_webhook is None
    assert "callRecords" not in result.child("ConfigMap")["data"]["config.yaml"]
    pod = result.child("Deployment")["spec"]["template"]["spec"]
    assert all(v["name"] != "spool" for v in pod["volumes"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"url": "ftp://crm.example.com/calls"}, "spec.callRecords.webhook.url"),
        ({"url": "crm.example.com"}, "spec.callRecords.webhook.url"),
        ({"timeoutSeconds": 0}, "spec.callRecords.webhook.timeoutSeconds"),
        (
            {"signingSecretRef": {"name": "records"}},
            "spec.callRecords.webhook.signingSecretRef.key",
        ),
    ],
)
def test_bad_webhooks_are_refused_naming_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message.replace(".", r"\.")):
        parse_spec(spec_with(**change))


def test_a_webhook_without_signing_secret_is_refused() -> None:
    spec = copy.deepcopy(SPEC)
    del spec["callRecords"]["webhook"]["signingSecretRef"]
    with pytest.raises(SpecError, match=r"spec\.callRecords\.webhook\.signingSecretRef"):
        parse_spec(spec)


class Secrets:
    """Kube.get for Secrets only, from a dict {name: data}."""

    def __init__(self, secrets: dict[str, dict[str, str]]) -> None:
        self.secrets = secrets

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        assert kind == "Secret"
        data = self.secrets.get(name)
        return {"data": data} if data is not None else None


@pytest.mark.parametrize(
    ("secrets", "reason", "field"),
    [
        ({}, "SecretNotFound", "spec.callRecords.webhook.signingSecretRef.name"),
        (
            {"records": {"other": "eA=="}},
            "SecretKeyNotFound",
            "spec.callRecords.webhook.signingSecretRef.key",
        ),
    ],
)
async def test_missing_signing_secret_or_key_is_a_problem_naming_the_field(
    secrets: dict[str, dict[str, str]], reason: str, field: str
) -> None:
    kube = Secrets({"openai": {"OPENAI_API_KEY": "eA=="}, **secrets})
    _, problems = await handlers.check_secrets(kube, "acme", parse_spec(SPEC))  # type: ignore[arg-type]
    assert [(p.reason, p.message.split(":")[0]) for p in problems] == [(reason, field)]


RECORDING = {
    "endpoint": "https://s3.eu-west-1.amazonaws.com",
    "bucket": "acme-calls",
    "prefix": "calls/",
    "credentialsSecretRef": {"name": "recordings"},
}


def test_recording_credentials_reach_the_workers_through_the_environment() -> None:
    spec = copy.deepcopy(SPEC)
    spec["callRecords"]["recording"] = RECORDING
    result = rendered(spec)
    storage = result.config.recording
    assert storage is not None and storage.bucket == "acme-calls" and storage.prefix == "calls/"
    access = render.header_env_var("recordings", "accessKeyId")
    secret = render.header_env_var("recordings", "secretAccessKey")
    assert (storage.access_key_id_from_env, storage.secret_access_key_from_env) == (access, secret)
    assert "credentialsSecretRef" not in result.child("ConfigMap")["data"]["config.yaml"]
    [container] = result.child("Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    # From the worker namespace's copy of the tenant's Secret (render_tenant_secret).
    assert env[access]["valueFrom"] == {"secretKeyRef": {"name": "support-secrets", "key": access}}
    assert env[secret]["valueFrom"] == {"secretKeyRef": {"name": "support-secrets", "key": secret}}


def test_recording_without_a_webhook_needs_no_spool() -> None:
    spec = copy.deepcopy(SPEC)
    spec["callRecords"] = {"recording": RECORDING}
    result = rendered(spec)
    assert result.config.records_webhook is None and result.config.recording is not None
    pod = result.child("Deployment")["spec"]["template"]["spec"]
    assert all(v["name"] != "spool" for v in pod["volumes"])


async def test_missing_recording_credential_is_a_problem_naming_the_field() -> None:
    spec = copy.deepcopy(SPEC)
    spec["callRecords"]["recording"] = RECORDING
    kube = Secrets(
        {
            "openai": {"OPENAI_API_KEY": "eA=="},
            "records": {"signing-key": "eA=="},
            "recordings": {"accessKeyId": "eA=="},
        }
    )
    _, problems = await handlers.check_secrets(kube, "acme", parse_spec(spec))  # type: ignore[arg-type]
    assert [(p.reason, p.message.split(":")[0]) for p in problems] == [
        ("SecretKeyNotFound", "spec.callRecords.recording.credentialsSecretRef.key")
    ]
    assert "secretAccessKey" in problems[0].message


def test_a_recording_bucket_must_be_a_bucket_name() -> None:
    spec = copy.deepcopy(SPEC)
    spec["callRecords"]["recording"] = {**RECORDING, "bucket": "Not A Bucket"}
    with pytest.raises(SpecError, match=r"spec\.callRecords\.recording\.bucket"):
        parse_spec(spec)


def test_the_record_schema_is_a_contract_module_pydantic_only() -> None:
    """The operator's generator documents the record from voicefleet_runtime.callrecords, so that
    module, like the config contract, must not pull livekit-agents into the operator image."""
    import ast
    from pathlib import Path

    from voicefleet_runtime import callrecords

    tree = ast.parse(Path(callrecords.__file__).read_text())
    imported = {
        alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names
    }
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    roots = {name.split(".")[0] for name in imported}
    assert roots <= {"__future__", "datetime", "hashlib", "hmac", "math", "typing", "pydantic"}
