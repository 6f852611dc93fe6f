"""The autoscaler's maths as tables: ramp, plateau, fall, flapping load, unreachable workers,
bounds and the manual pin; deletion costs; the HPA; and the worker reader against real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web
from voicefleet_operator.scaling import (
    DELETION_COST_ANNOTATION,
    LOAD_METRIC,
    Decision,
    FleetLoad,
    PendingScaleDown,
    Reason,
    ScalingPolicy,
    WorkerPod,
    WorkerReading,
    WorkerState,
    decide,
    deletion_cost,
    deletion_cost_updates,
    demand_replicas,
    read_fleet,
    render_hpa,
)
from voicefleet_runtime.admission import REPORT_PATH, WorkerReport

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)

# Small numbers, as in the e2e: a worker plans 2 * 0.7 = 1.4 jobs; one spare job.
POLICY = ScalingPolicy(
    jobs_per_worker=2,
    target_load=0.7,
    spare_jobs=1,
    min_replicas=1,
    max_replicas=5,
    scale_down_delay_seconds=10,
    load_threshold=0.7,
)


def policy(**changes: object) -> ScalingPolicy:
    values = {**POLICY.__dict__, **changes}
    return ScalingPolicy(**values)


# --- demand: one reading, no history --------------------------------------------------------


@pytest.mark.parametrize(
    ("active_jobs", "scaling", "expected"),
    [
        # ramp: ceil((jobs + 1) / 1.4)
        (0, POLICY, 1),
        (1, POLICY, 2),
        (2, POLICY, 3),
        (3, POLICY, 3),
        (4, POLICY, 4),
        (5, POLICY, 5),
        # bounds
        (9, POLICY, 5),
        (0, policy(min_replicas=3), 3),
        (0, policy(min_replicas=0, spare_jobs=0), 0),
        (0, policy(min_replicas=0, spare_jobs=1), 1),
        (100, policy(max_replicas=50), 50),
        # no spare: exactly full workers at target
        (7, policy(jobs_per_worker=10, spare_jobs=0), 1),
        (8, policy(jobs_per_worker=10, spare_jobs=0), 2),
        # exact arithmetic: 100 * 0.57 is 56.99999999999999 in floats, which would ask for 2
        (57, policy(jobs_per_worker=100, target_load=0.57, load_threshold=1.0, spare_jobs=0), 1),
        # a target above the worker's loadThreshold plans with the threshold (the worker reports
        # itself full there): 10 jobs per worker at 0.7 is 7, not 10
        (14, policy(jobs_per_worker=10, target_load=1.0, spare_jobs=0, max_replicas=9), 2),
        (15, policy(jobs_per_worker=10, target_load=1.0, spare_jobs=0, max_replicas=9), 3),
    ],
)
def test_demand(active_jobs: int, scaling: ScalingPolicy, expected: int) -> None:
    assert demand_replicas(active_jobs, scaling) == expected


# --- decisions over time --------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    second: float
    active_jobs: int
    replicas: int
    """Replicas expected after this step's decision."""
    reason: Reason


def run(scaling: ScalingPolicy, start_replicas: int, steps: list[Step]) -> list[Decision]:
    """Feed the readings to decide() as the timer does, carrying replicas and the window."""
    replicas, pending, decisions = start_replicas, None, []
    for step in steps:
        now = T0 + timedelta(seconds=step.second)
        decision = decide(
            current_replicas=replicas,
            active_jobs=step.active_jobs,
            policy=scaling,
            pending=pending,
            now=now,
        )
        # The window survives an operator restart through the Deployment annotation.
        restored = PendingScaleDown.from_annotation(
            decision.pending.to_annotation() if decision.pending else None
        )
        assert restored == decision.pending
        assert (decision.replicas, decision.reason) == (step.replicas, step.reason), (
            f"at {step.second}s with {step.active_jobs} jobs: {decision}"
        )
        replicas, pending = decision.replicas, restored
        decisions.append(decision)
    return decisions


UP, DOWN, WAIT, STEADY = (
    Reason.SCALE_UP,
    Reason.SCALE_DOWN,
    Reason.SCALE_DOWN_PENDING,
    Reason.STEADY,
)

SCENARIOS: dict[str, tuple[ScalingPolicy, int, list[Step]]] = {
    "ramp: each new call scales up at once, before the workers fill": (
        POLICY,
        1,
        [
            Step(0, 0, 1, STEADY),
            Step(5, 1, 2, UP),
            Step(10, 2, 3, UP),
            Step(15, 3, 3, STEADY),
            Step(20, 4, 4, UP),
            Step(25, 5, 5, UP),
            Step(30, 8, 5, STEADY),  # at maxReplicas
        ],
    ),
    "ramp by several calls at once jumps straight to the demand": (
        POLICY,
        1,
        [Step(0, 0, 1, STEADY), Step(5, 4, 4, UP)],
    ),
    "plateau: no change while the load holds": (
        POLICY,
        3,
        [Step(s, 3, 3, STEADY) for s in range(0, 60, 5)],
    ),
    "fall: hold for the delay, then scale down to the window's peak": (
        POLICY,
        5,
        [
            Step(0, 5, 5, STEADY),
            Step(5, 2, 5, WAIT),  # demand 3 from here
            Step(10, 1, 5, WAIT),  # demand 2
            Step(14, 1, 5, WAIT),
            Step(15, 1, 3, DOWN),  # 10 s of lower demand; peak in the window was 3
            Step(20, 1, 3, WAIT),  # a new window for the next step down
            Step(30, 1, 2, DOWN),
            Step(35, 0, 2, WAIT),
            Step(45, 0, 1, DOWN),
            Step(50, 0, 1, STEADY),
        ],
    ),
    "flapping load: demand back at the replicas restarts the window, so no scale-down": (
        POLICY,
        3,
        [
            Step(0, 3, 3, STEADY),
            Step(4, 1, 3, WAIT),
            Step(8, 3, 3, STEADY),
            Step(12, 1, 3, WAIT),
            Step(16, 2, 3, STEADY),
            Step(20, 0, 3, WAIT),
            Step(24, 3, 3, STEADY),
            Step(28, 1, 3, WAIT),
            Step(32, 0, 3, WAIT),
            Step(36, 2, 3, STEADY),
        ],
    ),
    "flapping below the replicas: scale down only to the highest demand seen": (
        POLICY,
        4,
        [
            Step(0, 1, 4, WAIT),  # demand 2
            Step(3, 0, 4, WAIT),  # demand 1
            Step(6, 1, 4, WAIT),
            Step(9, 0, 4, WAIT),
            Step(10, 0, 2, DOWN),
        ],
    ),
    "a rise during a pending scale-down scales up at once": (
        POLICY,
        3,
        [Step(0, 0, 3, WAIT), Step(5, 5, 5, UP), Step(8, 5, 5, STEADY)],
    ),
    "bounds: below minReplicas scales up, above maxReplicas scales down at once": (
        policy(min_replicas=2, max_replicas=3),
        1,
        [Step(0, 0, 2, UP), Step(5, 9, 3, UP)],
    ),
    "bounds: a lowered maximum applies without waiting": (
        policy(max_replicas=2),
        5,
        [Step(0, 5, 2, Reason.ABOVE_MAXIMUM), Step(5, 5, 2, STEADY)],
    ),
    "pin: spec.scaling.replicas wins over the load, both ways": (
        policy(pinned_replicas=4),
        1,
        [Step(0, 0, 4, Reason.PINNED), Step(5, 9, 4, Reason.PINNED), Step(9, 0, 4, Reason.PINNED)],
    ),
    "pin to zero is obeyed": (
        policy(pinned_replicas=0),
        2,
        [Step(0, 3, 0, Reason.PINNED)],
    ),
    "no delay: scale down on the first lower reading": (
        policy(scale_down_delay_seconds=0),
        4,
        [Step(0, 0, 1, DOWN)],
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str) -> None:
    scaling, start, steps = SCENARIOS[name]
    run(scaling, start, steps)


def test_restart_keeps_the_window() -> None:
    """An operator restarted mid-window reads the annotation and neither waits again nor forgets."""
    first = decide(current_replicas=4, active_jobs=0, policy=POLICY, pending=None, now=T0)
    assert first.reason is WAIT and first.pending is not None
    annotation = first.pending.to_annotation()
    later = T0 + timedelta(seconds=POLICY.scale_down_delay_seconds)
    restored = PendingScaleDown.from_annotation(annotation)
    after_restart = decide(
        current_replicas=4, active_jobs=0, policy=POLICY, pending=restored, now=later
    )
    assert (after_restart.replicas, after_restart.reason) == (1, DOWN)


@pytest.mark.parametrize(
    "annotation", [None, "", "{", '{"since": "yesterday", "peak": 1}', '{"peak": 1}', "[]"]
)
def test_unreadable_window_starts_a_new_one(annotation: str | None) -> None:
    assert PendingScaleDown.from_annotation(annotation) is None
    decision = decide(current_replicas=3, active_jobs=0, policy=POLICY, pending=None, now=T0)
    assert (decision.replicas, decision.reason) == (3, WAIT)


def test_window_from_the_future_restarts() -> None:
    future = PendingScaleDown(since=T0 + timedelta(hours=1), peak=1)
    decision = decide(current_replicas=3, active_jobs=0, policy=POLICY, pending=future, now=T0)
    assert decision.reason is WAIT and decision.pending == PendingScaleDown(T0, 1)


def test_messages_explain_the_numbers() -> None:
    decision = decide(current_replicas=1, active_jobs=2, policy=POLICY, pending=None, now=T0)
    assert decision.message == "2 active jobs + 1 spare over 1.4 jobs per worker need 3 replicas"


# --- unreachable and starting workers -------------------------------------------------------


def report(agent_jobs: int = 0, jobs_per_worker: int = 2, **fields: object) -> WorkerReport:
    values: dict[str, object] = {
        "agent_jobs": agent_jobs,
        "pending_agent_jobs": 0,
        "overflow_jobs": 0,
        "budget": jobs_per_worker,
        "capacity": jobs_per_worker,
        "jobs_per_worker": jobs_per_worker,
        "load_threshold": 1.0,
        "limit_reason": "capacity",
        "overflow_slots": 4,
        "draining": False,
        "registered": True,
        "config_hash": "c0ffee",
        **fields,
    }
    return WorkerReport.model_validate(values)


def reading(state: WorkerState, jobs: int = 0, pod: str = "p") -> WorkerReading:
    if state is WorkerState.REPORTING:
        return WorkerReading(pod, state, report(jobs))
    return WorkerReading(pod, state)


@pytest.mark.parametrize(
    ("workers", "active_jobs", "load", "replicas_from_two"),
    [
        ((reading(WorkerState.REPORTING, 0), reading(WorkerState.REPORTING, 0)), 0, 0.0, 2),
        ((reading(WorkerState.REPORTING, 1), reading(WorkerState.REPORTING, 0)), 1, 0.25, 2),
        # an unreachable worker is full (2 jobs), never idle: the fleet grows, not shrinks
        ((reading(WorkerState.REPORTING, 0), reading(WorkerState.UNREACHABLE)), 2, 0.5, 3),
        ((reading(WorkerState.UNREACHABLE), reading(WorkerState.UNREACHABLE)), 4, 1.0, 4),
        # a starting worker has no calls and no capacity yet: no cascade of new pods
        ((reading(WorkerState.REPORTING, 1), reading(WorkerState.STARTING)), 1, 0.5, 2),
        ((reading(WorkerState.STARTING),), 0, 0.0, 2),
    ],
)
def test_fleet_load(
    workers: tuple[WorkerReading, ...], active_jobs: int, load: float, replicas_from_two: int
) -> None:
    fleet = FleetLoad(workers)
    assert fleet.active_jobs(POLICY.jobs_per_worker) == active_jobs
    assert fleet.load(POLICY.jobs_per_worker) == load
    decision = decide(
        current_replicas=2,
        active_jobs=fleet.active_jobs(POLICY.jobs_per_worker),
        policy=POLICY,
        pending=None,
        now=T0,
    )
    assert decision.replicas == replicas_from_two
    assert decision.reason is not Reason.SCALE_DOWN


def test_each_pod_is_judged_by_the_jobs_per_worker_it_reports() -> None:
    # mid-rollout from jobsPerWorker 4 to 2: the old pod's 3 calls fill 3 of its own 4 slots
    old = WorkerReading("old", WorkerState.REPORTING, report(3, jobs_per_worker=4))
    new = WorkerReading("new", WorkerState.REPORTING, report(1, jobs_per_worker=2))
    fleet = FleetLoad((old, new))
    assert fleet.active_jobs(2) == 4
    assert fleet.load(2) == 4 / 6  # not 4 / (2 pods x the spec's 2) = 1.0
    # a pod that reported nothing is judged by the spec, and as full
    silent = WorkerReading("silent", WorkerState.UNREACHABLE)
    assert FleetLoad((old, silent)).load(2) == (3 + 2) / (4 + 2)


def test_registered_pods_come_from_their_reports() -> None:
    fleet = FleetLoad(
        (
            WorkerReading("a", WorkerState.REPORTING, report(0)),
            WorkerReading("b", WorkerState.REPORTING, report(0, registered=False)),
            WorkerReading("c", WorkerState.REPORTING, report(0, draining=True)),
            WorkerReading("d", WorkerState.STARTING),
        )
    )
    assert fleet.registered() == 1
    assert set(fleet.reports()) == {"a", "b", "c"}


# --- deletion cost --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("worker", "cost"),
    [
        (reading(WorkerState.REPORTING, 0), 0),
        (reading(WorkerState.REPORTING, 1), 100),
        (reading(WorkerState.REPORTING, 2), 200),
        (reading(WorkerState.UNREACHABLE), 200),  # as full: goes last
        (reading(WorkerState.STARTING), 0),
    ],
)
def test_deletion_cost(worker: WorkerReading, cost: int) -> None:
    assert deletion_cost(worker, jobs_per_worker=2) == cost


def test_deletion_cost_orders_idle_pods_first() -> None:
    workers = [
        reading(WorkerState.REPORTING, 2, "busy"),
        reading(WorkerState.REPORTING, 0, "idle"),
        reading(WorkerState.UNREACHABLE, 0, "silent"),
        reading(WorkerState.REPORTING, 1, "half"),
    ]
    ordered = sorted(workers, key=lambda w: deletion_cost(w, 2))
    assert [w.pod for w in ordered][:2] == ["idle", "half"]
    assert deletion_cost(ordered[-1], 2) == 200


def test_deletion_cost_updates_only_changed_pods() -> None:
    workers = [
        reading(WorkerState.REPORTING, 2, "same"),
        reading(WorkerState.REPORTING, 0, "fell"),
        reading(WorkerState.REPORTING, 1, "new"),
    ]
    annotations = {
        "same": {DELETION_COST_ANNOTATION: "200"},
        "fell": {DELETION_COST_ANNOTATION: "200", "other": "x"},
    }
    assert deletion_cost_updates(workers, annotations, 2) == {"fell": 0, "new": 100}


def test_deletion_cost_updates_leave_starting_pods_unstamped() -> None:
    # A stamped pod counts as having reported: were a booting (or unschedulable) pod stamped,
    # the next read would count it as full and scale up for demand that does not exist.
    workers = [reading(WorkerState.STARTING, 0, "booting"), reading(WorkerState.REPORTING, 0, "up")]
    assert deletion_cost_updates(workers, {}, 2) == {"up": 0}


# --- HPA mode -------------------------------------------------------------------------------


def test_hpa_scales_on_the_load_metric() -> None:
    owner = [{"apiVersion": "voicefleet.dev/v1alpha1", "kind": "VoiceAgent", "name": "a"}]
    hpa = render_hpa(
        name="support",
        namespace="acme",
        deployment_name="support",
        policy=policy(min_replicas=0, max_replicas=8, scale_down_delay_seconds=300),
        labels={"app.kubernetes.io/name": "voicefleet-worker"},
        owner_references=owner,
    )
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["metadata"] == {
        "name": "support",
        "namespace": "acme",
        "labels": {"app.kubernetes.io/name": "voicefleet-worker"},
        "ownerReferences": owner,
    }
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "support",
    }
    assert (spec["minReplicas"], spec["maxReplicas"]) == (1, 8)  # an HPA cannot scale to zero
    assert spec["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "voicefleet_worker_load"},
                "target": {"type": "AverageValue", "averageValue": "700m"},
            },
        }
    ]
    # Calls arrive faster than pods start: grow at once (double, or four pods, per 15 s,
    # whichever is more); shrink one pod per 15 s, only after scaleDownDelaySeconds.
    assert spec["behavior"] == {
        "scaleUp": {
            "stabilizationWindowSeconds": 0,
            "selectPolicy": "Max",
            "policies": [
                {"type": "Percent", "value": 100, "periodSeconds": 15},
                {"type": "Pods", "value": 4, "periodSeconds": 15},
            ],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": 300,
            "selectPolicy": "Max",
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 15}],
        },
    }
    assert hpa["kind"] == "HorizontalPodAutoscaler"
    assert set(hpa) == {"apiVersion", "kind", "metadata", "spec"}
    # Without labels or owners the metadata names the object only.
    bare = render_hpa(
        name="b", namespace="t", deployment_name="b", policy=policy(min_replicas=0, max_replicas=1)
    )
    assert bare["metadata"] == {"name": "b", "namespace": "t"}
    assert (bare["spec"]["minReplicas"], bare["spec"]["maxReplicas"]) == (1, 1)


@pytest.mark.parametrize(
    ("scaling", "has_hpa"),
    [
        ({}, False),
        ({"mode": "hpa"}, True),
        ({"mode": "hpa", "replicas": 3}, False),  # a pin suspends the HPA as well
    ],
)
def test_hpa_is_a_child_only_in_hpa_mode(scaling: dict[str, object], has_hpa: bool) -> None:
    from voicefleet_operator import render
    from voicefleet_operator.api import parse_spec
    from voicefleet_operator.settings import PlatformSettings

    spec = parse_spec(
        {
            "agents": [{"name": "front", "instructions": "Help."}],
            "entry": "front",
            "scaling": scaling,
        }
    )
    ref = render.VoiceAgentRef(name="support", namespace="acme", uid="u-1")
    settings = PlatformSettings(
        livekit_url="ws://lk:7880", livekit_secret_namespace="vf", runtime_image="rt:1"
    )
    livekit = {"LIVEKIT_API_KEY": "a2V5", "LIVEKIT_API_SECRET": "c2VjcmV0"}  # base64, as stored
    children = render.render_all(
        ref, spec, settings, livekit_data=livekit, secrets_hash="h", replicas=1
    ).children
    kinds = [child["kind"] for child in children]
    assert ("HorizontalPodAutoscaler" in kinds) is has_hpa
    if has_hpa:
        hpa = children[-1]
        assert kinds[-2:] == ["Deployment", "HorizontalPodAutoscaler"]
        assert hpa["metadata"]["namespace"] == "vf-acme"
        assert render.owned_by(hpa, ref)
        assert hpa["spec"]["scaleTargetRef"]["name"] == children[-2]["metadata"]["name"]


def test_hpa_metric_is_the_runtime_load_gauge() -> None:
    from voicefleet_runtime import metrics

    assert metrics.WORKER_LOAD._name == LOAD_METRIC


def test_hpa_target_never_above_the_load_threshold() -> None:
    hpa = render_hpa(name="a", namespace="t", deployment_name="a", policy=policy(target_load=0.9))
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "700m"


def test_policy_from_a_voiceagent_spec() -> None:
    from voicefleet_operator.api import parse_spec

    spec = parse_spec(
        {
            "agents": [{"name": "front", "instructions": "Help."}],
            "entry": "front",
            "worker": {"jobsPerWorker": 2, "loadThreshold": 0.8},
            "scaling": {"maxReplicas": 4, "spareJobs": 1, "scaleDownDelaySeconds": 10},
        }
    )
    assert ScalingPolicy.from_spec(spec) == policy(max_replicas=4, load_threshold=0.8)
    pinned = spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"replicas": 3})})
    assert ScalingPolicy.from_spec(pinned).pinned_replicas == 3


# --- policy validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"jobs_per_worker": 0}, "worker.jobsPerWorker"),
        ({"target_load": 0}, "scaling.targetLoad"),
        ({"target_load": 1.5}, "scaling.targetLoad"),
        ({"min_replicas": 6}, "scaling.minReplicas"),
        ({"spare_jobs": -1}, "scaling.spareJobs"),
        ({"scale_down_delay_seconds": -1}, "scaling.scaleDownDelaySeconds"),
        ({"pinned_replicas": -1}, "scaling.replicas"),
    ],
)
def test_policy_names_the_bad_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        policy(**changes)


# --- reading real HTTP endpoints ------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WorkerServers:
    """HTTP servers on loopback addresses (127.0.0.x), all on one port, as pods are."""

    def __init__(self) -> None:
        self.port = 0
        self.runners: list[web.AppRunner] = []

    async def start(self, address: str, handler: Handler) -> None:
        app = web.Application()
        app.router.add_get(REPORT_PATH, handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, address, self.port)
        await site.start()
        if not self.port:
            self.port = runner.addresses[0][1]
        self.runners.append(runner)


@pytest.fixture
async def worker_servers() -> AsyncIterator[WorkerServers]:
    servers = WorkerServers()
    yield servers
    for runner in servers.runners:
        await runner.cleanup()


async def test_read_fleet_over_http(worker_servers: WorkerServers) -> None:
    release = asyncio.Event()

    def answer(body: WorkerReport) -> web.Response:
        return web.json_response(body.model_dump(mode="json", by_alias=True))

    async def idle(_: web.Request) -> web.Response:
        return answer(report(0))

    async def busy(_: web.Request) -> web.Response:
        return answer(report(2))

    async def broken(_: web.Request) -> web.Response:
        return web.Response(status=503, text="failed to connect to livekit")

    async def hung(_: web.Request) -> web.Response:
        await release.wait()
        return answer(report(0))

    async def not_a_report(_: web.Request) -> web.Response:
        # e.g. an older runtime's livekit-agents JSON: never taken for an idle worker
        return web.json_response({"agent_name": "acme-support", "active_jobs": 1})

    for address, handler in [
        ("127.0.0.11", idle),
        ("127.0.0.12", busy),
        ("127.0.0.13", broken),
        ("127.0.0.14", hung),
        ("127.0.0.18", not_a_report),
    ]:
        await worker_servers.start(address, handler)

    def pod(name: str, ip: str | None, ready: bool = True, **annotations: str) -> WorkerPod:
        return WorkerPod(name, ip, ready, terminating=False, annotations=annotations)

    pods = [
        pod("idle", "127.0.0.11"),
        pod("busy", "127.0.0.12"),
        pod("broken", "127.0.0.13"),
        pod("hung", "127.0.0.14"),
        pod("not-a-report", "127.0.0.18"),
        pod("closed-port", "127.0.0.15"),
        pod("starting", "127.0.0.16", ready=False),
        pod("no-ip-yet", None, ready=False),
        # not ready now, but it reported before: it may hold calls
        pod("was-serving", "127.0.0.17", ready=False, **{DELETION_COST_ANNOTATION: "100"}),
        WorkerPod("draining", "127.0.0.12", ready=True, terminating=True),
    ]
    started = asyncio.get_running_loop().time()
    fleet = await read_fleet(pods, worker_servers.port, request_seconds=0.5)
    elapsed = asyncio.get_running_loop().time() - started
    release.set()

    states = {w.pod: (w.state, w.active_jobs) for w in fleet.workers}
    assert states == {
        "idle": (WorkerState.REPORTING, 0),
        "busy": (WorkerState.REPORTING, 2),
        "broken": (WorkerState.UNREACHABLE, 0),
        "hung": (WorkerState.UNREACHABLE, 0),
        "closed-port": (WorkerState.UNREACHABLE, 0),
        "starting": (WorkerState.STARTING, 0),
        "no-ip-yet": (WorkerState.STARTING, 0),
        "was-serving": (WorkerState.UNREACHABLE, 0),
        "not-a-report": (WorkerState.UNREACHABLE, 0),
    }
    assert "HTTP 503" in next(w.error for w in fleet.workers if w.pod == "broken")
    # in parallel, each bounded by the timeout
    assert elapsed < 2.0
    assert "ValidationError" in next(w.error for w in fleet.workers if w.pod == "not-a-report")
    # 2 busy + 5 unreachable counted as full (2 each)
    assert fleet.active_jobs(2) == 12
    assert fleet.count(WorkerState.UNREACHABLE) == 5


def test_worker_pod_from_a_pod_object() -> None:
    pod = WorkerPod.from_pod(
        {
            "metadata": {
                "name": "w-1",
                "annotations": {DELETION_COST_ANNOTATION: "0"},
                "deletionTimestamp": "2025-01-01T00:00:00Z",
            },
            "status": {
                "podIP": "10.0.0.7",
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
    )
    assert pod == WorkerPod("w-1", "10.0.0.7", True, True, {DELETION_COST_ANNOTATION: "0"})
    assert pod.reported_before
    assert not WorkerPod.from_pod({"metadata": {"name": "x"}}).ready


# --- the policy's own bounds (issue 18: the mutation run found its edges unguarded) ----------


def test_the_policy_accepts_each_bound_itself() -> None:
    edge = policy(
        jobs_per_worker=1,
        target_load=1.0,
        load_threshold=1.0,
        spare_jobs=0,
        min_replicas=5,
        max_replicas=5,
        scale_down_delay_seconds=0,
        pinned_replicas=0,
    )
    assert (edge.jobs_per_worker, edge.spare_jobs, edge.pinned_replicas) == (1, 0, 0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"jobs_per_worker": 0}, "worker.jobsPerWorker must be at least 1"),
        ({"target_load": 0.0}, "scaling.targetLoad must be in (0, 1]"),
        ({"target_load": 1.01}, "scaling.targetLoad must be in (0, 1]"),
        ({"load_threshold": 0.0}, "worker.loadThreshold must be in (0, 1]"),
        ({"load_threshold": 1.5}, "worker.loadThreshold must be in (0, 1]"),
        ({"spare_jobs": -1}, "scaling.spareJobs must not be negative"),
        (
            {"min_replicas": 6, "max_replicas": 5},
            "scaling.minReplicas must be between 0 and scaling.maxReplicas",
        ),
        ({"scale_down_delay_seconds": -1}, "scaling.scaleDownDelaySeconds must not be negative"),
        ({"pinned_replicas": -1}, "scaling.replicas must not be negative"),
    ],
)
def test_the_policy_refuses_just_beyond_each_bound_naming_the_field(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as error:
        policy(**changes)
    assert str(error.value) == message


# --- each decision in full: replicas, demand, reason, message, window (issue 18) -------------

WHY = "0 active jobs + 1 spare over 1.4 jobs per worker"


def decision(current: int, active: int = 0, **kwargs: object) -> Decision:
    pending = kwargs.pop("pending", None)
    return decide(
        current_replicas=current,
        active_jobs=active,
        policy=policy(**kwargs),
        pending=pending,  # type: ignore[arg-type]
        now=T0,
    )


def test_each_decision_in_full() -> None:
    assert decision(1, pinned_replicas=3) == Decision(
        3, 1, Reason.PINNED, f"pinned to 3 by spec.scaling.replicas ({WHY})"
    )
    assert decision(1, active=2) == Decision(
        3, 3, Reason.SCALE_UP, "2 active jobs + 1 spare over 1.4 jobs per worker need 3 replicas"
    )
    assert decision(7) == Decision(
        5, 1, Reason.ABOVE_MAXIMUM, "7 replicas exceed scaling.maxReplicas 5"
    )
    assert decision(3) == Decision(
        3,
        1,
        Reason.SCALE_DOWN_PENDING,
        f"{WHY} need 1 replicas; keeping 3 until demand stays lower for 10s (lower since "
        "12:00:00Z)",
        PendingScaleDown(since=T0, peak=1),
    )
    waited = PendingScaleDown(since=T0 - timedelta(seconds=20), peak=2)
    assert decision(4, pending=waited) == Decision(
        2,
        1,
        Reason.SCALE_DOWN,
        f"{WHY} need 1 replicas (at most 2 for 20s); scaling down to 2",
    )


def test_the_scale_down_window_keeps_its_peak_and_restarts_only_when_stale() -> None:
    # A window opened this very second is kept (with its higher peak), not restarted.
    now_open = decision(3, pending=PendingScaleDown(since=T0, peak=2))
    assert now_open.pending == PendingScaleDown(since=T0, peak=2)
    # A peak as high as the current replicas means the window is from another time: restart.
    stale = decision(3, pending=PendingScaleDown(since=T0 - timedelta(seconds=20), peak=3))
    assert (stale.reason, stale.pending) == (
        Reason.SCALE_DOWN_PENDING,
        PendingScaleDown(since=T0, peak=1),
    )
    # Demand rising inside the window raises its peak.
    opened = T0 - timedelta(seconds=5)
    rising = decision(4, active=2, pending=PendingScaleDown(since=opened, peak=1))
    assert rising.pending == PendingScaleDown(since=opened, peak=3)
