"""Tenant-chosen worker images: the chart's ValidatingAdmissionPolicy on a real kube-apiserver.

The chart is rendered (helm template) with an allow-list of one repository and one digest,
serving one namespace; its policy and binding are applied with the VoiceAgent CRD. Then the API
server refuses a VoiceAgent whose spec.worker.image is anything else, naming the field, on
create and on update, and admits the platform's runtime image, the listed repository's tags and
any repository pinned to the listed digest. The operator's twin of the rule
(voicefleet_operator.image_policy) is held to the same cases.
"""

from __future__ import annotations

import copy
import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from voicefleet_localdev import chart, paths
from voicefleet_localdev.operator_process import OperatorProcess, settings_environment
from voicefleet_localdev.pytest_plugin import ClusterHandle
from voicefleet_operator import api, image_policy, render
from voicefleet_operator.settings import PlatformSettings
from voicefleet_testkit import observability
from voicefleet_testkit.conditions import condition, wait_condition
from voicefleet_testkit.waiting import wait_for

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "voiceagent.yaml"
RUNTIME_IMAGE = "voicefleet/runtime:0.1.0"  # the chart's default runtime image (appVersion)
REPOSITORY = "registry.example:5000/voice/runtime"
DIGEST = "sha256:" + "ab" * 32
ALLOWED = [
    RUNTIME_IMAGE,
    f"{REPOSITORY}:v2",
    REPOSITORY,
    f"{REPOSITORY}@{DIGEST}",
    f"elsewhere.example/any/image@{DIGEST}",
]
REFUSED = [
    "evil.example/miner:latest",
    "voicefleet/runtime:0.0.9",  # another tag of the platform image is not the platform image
    f"{REPOSITORY}-evil:v1",  # a repository that only starts like the allowed one
    f"registry.example:5000/voice:runtime@{DIGEST[:-2]}00",
]


def _render_chart(*set_args: str) -> list[dict[str, Any]]:
    """`helm template` with the pinned helm (found by localdev, not on PATH: `make test` does
    not put it there) and the test kit's base values."""
    argv = [str(chart.helm()), "template", "vf", str(chart.CHART), "--namespace", "vf-system"]
    argv += [*observability.BASE_VALUES, *set_args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}{proc.stdout}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def policy_namespace(control_plane: ClusterHandle) -> Iterator[str]:
    """The CRD, a namespace, and the chart's image policy bound to that namespace."""
    cluster = control_plane
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(chart.CHART / "crds"))
    namespace = f"images-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", namespace)
    docs = _render_chart(
        "--set", f"watchNamespaces={{{namespace}}}",
        "--set", f"runtime.allowedImages.repositories={{{REPOSITORY}}}",
        "--set", f"runtime.allowedImages.digests={{{DIGEST}}}",
    )  # fmt: skip
    kinds = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
    objects = [doc for doc in docs if doc["kind"] in kinds]
    assert sorted(o["kind"] for o in objects) == sorted(kinds)
    # Cluster-scoped names: one per test session on a shared cluster.
    name = f"worker-images-{namespace}"
    for obj in objects:
        obj["metadata"]["name"] = name
        if obj["kind"] == "ValidatingAdmissionPolicyBinding":
            obj["spec"]["policyName"] = name
    manifest = paths.state_dir() / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(manifest))
        yield namespace
    finally:
        for kind in kinds:
            cluster.kubectl("delete", kind.lower(), name, "--ignore-not-found")
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")
        manifest.unlink(missing_ok=True)


def _voiceagent(namespace: str, name: str, image: str | None) -> dict[str, Any]:
    body = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    body["metadata"] = {"name": name, "namespace": namespace}
    body["spec"].setdefault("worker", {}).pop("image", None)
    if image is not None:
        body["spec"]["worker"]["image"] = image
    return dict(body)


def _refusal(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "")["message"])
    except (TypeError, ValueError, KeyError):
        return str(error.body)


def test_only_allowed_worker_images_are_admitted(
    control_plane: ClusterHandle, policy_namespace: str
) -> None:
    objects = k8s.CustomObjectsApi(control_plane.api_client)
    namespace = policy_namespace

    def create(name: str, image: str | None) -> Any:
        body = _voiceagent(namespace, name, image)
        return objects.create_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, body
        )

    def delete(name: str) -> None:
        objects.delete_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)

    # The policy takes effect once the API server has loaded and type-checked it: until the
    # first refusal, whatever got created is deleted and the create is tried again.
    def refused_once() -> str | None:
        try:
            create("probe", REFUSED[0])
        except ApiException as error:
            if error.status == 422 and "spec.worker.image" in _refusal(error):
                return _refusal(error)
            raise
        delete("probe")
        return None

    message = str(wait_for("the image policy to refuse a VoiceAgent", refused_once, timeout=60))
    assert f"spec.worker.image: {REFUSED[0]} is not an image the platform allows" in message
    assert RUNTIME_IMAGE in message and REPOSITORY in message and DIGEST in message

    for index, image in enumerate(REFUSED):
        with pytest.raises(ApiException) as refused:
            create(f"refused-{index}", image)
        assert refused.value.status == 422, image
        assert f"spec.worker.image: {image} is not an image" in _refusal(refused.value)

    create("allowed-default", None)
    for index, allowed in enumerate(ALLOWED):
        create(f"allowed-{index}", allowed)

    # An update to a refused image is refused as well.
    current: Any = objects.get_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, "allowed-1"
    )
    current["spec"]["worker"]["image"] = REFUSED[0]
    with pytest.raises(ApiException) as refused:
        objects.replace_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, "allowed-1", current
        )
    assert refused.value.status == 422
    assert "spec.worker.image" in _refusal(refused.value)


def test_the_operator_holds_the_same_rule() -> None:
    settings = PlatformSettings(
        livekit_url="ws://livekit.example:7880",
        livekit_secret_namespace="voicefleet-system",
        runtime_image=RUNTIME_IMAGE,
        allowed_image_repositories=(REPOSITORY,),
        allowed_image_digests=(DIGEST,),
    )
    assert all(image_policy.image_allowed(image, settings) for image in ALLOWED)
    assert not any(image_policy.image_allowed(image, settings) for image in REFUSED)


def test_the_operator_refuses_an_image_admitted_without_the_policy(
    control_plane: ClusterHandle, policy_namespace: str
) -> None:
    """A VoiceAgent admitted where no policy binds (the policy came later, or the cluster has
    none) is ConfigValid=False naming spec.worker.image, and gets no workers; an allowed image
    makes it valid."""
    cluster = control_plane
    core = k8s.CoreV1Api(cluster.api_client)
    objects = k8s.CustomObjectsApi(cluster.api_client)
    suffix = secrets.token_hex(3)
    platform, tenant = f"images-platform-{suffix}", f"images-tenant-{suffix}"
    for namespace in (platform, tenant):
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    secret_data = {
        platform: ("voicefleet-livekit", {"LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "s"}),
        tenant: ("openai", {"OPENAI_API_KEY": "sk-x"}),
    }
    for namespace, (name, data) in secret_data.items():
        core.create_namespaced_secret(
            namespace, k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name), string_data=data)
        )
    settings = PlatformSettings(
        livekit_url="ws://127.0.0.1:7880",
        livekit_secret_namespace=platform,
        runtime_image=RUNTIME_IMAGE,
        runtime_image_pull_policy="Never",
        allowed_image_repositories=(REPOSITORY,),
        allowed_image_digests=(DIGEST,),
        watch_namespaces=(tenant,),
        recheck_invalid_seconds=1.0,
        metrics_port=0,
    )
    operator = OperatorProcess(
        settings, cluster.kubeconfig, paths.logs_dir() / f"operator-images-{suffix}.log"
    ).start()
    body = {
        "apiVersion": f"{api.GROUP}/{api.VERSION}",
        "kind": api.KIND,
        "metadata": {"name": "chooser", "namespace": tenant},
        "spec": {
            "agents": [{"name": "assistant", "instructions": "Be brief."}],
            "entry": "assistant",
            "pipeline": {
                "stt": {"provider": "openai"},
                "llm": {"provider": "openai"},
                "tts": {"provider": "openai", "voice": "alloy"},
            },
            "secretRefs": [{"name": "openai"}],
            "worker": {"image": REFUSED[0]},
        },
    }
    try:
        objects.create_namespaced_custom_object(api.GROUP, api.VERSION, tenant, api.PLURAL, body)

        def config_valid(expected: str) -> dict[str, Any]:
            """The ConfigValid condition, once it has status `expected`."""

            def read() -> Any:
                return objects.get_namespaced_custom_object(
                    api.GROUP, api.VERSION, tenant, api.PLURAL, "chooser"
                )

            agent = wait_condition(
                f"{tenant}/chooser",
                read,
                "ConfigValid",
                expected,
                timeout=60,
            )
            found = condition(agent, "ConfigValid")
            assert found is not None
            return found

        refused = config_valid("False")
        assert refused["reason"] == "ImageNotAllowed"
        assert refused["message"].startswith(f"spec.worker.image: '{REFUSED[0]}' is not an image")
        workers = render.worker_namespace(tenant)
        deployments = k8s.AppsV1Api(cluster.api_client).list_namespaced_deployment(workers)
        assert deployments.items == []

        patch = {"spec": {"worker": {"image": f"{REPOSITORY}:v2"}}}
        objects.patch_namespaced_custom_object(
            api.GROUP, api.VERSION, tenant, api.PLURAL, "chooser", patch
        )
        config_valid("True")
        deployment: Any = wait_for(
            "the workers' Deployment",
            lambda: k8s.AppsV1Api(cluster.api_client).list_namespaced_deployment(workers).items,
            timeout=60,
        )
        assert deployment[0].spec.template.spec.containers[0].image == f"{REPOSITORY}:v2"
        objects.delete_namespaced_custom_object(
            api.GROUP, api.VERSION, tenant, api.PLURAL, "chooser"
        )

        def gone() -> bool:
            listed: Any = objects.list_namespaced_custom_object(
                api.GROUP, api.VERSION, tenant, api.PLURAL
            )
            return not listed["items"]

        wait_for("the VoiceAgent to be deleted", gone, timeout=60)
    finally:
        operator.stop()
        for namespace in (tenant, platform):
            core.delete_namespace(namespace)


def test_operator_process_environment_round_trips_settings() -> None:
    """OperatorProcess sets the variables as the chart does (maps as key=value lists)."""
    chosen = PlatformSettings(
        livekit_url="ws://livekit.example:7880",
        livekit_secret_namespace="voicefleet-system",
        runtime_image=RUNTIME_IMAGE,
        allowed_image_repositories=(REPOSITORY,),
        allowed_image_digests=(DIGEST,),
        platform_namespace="platform",
        monitoring_namespace_selector={"kubernetes.io/metadata.name": "mon"},
        monitoring_pod_selector={"app": "prometheus"},
        egress_allowed_cidrs=("10.1.0.0/16",),
    )
    assert PlatformSettings.from_environment(settings_environment(chosen)) == chosen
