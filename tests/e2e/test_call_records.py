"""Call records and recordings on the full stack: the chart's operator renders spec.callRecords
into worker pods (signing key and bucket credentials from the tenant's Secrets, the spool on an
emptyDir, read-only root filesystem, restricted pod security), a WebRTC caller talks to the
agent, and

- the tenant's receiver (a host process pods reach) gets the call's record, signed with the
  Secret's key, and the recording is in the bucket of the local S3 server (versitygw);
- a worker pod deleted as its call ends (SIGTERM), with the receiver refusing the first attempt,
  still delivers the record before it goes.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from voicefleet_localdev import chart, paths
from voicefleet_localdev.livekit import S3_PORT, LiveKitEndpoint, S3Endpoint
from voicefleet_localdev.pytest_plugin import ClusterHandle, installed_chart
from voicefleet_operator import render
from voicefleet_operator.render import dispatch_name
from voicefleet_runtime.admission import DEFAULT_OVERFLOW_MESSAGE
from voicefleet_runtime.callrecords import verify
from voicefleet_runtime.config import CallRecordingConfig
from voicefleet_runtime.recording import get_object
from voicefleet_testkit.participant import TestParticipant, participant_token
from voicefleet_testkit.providers import LLMReply, ProviderServer, pointed_at
from voicefleet_testkit.records import RecordReceiver as Receiver
from voicefleet_testkit.s3 import create_bucket
from voicefleet_testkit.waiting import wait_for, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2700)]

AGENT = "records"
GREETING = "Hello, this is the call records test."
QUESTION = "Do you keep a record of this call?"
ANSWER = "Yes, every call leaves a record."
EXAMPLE_PIPELINE = yaml.safe_load((paths.REPO_ROOT / "examples" / "voiceagent.yaml").read_text())[
    "spec"
]["pipeline"]
SIGNING_KEY = "whsec-e2e-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def namespaces(cluster_with_node: ClusterHandle) -> Iterator[tuple[str, str]]:
    """(platform namespace, tenant namespace); the tenant enforces the restricted PSS."""
    suffix = secrets.token_hex(3)
    platform, tenant = f"vf-rec-system-{suffix}", f"rec-{suffix}"
    for namespace in (platform, tenant):
        cluster_with_node.kubectl("create", "namespace", namespace)
    cluster_with_node.kubectl(
        "label", "namespace", tenant, "pod-security.kubernetes.io/enforce=restricted"
    )
    yield platform, tenant
    for namespace in (tenant, platform):
        with contextlib.suppress(AssertionError):
            cluster_with_node.kubectl("delete", "namespace", namespace, "--wait=false")


@pytest.fixture(scope="module")
def release(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    project_images: dict[str, str],
    namespaces: tuple[str, str],
) -> Iterator[str]:
    """The chart, serving only the tenant; the CRD of this checkout applied first (server-side,
    taking it over from whoever applied an older one on the shared cluster)."""
    platform, tenant = namespaces
    crds = paths.REPO_ROOT / "charts" / "voicefleet" / "crds"
    cluster_with_node.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds))
    cluster_with_node.kubectl(
        "wait", "--for=condition=Established", "crd/voiceagents.voicefleet.dev", "--timeout=60s"
    )
    values = chart.local_values(watch_namespaces=[tenant], livekit=livekit)
    release = f"vf-rec-{tenant.rsplit('-', 1)[-1]}"
    with installed_chart(
        cluster_with_node, release, platform, values, tenants=[tenant], skip_crds=True
    ):
        yield release


@pytest_asyncio.fixture(loop_scope="session")
async def receiver(cluster_with_node: ClusterHandle) -> AsyncIterator[Receiver]:
    server = Receiver(cluster_with_node.host_address_from_pods)
    await server.up()
    yield server
    await server.down()


def _json(cluster: ClusterHandle, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json"))


def _apply(cluster: ClusterHandle, tenant: str, obj: dict[str, Any]) -> None:
    manifest = paths.state_dir() / f"records-e2e-{tenant}-{obj['kind']}.json"
    manifest.write_text(json.dumps(obj))
    try:
        cluster.kubectl("-n", tenant, "apply", "-f", str(manifest))
    finally:
        manifest.unlink(missing_ok=True)


def _ready(agent: dict[str, Any]) -> bool:
    conditions = (agent.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


async def _call(livekit: LiveKitEndpoint, tenant: str, room: str) -> TestParticipant:
    token = participant_token(
        livekit.api_key,
        livekit.api_secret,
        room,
        identity=f"caller-{room}",
        dispatch_agent=dispatch_name(tenant, AGENT),
    )
    caller = TestParticipant(livekit.url, token)
    await caller.join()
    return caller


@pytest.mark.asyncio(loop_scope="session")
async def test_records_and_recordings_from_worker_pods(
    cluster_with_node: ClusterHandle,
    livekit: LiveKitEndpoint,
    s3: S3Endpoint,
    release: str,
    namespaces: tuple[str, str],
    receiver: Receiver,
    pod_providers: ProviderServer,
    record_property: Any,
) -> None:
    cluster = cluster_with_node
    _, tenant = namespaces
    host = cluster.host_address_from_pods
    bucket = f"rec-{secrets.token_hex(4)}"
    await create_bucket(s3, bucket)
    secrets_data = {
        "provider-keys": {
            "OPENAI_API_KEY": "sk-e2e",
            "DEEPGRAM_API_KEY": "dg-e2e",
            "ELEVEN_API_KEY": "el-e2e",
        },
        "records-signing": {"key": SIGNING_KEY},
        "recordings-s3": {"accessKeyId": s3.access_key, "secretAccessKey": s3.secret_key},
    }
    for name, data in secrets_data.items():
        literals = [f"--from-literal={key}={value}" for key, value in data.items()]
        cluster.kubectl("-n", tenant, "create", "secret", "generic", name, *literals)
    storage = {
        "endpoint": f"http://{host}:{S3_PORT}",
        "bucket": bucket,
        "prefix": f"{tenant}/",
        "credentialsSecretRef": {"name": "recordings-s3"},
    }
    _apply(
        cluster,
        tenant,
        {
            "apiVersion": "voicefleet.dev/v1alpha1",
            "kind": "VoiceAgent",
            "metadata": {"name": AGENT, "namespace": tenant},
            "spec": {
                "agents": [
                    {"name": "front", "instructions": "Answer briefly.", "greeting": GREETING}
                ],
                "entry": "front",
                # The example's own pipeline (Deepgram STT, OpenAI LLM, ElevenLabs TTS, Silero
                # VAD, its turn detection) on the provider servers, as the demo points it.
                "pipeline": pointed_at(EXAMPLE_PIPELINE, pod_providers.url),
                "secretRefs": [{"name": "provider-keys"}],
                "worker": {
                    "jobsPerWorker": 2,
                    "idleProcesses": 1,
                    "drainTimeoutSeconds": 60,
                    "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}},
                },
                "scaling": {"replicas": 1},
                "callRecords": {
                    "webhook": {
                        "url": receiver.url,
                        "timeoutSeconds": 5,
                        "signingSecretRef": {"name": "records-signing", "key": "key"},
                    },
                    "recording": storage,
                },
            },
        },
    )

    workers = render.worker_namespace(tenant)  # where the worker pods and children live

    def diagnostics() -> str:
        return cluster.diagnostics(workers, log_selector=f"voicefleet.dev/voiceagent={AGENT}")

    try:
        wait_for(
            "the VoiceAgent to be Ready",
            lambda: _ready(_json(cluster, "-n", tenant, "get", "va", AGENT)),
            timeout=400,
            interval=3,
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnostics()}") from None
    # The ConfigMap names the key's variable; the value only reaches the pod's environment.
    config_map = _json(cluster, "-n", workers, "get", "configmap", f"{AGENT}-config")
    assert SIGNING_KEY not in json.dumps(config_map)
    assert s3.secret_key not in json.dumps(config_map)

    # 1. A call: the record arrives signed, and its recording is in the bucket.
    pod_providers.script_transcripts(QUESTION)
    pod_providers.script_llm(LLMReply(ANSWER, match="record"))
    room = f"records-{secrets.token_hex(4)}"
    caller = await _call(livekit, tenant, room)
    try:
        agent = await caller.wait_for_participant(agent=True, timeout_s=90)
        greeting = await caller.wait_for_audio(agent.identity, timeout_s=60)
        await caller.wait_for_speech_end(agent.identity, after=greeting - 0.1, timeout_s=60)
        phrase = await caller.say(QUESTION)
        assert phrase.ended_at is not None
        reply = await caller.wait_for_audio(agent.identity, after=phrase.ended_at, timeout_s=60)
        await caller.wait_for_speech_end(agent.identity, after=reply - 0.1, timeout_s=60)
    finally:
        await caller.leave()
    left_at = time.time()
    await wait_until(
        "the call's record from the worker pod",
        lambda: receiver.record_of(room) is not None,
        60,
        describe=diagnostics,
    )
    found = receiver.record_of(room)
    assert found is not None
    record, delivery = found
    assert verify(
        delivery["body"], SIGNING_KEY.encode(), delivery["headers"]["X-VoiceFleet-Signature"]
    )
    assert delivery["headers"]["X-VoiceFleet-Delivery"] == record.record_id
    assert (record.tenant, record.voice_agent) == (tenant, AGENT)
    assert record.dispatch_name == dispatch_name(tenant, AGENT)
    status = _json(cluster, "-n", tenant, "get", "va", AGENT)["status"]
    assert record.config_hash == status["configHash"]
    said = [(t.speaker, t.text) for t in record.transcript]
    assert ("agent", GREETING) in said and ("caller", QUESTION) in said, said
    assert ("agent", ANSWER) in said, said
    # The caller's words came from the Deepgram server, the agent's voice from ElevenLabs.
    heard = [r for r in pod_providers.requests("stt") if not r.get("silent")]
    assert {(r["provider"], r["model"]) for r in heard} == {("deepgram", "nova-3")}, heard
    assert QUESTION in [r["transcript"] for r in heard], heard
    synthesised = [
        r for r in pod_providers.requests("tts") if r["text"] != DEFAULT_OVERFLOW_MESSAGE
    ]
    assert {(r["provider"], r["model"]) for r in synthesised} == {
        ("elevenlabs", "eleven_flash_v2_5")
    }, synthesised
    spoken = " ".join(r["text"] for r in synthesised)
    assert GREETING in spoken and ANSWER in spoken, spoken
    assert record.end_reason == "caller_hung_up", record.end_detail
    assert record.recording is not None, diagnostics()
    assert record.recording.object_key == f"{tenant}/{record.record_id}.ogg"
    async with aiohttp.ClientSession() as session:
        audio = await get_object(
            session,
            CallRecordingConfig.model_validate(
                {
                    **{k: v for k, v in storage.items() if k != "credentialsSecretRef"},
                    "endpoint": s3.url,
                    "accessKeyIdFromEnv": "UNUSED",
                    "secretAccessKeyFromEnv": "UNUSED",
                }
            ),
            (s3.access_key, s3.secret_key),
            record.recording.object_key,
        )
    assert audio[:4] == b"OggS" and record.recording.duration_seconds > 1

    # 2. The worker pod deleted as its call ends, the receiver refusing the first attempt.
    (pod,) = _json(
        cluster, "-n", workers, "get", "pods", "-l", f"voicefleet.dev/voiceagent={AGENT}"
    )["items"]
    receiver.script = [503]
    room2 = f"records-{secrets.token_hex(4)}"
    caller = await _call(livekit, tenant, room2)
    try:
        agent = await caller.wait_for_participant(agent=True, timeout_s=90)
        greeting = await caller.wait_for_audio(agent.identity, timeout_s=60)
    finally:
        await caller.leave()
    cluster.kubectl("-n", workers, "delete", "pod", pod["metadata"]["name"], "--wait=false")
    deleted_at = time.time()
    await wait_until(
        "the record of the pod's last call",
        lambda: receiver.record_of(room2) is not None,
        120,
        describe=diagnostics,
    )
    found = receiver.record_of(room2)
    assert found is not None
    statuses = [d["status"] for d in receiver.deliveries if json.loads(d["body"])["room"] == room2]
    assert statuses == [503, 200], statuses
    figures = {
        "pod_call_end_to_record_delivered_s": round(delivery["at"] - left_at, 3),
        "pod_deleted_to_record_delivered_s": round(found[1]["at"] - deleted_at, 3),
        "recording_seconds": record.recording.duration_seconds,
    }
    print("call records e2e:", json.dumps(figures))
    for key, value in figures.items():
        record_property(key, value)
