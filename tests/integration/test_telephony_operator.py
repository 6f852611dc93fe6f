"""The operator's telephony against a real kube-apiserver and a real livekit-server.

The operator runs in-process (kopf) with the platform Secret holding the LiveKit stack's dev
credentials; VoiceAgents with numbers get a SIP trunk and dispatch rule that livekit-api lists,
TelephonyReady and status.telephony say so; conflicts, drift, deletion through the finalizer and
an operator killed while provisioning are exercised end to end.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from livekit import api
from voicefleet_localdev.livekit import LiveKitEndpoint
from voicefleet_localdev.operator_process import OperatorProcess
from voicefleet_localdev.pytest_plugin import ClusterHandle
from voicefleet_operator import telephony, telephony_handlers
from voicefleet_testkit.net import free_port
from voicefleet_testkit.waiting import wait_for

from tests.integration.test_operator import (
    CRD,
    GROUP,
    PLURAL,
    VERSION,
    _create_namespace,
    _create_secret,
    condition,
    create_agent,
    custom,
    events_of,
    example_spec,
    get_agent,
    operator_log,
    patch_spec,
    settings_for,
    stop_cleanly,
    wait_condition,
)

pytestmark = pytest.mark.integration


def fresh_number() -> str:
    return "+1555" + "".join(secrets.choice("0123456789") for _ in range(7))


@pytest.fixture(scope="module")
def cluster(control_plane: ClusterHandle) -> ClusterHandle:
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/voiceagents.voicefleet.dev"
    )
    return control_plane


@pytest.fixture(scope="module")
def platform(cluster: ClusterHandle, livekit: LiveKitEndpoint) -> Iterator[str]:
    """The operator's namespace with the real LiveKit stack's credentials."""
    namespace = _create_namespace(cluster, "vf-platform")
    _create_secret(
        cluster,
        namespace,
        "voicefleet-livekit",
        {"LIVEKIT_API_KEY": livekit.api_key, "LIVEKIT_API_SECRET": livekit.api_secret},
    )
    yield namespace
    k8s.CoreV1Api(cluster.api_client).delete_namespace(namespace)


@pytest.fixture
def tenants(cluster: ClusterHandle) -> Iterator[tuple[str, str]]:
    """Two tenant namespaces with provider keys."""
    created = []
    for prefix in ("tel-a", "tel-b"):
        namespace = _create_namespace(cluster, prefix)
        _create_secret(
            cluster,
            namespace,
            "provider-keys",
            {"OPENAI_API_KEY": "sk-x", "DEEPGRAM_API_KEY": "dg-x", "ELEVEN_API_KEY": "el-x"},
        )
        _create_secret(cluster, namespace, "acme-orders-api", {"authorization": "Bearer t0ken"})
        created.append(namespace)
    yield created[0], created[1]
    for namespace in created:
        k8s.CoreV1Api(cluster.api_client).delete_namespace(namespace)


@pytest.fixture
def fast_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    # The drift timer runs every 30 s in production; the tests cannot wait that long.
    monkeypatch.setattr(telephony_handlers, "TELEPHONY_CHECK_SECONDS", 2.0)


def phone_spec(*numbers: str, **telephony_fields: Any) -> dict[str, Any]:
    spec = example_spec()
    spec["telephony"] = {"numbers": list(numbers), **telephony_fields}
    return spec


def livekit_objects(
    livekit: LiveKitEndpoint, namespace: str, name: str
) -> tuple[list[api.SIPInboundTrunkInfo], list[api.SIPDispatchRuleInfo]]:
    return asyncio.run(livekit.sip_objects_named(telephony.object_name(namespace, name)))


def delete_agent(cluster: ClusterHandle, namespace: str, name: str) -> None:
    custom(cluster).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def agent_gone(cluster: ClusterHandle, namespace: str, name: str) -> bool:
    try:
        get_agent(cluster, namespace, name)
    except k8s.ApiException as error:
        return error.status == 404
    return False


def test_numbers_are_provisioned_updated_contested_and_removed(
    cluster: ClusterHandle,
    platform: str,
    tenants: tuple[str, str],
    livekit: LiveKitEndpoint,
    fast_checks: None,
) -> None:
    first_tenant, second_tenant = tenants
    number, other = fresh_number(), fresh_number()
    _create_secret(cluster, first_tenant, "sip-auth", {"username": "carrier", "password": "pw-1"})
    operator = OperatorProcess(settings_for(platform, tenants), cluster.kubeconfig).start()
    try:
        applied_at = time.monotonic()
        create_agent(
            cluster,
            first_tenant,
            "support",
            phone_spec(
                number,
                inbound={"allowedAddresses": ["127.0.0.1"], "authSecretRef": {"name": "sip-auth"}},
                transferTo="+15559990000",
            ),
        )
        agent = wait_condition(cluster, first_tenant, "support", "TelephonyReady", "True")
        ready_after = time.monotonic() - applied_at
        print(f"\nkubectl apply -> TelephonyReady=True: {ready_after:.2f}s")
        status = agent["status"]
        trunks, rules = livekit_objects(livekit, first_tenant, "support")
        assert [t.sip_trunk_id for t in trunks] == [status["telephony"]["trunkID"]]
        assert [r.sip_dispatch_rule_id for r in rules] == [status["telephony"]["dispatchRuleID"]]
        assert status["telephony"]["numbers"] == [number]
        assert status["numbers"] == number  # the Numbers printer column
        assert list(trunks[0].numbers) == [number]
        assert list(trunks[0].allowed_addresses) == ["127.0.0.1"]
        assert (trunks[0].auth_username, trunks[0].auth_password) == ("carrier", "pw-1")
        assert [a.agent_name for a in rules[0].room_config.agents] == [f"{first_tenant}.support"]
        # The password is nowhere in the status or the Events.
        assert "pw-1" not in str(agent)
        assert not [e for e in events_of(cluster, first_tenant, "support") if "pw-1" in e.message]
        assert any(
            e.reason == "TelephonyProvisioned" for e in events_of(cluster, first_tenant, "support")
        )

        # A new number and a rotated password update the same trunk in place.
        k8s.CoreV1Api(cluster.api_client).patch_namespaced_secret(
            "sip-auth", first_tenant, {"stringData": {"password": "pw-2"}}
        )
        patch_spec(cluster, first_tenant, "support", {"telephony": {"numbers": [number, other]}})

        def updated() -> bool:
            found, _ = livekit_objects(livekit, first_tenant, "support")
            return (
                bool(found)
                and list(found[0].numbers) == [number, other]
                and (found[0].auth_password == "pw-2")
            )

        wait_for("trunk updated in place", updated, timeout=30)
        trunks, rules = livekit_objects(livekit, first_tenant, "support")
        assert [t.sip_trunk_id for t in trunks] == [status["telephony"]["trunkID"]]
        wait_for(
            "status numbers",
            lambda: (
                get_agent(cluster, first_tenant, "support")["status"].get("numbers")
                == f"{number}, {other}"
            ),
            timeout=30,
        )

        # Another tenant claims the number: it does not get it.
        create_agent(cluster, second_tenant, "sales", phone_spec(number))
        contested = wait_condition(cluster, second_tenant, "sales", "TelephonyReady", "False")
        found = condition(contested, "TelephonyReady")
        assert found is not None and found["reason"] == "NumberConflict"
        assert number in found["message"] and f"{first_tenant}/support" in found["message"]
        wait_for(
            "NumberConflict event",
            lambda: any(
                e.reason == "NumberConflict" and number in e.message
                for e in events_of(cluster, second_tenant, "sales")
            ),
            timeout=30,
        )
        assert livekit_objects(livekit, second_tenant, "sales") == ([], [])
        assert contested["status"].get("numbers") is None
        trunks, _ = livekit_objects(livekit, first_tenant, "support")
        assert number in trunks[0].numbers

        # Drift: the trunk deleted behind the operator's back comes back.
        async def delete_trunk(trunk_id: str) -> None:
            async with livekit.api() as lkapi:
                await lkapi.sip.delete_trunk(api.DeleteSIPTrunkRequest(sip_trunk_id=trunk_id))

        asyncio.run(delete_trunk(trunks[0].sip_trunk_id))

        def recreated() -> bool:
            found, rules = livekit_objects(livekit, first_tenant, "support")
            return (
                len(found) == 1
                and len(rules) == 1
                and list(rules[0].trunk_ids) == [found[0].sip_trunk_id]
            )

        wait_for("trunk re-created", recreated, timeout=30)

        # Deleting the holder removes its trunk and rule (finalizer), and the number moves on.
        delete_agent(cluster, first_tenant, "support")
        wait_for("support deleted", lambda: agent_gone(cluster, first_tenant, "support"), 30)
        assert livekit_objects(livekit, first_tenant, "support") == ([], [])
        taken = wait_condition(cluster, second_tenant, "sales", "TelephonyReady", "True")
        assert taken["status"]["telephony"]["numbers"] == [number]
        delete_agent(cluster, second_tenant, "sales")
        wait_for("sales deleted", lambda: agent_gone(cluster, second_tenant, "sales"), 30)
        assert livekit_objects(livekit, second_tenant, "sales") == ([], [])
    finally:
        stop_cleanly(operator)


def test_livekit_unreachable_is_a_condition_with_retries_not_a_crash(
    cluster: ClusterHandle, platform: str, tenants: tuple[str, str], livekit: LiveKitEndpoint
) -> None:
    tenant = tenants[0]
    # Port 9 is closed: every LiveKit call fails at once.
    settings = settings_for(platform, (tenant,), livekit_url="ws://127.0.0.1:9")
    operator = OperatorProcess(settings, cluster.kubeconfig).start()
    try:
        create_agent(cluster, tenant, "support", phone_spec(fresh_number()))
        agent = wait_condition(cluster, tenant, "support", "TelephonyReady", "False")
        found = condition(agent, "TelephonyReady")
        assert found is not None and found["reason"] == "LiveKitError"
        assert "list SIP inbound trunks failed" in found["message"]
        assert "retrying in" in found["message"]
        # Deleting waits for LiveKit (the finalizer stays) rather than leaking the trunk: once
        # the operator has tried the removal and failed, the VoiceAgent is still there.
        delete_agent(cluster, tenant, "support")
        wait_for(
            "the operator's failed telephony removal",
            lambda: f"{tenant}/support: telephony removal failed" in operator_log(operator),
            timeout=60,
            describe=operator.tail,
        )
        assert get_agent(cluster, tenant, "support")["metadata"].get("deletionTimestamp")
    finally:
        stop_cleanly(operator)
    # A working operator finishes the deletion.
    operator = OperatorProcess(settings_for(platform, (tenant,)), cluster.kubeconfig).start()
    try:
        wait_for("support deleted", lambda: agent_gone(cluster, tenant, "support"), 60)
    finally:
        stop_cleanly(operator)


def test_operator_killed_while_provisioning_leaves_one_trunk_and_one_rule(
    cluster: ClusterHandle,
    platform: str,
    tenants: tuple[str, str],
    livekit: LiveKitEndpoint,
    tmp_path: Path,
) -> None:
    tenant = tenants[0]
    settings = settings_for(platform, (tenant,))
    number = fresh_number()
    # Kill the operator at several points of its first provisioning, each time restarting it:
    # each kill comes a moment after the process is up (/healthz answers), and where it landed
    # is read after it (LiveKit's objects and the condition, which no one changes meanwhile).
    landed: list[tuple[int, int, str | None]] = []
    for attempt, delay in enumerate((0.0, 0.3, 0.6, 1.0)):
        log = tmp_path / f"op-{attempt}.log"
        process = OperatorProcess(settings, cluster.kubeconfig, log).start()
        try:
            if attempt == 0:
                create_agent(cluster, tenant, "support", phone_spec(number))
            time.sleep(delay)
        finally:
            process.kill()
        trunks, rules = livekit_objects(livekit, tenant, "support")
        ready = condition(get_agent(cluster, tenant, "support"), "TelephonyReady")
        landed.append((len(trunks), len(rules), ready["status"] if ready else None))
    # At least one kill cut the provisioning short (else the restarts had nothing to finish).
    assert any(state != (1, 1, "True") for state in landed), landed
    operator = OperatorProcess(settings, cluster.kubeconfig).start()
    try:
        agent = wait_condition(cluster, tenant, "support", "TelephonyReady", "True", timeout=60)
        trunks, rules = livekit_objects(livekit, tenant, "support")
        assert (len(trunks), len(rules)) == (1, 1)
        assert agent["status"]["telephony"]["trunkID"] == trunks[0].sip_trunk_id
        assert agent["status"]["telephony"]["dispatchRuleID"] == rules[0].sip_dispatch_rule_id
        delete_agent(cluster, tenant, "support")
        wait_for("support deleted", lambda: agent_gone(cluster, tenant, "support"), 30)
        assert livekit_objects(livekit, tenant, "support") == ([], [])
    finally:
        stop_cleanly(operator)


# An operator process that SIGKILLs itself the moment livekit-server has answered one SIP API
# call (argv[1]: a SipService method): after LiveKit made the object, before anything else.
DIE_AFTER_SIP_CALL = """
import os, signal, sys
from livekit.api.sip_service import SipService
from voicefleet_operator.__main__ import main

method = sys.argv[1]
original = getattr(SipService, method)

async def call_then_die(self, *args, **kwargs):
    result = await original(self, *args, **kwargs)
    print(f"killed after {method}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(SipService, method, call_then_die)
sys.exit(main())
"""


def annotations_of(agent: dict[str, Any]) -> dict[str, str]:
    return dict(agent["metadata"].get("annotations") or {})


@pytest.mark.parametrize("killed_after", ["create_inbound_trunk", "create_dispatch_rule"])
def test_killed_before_recording_then_numbers_removed_leaves_nothing_and_frees_the_number(
    cluster: ClusterHandle,
    platform: str,
    tenants: tuple[str, str],
    livekit: LiveKitEndpoint,
    fast_checks: None,
    tmp_path: Path,
    killed_after: str,
) -> None:
    """Issue 15 item 6: the operator dies after LiveKit created the trunk (and maybe the rule)
    and before status.telephony records it; the tenant removes spec.telephony while it is down;
    the restarted operator must still remove both, by name, and the number must be free."""
    first_tenant, second_tenant = tenants
    number = fresh_number()
    settings = settings_for(platform, tenants)
    dying = OperatorProcess(
        settings,
        cluster.kubeconfig,
        tmp_path / "dying-operator.log",
        python_args=("-c", DIE_AFTER_SIP_CALL, killed_after),
    ).launch()
    try:
        create_agent(cluster, first_tenant, "support", phone_spec(number))
        try:
            returncode = dying.wait(90)
        except Exception:
            raise AssertionError(f"the operator did not die\n{dying.tail()}") from None
        assert returncode == -9, dying.tail()
        assert f"killed after {killed_after}" in dying.log.read_text()
    finally:
        dying.kill()

    # The state the issue describes: LiveKit has the objects, the status does not know them.
    trunks, rules = livekit_objects(livekit, first_tenant, "support")
    assert len(trunks) == 1 and [str(n) for n in trunks[0].numbers] == [number]
    assert len(rules) == (1 if killed_after == "create_dispatch_rule" else 0)
    agent = get_agent(cluster, first_tenant, "support")
    assert not (agent.get("status") or {}).get("telephony")
    assert annotations_of(agent).get(telephony_handlers.LIVEKIT_OBJECTS_ANNOTATION) == (
        telephony.object_name(first_tenant, "support")
    )

    # While no operator runs, the tenant drops its numbers.
    patch_spec(cluster, first_tenant, "support", {"telephony": None})

    operator = OperatorProcess(settings, cluster.kubeconfig).start()
    try:
        wait_for(
            "the unrecorded trunk and rule removed by name",
            lambda: livekit_objects(livekit, first_tenant, "support") == ([], []),
            timeout=60,
        )
        wait_for(
            "the write-ahead annotation cleared after the removal",
            lambda: (
                telephony_handlers.LIVEKIT_OBJECTS_ANNOTATION
                not in annotations_of(get_agent(cluster, first_tenant, "support"))
            ),
            timeout=30,
        )
        cleaned = get_agent(cluster, first_tenant, "support")
        assert condition(cleaned, "TelephonyReady") is None
        assert not (cleaned.get("status") or {}).get("telephony")

        # The number is free: another tenant's VoiceAgent gets it (no NumberConflict).
        create_agent(cluster, second_tenant, "sales", phone_spec(number))
        taken = wait_condition(cluster, second_tenant, "sales", "TelephonyReady", "True")
        found = condition(taken, "TelephonyReady")
        assert found is not None and found["reason"] == "Provisioned"
        assert taken["status"]["telephony"]["numbers"] == [number]
        trunks, rules = livekit_objects(livekit, second_tenant, "sales")
        assert [list(t.numbers) for t in trunks] == [[number]] and len(rules) == 1

        delete_agent(cluster, first_tenant, "support")
        delete_agent(cluster, second_tenant, "sales")
        wait_for("support deleted", lambda: agent_gone(cluster, first_tenant, "support"), 30)
        wait_for("sales deleted", lambda: agent_gone(cluster, second_tenant, "sales"), 30)
        assert livekit_objects(livekit, first_tenant, "support") == ([], [])
        assert livekit_objects(livekit, second_tenant, "sales") == ([], [])
    finally:
        stop_cleanly(operator)


def lease_holder(cluster: ClusterHandle, namespace: str, name: str) -> str | None:
    try:
        lease = k8s.CoordinationV1Api(cluster.api_client).read_namespaced_lease(name, namespace)
    except k8s.ApiException as error:
        if error.status == 404:
            return None
        raise
    return (lease.spec.holder_identity if lease.spec else None) or None


def test_two_replicas_one_active_and_the_standby_takes_over_a_killed_leader(
    cluster: ClusterHandle,
    platform: str,
    tenants: tuple[str, str],
    livekit: LiveKitEndpoint,
    tmp_path: Path,
) -> None:
    """Issue 15 item 7: two operator processes with leader election (as the chart runs them);
    the leader is SIGKILLed while it provisions; the standby converges every VoiceAgent with
    exactly one trunk and one rule each. Then a clean stop hands over at once."""
    lease = f"vf-election-{secrets.token_hex(3)}"
    settings = settings_for(platform, tenants)
    ports = {identity: free_port() for identity in ("replica-a", "replica-b")}

    def replica(identity: str) -> OperatorProcess:
        return OperatorProcess(
            settings,
            cluster.kubeconfig,
            tmp_path / f"{identity}.log",
            extra_env={
                "POD_NAME": identity,
                "POD_NAMESPACE": platform,
                "VOICEFLEET_LEADER_ELECTION": "true",
                "VOICEFLEET_LEASE_NAME": lease,
                "VOICEFLEET_LIVENESS_PORT": str(ports[identity]),
            },
        ).launch()

    def healthz(identity: str) -> str | None:
        """The liveness probe's answer: the standby's own, or kopf's once it leads."""
        url = f"http://127.0.0.1:{ports[identity]}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return str(response.read().decode())
        except OSError:
            return None

    replicas = {name: replica(name) for name in ("replica-a", "replica-b")}
    agents = [(tenant, f"phone-{i}") for tenant in tenants for i in range(2)]
    try:
        leader = wait_for("a leader", lambda: lease_holder(cluster, platform, lease), timeout=60)
        (standby,) = set(replicas) - {leader}
        wait_for(
            "the standby answering its liveness probe",
            lambda: "standby" in (healthz(standby) or ""),
            timeout=30,
        )
        for namespace, name in agents:
            create_agent(cluster, namespace, name, phone_spec(fresh_number()))

        first_namespace, first_name = agents[0]
        wait_for(
            "the leader provisioning",
            lambda: livekit_objects(livekit, first_namespace, first_name)[0],
            timeout=60,
            interval=0.05,
        )
        replicas[leader].kill()  # SIGKILL, mid-way through the batch
        killed_at = time.monotonic()
        done = sum(1 for ns, name in agents if livekit_objects(livekit, ns, name) != ([], []))
        print(f"\nleader killed with {done}/{len(agents)} VoiceAgents provisioned in LiveKit")
        assert replicas[leader].returncode() == -9
        wait_for(
            "the standby holding the lease",
            lambda: lease_holder(cluster, platform, lease) == standby,
            timeout=60,
            interval=0.2,
        )
        takeover = time.monotonic() - killed_at
        # kopf's liveness endpoint now answers on the port the standby served.
        wait_for(
            "the new leader's kopf answering the liveness probe",
            lambda: (answer := healthz(standby)) is not None and "standby" not in answer,
            timeout=60,
        )
        for namespace, name in agents:
            wait_condition(cluster, namespace, name, "TelephonyReady", "True", timeout=90)
            wait_condition(cluster, namespace, name, "Reconciled", "True", timeout=30)
        converged = time.monotonic() - killed_at
        print(
            f"\nleader SIGKILLed -> standby holds the lease: {takeover:.1f}s; "
            f"-> {len(agents)} VoiceAgents TelephonyReady: {converged:.1f}s"
        )
        for namespace, name in agents:
            trunks, rules = livekit_objects(livekit, namespace, name)
            assert (len(trunks), len(rules)) == (1, 1), (namespace, name, trunks, rules)
            status = get_agent(cluster, namespace, name)["status"]["telephony"]
            assert status["trunkID"] == trunks[0].sip_trunk_id
            assert status["dispatchRuleID"] == rules[0].sip_dispatch_rule_id
        # The standby was idle until it held the lease: its log has kopf's start after that.
        log = replicas[standby].log.read_text()
        assert log.count("acquired lease") == 1, replicas[standby].tail()

        # A clean stop (SIGTERM, as when the pod is deleted) hands the lease over at once.
        replicas[leader] = replica(leader)  # the killed pod, restarted: now the standby
        wait_for(
            "the restarted replica standing by",
            lambda: "standing by" in replicas[leader].log.read_text(),
            timeout=60,
        )
        replicas[standby].terminate()
        stopped_at = time.monotonic()
        assert replicas[standby].wait(60) == 0, replicas[standby].tail()
        wait_for(
            "the lease handed over",
            lambda: lease_holder(cluster, platform, lease) == leader,
            timeout=60,
            interval=0.2,
        )
        handover = time.monotonic() - stopped_at
        print(f"leader stopped cleanly -> standby holds the lease: {handover:.1f}s")
        assert "released lease" in replicas[standby].log.read_text()

        for namespace, name in agents:
            delete_agent(cluster, namespace, name)
        wait_for(
            "every VoiceAgent deleted",
            lambda: all(agent_gone(cluster, ns, name) for ns, name in agents),
            timeout=60,
        )
        for namespace, name in agents:
            assert livekit_objects(livekit, namespace, name) == ([], [])
    finally:
        for process in replicas.values():
            process.kill()


def test_a_deposed_leader_exits_at_once(
    cluster: ClusterHandle, platform: str, tenants: tuple[str, str], tmp_path: Path
) -> None:
    """A leader that finds the Lease held by another replica (it was paused for longer than
    the lease, say) ends its process instead of acting on: exit status 3."""
    lease = f"vf-deposed-{secrets.token_hex(3)}"
    process = OperatorProcess(
        settings_for(platform, tenants),
        cluster.kubeconfig,
        tmp_path / "deposed.log",
        extra_env={
            "POD_NAME": "replica-a",
            "VOICEFLEET_LEADER_ELECTION": "true",
            "VOICEFLEET_LEASE_NAME": lease,
            "VOICEFLEET_LEASE_NAMESPACE": platform,
        },
    ).launch()
    try:
        wait_for(
            "replica-a leading",
            lambda: lease_holder(cluster, platform, lease) == "replica-a",
            timeout=60,
        )
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        k8s.CoordinationV1Api(cluster.api_client).patch_namespaced_lease(
            lease,
            platform,
            {"spec": {"holderIdentity": "replica-z", "renewTime": now, "acquireTime": now}},
        )
        deposed_at = time.monotonic()
        try:
            returncode = process.wait(30)
        except Exception:
            raise AssertionError(f"the deposed leader kept running\n{process.tail()}") from None
        print(f"\nlease taken over -> deposed leader exited: {time.monotonic() - deposed_at:.1f}s")
        assert returncode == 3, process.tail()
        assert "leadership lost" in process.log.read_text()
        assert lease_holder(cluster, platform, lease) == "replica-z"  # it did not write back
    finally:
        process.kill()
