"""Operator at scale: 100, 300 and 1000 VoiceAgents over 20 tenant namespaces, against the API
server's own floor measured in the same run (issue 15 item 5).

Per size, with a fresh operator process (`python -m voicefleet_operator`, as its pod runs it,
serving the tenant namespaces):

- **floor**: the same number of bare server-side applies of a small ConfigMap, same parallelism,
  same namespaces, no operator running; then their deletion (until every one is gone);
- **children floor**: the eight children the operator renders for each VoiceAgent, applied bare
  in the same order (same parallelism, into the tenant namespaces), then deleted: what the API
  server needs for the objects themselves, before any read, status write or kopf bookkeeping;
- **apply**: server-side apply of N VoiceAgents (the example without telephony, scaled to zero,
  as bench/reconcile.py uses), `parallel` at a time, round-robin over the namespaces;
- **reconciled**: until every VoiceAgent has status.observedGeneration == generation and
  Reconciled=True, seen by a watch (time after the last apply returned);
- **settled**: `settle_s` more seconds of steady state: RSS and the operator's CPU share then
  (what per-VoiceAgent daemons and timers cost when nothing changes);
- **delete**: one DELETE of each namespace's collection, until every VoiceAgent is gone
  (finalizers done); then until the worker namespaces are gone, and what is left in them;
- **RSS**: psutil samples of the operator process every `RSS_SAMPLE_S`; peak over the whole
  size, and per VoiceAgent ((peak - idle) / N);
- **API errors**: WARNING/ERROR lines of the operator's log that name a failed API call.

Scaled to zero, so no worker pod runs: the figures are the operator's and the API server's.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.rest import ApiException
from voicefleet_operator.render import worker_namespace

from voicefleet_localdev import paths
from voicefleet_localdev.bench.reconcile import (
    GROUP,
    PLURAL,
    VERSION,
    bench_settings,
    bench_voiceagent,
    reconciled,
)
from voicefleet_localdev.bench.workers import BenchError
from voicefleet_localdev.kubectl import kubectl
from voicefleet_localdev.livekit import LiveKitEndpoint
from voicefleet_localdev.operator_process import OperatorProcess

DEFAULT_SIZES = (100, 300, 1000)
DEFAULT_NAMESPACES = 20
DEFAULT_PARALLEL = 8
RSS_SAMPLE_S = 0.25
BENCH_LABEL = "voicefleet.dev/bench"
FIELD_MANAGER = "voicefleet-bench"
APPLY = "application/apply-patch+yaml"

API_ERROR = re.compile(
    r"API\w*Error|KubeError|Conflict|Throttl|TooManyRequests|ServerDisconnected|"
    r"ClientConnector|ClientOSError|TimeoutError|request attempt|not reconciled|failed|"
    r"\b(?:40[0-9]|429|5\d\d)\b"
)
LOG_LEVEL = re.compile(r"\[(?:WARNING|ERROR|CRITICAL) *\] ")


# --- pure parts (unit-tested) -------------------------------------------------------------------


def spread(count: int, namespaces: list[str]) -> list[tuple[str, str]]:
    """(namespace, name) of `count` objects, round-robin over `namespaces`."""
    return [(namespaces[i % len(namespaces)], f"va-{i:04d}") for i in range(count)]


def api_errors(log_lines: Iterable[str]) -> list[str]:
    """The operator's WARNING/ERROR lines whose message (after the level, not the timestamp)
    names a failed API call."""
    found = []
    for line in log_lines:
        level = LOG_LEVEL.search(line)
        if level is not None and API_ERROR.search(line, level.end()):
            found.append(line)
    return found


@dataclass
class RssSampler:
    """Peak and last RSS (MB) of one process, sampled in a thread."""

    pid: int
    interval_s: float = RSS_SAMPLE_S
    samples: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        process = psutil.Process(self.pid)

        def loop() -> None:
            while not self._stop.is_set():
                with contextlib.suppress(psutil.Error):
                    self.samples.append((time.monotonic(), process.memory_info().rss / 2**20))
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, name="rss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def peak(self, since: float = 0.0, until: float = float("inf")) -> float:
        return max((mb for at, mb in self.samples if since <= at <= until), default=0.0)

    def last(self) -> float:
        return self.samples[-1][1] if self.samples else 0.0


def size_figures(
    count: int,
    *,
    apply_s: float,
    reconciled_after_apply_s: float,
    rss_idle_mb: float,
    rss_peak_mb: float,
    rss_settled_mb: float,
    settle_cpu_percent: float,
    delete_s: float,
    worker_namespaces_gone_s: float | None,
    errors: list[str],
    leftovers: dict[str, int],
    floor_apply_s: float,
    floor_delete_s: float,
    floor_children: tuple[float, float] | None = None,
    create_cpu_s: float = 0.0,
    delete_cpu_s: float = 0.0,
    load_average: float = 0.0,
) -> dict[str, Any]:
    """The figures of one size, as bench.json records them. `create_cpu_s`/`delete_cpu_s`:
    the operator's CPU seconds from the first apply to all reconciled, and over the deletion
    (less sensitive than the times to what else runs on the machine, `load_average`)."""
    return {
        "voiceagents": count,
        "apply_s": round(apply_s, 2),
        "all_reconciled_after_last_apply_s": round(reconciled_after_apply_s, 2),
        "all_reconciled_s": round(apply_s + reconciled_after_apply_s, 2),
        "rss_idle_mb": round(rss_idle_mb, 1),
        "rss_peak_mb": round(rss_peak_mb, 1),
        "rss_settled_mb": round(rss_settled_mb, 1),
        "rss_per_voiceagent_mb": round(max(rss_peak_mb - rss_idle_mb, 0.0) / count, 3),
        "settled_cpu_percent": round(settle_cpu_percent, 1),
        "delete_all_s": round(delete_s, 2),
        "worker_namespaces_gone_s": (
            None if worker_namespaces_gone_s is None else round(worker_namespaces_gone_s, 2)
        ),
        "api_errors": len(errors),
        "api_error_samples": errors[:5],
        "leftovers": leftovers,
        "floor": {
            "apply_s": round(floor_apply_s, 2),
            "delete_all_s": round(floor_delete_s, 2),
            # The children the operator renders, applied bare (children_floor).
            "children_apply_s": None if floor_children is None else round(floor_children[0], 2),
            "children_delete_s": None if floor_children is None else round(floor_children[1], 2),
        },
        "operator_cpu_s": {"create": round(create_cpu_s, 1), "delete": round(delete_cpu_s, 1)},
        "load_average_1m": round(load_average, 1),
    }


TARGETS = {
    "all_reconciled_after_last_apply_s": 60.0,
    "rss_peak_mb": 200.0,
    "delete_all_s": 60.0,
}
"""Issue 15's targets at 1000 VoiceAgents over 20 namespaces."""


def table(sizes: list[dict[str, Any]]) -> str:
    """One row per size: the figures that show growth, and the API server's floor."""
    header = (
        "VoiceAgents", "apply s", "reconciled s after last apply", "peak RSS MB",
        "MB/VoiceAgent", "settled RSS MB", "settled CPU %", "delete all s",
        "floor apply s", "floor delete s", "floor children apply s", "API errors", "leftovers",
        "CPU s create", "CPU s delete", "load",
    )  # fmt: skip
    rows: list[tuple[str, ...]] = [header]
    for s in sizes:
        if "error" in s:
            rows.append((str(s["voiceagents"]), "failed", *[""] * (len(header) - 2)))
            continue
        rows.append(
            (
                str(s["voiceagents"]), f"{s['apply_s']:.1f}",
                f"{s['all_reconciled_after_last_apply_s']:.1f}", f"{s['rss_peak_mb']:.0f}",
                f"{s['rss_per_voiceagent_mb']:.3f}", f"{s['rss_settled_mb']:.0f}",
                f"{s['settled_cpu_percent']:.0f}", f"{s['delete_all_s']:.1f}",
                f"{s['floor']['apply_s']:.1f}", f"{s['floor']['delete_all_s']:.1f}",
                _figure(s["floor"].get("children_apply_s")),
                str(s["api_errors"]), str(sum(s["leftovers"].values())),
                f"{s['operator_cpu_s']['create']:.0f}", f"{s['operator_cpu_s']['delete']:.0f}",
                f"{s['load_average_1m']:.1f}",
            )
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def missed_targets(size: dict[str, Any]) -> list[str]:
    """Which of the issue's targets a size misses (with its figure)."""
    if "error" in size:
        return [f"failed: {size['error']}"]
    missed = [
        f"{key} {size[key]} > {limit:g}" for key, limit in TARGETS.items() if size[key] > limit
    ]
    if size["api_errors"]:
        missed.append(f"api_errors {size['api_errors']}")
    if any(size["leftovers"].values()):
        missed.append(f"leftovers {size['leftovers']}")
    return missed


# --- the cluster side ---------------------------------------------------------------------------


class Tracker:
    """Watches the benchmark's VoiceAgents (by label), noting when each was first seen
    reconciled and when it was deleted."""

    def __init__(self, api: k8s.ApiClient, run: str) -> None:
        self.custom = k8s.CustomObjectsApi(api)
        self.selector = f"{BENCH_LABEL}={run}"
        self.reconciled_at: dict[tuple[str, str], float] = {}
        self.present: set[tuple[str, str]] = set()
        self.deleted_at: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._watch: k8s_watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name="tracker", daemon=True)

    def start(self) -> Tracker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        self._thread.join(timeout=15)

    def _seen(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        now = time.monotonic()
        with self.lock:
            if kind == "DELETED":
                self.present.discard(key)
                self.deleted_at.setdefault(key, now)
                return
            self.present.add(key)
            if reconciled(obj):
                self.reconciled_at.setdefault(key, now)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                listing: Any = self.custom.list_cluster_custom_object(
                    GROUP, VERSION, PLURAL, label_selector=self.selector
                )
                with self.lock:
                    listed = {
                        (o["metadata"]["namespace"], o["metadata"]["name"])
                        for o in listing["items"]
                    }
                    now = time.monotonic()
                    for key in self.present - listed:
                        self.deleted_at.setdefault(key, now)
                    self.present = set()
                for obj in listing["items"]:
                    self._seen("ADDED", obj)
                self._watch = k8s_watch.Watch()
                for event in self._watch.stream(
                    self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL,
                    label_selector=self.selector,
                    resource_version=listing["metadata"]["resourceVersion"],
                    timeout_seconds=60,
                ):  # fmt: skip
                    if self._stop.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._seen(event["type"], event["object"])
            except (ApiException, OSError, ValueError, urllib3.exceptions.HTTPError):
                if not self._stop.wait(0.5):
                    continue

    def wait(self, done: Callable[[], bool], timeout_s: float, what: str) -> float:
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                if done():
                    return time.monotonic()
            if time.monotonic() > deadline:
                with self.lock:
                    seen = (
                        f"{len(self.reconciled_at)} seen reconciled, {len(self.present)} "
                        f"present, {len(self.deleted_at)} deleted"
                    )
                raise BenchError(f"{what}: not within {timeout_s:.0f}s ({seen})")
            time.sleep(0.1)


def parallel_calls(calls: list[Callable[[], Any]], parallel: int) -> float:
    """Run `calls` `parallel` at a time; returns when the last one returned (monotonic)."""
    with ThreadPoolExecutor(parallel) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()
    return time.monotonic()


def wait_gone(list_count: Callable[[], int], timeout_s: float, what: str) -> float:
    deadline = time.monotonic() + timeout_s
    while list_count():
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not gone within {timeout_s:.0f}s")
        time.sleep(0.25)
    return time.monotonic()


def api_floor(
    core: k8s.CoreV1Api, placement: list[tuple[str, str]], parallel: int, run: str
) -> tuple[float, float]:
    """(apply s, delete s) of len(placement) bare ConfigMap server-side applies, no operator."""
    selector = f"{BENCH_LABEL}={run}"
    namespaces = sorted({ns for ns, _ in placement})

    def apply(namespace: str, name: str) -> Callable[[], Any]:
        body = {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "labels": {BENCH_LABEL: run}},
            "data": {"runtime.yaml": "x" * 2048},
        }  # fmt: skip
        return lambda: core.patch_namespaced_config_map(
            name, namespace, body, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY
        )

    started = time.monotonic()
    applied = parallel_calls([apply(ns, name) for ns, name in placement], parallel)
    for namespace in namespaces:
        core.delete_collection_namespaced_config_map(namespace, label_selector=selector)
    gone = wait_gone(
        lambda: len(core.list_config_map_for_all_namespaces(label_selector=selector).items),
        120,
        "bare ConfigMaps",
    )
    return applied - started, gone - applied


def children_floor(
    api: k8s.ApiClient,
    placement: list[tuple[str, str]],
    parallel: int,
    run: str,
    settings: Any,
) -> tuple[float, float]:
    """(apply s, delete s) of the children the operator renders for each VoiceAgent (the same
    eight objects, server-side applied in the same order, into the tenant namespaces), no
    operator: the API server's floor for the objects themselves, without the operator's reads,
    status writes and kopf's bookkeeping."""
    from kubernetes.dynamic import DynamicClient
    from voicefleet_operator import render
    from voicefleet_operator.api import parse_spec
    from voicefleet_operator.settings import LIVEKIT_SECRET_KEYS

    dynamic = DynamicClient(api)
    spec = parse_spec(bench_voiceagent("floor")["spec"])
    livekit_data = {key: "Zmxvb3I=" for key in LIVEKIT_SECRET_KEYS}
    kinds: dict[tuple[str, str], Any] = {}

    def children(namespace: str, name: str) -> list[dict[str, Any]]:
        ref = render.VoiceAgentRef(name, namespace, "floor")
        rendered = render.render_all(
            ref, spec, settings, livekit_data=livekit_data, secrets_hash="0" * 16, replicas=0
        )
        for child in rendered.children:
            child["metadata"]["namespace"] = namespace
            child["metadata"].setdefault("labels", {})[BENCH_LABEL] = run
        return rendered.children

    def resource(child: dict[str, Any]) -> Any:
        key = (child["apiVersion"], child["kind"])
        if key not in kinds:
            kinds[key] = dynamic.resources.get(api_version=key[0], kind=key[1])
        return kinds[key]

    def apply_all(namespace: str, name: str) -> Callable[[], Any]:
        def call() -> None:
            for child in children(namespace, name):
                resource(child).server_side_apply(
                    body=child, name=child["metadata"]["name"], namespace=namespace,
                    field_manager=FIELD_MANAGER, force_conflicts=True,
                )  # fmt: skip

        return call

    for child in children(*placement[0]):
        resource(child)  # discovery before the clock starts
    started = time.monotonic()
    applied = parallel_calls([apply_all(ns, name) for ns, name in placement], parallel)
    selector = f"{BENCH_LABEL}={run}"
    namespaces = sorted({ns for ns, _ in placement})
    for kind in kinds.values():
        for namespace in namespaces:
            kind.delete(namespace=namespace, label_selector=selector)

    def remaining() -> int:
        return sum(len(kind.get(label_selector=selector).items) for kind in kinds.values())

    gone = wait_gone(remaining, 300, "the bare children")
    return applied - started, gone - applied


def strip_finalizers(custom: k8s.CustomObjectsApi, namespaces: list[str]) -> int:
    """After a failed run, with the operator stopped: remove the finalizers of the benchmark's
    VoiceAgents still there, so their namespaces can go (never leave the shared cluster with
    namespaces stuck Terminating). How many there were."""
    stuck = 0
    for namespace in namespaces:
        listed: Any = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        for item in listed["items"]:
            stuck += 1
            with contextlib.suppress(ApiException):
                custom.patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, item["metadata"]["name"],
                    {"metadata": {"finalizers": None}},
                )  # fmt: skip
    return stuck


def _names(items: Any) -> set[str]:
    return {item.metadata.name for item in items}


def leftovers(api: k8s.ApiClient, namespaces: list[str], run: str) -> dict[str, int]:
    """What is left after deletion: VoiceAgents, and children in the worker namespaces."""
    core, apps = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
    custom = k8s.CustomObjectsApi(api)
    agents: Any = custom.list_cluster_custom_object(
        GROUP, VERSION, PLURAL, label_selector=f"{BENCH_LABEL}={run}"
    )
    found = {"voiceagents": len(agents["items"])}
    workers = [worker_namespace(ns) for ns in namespaces]
    children: dict[str, Callable[[str], set[str]]] = {
        "deployments": lambda ns: _names(apps.list_namespaced_deployment(ns).items),
        "configmaps": lambda ns: (
            _names(core.list_namespaced_config_map(ns).items) - {"kube-root-ca.crt"}
        ),
        "secrets": lambda ns: _names(core.list_namespaced_secret(ns).items),
        "services": lambda ns: _names(core.list_namespaced_service(ns).items),
    }
    existing = _names(core.list_namespace().items)
    found["worker_namespaces"] = sum(1 for ns in workers if ns in existing)
    for kind, listing in children.items():
        found[kind] = sum(len(listing(ns)) for ns in workers if ns in existing)
    return found


class Operator(OperatorProcess):
    def __init__(self, namespaces: list[str], platform: str, log: Path) -> None:
        settings = bench_settings(LiveKitEndpoint(), tuple(namespaces), platform)
        super().__init__(settings, paths.kubeconfig(), log)


def run_size(
    api: k8s.ApiClient,
    namespaces: list[str],
    platform: str,
    count: int,
    *,
    parallel: int,
    settle_s: float,
    timeout_s: float,
    workdir: Path,
    report: Callable[[str], None],
) -> dict[str, Any]:
    core, custom = k8s.CoreV1Api(api), k8s.CustomObjectsApi(api)
    run = secrets.token_hex(3)
    placement = spread(count, namespaces)
    load_average = psutil.getloadavg()[0]
    floor_apply_s, floor_delete_s = api_floor(core, placement, parallel, run)
    report(f"{count}: API floor: {count} ConfigMap applies {floor_apply_s:.1f}s, "
           f"deleted {floor_delete_s:.1f}s")  # fmt: skip
    settings = bench_settings(LiveKitEndpoint(), tuple(namespaces), platform)
    floor_children = children_floor(api, placement, parallel, run, settings)
    report(f"{count}: API floor: the children of {count} VoiceAgents applied bare "
           f"{floor_children[0]:.1f}s, deleted {floor_children[1]:.1f}s")  # fmt: skip

    log = workdir / f"operator-scale-{count}.log"
    log.unlink(missing_ok=True)
    operator = Operator(namespaces, platform, log)
    tracker = Tracker(api, run).start()
    sampler: RssSampler | None = None
    try:
        try:
            operator.start()
        except AssertionError as failed:
            raise BenchError(str(failed)) from None
        assert operator.process is not None
        process = psutil.Process(operator.process.pid)
        sampler = RssSampler(operator.process.pid).start()
        time.sleep(2)  # watches established, idle
        rss_idle = sampler.last()

        def apply(namespace: str, name: str) -> Callable[[], Any]:
            body = bench_voiceagent(name)
            body["metadata"] = {"name": name, "namespace": namespace, "labels": {BENCH_LABEL: run}}
            return lambda: custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, body,
                field_manager=FIELD_MANAGER, force=True, _content_type=APPLY,
            )  # fmt: skip

        def cpu_s() -> float:
            return float(sum(process.cpu_times()[:2]))

        cpu_started = cpu_s()
        started = time.monotonic()
        applied = parallel_calls([apply(ns, name) for ns, name in placement], parallel)
        report(f"{count}: applied in {applied - started:.1f}s")
        keys = set(placement)
        done = tracker.wait(
            lambda: keys <= tracker.reconciled_at.keys(), timeout_s, f"{count} reconciled"
        )
        report(f"{count}: all reconciled {done - applied:.1f}s after the last apply")
        cpu_before = cpu_s()
        create_cpu = cpu_before - cpu_started
        time.sleep(settle_s)
        settle_cpu = (cpu_s() - cpu_before) / settle_s * 100
        rss_settled = sampler.last()

        delete_started = time.monotonic()
        cpu_delete_started = cpu_s()
        for namespace in namespaces:
            custom.delete_collection_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, label_selector=f"{BENCH_LABEL}={run}"
            )
        deleted = tracker.wait(
            lambda: not (keys & tracker.present) and keys <= tracker.deleted_at.keys(),
            timeout_s,
            f"{count} deleted",
        )
        report(f"{count}: all deleted in {deleted - delete_started:.1f}s")
        delete_cpu = cpu_s() - cpu_delete_started
        workers = {worker_namespace(ns) for ns in namespaces}
        try:
            gone_at: float | None = wait_gone(
                lambda: len(workers & _names(core.list_namespace().items)),
                60,
                "worker namespaces",
            )
        except BenchError:
            gone_at = None
        rss_peak = sampler.peak()
        left = leftovers(api, namespaces, run)
    except ApiException as error:
        raise BenchError(f"API error: {error.status} {error.reason}: {error.body}") from error
    finally:
        if sampler is not None:
            sampler.stop()
        with contextlib.suppress(ApiException, BenchError):
            for namespace in namespaces:
                custom.delete_collection_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, label_selector=f"{BENCH_LABEL}={run}"
                )
            tracker.wait(lambda: not tracker.present, 120, "cleanup")
        tracker.stop()
        operator.stop()
    errors = api_errors(log.read_text(errors="replace").splitlines())
    figures = size_figures(
        count,
        apply_s=applied - started,
        reconciled_after_apply_s=done - applied,
        rss_idle_mb=rss_idle,
        rss_peak_mb=rss_peak,
        rss_settled_mb=rss_settled,
        settle_cpu_percent=settle_cpu,
        delete_s=deleted - delete_started,
        worker_namespaces_gone_s=None if gone_at is None else gone_at - delete_started,
        errors=errors,
        leftovers=left,
        floor_apply_s=floor_apply_s,
        floor_delete_s=floor_delete_s,
        floor_children=floor_children,
        create_cpu_s=create_cpu,
        delete_cpu_s=delete_cpu,
        load_average=load_average,
    )
    report(
        f"{count}: peak RSS {rss_peak:.0f} MB (idle {rss_idle:.0f}, settled {rss_settled:.0f}), "
        f"settled CPU {settle_cpu:.0f}%, API errors {len(errors)}, leftovers {left}"
    )
    return figures


def run(
    workdir: Path,
    *,
    sizes: list[int],
    namespaces: int = DEFAULT_NAMESPACES,
    parallel: int = DEFAULT_PARALLEL,
    settle_s: float = 15.0,
    timeout_s: float = 300.0,
    report: Callable[[str], None],
) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    k8s_config.load_kube_config(config_file=str(paths.kubeconfig()))
    configuration = k8s.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = parallel + 4
    api = k8s.ApiClient(configuration)
    core = k8s.CoreV1Api(api)
    prefix = f"vfs-{secrets.token_hex(2)}"
    # Fresh tenant namespaces per size: the worker namespaces of the previous size may still
    # be terminating (their children then cannot be created: 403), which is not what is measured.
    per_size = [
        [f"{prefix}-s{index}-t{i:02d}" for i in range(namespaces)] for index in range(len(sizes))
    ]
    tenants = [namespace for group in per_size for namespace in group]
    platform = f"{prefix}-platform"
    livekit = LiveKitEndpoint()
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(paths.REPO_ROOT / "crds"))
    results: dict[str, Any] = {
        "namespaces": namespaces,
        "parallel": parallel,
        "cpus": psutil.cpu_count(),
        "load_average_before": [round(x, 2) for x in psutil.getloadavg()],
        "sizes": [],
    }
    try:
        for namespace in [platform, *tenants]:
            core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
        core.create_namespaced_secret(
            platform,
            k8s.V1Secret(
                metadata=k8s.V1ObjectMeta(name="voicefleet-livekit"),
                string_data={
                    "LIVEKIT_API_KEY": livekit.api_key,
                    "LIVEKIT_API_SECRET": livekit.api_secret,
                },
            ),
        )
        for namespace in tenants:
            for name, data in {
                "provider-keys": {
                    "OPENAI_API_KEY": "b", "DEEPGRAM_API_KEY": "b", "ELEVEN_API_KEY": "b",
                },
                "acme-orders-api": {"authorization": "Bearer bench"},
            }.items():  # fmt: skip
                secret = k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name), string_data=data)
                core.create_namespaced_secret(namespace, secret)
        for index, count in enumerate(sizes):
            print(f"scale: {count} VoiceAgents over {namespaces} namespaces", flush=True)
            try:
                results["sizes"].append(
                    run_size(
                        api, per_size[index], platform, count, parallel=parallel,
                        settle_s=settle_s, timeout_s=timeout_s, workdir=workdir, report=report,
                    )
                )  # fmt: skip
            except BenchError as error:
                # Kept with the sizes measured before it; larger sizes are not tried.
                report(f"{count}: FAILED: {error}")
                results["sizes"].append({"voiceagents": count, "error": str(error)})
                break
    finally:
        with contextlib.suppress(ApiException, OSError, urllib3.exceptions.HTTPError):
            stuck = strip_finalizers(k8s.CustomObjectsApi(api), tenants)
            if stuck:
                report(f"{stuck} VoiceAgents were left with the operator's finalizer: removed")
        for namespace in [*tenants, *(worker_namespace(t) for t in tenants), platform]:
            with contextlib.suppress(ApiException):
                core.delete_namespace(namespace)
        api.close()
    results["load_average_after"] = [round(x, 2) for x in psutil.getloadavg()]
    return results
