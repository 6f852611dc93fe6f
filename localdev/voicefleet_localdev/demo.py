"""`make demo`: the whole of VoiceFleet on this machine, ending in a call that is answered.

    python -m voicefleet_localdev.demo        bring everything up, place the calls, print them
    python -m voicefleet_localdev.demo down   stop the provider server, the LiveKit stack, cluster

Up, in order (each step reuses what already runs): the pinned upstream builds (cached), the local
cluster with its node, the LiveKit stack (Redis, livekit-server, livekit-sip, Prometheus), the
operator and runtime images imported into the node, the local provider server (fake OpenAI,
Deepgram and ElevenLabs endpoints) as a host process reachable from pods, the chart (operator
pod), the example's Secrets and examples/voiceagent.yaml with only the provider endpoints (and,
for sipp on this host, the SIP source address) pointed at this machine. Then it waits for the
VoiceAgent to be Ready (its workers registered with LiveKit), places a test call (a LiveKit
participant dispatching the agent), and, when the example has a phone number, a phone call
through sipp and livekit-sip. It prints what was said each way and the latencies, and writes
them as JSON. Exit status 0 only if the calls were answered.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import copy
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from voicefleet_operator.render import worker_namespace
from voicefleet_testkit import waiting
from voicefleet_testkit.conditions import condition
from voicefleet_testkit.providers import pointed_at

from voicefleet_localdev import chart, leases, paths, procs
from voicefleet_localdev import livekit as stack
from voicefleet_localdev.kubectl import KubectlError, diagnostics, kubectl, kubectl_json
from voicefleet_localdev.procs import CommandError, ComponentError

EXAMPLE = paths.REPO_ROOT / "examples" / "voiceagent.yaml"
EXAMPLE_SECRETS = paths.REPO_ROOT / "examples" / "voiceagent-secrets.yaml"
RELEASE = "voicefleet-demo"
PLATFORM_NAMESPACE = "voicefleet-system"
TENANT = os.environ.get("VOICEFLEET_DEMO_TENANT", "acme")
WORKERS = worker_namespace(TENANT)
"""Where the operator runs the tenant's workers (a platform-owned namespace)."""
PROVIDERS_PROCESS = "demo-providers"
PROVIDERS_PORT = int(os.environ.get("VOICEFLEET_DEMO_PROVIDERS_PORT", "8300"))
RESULTS_FILE = paths.logs_dir() / "demo.json"
RENDERED_AGENT = paths.state_dir() / "demo-voiceagent.yaml"
# The tenant's call-record receiver (voicefleet_testkit.records) on the address pods reach; every
# verified record lands in RECORDS_DIR as <recordId>.json.
RECORDS_PROCESS = "demo-records"
RECORDS_PORT = int(os.environ.get("VOICEFLEET_DEMO_RECORDS_PORT", "8310"))
RECORDS_DIR = paths.state_dir() / "call-records"
RECORDS_SECRET = "acme-call-records"
RECORDS_KEY_FILE = paths.state_dir() / "demo-call-records.key"
PLOT_FILE = paths.logs_dir() / "demo-latency.png"
PLOT_SCRAPE_WAIT_S = 12
CALLER_NUMBER = "+15550001111"

# What the caller says, and what the scripted providers answer (they are fakes: the STT does not
# recognise speech, it answers with the scripted transcript once it has heard speech).
CALLER_QUESTION = "Hello. Where is my order A one two three four five?"
CALLER_TRANSCRIPT = "Hello. Where is my order A-12345?"
AGENT_REPLY = "Your order A-12345 left our warehouse this morning and arrives tomorrow."


T = TypeVar("T")


class DemoError(RuntimeError):
    """A step failed; the message says which and carries the diagnostics to read."""


# --- output ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.steps: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)

    def step(self, name: str, run: Callable[[], T]) -> T:
        self.say(f"{name} ...")
        began = time.monotonic()
        result = run()
        self.steps[name] = round(time.monotonic() - began, 1)
        self.say(f"{name}: done in {self.steps[name]:.1f}s")
        return result


# --- waiting ----------------------------------------------------------------------------------


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 1) -> T:
    """voicefleet_testkit's wait_for, failing with a DemoError (the demo's one failure type)."""
    return waiting.wait_for(what, probe, timeout, interval, error=DemoError)


# --- bring-up --------------------------------------------------------------------------------


def build_infra() -> None:
    from voicefleet_localdev import build

    rows = build.build_all(None)
    built = [r.component for r in rows if r.status != "cached"]
    print(f"    {len(rows)} components, {'built: ' + ', '.join(built) if built else 'all cached'}")


def cluster_up() -> str:
    from voicefleet_localdev import cluster, images

    info = cluster.up(with_node=True, prepare_node=images.ensure_node_images)
    if not info.hostAddressFromPods:
        raise DemoError(f"the cluster has no node address for pods: {info}")
    print(f"    {info.provider} cluster, kubeconfig {info.kubeconfig}")
    return info.hostAddressFromPods


def livekit_up() -> None:
    from voicefleet_localdev.prometheus import PrometheusClient

    stack.up(report=lambda line: print(f"    {line}"))
    # Prometheus discovers pods through the kubeconfig: reload it for this cluster.
    PrometheusClient().sync_discovery()


def image_created(image: str) -> float | None:
    done = procs.run(
        ["podman", "image", "inspect", "--format", "{{.Created.Unix}}", image], check=False
    )
    return float(done.stdout.strip()) if done.returncode == 0 else None


def restart_stale_pods(namespace: str, selector: str, image: str) -> list[str]:
    """Delete the pods (their Deployment recreates them) whose containers started before
    `image` was last built: with a fixed tag and pullPolicy Never, nothing else rolls them."""
    built = image_created(image)
    if built is None:
        return []
    stale = []
    for pod in kubectl_json("-n", namespace, "get", "pods", "-l", selector)["items"]:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            started = ((container.get("state") or {}).get("running") or {}).get("startedAt")
            if container.get("image") != image or not started:
                continue
            if calendar.timegm(time.strptime(started, "%Y-%m-%dT%H:%M:%SZ")) < built:
                stale.append(pod["metadata"]["name"])
    if stale:
        kubectl("-n", namespace, "delete", "pod", *stale, "--wait=false")
    return stale


def images_up() -> None:
    from voicefleet_localdev import images

    for result in images.build_all(import_into_node=True):
        print(f"    {result.name:48} {result.status:8} {result.seconds:6.1f}s")
    on_node = images.images_on_node()
    missing = [image for image in images.PROJECT_IMAGES.values() if image not in on_node]
    if missing:
        raise DemoError(f"images not on the node after import: {missing}")


def providers_url(host: str) -> str:
    return f"http://{host}:{PROVIDERS_PORT}"


def providers_up(host: str) -> str:
    """The provider server as a host process on the address pods reach (the bridge gateway)."""
    url = providers_url(host)
    argv = [
        sys.executable,
        "-m",
        "voicefleet_testkit.providers",
        "--host",
        host,
        "--port",
        str(PROVIDERS_PORT),
    ]
    if procs.is_running(PROVIDERS_PROCESS):
        print(f"    already running (pid {procs.pid_of(PROVIDERS_PROCESS)})")
    else:
        procs.start(PROVIDERS_PROCESS, argv, cwd=paths.REPO_ROOT)
    procs.wait_until(
        PROVIDERS_PROCESS, "answering", lambda: stack.http_ok(f"{url}/_control/health"), timeout=60
    )
    # The demo holds the platform as long as its provider server runs: test sessions then
    # leave the cluster and the LiveKit stack up when they end (voicefleet_localdev.leases).
    provider_pid = procs.pid_of(PROVIDERS_PROCESS)
    if provider_pid is not None:
        leases.hold(leases.DEMO, provider_pid)
    print(f"    {url}/v1 (log {paths.log_file(PROVIDERS_PROCESS)})")
    return url


def records_key() -> str:
    """The tenant's signing key, made once and kept with the demo's state."""
    if not RECORDS_KEY_FILE.exists():
        RECORDS_KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
        RECORDS_KEY_FILE.write_text(secrets.token_hex(32))
        RECORDS_KEY_FILE.chmod(0o600)
    return RECORDS_KEY_FILE.read_text().strip()


def records_up(host: str) -> str:
    """The call-record receiver as a host process; returns the webhook URL pods post to."""
    from voicefleet_testkit import records

    argv = [sys.executable, "-m", "voicefleet_testkit.records", "--host", host,
            "--port", str(RECORDS_PORT), "--out", str(RECORDS_DIR)]  # fmt: skip
    if not procs.is_running(RECORDS_PROCESS):
        env = {**os.environ, records.KEY_ENV: records_key()}
        procs.start(RECORDS_PROCESS, argv, cwd=paths.REPO_ROOT, env=env)
    procs.wait_until(
        RECORDS_PROCESS, "listening", lambda: stack.tcp_open(host, RECORDS_PORT), timeout=30
    )
    url = f"http://{host}:{RECORDS_PORT}{records.PATH}"
    print(f"    {url} -> {RECORDS_DIR}/<recordId>.json (log {paths.log_file(RECORDS_PROCESS)})")
    return url


def install_chart(providers: str) -> None:
    from voicefleet_localdev import images

    # The platform desk speaks through the provider server's OpenAI-compatible TTS.
    values = chart.local_values(watch_namespaces=[TENANT], desk_tts_url=f"{providers}/v1")
    chart.upgrade_install(RELEASE, PLATFORM_NAMESPACE, values)
    print(f"    release {RELEASE} in namespace {PLATFORM_NAMESPACE}, serving namespace {TENANT}")
    operator = "app.kubernetes.io/name=voicefleet-operator"
    if restart_stale_pods(PLATFORM_NAMESPACE, operator, images.PROJECT_IMAGES["operator"]):
        print("    the operator image was rebuilt: operator pod replaced")
        kubectl("-n", PLATFORM_NAMESPACE, "rollout", "status", f"deployment/{RELEASE}",
                "--timeout=300s", timeout=320)  # fmt: skip
    desk = "app.kubernetes.io/name=voicefleet-desk"
    if restart_stale_pods(PLATFORM_NAMESPACE, desk, images.PROJECT_IMAGES["runtime"]):
        print("    the runtime image was rebuilt: desk pod replaced")
    kubectl("-n", PLATFORM_NAMESPACE, "rollout", "status", f"deployment/{RELEASE}-desk",
            "--timeout=300s", timeout=320)  # fmt: skip


def ensure_namespace(name: str, labels: dict[str, str]) -> None:
    manifest = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    manifest["metadata"]["labels"] = labels  # type: ignore[index]
    kubectl("apply", "-f", "-", stdin=json.dumps(manifest))


DEMO_CPU_REQUEST = "250m"
"""The CPU the demo's worker asks the scheduler for. The local cluster is one node with this
machine's CPUs (2 here); the example's derived request (100m + 100m per job: 1.1 CPU for ten
jobs) would leave a test session's fleets no room beside the demo, so `make test` while the demo
runs would find its worker pods Pending. A request reserves, it does not limit: the worker still
uses what it needs."""


def rendered_example(url: str, records_url: str) -> dict[str, Any]:
    """examples/voiceagent.yaml with the provider endpoints pointed at the local provider server,
    this host allowed to place SIP calls (sipp runs here), call records sent to the demo's
    receiver and, unless the example sets one, a small CPU request (DEMO_CPU_REQUEST); nothing
    else changes."""
    example = yaml.safe_load(EXAMPLE.read_text())
    agent = copy.deepcopy(example)
    resources = agent["spec"].setdefault("worker", {}).setdefault("resources", {})
    resources.setdefault("requests", {}).setdefault("cpu", DEMO_CPU_REQUEST)
    agent["spec"]["callRecords"] = {
        "webhook": {
            "url": records_url,
            "signingSecretRef": {"name": RECORDS_SECRET, "key": "signingKey"},
        }
    }
    agent["spec"]["pipeline"] = pointed_at(agent["spec"]["pipeline"], url)
    inbound = (agent["spec"].get("telephony") or {}).get("inbound")
    if inbound is not None and inbound.get("allowedAddresses"):
        inbound["allowedAddresses"] = [*inbound["allowedAddresses"], "127.0.0.1/32"]
    return dict(agent)


def overrides(agent: dict[str, Any]) -> list[str]:
    pipeline = agent["spec"]["pipeline"]
    lines = [f"spec.pipeline.{part}.baseUrl = {pipeline[part]['baseUrl']}" for part in pipeline
             if isinstance(pipeline[part], dict) and "baseUrl" in pipeline[part]]  # fmt: skip
    inbound = (agent["spec"].get("telephony") or {}).get("inbound") or {}
    if "127.0.0.1/32" in inbound.get("allowedAddresses", []):
        lines.append(
            f"spec.telephony.inbound.allowedAddresses = {inbound['allowedAddresses']} "
            "(sipp calls from this host)"
        )
    cpu = agent["spec"]["worker"]["resources"]["requests"]["cpu"]
    if cpu == DEMO_CPU_REQUEST:
        lines.append(
            f"spec.worker.resources.requests.cpu = {cpu} (one small node: leaves room for "
            "`make test` beside the demo)"
        )
    webhook = (agent["spec"].get("callRecords") or {}).get("webhook")
    if webhook:
        lines.append(
            f"spec.callRecords.webhook = {webhook['url']}, signed with Secret {RECORDS_SECRET}"
        )
    return lines


def apply_example(url: str, records_url: str) -> dict[str, Any]:
    kubectl("-n", TENANT, "apply", "-f", str(EXAMPLE_SECRETS))
    signing = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": RECORDS_SECRET},
        "stringData": {"signingKey": records_key()},
    }
    kubectl("-n", TENANT, "apply", "-f", "-", stdin=json.dumps(signing))
    agent = rendered_example(url, records_url)
    RENDERED_AGENT.write_text(yaml.safe_dump(agent, sort_keys=False))
    kubectl("-n", TENANT, "apply", "-f", str(RENDERED_AGENT))
    from voicefleet_localdev import images

    runtime = images.PROJECT_IMAGES["runtime"]
    stale = restart_stale_pods(WORKERS, selector_for(agent["metadata"]["name"]), runtime)
    if stale:
        print(f"    the runtime image was rebuilt: replaced worker pods {', '.join(stale)}")
    print(f"    Secrets from {EXAMPLE_SECRETS.relative_to(paths.REPO_ROOT)}")
    print(f"    {EXAMPLE.relative_to(paths.REPO_ROOT)} as {RENDERED_AGENT}, with:")
    for line in overrides(agent):
        print(f"      {line}")
    return agent


def wait_ready(name: str, clock: Clock, timeout: float) -> dict[str, Any]:
    seen: list[str] = []

    def probe() -> dict[str, Any] | None:
        agent: dict[str, Any] = kubectl_json("-n", TENANT, "get", "va", name)
        status = agent.get("status") or {}
        summary = f"phase {status.get('phase')}, replicas {status.get('readyReplicas', 0)}/" + str(
            status.get("replicas", 0)
        )
        ready = condition(agent, "Ready")
        if ready is not None and ready["status"] != "True":
            summary += f" ({ready.get('reason')}: {ready.get('message', '')[:120]})"
        if not seen or seen[-1] != summary:
            seen.append(summary)
            clock.say(f"    {name}: {summary}")
        return agent if ready is not None and ready["status"] == "True" else None

    try:
        return wait_for(f"VoiceAgent {TENANT}/{name} Ready", probe, timeout, interval=2)
    except DemoError as error:
        raise DemoError(
            f"{error}\n{diagnostics(WORKERS, log_selector=selector_for(name))}"
        ) from None


def selector_for(name: str) -> str:
    from voicefleet_operator.render import selector_labels

    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


# --- the calls -------------------------------------------------------------------------------


@dataclass
class CallReport:
    kind: str
    answered: bool = False
    room: str = ""
    agent_said: list[str] = field(default_factory=list)
    caller_said: list[str] = field(default_factory=list)
    latencies: dict[str, float] = field(default_factory=dict)
    providers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None


async def script_providers(url: str) -> None:
    from voicefleet_testkit.providers import LLMReply, ProviderControl

    control = ProviderControl(url)
    await control.reset()
    # Whatever stretch of speech the STT hears gets the question's words (a phone line may
    # carry a click before the caller speaks).
    await control.script(
        default_transcript=CALLER_TRANSCRIPT, llm=[LLMReply(text=AGENT_REPLY, after="user")]
    )


async def provider_requests(url: str) -> dict[str, list[dict[str, Any]]]:
    from voicefleet_testkit.providers import ProviderControl

    control = ProviderControl(url)
    return {kind: await control.requests(kind) for kind in ("stt", "chat", "tts")}


def summarise_providers(requests: dict[str, list[dict[str, Any]]]) -> list[str]:
    """What the provider server received and answered, one line per request."""
    lines = []
    for entry in requests.get("stt", []):
        if entry.get("silent"):
            continue
        lines.append(
            f"STT  {entry.get('provider')} {entry.get('model')}: heard "
            f"{entry.get('audio_seconds', 0):.1f}s of speech -> {entry.get('transcript')!r}"
        )
    for entry in requests.get("chat", []):
        messages = entry["body"].get("messages") or []
        user = [m for m in messages if m.get("role") == "user"]
        last = user[-1]["content"] if user else "(no user message yet)"
        reply = entry.get("reply") or {}
        answer = reply.get("text") or [c["name"] for c in reply.get("tool_calls") or []]
        lines.append(
            f"LLM  {entry['body'].get('model')}: {len(messages)} messages, last from the caller "
            f"{last!r} -> {answer!r}"
        )
    for entry in requests.get("tts", []):
        lines.append(
            f"TTS  {entry.get('provider')} {entry.get('model')}: {entry.get('text')!r} -> "
            f"{entry.get('audio_seconds', 0):.1f}s of audio"
        )
    return lines


async def webrtc_call(dispatch_name: str, url: str) -> CallReport:
    """A LiveKit participant joins a new room with a token that dispatches the agent, hears the
    greeting, asks its question and hears the reply."""
    from voicefleet_testkit.participant import ParticipantError, TestParticipant, participant_token

    endpoint = stack.LiveKitEndpoint()
    report = CallReport(kind="webrtc", room=f"demo-{secrets.token_hex(3)}")
    await script_providers(url)
    token = participant_token(
        endpoint.api_key,
        endpoint.api_secret,
        report.room,
        identity="demo-caller",
        dispatch_agent=dispatch_name,
    )
    caller = TestParticipant(endpoint.url, token)
    dispatched_at = time.monotonic()
    try:
        await caller.join()
        agent = await caller.wait_for_participant(timeout_s=60)
        report.latencies["dispatch_to_agent_joined_s"] = round(time.monotonic() - dispatched_at, 3)
        greeting_at = await caller.wait_for_audio(agent.identity, timeout_s=60)
        report.answered = True
        report.latencies["dispatch_to_greeting_s"] = round(greeting_at - dispatched_at, 3)
        await caller.wait_for_speech_end(agent.identity, after=greeting_at, quiet_s=1.0)
        phrase = await caller.say(CALLER_QUESTION)
        reply_at = await caller.wait_for_audio(agent.identity, after=phrase.ended_at, timeout_s=45)
        report.latencies["turn_latency_s"] = round(reply_at - phrase.ended_at, 3)
        await caller.wait_for_speech_end(agent.identity, after=reply_at, quiet_s=1.0)
        # The last transcription segments arrive just after the audio.
        await asyncio.sleep(1.0)
        report.agent_said = caller.said(agent.identity)
        report.caller_said = caller.said(caller.identity)
    except ParticipantError as error:
        report.error = str(error)
        report.agent_said = caller.said()
    finally:
        await caller.leave()
    report.providers = await provider_requests(url)
    if not report.caller_said:
        report.notes.append(f"caller spoke (espeak-ng): {CALLER_QUESTION!r}")
    return report


def sip_credentials(agent: dict[str, Any]) -> tuple[str, str] | None:
    inbound = agent["spec"]["telephony"].get("inbound") or {}
    ref = inbound.get("authSecretRef")
    if not ref:
        return None
    import base64

    data = kubectl_json("-n", TENANT, "get", "secret", ref["name"])["data"]
    return (
        base64.b64decode(data["username"]).decode(),
        base64.b64decode(data["password"]).decode(),
    )


async def phone_call(agent: dict[str, Any], url: str, workdir: Path) -> CallReport:
    """sipp dials the example's first number through livekit-sip (digest auth when the trunk
    has credentials); the caller's RTP is captured off the wire."""
    from voicefleet_testkit import sipcall

    number = agent["spec"]["telephony"]["numbers"][0]
    report = CallReport(kind="phone", room=f"{number} via livekit-sip")
    await script_providers(url)
    auth = sip_credentials(agent)
    result = await asyncio.to_thread(
        sipcall.place_call,
        "call_auth.xml" if auth else "call.xml",
        number,
        workdir,
        caller=CALLER_NUMBER,
        talk_seconds=16,
        speech=CALLER_QUESTION,
        speech_delay=6.0,
        auth=auth,
    )
    report.answered = result.answered_at is not None and result.capture.voiced_seconds() > 0.5
    if result.invite_to_first_audio is not None:
        report.latencies["invite_to_first_greeting_audio_s"] = round(
            result.invite_to_first_audio, 3
        )
    if result.answered_at is not None and result.invite_at is not None:
        report.latencies["invite_to_answer_s"] = round(result.answered_at - result.invite_at, 3)
    report.latencies["caller_heard_voiced_s"] = round(result.capture.voiced_seconds(), 2)
    report.notes.append(
        f"SIP responses {result.capture.responses()}, sipp exit {result.returncode}"
    )
    if not report.answered:
        report.error = result.describe()
    report.providers = await provider_requests(url)
    report.agent_said = [e["text"] for e in report.providers.get("tts", [])]
    report.caller_said = [
        e["transcript"] for e in report.providers.get("stt", []) if not e.get("silent")
    ]
    return report


def print_call(report: CallReport) -> None:
    title = "WebRTC test call" if report.kind == "webrtc" else "Phone call (sipp -> livekit-sip)"
    print(f"\n=== {title}: {'ANSWERED' if report.answered else 'NOT ANSWERED'} ({report.room})")
    if report.kind == "webrtc":
        print("  What was said (the participant's lk.transcription segments):")
    else:
        print("  What was said (the agent's TTS requests; the caller as the STT server heard it):")
    for text in report.agent_said:
        print(f"    agent : {text}")
    for text in report.caller_said:
        print(f"    caller: {text}")
    for note in report.notes:
        print(f"    ({note})")
    print("  What the provider server received and answered:")
    for line in summarise_providers(report.providers) or ["(nothing)"]:
        print(f"    {line}")
    if report.latencies:
        print("  Measured:")
        for name, value in report.latencies.items():
            print(f"    {name:36} {value:8.3f}")
    if report.error:
        print(f"  ERROR: {report.error[-3000:]}")


def write_plot(clock: Clock, started_unix: float) -> Path | None:
    """The observability helper's plot of turn latencies and active calls, if it exists."""
    if importlib.util.find_spec("voicefleet_localdev.plot") is None:
        return None
    done = subprocess.run(
        [sys.executable, "-m", "voicefleet_localdev.plot",
         "--since", str(int(started_unix)), "--out",
         str(PLOT_FILE), "--tenant", TENANT],
        capture_output=True, text=True, timeout=120, check=False, cwd=paths.REPO_ROOT,
    )  # fmt: skip
    if done.returncode != 0:
        clock.say(f"plot failed ({done.returncode}): {(done.stderr or done.stdout)[-800:]}")
        return None
    return PLOT_FILE


def metrics_of(pod_ip: str, port: int = 9100) -> str:
    with urllib.request.urlopen(f"http://{pod_ip}:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def how_to_watch(name: str) -> str:
    kubeconfig = paths.kubeconfig()
    return f"""
How to watch it:
  export KUBECONFIG={kubeconfig}      # or: eval "$(make -s env)"  (kubectl and helm on PATH)
  kubectl -n {TENANT} get va -w                     # Ready, Replicas, Jobs, Numbers
  kubectl -n {TENANT} describe va {name}            # conditions and events
  kubectl -n {WORKERS} logs -l {selector_for(name)} -f --prefix   # the workers
  kubectl -n {PLATFORM_NAMESPACE} logs deploy/{RELEASE} -f             # the operator
  Prometheus: http://127.0.0.1:9090  (e.g. voicefleet_active_jobs, voicefleet_turn_latency_seconds)
  Logs of host processes: {paths.logs_dir()}/<component>.log (provider server: {PROVIDERS_PROCESS})
  Call again: .venv/bin/python -m voicefleet_localdev.demo call
Tear it all down:
  make demo-down"""


# --- entry points ----------------------------------------------------------------------------


def up(args: argparse.Namespace) -> int:
    clock = Clock()
    # Held while this process brings the platform up; the provider server's lease (taken once it
    # runs) holds it after this process exits, until `make demo-down`.
    leases.hold(leases.DEMO)
    started_unix = time.time()
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        if not args.skip_infra:
            clock.step("infra build (cached)", build_infra)
        host = clock.step("cluster up", cluster_up)
        clock.step("LiveKit stack up", livekit_up)
        clock.step("images built and imported", images_up)
        url = clock.step("provider server", lambda: providers_up(host))
        records_url = clock.step("call-record receiver", lambda: records_up(host))
        ensure_namespace(TENANT, {"pod-security.kubernetes.io/enforce": "restricted"})
        clock.step("chart installed", lambda: install_chart(url))
        agent = clock.step("example applied", lambda: apply_example(url, records_url))
        name = agent["metadata"]["name"]
        applied = time.monotonic()
        status = clock.step("VoiceAgent Ready", lambda: wait_ready(name, clock, args.timeout))
        # Ready means a worker is registered with LiveKit (the runtime's /ready), so calls can go.
        results["apply_to_ready_s"] = round(time.monotonic() - applied, 1)
        print(kubectl("-n", TENANT, "get", "va", "-o", "wide"))
        return calls(args, clock, agent, status, url, results, started_unix)
    except (DemoError, KubectlError, ComponentError, CommandError) as error:
        clock.say(f"FAILED: {error}")
        results["error"] = str(error)[-4000:]
        write_results(results, clock)
        return 1


def calls(
    args: argparse.Namespace,
    clock: Clock,
    agent: dict[str, Any],
    status: dict[str, Any],
    url: str,
    results: dict[str, Any],
    started_unix: float,
) -> int:
    name = agent["metadata"]["name"]
    dispatch_name = status["status"].get("dispatchName") or f"{TENANT}.{name}"
    calls_began = time.time()
    reports = []
    webrtc = clock.step("test call (WebRTC)", lambda: asyncio.run(webrtc_call(dispatch_name, url)))
    reports.append(webrtc)
    numbers = (agent["spec"].get("telephony") or {}).get("numbers") or []
    if numbers and not args.no_phone:
        telephony = condition(status, "TelephonyReady")
        if stack.status().get("livekit-sip") is None:
            clock.say("no phone call: livekit-sip is not running")
        elif telephony is None or telephony["status"] != "True":
            clock.say(f"no phone call: TelephonyReady is not True ({telephony})")
        else:
            workdir = paths.state_dir() / "demo-sipp"
            phone = clock.step(
                f"phone call to {numbers[0]} (sipp)",
                lambda: asyncio.run(phone_call(agent, url, workdir)),
            )
            reports.append(phone)
    for report in reports:
        print_call(report)
    results["calls"] = [vars(r) for r in reports]
    results["call_records"] = [str(p) for p in print_records(len(reports), calls_began)]
    time.sleep(PLOT_SCRAPE_WAIT_S)  # Prometheus scrapes every 5 s: let it see the last call
    plot = write_plot(clock, started_unix)
    if plot is not None:
        print(f"\nPlot of turn latencies and active calls: {plot}")
        results["plot"] = str(plot)
    answered = all(r.answered for r in reports)
    write_results(results, clock)
    print(how_to_watch(name))
    print(f"\nResults: {RESULTS_FILE}; total {clock.elapsed():.0f}s")
    verdict = "OK: answered" if answered else "FAILED: not answered"
    print(f"{verdict}: {', '.join(f'{r.kind} {r.answered}' for r in reports)}")
    return 0 if answered else 1


def print_records(count: int, since: float, timeout: float = 60) -> list[Path]:
    """Wait for the `count` calls' records the worker signs and posts after each call; print
    where each went and what it says."""

    def arrived() -> list[Path] | None:
        found = [p for p in RECORDS_DIR.glob("*.json") if p.stat().st_mtime >= since]
        return sorted(found, key=lambda p: p.stat().st_mtime) if len(found) >= count else None

    try:
        found = wait_for(f"{count} call record(s) in {RECORDS_DIR}", arrived, timeout)
    except DemoError as missing:
        print(f"\n=== Call records: {missing}")
        return []
    print(f"\n=== Call records (signed, verified by the receiver): {len(found)} in {RECORDS_DIR}")
    for path in found:
        record = json.loads(path.read_text())
        usage = record.get("usage") or {}
        tokens = sum(u.get("promptTokens", 0) + u.get("completionTokens", 0)
                     for u in usage.get("llm", []))  # fmt: skip
        print(
            f"  {path}\n    {record.get('channel', record.get('direction'))} call in "
            f"{record['room']}: {record['durationSeconds']:.1f}s, end {record['endReason']}, "
            f"{len(record.get('transcript', []))} transcript turns, agents "
            f"{[a['name'] for a in record.get('agents', [])]}, LLM tokens {tokens}"
        )
    return found


def write_results(results: dict[str, Any], clock: Clock) -> None:
    results["steps_s"] = clock.steps
    results["total_s"] = round(clock.elapsed(), 1)
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(results, indent=2, default=str))


def call_again(args: argparse.Namespace) -> int:
    """Only the calls, against a stack `make demo` left running."""
    clock = Clock()
    host = paths.host_address_for_pods()
    if host is None or not procs.is_running(PROVIDERS_PROCESS):
        print("the demo is not up: run `make demo` first", file=sys.stderr)
        return 1
    agent = yaml.safe_load(RENDERED_AGENT.read_text())
    status = kubectl_json("-n", TENANT, "get", "va", agent["metadata"]["name"])
    return calls(args, clock, agent, status, providers_url(host), {}, time.time() - 300)


def down(args: argparse.Namespace) -> int:
    from voicefleet_localdev import cluster

    clock = Clock()
    busy = [h for h in leases.holders() if h.kind != leases.DEMO]
    if busy and not args.force:
        print(
            f"{', '.join(map(str, busy))} still use the cluster; not taking it down. "
            "Wait for them, or run `make demo-down FORCE=1`.",
            file=sys.stderr,
        )
        return 1
    for holder in leases.holders():
        if holder.kind == leases.DEMO:
            leases.release(leases.DEMO, holder.pid)
    stopped = procs.stop(PROVIDERS_PROCESS)
    clock.say(f"provider server {'stopped' if stopped else 'was not running'}")
    stopped = procs.stop(RECORDS_PROCESS)
    clock.say(f"call-record receiver {'stopped' if stopped else 'was not running'}")
    clock.step("LiveKit stack down", lambda: stack.down(report=lambda line: print(f"    {line}")))
    clock.step("cluster down", cluster.down)
    RENDERED_AGENT.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m voicefleet_localdev.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", nargs="?", default="up", choices=["up", "call", "down"])
    parser.add_argument("--no-phone", action="store_true", help="skip the sipp phone call")
    parser.add_argument("--skip-infra", action="store_true", help="do not check the builds")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per wait")
    parser.add_argument("--force", action="store_true", help="down even if tests use it")
    args = parser.parse_args(argv)
    action = {"up": up, "call": call_again, "down": down}[args.action]
    return action(args)


if __name__ == "__main__":
    sys.exit(main())
