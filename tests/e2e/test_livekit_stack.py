"""The local LiveKit stack works: rooms, SIP objects, a SIP INVITE, WebRTC media, Prometheus."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kubernetes import client as k8s
from livekit import api, rtc
from voicefleet_localdev import images, paths
from voicefleet_localdev import livekit as stack
from voicefleet_localdev.prometheus import PrometheusClient
from voicefleet_localdev.pytest_plugin import ClusterHandle, refuse_while_the_demo_holds
from voicefleet_testkit.net import free_port
from voicefleet_testkit.waiting import wait_for

pytestmark = pytest.mark.integration


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_room_is_created_listed_and_deleted(livekit: stack.LiveKitEndpoint) -> None:
    name = unique("room")
    async with livekit.api() as lkapi:
        created = await lkapi.room.create_room(api.CreateRoomRequest(name=name, empty_timeout=60))
        assert created.name == name and created.sid.startswith("RM_")

        listed = await lkapi.room.list_rooms(api.ListRoomsRequest(names=[name]))
        assert [room.sid for room in listed.rooms] == [created.sid]

        await lkapi.room.delete_room(api.DeleteRoomRequest(room=name))
        listed = await lkapi.room.list_rooms(api.ListRoomsRequest())
        assert name not in [room.name for room in listed.rooms]


async def test_sip_inbound_trunk_and_dispatch_rule_round_trip(
    livekit: stack.LiveKitEndpoint,
) -> None:
    number = fresh_number()
    async with livekit.api() as lkapi:
        trunk = await lkapi.sip.create_inbound_trunk(
            api.CreateSIPInboundTrunkRequest(
                trunk=api.SIPInboundTrunkInfo(name=unique("trunk"), numbers=[number])
            )
        )
        assert trunk.sip_trunk_id.startswith("ST_")
        rule = await lkapi.sip.create_dispatch_rule(
            api.CreateSIPDispatchRuleRequest(
                dispatch_rule=api.SIPDispatchRuleInfo(
                    name=unique("rule"),
                    trunk_ids=[trunk.sip_trunk_id],
                    rule=api.SIPDispatchRule(
                        dispatch_rule_individual=api.SIPDispatchRuleIndividual(room_prefix="call-")
                    ),
                )
            )
        )
        assert rule.sip_dispatch_rule_id.startswith("SDR_")

        trunks = await lkapi.sip.list_inbound_trunk(api.ListSIPInboundTrunkRequest())
        found = [t for t in trunks.items if t.sip_trunk_id == trunk.sip_trunk_id]
        assert [list(t.numbers) for t in found] == [[number]]
        rules = await lkapi.sip.list_dispatch_rule(api.ListSIPDispatchRuleRequest())
        found_rules = [
            r for r in rules.items if r.sip_dispatch_rule_id == rule.sip_dispatch_rule_id
        ]
        assert [list(r.trunk_ids) for r in found_rules] == [[trunk.sip_trunk_id]]

        await lkapi.sip.delete_dispatch_rule(
            api.DeleteSIPDispatchRuleRequest(sip_dispatch_rule_id=rule.sip_dispatch_rule_id)
        )
        await lkapi.sip.delete_trunk(api.DeleteSIPTrunkRequest(sip_trunk_id=trunk.sip_trunk_id))
        trunks = await lkapi.sip.list_inbound_trunk(api.ListSIPInboundTrunkRequest())
        rules = await lkapi.sip.list_dispatch_rule(api.ListSIPDispatchRuleRequest())
        assert trunk.sip_trunk_id not in [t.sip_trunk_id for t in trunks.items]
        assert rule.sip_dispatch_rule_id not in [r.sip_dispatch_rule_id for r in rules.items]


def sipp_argv(endpoint: stack.SipEndpoint, number: str, workdir: Path, wait_ms: int) -> list[str]:
    """One call with sipp's built-in UAC scenario; every message is traced to messages.log."""
    return [
        "sipp",
        f"{endpoint.host}:{endpoint.port}",
        *("-sn", "uac", "-s", number, "-m", "1", "-t", "u1"),
        *("-i", "127.0.0.1", "-p", str(free_port("udp"))),
        # How long to wait for each expected answer; then sipp CANCELs and gives up.
        *("-recv_timeout", str(wait_ms), "-timeout", "60s"),
        *("-trace_msg", "-message_file", str(workdir / "messages.log")),
        *("-trace_err", "-error_file", str(workdir / "errors.log")),
    ]


def sip_responses(workdir: Path) -> list[int]:
    """Status codes of the SIP responses sipp received, in order."""
    trace = workdir / "messages.log"
    text = trace.read_text() if trace.exists() else ""
    return [int(code) for code in re.findall(r"^SIP/2\.0 (\d{3})", text, re.M)]


def sipp_call(endpoint: stack.SipEndpoint, number: str, workdir: Path, wait_ms: int) -> list[int]:
    # sipp's exit status only says whether the scenario (which expects 200 OK) completed.
    done = subprocess.run(
        sipp_argv(endpoint, number, workdir, wait_ms),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=90,
    )
    codes = sip_responses(workdir)
    if not codes:
        pytest.fail(
            f"sipp got no SIP response at all (exit {done.returncode}):\n"
            f"{done.stdout[-1500:]}\n{done.stderr[-1500:]}\n{stack.log_tail('livekit-sip')}",
            pytrace=False,
        )
    return codes


@contextlib.asynccontextmanager
async def inbound_trunk(
    lkapi: api.LiveKitAPI, number: str, auth: tuple[str, str] | None = None
) -> AsyncIterator[api.SIPInboundTrunkInfo]:
    username, password = auth or ("", "")
    trunk = await lkapi.sip.create_inbound_trunk(
        api.CreateSIPInboundTrunkRequest(
            trunk=api.SIPInboundTrunkInfo(
                name=unique("trunk"),
                numbers=[number],
                auth_username=username,
                auth_password=password,
            )
        )
    )
    try:
        yield trunk
    finally:
        await lkapi.sip.delete_trunk(api.DeleteSIPTrunkRequest(sip_trunk_id=trunk.sip_trunk_id))


def fresh_number() -> str:
    return f"+1555{uuid.uuid4().int % 10**7:07d}"


async def test_sipp_invite_gets_a_final_rejection(
    livekit: stack.LiveKitEndpoint, sip: stack.SipEndpoint, tmp_path: Path
) -> None:
    number = fresh_number()
    async with (
        livekit.api() as lkapi,
        inbound_trunk(lkapi, number, auth=("caller", uuid.uuid4().hex)),
    ):
        codes = await asyncio.to_thread(sipp_call, sip, number, tmp_path, 10_000)
    finals = [code for code in codes if code >= 200]
    # livekit-sip learns the trunk's credentials from livekit-server over Redis psrpc and
    # challenges the unauthenticated INVITE; had that round trip failed it would answer 503.
    assert finals and 400 <= finals[0] < 700, codes
    assert finals[0] == 407, f"expected a 407 digest challenge, got {codes}"


async def test_sipp_invite_for_unknown_number_is_dropped_without_answer(
    sip: stack.SipEndpoint, tmp_path: Path
) -> None:
    # livekit-server (OSS) answers "no trunk, no dispatch rule" with DROP, and livekit-sip then
    # stays silent on purpose (anti-flood): a caller to an unknown number sees no final response.
    codes = await asyncio.to_thread(sipp_call, sip, fresh_number(), tmp_path, 4_000)
    assert codes[0] == 100, codes  # livekit-sip took the INVITE
    assert [code for code in codes if code >= 200] == [], codes


async def test_sipp_call_to_a_dispatched_number_joins_a_room(
    livekit: stack.LiveKitEndpoint, sip: stack.SipEndpoint, tmp_path: Path
) -> None:
    number = fresh_number()
    prefix = unique("call") + "-"
    async with livekit.api() as lkapi, inbound_trunk(lkapi, number) as trunk:
        rule = await lkapi.sip.create_dispatch_rule(
            api.CreateSIPDispatchRuleRequest(
                dispatch_rule=api.SIPDispatchRuleInfo(
                    name=unique("rule"),
                    trunk_ids=[trunk.sip_trunk_id],
                    rule=api.SIPDispatchRule(
                        dispatch_rule_individual=api.SIPDispatchRuleIndividual(room_prefix=prefix)
                    ),
                )
            )
        )
        # Without an agent to subscribe, livekit-sip keeps ringing; sipp gives up after 15 s.
        caller = await asyncio.create_subprocess_exec(
            *sipp_argv(sip, number, tmp_path, 15_000),
            cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            participant = None
            deadline = time.monotonic() + 15
            while participant is None and time.monotonic() < deadline:
                rooms = await lkapi.room.list_rooms(api.ListRoomsRequest())
                for room in rooms.rooms:
                    if room.name.startswith(prefix):
                        listed = await lkapi.room.list_participants(
                            api.ListParticipantsRequest(room=room.name)
                        )
                        participant = next(iter(listed.participants), None)
                await asyncio.sleep(0.5)
            assert participant is not None, (
                f"no room {prefix}* with a participant after 15 s; SIP responses: "
                f"{sip_responses(tmp_path)}\n{stack.log_tail('livekit-sip')}"
            )
            assert participant.kind == api.ParticipantInfo.Kind.SIP
            assert participant.attributes["sip.trunkPhoneNumber"] == number
            assert 180 in sip_responses(tmp_path)
        finally:
            with contextlib.suppress(ProcessLookupError):
                caller.terminate()
            await caller.wait()
            await lkapi.sip.delete_dispatch_rule(
                api.DeleteSIPDispatchRuleRequest(sip_dispatch_rule_id=rule.sip_dispatch_rule_id)
            )


async def addresses_carrying_media(room: rtc.Room) -> set[str]:
    """Server-side addresses of the ICE candidate pairs that received data."""
    stats = await room.get_rtc_stats()
    # Recent servers and SDKs may use one peer connection for both directions: read both lists.
    entries = [*stats.publisher_stats, *stats.subscriber_stats]
    remote = {
        e.remote_candidate.rtc.id: e.remote_candidate.candidate.address
        for e in entries
        if e.WhichOneof("stats") == "remote_candidate"
    }
    return {
        remote.get(e.candidate_pair.candidate_pair.remote_candidate_id, "?")
        for e in entries
        if e.WhichOneof("stats") == "candidate_pair"
        and e.candidate_pair.candidate_pair.bytes_received > 0
    }


SAMPLE_RATE = 48000
TONE_HZ = 440.0


async def receive_tone(track: rtc.Track, seconds: float, within_s: float) -> np.ndarray:
    """Non-silent samples received on `track`: `seconds` of them, or what came in `within_s`."""
    received: list[np.ndarray] = []
    stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1)
    deadline = time.monotonic() + within_s
    try:
        async for event in stream:
            samples = np.frombuffer(event.frame.data, dtype=np.int16)
            if np.sqrt(np.mean(samples.astype(np.float64) ** 2)) > 500:
                received.append(samples)
            if sum(len(s) for s in received) >= seconds * SAMPLE_RATE:
                break
            if time.monotonic() > deadline:
                break
    finally:
        await stream.aclose()
    return np.concatenate(received) if received else np.zeros(0, dtype=np.int16)


async def test_two_participants_exchange_audio_over_webrtc(
    livekit: stack.LiveKitEndpoint,
) -> None:
    room_name = unique("media")

    def token(identity: str) -> str:
        grants = api.VideoGrants(room_join=True, room=room_name)
        return (
            api.AccessToken(livekit.api_key, livekit.api_secret)
            .with_identity(identity)
            .with_grants(grants)
            .to_jwt()
        )

    speaker, listener = rtc.Room(), rtc.Room()
    subscribed: asyncio.Future[rtc.Track] = asyncio.get_running_loop().create_future()

    @listener.on("track_subscribed")
    def _on_track(track: rtc.Track, *_: object) -> None:
        if track.kind == rtc.TrackKind.KIND_AUDIO and not subscribed.done():
            subscribed.set_result(track)

    await listener.connect(livekit.url, token("listener"))
    await speaker.connect(livekit.url, token("speaker"))
    try:
        source = rtc.AudioSource(SAMPLE_RATE, 1)
        track = rtc.LocalAudioTrack.create_audio_track("tone", source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        await speaker.local_participant.publish_track(track, options)

        async def play_tone() -> None:
            samples_per_frame = SAMPLE_RATE // 100
            t = 0
            while True:
                n = np.arange(t, t + samples_per_frame)
                wave = (0.3 * 32767 * np.sin(2 * np.pi * TONE_HZ * n / SAMPLE_RATE)).astype(
                    np.int16
                )
                frame = rtc.AudioFrame(wave.tobytes(), SAMPLE_RATE, 1, samples_per_frame)
                await source.capture_frame(frame)
                t += samples_per_frame

        player = asyncio.create_task(play_tone())
        remote = await asyncio.wait_for(subscribed, timeout=20)
        audio = await receive_tone(remote, seconds=1.0, within_s=20)
        player.cancel()
        assert len(audio) >= SAMPLE_RATE, (
            f"listener got {len(audio) / SAMPLE_RATE:.2f} s of non-silent audio in 20 s"
        )
        spectrum = np.abs(np.fft.rfft(audio[:SAMPLE_RATE]))
        peak_hz = float(np.argmax(spectrum))  # one second of audio: bins are 1 Hz apart
        assert abs(peak_hz - TONE_HZ) < 5, f"received tone peaks at {peak_hz} Hz"

        # Media flowed through the address livekit-server advertises (pods use the same one).
        assert stack.node_ip() in await addresses_carrying_media(listener)
    finally:
        await speaker.disconnect()
        await listener.disconnect()


# Runs inside the pod-like network namespace: joins the room and plays a 440 Hz tone.
POD_SPEAKER = """
import asyncio, sys
import numpy as np
from livekit import rtc

async def main():
    room = rtc.Room()
    await room.connect(sys.argv[1], sys.argv[2])
    source = rtc.AudioSource(48000, 1)
    track = rtc.LocalAudioTrack.create_audio_track("tone", source)
    options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
    await room.local_participant.publish_track(track, options)
    t = 0
    while True:
        n = np.arange(t, t + 480)
        wave = (0.3 * 32767 * np.sin(2 * np.pi * 440 * n / 48000)).astype(np.int16)
        await source.capture_frame(rtc.AudioFrame(wave.tobytes(), 48000, 1, 480))
        t += 480

asyncio.run(main())
"""


@pytest.fixture
def pod_like_netns() -> Iterator[tuple[str, str]]:
    """A network namespace wired to the host like a pod: (namespace, host address it uses)."""
    tag = uuid.uuid4().hex[:6]
    netns, host_if, pod_if = f"lkpod-{tag}", f"lkh{tag}", f"lkp{tag}"
    subnet = f"10.254.{int(tag[:2], 16)}"
    host_ip, pod_ip = f"{subnet}.1", f"{subnet}.2"
    steps = [
        ["ip", "netns", "add", netns],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", pod_if],
        ["ip", "link", "set", pod_if, "netns", netns],
        ["ip", "addr", "add", f"{host_ip}/24", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "-n", netns, "addr", "add", f"{pod_ip}/24", "dev", pod_if],
        ["ip", "-n", netns, "link", "set", pod_if, "up"],
        ["ip", "-n", netns, "link", "set", "lo", "up"],
        ["ip", "-n", netns, "route", "add", "default", "via", host_ip],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, text=True)
        yield netns, host_ip
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


async def test_participant_in_a_pod_network_reaches_livekit_media(
    livekit: stack.LiveKitEndpoint, pod_like_netns: tuple[str, str]
) -> None:
    """A client in its own network namespace (as in a pod) signals through the host address
    pods use and sends media to the ICE candidates livekit-server advertises."""
    netns, host_ip = pod_like_netns
    room_name = unique("pod-media")

    def token(identity: str) -> str:
        grants = api.VideoGrants(room_join=True, room=room_name)
        return (
            api.AccessToken(livekit.api_key, livekit.api_secret)
            .with_identity(identity)
            .with_grants(grants)
            .to_jwt()
        )

    listener = rtc.Room()
    subscribed: asyncio.Future[rtc.Track] = asyncio.get_running_loop().create_future()

    @listener.on("track_subscribed")
    def _on_track(track: rtc.Track, *_: object) -> None:
        if not subscribed.done():
            subscribed.set_result(track)

    await listener.connect(livekit.url, token("host-listener"))
    pod_url = f"ws://{host_ip}:{stack.LIVEKIT_PORT}"
    speaker = await asyncio.create_subprocess_exec(
        *("ip", "netns", "exec", netns, sys.executable, "-c", POD_SPEAKER),
        *(pod_url, token("pod-speaker")),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        try:
            remote = await asyncio.wait_for(subscribed, timeout=30)
        except TimeoutError:
            speaker.kill()
            _, err = await speaker.communicate()
            pytest.fail(f"no track from the pod-like client:\n{err.decode()[-2000:]}")
        audio = await receive_tone(remote, seconds=1.0, within_s=20)
        assert len(audio) >= SAMPLE_RATE, f"got {len(audio) / SAMPLE_RATE:.2f} s of audio"
        assert abs(float(np.argmax(np.abs(np.fft.rfft(audio[:SAMPLE_RATE])))) - TONE_HZ) < 5
        assert stack.node_ip() in await addresses_carrying_media(listener)
    finally:
        with contextlib.suppress(ProcessLookupError):
            speaker.kill()
        await speaker.wait()
        await listener.disconnect()


def test_prometheus_answers_and_scrapes_the_stack(
    prometheus: PrometheusClient, livekit: stack.LiveKitEndpoint, sip: stack.SipEndpoint
) -> None:
    deadline = time.monotonic() + 30
    while True:
        up = {sample.labels["job"]: sample.value for sample in prometheus.query("up")}
        if all(up.get(job) == 1 for job in ("prometheus", "livekit-server", "livekit-sip")):
            break
        assert time.monotonic() < deadline, f"`up` by job after 30 s: {up}"
        time.sleep(1)


def test_livekit_down_stops_every_process_and_up_restores_them(
    livekit: stack.LiveKitEndpoint,
    sip: stack.SipEndpoint,
    prometheus: PrometheusClient,
    s3: stack.S3Endpoint,
) -> None:
    refuse_while_the_demo_holds("taking the LiveKit stack down")
    pids = stack.status()
    assert all(pids.values()), pids
    cli = [sys.executable, "-m", "voicefleet_localdev", "livekit"]
    env = dict(os.environ)  # the editable install makes voicefleet_localdev importable

    down = subprocess.run([*cli, "down"], capture_output=True, text=True, env=env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    survivors = {name: pid for name, pid in pids.items() if pid and stack.process_alive(pid)}
    assert survivors == {}, f"still running after `livekit down`: {survivors}"
    binaries = {
        str(paths.binary("livekit-server")),
        str(paths.binary("livekit-sip")),
        str(paths.binary("prometheus")),
        str(paths.binary("versitygw")),
        "/usr/bin/redis-server",
        "/usr/bin/redis-check-rdb",  # redis-server is a link to it
    }
    leftovers = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "exe") in binaries:
                leftovers.append((proc.name, os.readlink(proc / "exe")))
        except OSError:
            continue
    assert leftovers == [], f"stack binaries still running: {leftovers}"

    # Bring the stack back for the rest of the session (fixtures stop it at the end).
    began = time.monotonic()
    again = subprocess.run([*cli, "up"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert all(stack.status().values()), again.stdout
    print(f"livekit up after down: {time.monotonic() - began:.1f} s\n{again.stdout}")


def _testserver_deployment(name: str, annotations: dict[str, str]) -> dict[str, Any]:
    labels = {"app": name}
    container = {
        "name": "testserver",
        "image": images.TESTSERVER_IMAGE,
        "imagePullPolicy": "Never",
        "ports": [{"containerPort": 8080}],
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    return {
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": {"containers": [container]},
            },
        },
    }


def test_prometheus_discovers_annotated_pods_of_the_cluster(
    cluster_with_node: ClusterHandle, prometheus: PrometheusClient
) -> None:
    # Typed as Any: the client's models are awkward for plain-dict manifests.
    core: Any = k8s.CoreV1Api(cluster_with_node.api_client)
    apps: Any = k8s.AppsV1Api(cluster_with_node.api_client)
    namespace = unique("e2e-prom")
    core.create_namespace({"metadata": {"name": namespace}})
    try:
        scraped = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": "8080",
            "prometheus.io/path": "/custom-metrics",
        }
        apps.create_namespaced_deployment(namespace, _testserver_deployment("scraped", scraped))
        apps.create_namespaced_deployment(namespace, _testserver_deployment("ignored", {}))

        def running_pods() -> dict[str, Any] | None:
            pods = core.list_namespaced_pod(namespace).items
            ready = {p.metadata.labels["app"]: p for p in pods if p.status.phase == "Running"}
            return ready if len(ready) == 2 else None

        pods = wait_for("both testserver pods Running", running_pods, timeout=180)
        pod = pods["scraped"]

        targets = prometheus.wait_for_targets(
            "kubernetes-pods", {"namespace": namespace, "pod": pod.metadata.name}, timeout=90
        )
        # The port and path annotations are honoured, and Prometheus reaches the pod's IP.
        assert targets[0]["scrapeUrl"] == f"http://{pod.status.pod_ip}:8080/custom-metrics"

        def scraped_once() -> dict[str, Any] | None:
            for target in prometheus.active_targets():
                if (
                    target["labels"].get("pod") == pod.metadata.name
                    and target["health"] != "unknown"
                ):
                    return dict(target)
            return None

        target = wait_for("a first scrape of the annotated pod", scraped_once, timeout=30)
        # testserver answers text that is not the exposition format: a parse error is expected,
        # a network error would mean the host cannot reach the pod.
        for network_error in ("connection refused", "no route", "i/o timeout", "deadline"):
            assert network_error not in target["lastError"], target

        ignored = pods["ignored"].metadata.name
        listed = [t["labels"].get("pod") for t in prometheus.active_targets()]
        assert ignored not in listed, "a pod without prometheus.io/scrape was scraped"
    finally:
        core.delete_namespace(namespace)
