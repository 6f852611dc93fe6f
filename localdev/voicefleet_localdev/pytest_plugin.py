"""The local platform held for a test session: the pytest fixtures of every test tier above unit.

- `control_plane`, `cluster_with_node`, `project_images`: a real cluster (provider auto: kind where
  Docker can pull, else local) and the project's images on its node;
- `livekit`, `sip`, `prometheus`: the LiveKit stack as host processes;
- `providers`: a fresh local provider server (voicefleet_testkit.providers) per test.

They start what is not running and fail (never skip) with the tail of the failing component's
log. Several holders may share the platform: each test session and the demo hold a lease
(voicefleet_localdev.leases), and what a test session started is stopped by the last holder to
finish;
a cluster started with `make cluster-up` keeps running. Register them with plain imports in a
conftest.py (tests/integration/conftest.py, tests/e2e/conftest.py); unit tests never load them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from voicefleet_testkit.providers import ProviderServer
from voicefleet_testkit.waiting import wait_for

from voicefleet_localdev import chart, cluster, images, leases
from voicefleet_localdev import livekit as stack
from voicefleet_localdev.kubectl import diagnostics, kubectl
from voicefleet_localdev.procs import CommandError, ComponentError
from voicefleet_localdev.prometheus import PrometheusClient


@dataclass
class ClusterHandle:
    kubeconfig: Path
    api_client: k8s.ApiClient
    info: cluster.ClusterInfo

    @property
    def host_address_from_pods(self) -> str:
        """The host as pods reach it (e.g. for livekit-server's URL given to pods)."""
        if not self.info.hostAddressFromPods:
            raise AssertionError("this cluster has no node: use the cluster_with_node fixture")
        return self.info.hostAddressFromPods

    def kubectl(self, *args: str, timeout: float = 60) -> str:
        """Run kubectl against this cluster; return stdout; KubectlError (an AssertionError)
        with its output on failure."""
        return kubectl(*args, kubeconfig=self.kubeconfig, timeout=timeout)

    def diagnostics(self, namespace: str, *, log_selector: str = "app.kubernetes.io/name") -> str:
        """Pods, VoiceAgents, recent logs and events of `namespace`: for a failure message."""
        return diagnostics(namespace, log_selector=log_selector, kubeconfig=self.kubeconfig)


@contextlib.contextmanager
def installed_chart(
    cluster: ClusterHandle,
    release: str,
    namespace: str,
    values: dict[str, Any],
    *,
    tenants: list[str],
    skip_crds: bool = False,
) -> Iterator[str]:
    """The chart installed as `release` in `namespace` (voicefleet_localdev.chart, as the demo),
    operator pod Ready; yields helm's output (with the NOTES). A failed install fails the test
    with the namespace's diagnostics.

    `skip_crds`: apply charts/voicefleet/crds server-side instead, taking the shared CRD over
    from whoever applied it last on this cluster. On exit the `tenants`' VoiceAgents are deleted
    first, while the operator runs: their finalizer deletes the LiveKit trunks and rules
    (uninstalling first would leave those, and the namespaces stuck terminating)."""
    if skip_crds:
        cluster.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", str(chart.CHART / "crds")
        )
    try:
        notes = chart.upgrade_install(
            release, namespace, values, kubeconfig=cluster.kubeconfig, skip_crds=skip_crds
        )
    except (CommandError, ComponentError) as error:
        pytest.fail(f"helm install failed:\n{error}\n{cluster.diagnostics(namespace)}")
    try:
        yield notes
    finally:
        for tenant in tenants:
            try:
                cluster.kubectl("-n", tenant, "delete", "va", "--all", "--wait=true", timeout=120)
            except AssertionError as error:
                print(f"cleanup of {tenant}'s VoiceAgents failed: {error}")
        chart.uninstall(release, namespace, kubeconfig=cluster.kubeconfig)


def _up(with_node: bool) -> cluster.ClusterInfo:
    try:
        return cluster.up(with_node=with_node, prepare_node=images.ensure_node_images)
    except (ComponentError, CommandError) as exc:
        pytest.fail(f"cluster could not start:\n{exc}", pytrace=False)


def _handle(info: cluster.ClusterInfo) -> ClusterHandle:
    kubeconfig = Path(info.kubeconfig)
    api_client = k8s_config.new_client_from_config(config_file=str(kubeconfig))
    return ClusterHandle(kubeconfig=kubeconfig, api_client=api_client, info=info)


def _other_holders() -> list[leases.Holder]:
    """Other live holders of the platform: test sessions and the demo (see leases.py)."""
    return leases.holders(excluding_pid=os.getpid())


def refuse_while_the_demo_holds(action: str) -> None:
    """For a test that takes down what the demo uses (the cluster, the LiveKit stack): refuse
    while the demo holds the platform, naming it — a skip with that reason on a developer's
    machine, a failure in CI, where nothing but the test session may hold it."""
    demo = [holder for holder in leases.holders() if holder.kind == leases.DEMO]
    if demo:
        refusal = f"not {action}: {demo[0]} holds it; `make demo-down` first to run this test"
        if os.environ.get("CI"):
            pytest.fail(refusal, pytrace=False)
        pytest.skip(refusal)


def wait_for_other_holders(timeout: float) -> None:
    """Wait until nothing else holds the platform (before taking it down)."""
    try:
        wait_for("no other holder", lambda: not _other_holders(), timeout=timeout, interval=2)
    except AssertionError:
        held = ", ".join(map(str, _other_holders()))
        raise AssertionError(
            f"the cluster is still held after {timeout:.0f}s by {held} (leases in "
            f"{leases.leases_dir()}); rerun when they are done"
        ) from None


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ClusterHandle]:
    """A control plane (etcd, kube-apiserver, controller-manager, scheduler); may have a node
    if one was already running. Stopped at the end by the last test session using it, if a
    test session started it (a cluster from `make cluster-up` is left running)."""
    with cluster.exclusive():  # no holder's teardown can stop what this session just found
        lease = leases.hold(leases.TEST_SESSION)
        running = cluster.provider().running()
    if running is None:
        _up(with_node=False)
        cluster.record_starter("startedBy", os.getpid())
    info = cluster.read_info()
    assert info is not None
    handle = _handle(info)
    try:
        yield handle
    finally:
        handle.api_client.close()
        lease.unlink(missing_ok=True)
        current = cluster.read_info()
        if current is not None and current.startedBy is not None:
            cluster.down_unless_held(excluding_pid=os.getpid())


@pytest.fixture(scope="session")
def cluster_with_node(control_plane: ClusterHandle) -> Iterator[ClusterHandle]:
    """The cluster with its node (containerd, kubelet, kube-proxy) Ready; the locally built
    sandbox and test images (and any built project image) are imported into the node. A node
    a test session added is stopped by the last session using the cluster."""
    before = cluster.read_info()
    info = _up(with_node=True)
    if before is None or not before.has_node:
        cluster.record_starter("nodeStartedBy", os.getpid())
    handle = _handle(info)
    try:
        yield handle
    finally:
        handle.api_client.close()
        current = cluster.read_info()
        if current is not None and current.nodeStartedBy is not None:
            cluster.down_unless_held(node_only=True, excluding_pid=os.getpid())


@pytest.fixture(scope="session")
def project_images(cluster_with_node: ClusterHandle) -> dict[str, str]:
    """The operator and runtime images from the repository's Dockerfiles, on the node.

    Built once per session (and only when their sources changed since the last build).
    """
    missing = [n for n in ("operator", "runtime") if n not in images.project_dockerfiles()]
    if missing:
        pytest.fail(f"no Dockerfile for {missing}: the images cannot be built", pytrace=False)
    results = images.build_all(import_into_node=True)
    on_node = images.images_on_node()
    for name in ("operator", "runtime"):
        if images.PROJECT_IMAGES[name] not in on_node:
            pytest.fail(f"{images.PROJECT_IMAGES[name]} is not on the node: {results}")
    return images.PROJECT_IMAGES


# ---------------------------------------------------------------- LiveKit stack


def _stop_stack(result: stack.UpResult) -> None:
    """Stop what this session started, unless another holder (the demo, a session that came
    later) still uses it: it then keeps running, as after `make livekit-up`."""
    if not _other_holders():
        stack.down(tuple(result.started))


def _start_stack(names: tuple[str, ...]) -> stack.UpResult:
    result = stack.UpResult()
    try:
        stack.up(names, result=result)
    except ComponentError as error:
        stack.down(tuple(result.started))
        pytest.fail(f"could not start {', '.join(names)}:\n{error}", pytrace=False)
    return result


@pytest.fixture(scope="session")
def livekit() -> Iterator[stack.LiveKitEndpoint]:
    """livekit-server with Redis: `.url` (host), `.url_for_pods`, `.api_key`, `.api_secret`,
    `.api()` -> livekit-api client (`async with livekit.api() as lkapi: ...`)."""
    result = _start_stack(("redis", "livekit-server"))
    yield stack.LiveKitEndpoint()
    _stop_stack(result)


@pytest.fixture(scope="session")
def sip(livekit: stack.LiveKitEndpoint) -> Iterator[stack.SipEndpoint]:
    """livekit-sip, registered with livekit-server through Redis: `.host`, `.port` (UDP+TCP)."""
    result = _start_stack(("livekit-sip",))
    yield stack.SipEndpoint()
    _stop_stack(result)


@pytest.fixture(scope="session")
def s3() -> Iterator[stack.S3Endpoint]:
    """The S3-compatible object store (versitygw): `.url`, `.access_key`, `.secret_key`,
    `.region`; create buckets with a signed PUT /<bucket>."""
    result = _start_stack(("s3",))
    yield stack.S3Endpoint()
    _stop_stack(result)


@pytest.fixture(scope="session")
def prometheus() -> Iterator[PrometheusClient]:
    """Prometheus: `.base_url`, `.query(expr)` -> [Sample(labels, value)], `.active_targets()`,
    `.wait_for_targets(job, labels)`; discovery follows the current cluster's kubeconfig."""
    result = _start_stack(("prometheus",))
    client = PrometheusClient()
    client.sync_discovery()
    yield client
    _stop_stack(result)


# ---------------------------------------------------------------- provider servers


@pytest_asyncio.fixture
async def providers() -> AsyncIterator[ProviderServer]:
    async with ProviderServer() as server:
        yield server
