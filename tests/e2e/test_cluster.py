"""The cluster provider: API machinery, a pod on the node, networking, and a clean teardown.

The last test stops the cluster, checks nothing is left behind, and brings it back in the same
mode (the PKI is kept, so the session fixtures' clients stay valid).
"""

from __future__ import annotations

import http.server
import os
import secrets
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from voicefleet_localdev import cluster, images
from voicefleet_localdev.pytest_plugin import (
    ClusterHandle,
    refuse_while_the_demo_holds,
    wait_for_other_holders,
)
from voicefleet_testkit.waiting import wait_for

pytestmark = pytest.mark.e2e

GROUP = "e2e.voicefleet.dev"


def _crd(plural: str) -> Any:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural[:-1], "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "size": {"type": "integer", "minimum": 1},
                                        "colour": {"type": "string"},
                                    },
                                    "required": ["size"],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


def test_custom_resource_is_stored_and_read_back(control_plane: ClusterHandle) -> None:
    extensions = k8s.ApiextensionsV1Api(control_plane.api_client)
    custom = k8s.CustomObjectsApi(control_plane.api_client)
    plural = f"widgets{secrets.token_hex(3)}"
    extensions.create_custom_resource_definition(_crd(plural))
    try:

        def established() -> bool:
            crd: Any = extensions.read_custom_resource_definition(f"{plural}.{GROUP}")
            return any(
                c.type == "Established" and c.status == "True" for c in crd.status.conditions or []
            )

        wait_for("the CRD to be Established", established, timeout=60)
        body = {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Widget",
            "metadata": {"name": "blue-widget"},
            "spec": {"size": 3, "colour": "blue"},
        }
        wait_for(
            "the new resource to be served",
            lambda: custom.create_namespaced_custom_object(GROUP, "v1", "default", plural, body),
            timeout=30,
        )
        stored: Any = custom.get_namespaced_custom_object(
            GROUP, "v1", "default", plural, "blue-widget"
        )
        assert stored["spec"] == {"size": 3, "colour": "blue"}
        assert stored["metadata"]["uid"]

        # The schema is enforced by the apiserver: size must be at least 1.
        invalid = {**body, "metadata": {"name": "bad-widget"}, "spec": {"size": 0}}
        with pytest.raises(ApiException) as rejected:
            custom.create_namespaced_custom_object(GROUP, "v1", "default", plural, invalid)
        assert rejected.value.status == 422
    finally:
        extensions.delete_custom_resource_definition(f"{plural}.{GROUP}")


@pytest.fixture
def namespace(cluster_with_node: ClusterHandle) -> Iterator[str]:
    """A namespace enforcing the `restricted` Pod Security Standard."""
    core = k8s.CoreV1Api(cluster_with_node.api_client)
    name = f"e2e-cluster-{secrets.token_hex(3)}"
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    body: Any = {"metadata": {"name": name, "labels": labels}}
    core.create_namespace(body)
    yield name
    core.delete_namespace(name)


class _HostServer(http.server.ThreadingHTTPServer):
    seen_from: list[str]


@pytest.fixture
def host_server(cluster_with_node: ClusterHandle) -> Iterator[_HostServer]:
    """An HTTP server on the host address pods use, recording who called it."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.seen_from.append(self.client_address[0])
            payload = b"host-says-hello"
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = _HostServer((cluster_with_node.host_address_from_pods, 0), Handler)
    server.seen_from = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _restricted_container(probe_urls: str) -> dict[str, Any]:
    return {
        "name": "testserver",
        "image": images.TESTSERVER_IMAGE,
        # Never: proves the image came from the local import, not a registry.
        "imagePullPolicy": "Never",
        "env": [{"name": "PROBE_URLS", "value": probe_urls}],
        "ports": [{"containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 2},
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def test_deployment_of_local_image_runs_and_is_reachable(
    cluster_with_node: ClusterHandle, namespace: str, host_server: _HostServer
) -> None:
    apps = k8s.AppsV1Api(cluster_with_node.api_client)
    core = k8s.CoreV1Api(cluster_with_node.api_client)
    host = cluster_with_node.host_address_from_pods
    port = host_server.server_address[1]
    # The pod calls the host directly and the kubernetes Service through kube-proxy.
    probe_urls = (
        f"http://{host}:{port}/from-pod,"
        "https://$(KUBERNETES_SERVICE_HOST):$(KUBERNETES_SERVICE_PORT)/version"
    )
    labels = {"app": "testserver"}
    deployment: Any = {
        "metadata": {"name": "testserver"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [_restricted_container(probe_urls)]},
            },
        },
    }
    apps.create_namespaced_deployment(namespace, deployment)

    def ready_pod() -> Any:
        pods: Any = core.list_namespaced_pod(namespace, label_selector="app=testserver")
        for pod in pods.items:
            conditions = pod.status.conditions or []
            ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
            if pod.status.phase == "Running" and ready:
                return pod
        return None

    pod: Any = wait_for("a Running, Ready testserver pod", ready_pod, timeout=180)
    assert pod.spec.node_name == cluster_with_node.info.nodeName
    pod_ip = pod.status.pod_ip
    assert pod_ip and pod_ip != host

    # The host reaches the pod's IP.
    with urllib.request.urlopen(f"http://{pod_ip}:8080/from-host", timeout=10) as response:
        assert response.read().decode().strip() == f"hello from {pod.metadata.name}"

    # The pod reaches the host, from its own IP.
    wait_for("the pod to call the host", lambda: pod_ip in host_server.seen_from, timeout=30)

    # kubectl logs shows the container's output: its start, the host's request, and the
    # answers it got from the host and from the kubernetes Service (through kube-proxy).
    wanted = (
        "listening on :8080",
        "request GET /from-host",
        f'probe http://{host}:{port}/from-pod: status 200 body "host-says-hello"',
        f"probe https://{cluster.KUBERNETES_SERVICE_IP}:443/version: status 200",
    )
    log_text = ""

    def all_lines_logged() -> bool:
        nonlocal log_text
        log_text = cluster_with_node.kubectl("logs", "-n", namespace, pod.metadata.name)
        return all(w in log_text for w in wanted)

    try:
        wait_for("the expected lines in kubectl logs", all_lines_logged, timeout=30)
    except AssertionError:
        missing = [w for w in wanted if w not in log_text]
        raise AssertionError(f"kubectl logs lacks {missing}; it shows:\n{log_text}") from None


def test_pod_security_admission_rejects_privileged_pod(
    cluster_with_node: ClusterHandle, namespace: str
) -> None:
    core = k8s.CoreV1Api(cluster_with_node.api_client)
    container = {**_restricted_container(""), "securityContext": {"privileged": True}}
    with pytest.raises(ApiException) as rejected:
        pod: Any = {"metadata": {"name": "privileged"}, "spec": {"containers": [container]}}
        core.create_namespaced_pod(namespace, pod)
    assert rejected.value.status == 403
    assert "violates PodSecurity" in str(rejected.value.body)


def _quota_status_hard(core: k8s.CoreV1Api, namespace: str) -> Any:
    quota: Any = core.read_namespaced_resource_quota("no-services", namespace)
    return quota.status.hard if quota.status else None


def test_resource_quota_is_enforced(control_plane: ClusterHandle) -> None:
    core = k8s.CoreV1Api(control_plane.api_client)
    name = f"e2e-quota-{secrets.token_hex(3)}"
    namespace: Any = {"metadata": {"name": name}}
    core.create_namespace(namespace)
    try:
        quota: Any = {"metadata": {"name": "no-services"}, "spec": {"hard": {"services": "0"}}}
        core.create_namespaced_resource_quota(name, quota)
        # Admission refuses to guess: wait until the quota controller has computed its status.
        wait_for(
            "the quota controller to compute the quota's status",
            lambda: _quota_status_hard(core, name),
            timeout=60,
        )
        service: Any = {"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}
        with pytest.raises(ApiException) as rejected:
            core.create_namespaced_service(name, service)
        assert rejected.value.status == 403
        assert "exceeded quota: no-services" in str(rejected.value.body)
    finally:
        core.delete_namespace(name)


def test_cluster_down_leaves_nothing_behind(cluster_with_node: ClusterHandle) -> None:
    """Runs last in this module: stop, check, stop again (idempotent), restart as it was.

    It takes down the one local cluster of this machine, so it never runs while the demo holds it
    (the demo's namespace, chart and VoiceAgent would be lost): it refuses, naming the holder —
    a skip with that reason on a developer's machine, a failure in CI (where nothing but the test
    session may hold the cluster). Other test sessions end by themselves: it waits for them."""
    refuse_while_the_demo_holds("taking the cluster down")
    wait_for_other_holders(timeout=600)  # below pytest-timeout, so this message is shown
    info = cluster.read_info()
    assert info is not None
    # Checked again under the cluster lock: a session that arrived meanwhile keeps it up.
    held = cluster.down_unless_held(excluding_pid=os.getpid())
    assert not held, f"not taking the cluster down: held by {', '.join(map(str, held))}"
    try:
        left = cluster.leftovers()
        assert left == {
            "processes": [],
            "mounts": [],
            "interfaces": [],
            "rules": [],
            "cgroups": [],
        }
        assert not cluster.provider(info.provider).running()
        cluster.down()  # a second down is harmless
        assert cluster.leftovers() == left
    finally:
        # Whatever failed above, the rest of the session gets its cluster back as it was.
        restarted = cluster.up(
            with_node=info.has_node,
            provider_name=info.provider,
            prepare_node=images.ensure_node_images,
        )
        # Whoever was to stop the cluster at the end of the session still does.
        cluster.record_starter("startedBy", info.startedBy)
        cluster.record_starter("nodeStartedBy", info.nodeStartedBy)
    assert restarted.has_node == info.has_node
    nodes: Any = k8s.CoreV1Api(cluster_with_node.api_client).list_node()
    assert [n.metadata.name for n in nodes.items] == [info.nodeName]
