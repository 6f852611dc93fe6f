"""kube.py, the operator's facade over lightkube: the requests it makes (paths, field managers,
content types, Accept headers) and how API answers come back (plain dicts, None for 404,
KubeError subclasses), against a recorded transport instead of an API server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from lightkube import KubeConfig
from lightkube.config.models import Cluster, User
from voicefleet_operator import autoscaler
from voicefleet_operator.kube import (
    FIELD_MANAGER,
    METADATA_ONLY,
    Conflict,
    Kube,
    KubeError,
    NotFound,
    Unreachable,
    connection_fields,
)
from voicefleet_operator.scaling import Decision, Reason

SERVER = "https://kube.test"
STATUS_PATH = "/apis/voicefleet.dev/v1alpha1/namespaces/acme/voiceagents/support/status"
EMPTY_PARTIAL_LIST = {"kind": "PartialObjectMetadataList", "items": None}

Handler = Callable[[httpx2.Request], httpx2.Response]


def status(code: int, reason: str, message: str) -> httpx2.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code}
    return httpx2.Response(code, json={**body, "reason": reason, "message": message})


def kube_with(handler: Handler) -> tuple[Kube, list[httpx2.Request]]:
    seen: list[httpx2.Request] = []

    def record(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return handler(request)

    config = KubeConfig.from_one(cluster=Cluster(server=SERVER), user=User(token="t0k"))
    return Kube(config, transport=httpx2.MockTransport(record)), seen


def run(kube: Kube, call: Any) -> Any:
    async def main() -> Any:
        try:
            return await call
        finally:
            await kube.close()

    return asyncio.run(main())


def test_get_returns_a_plain_dict_and_none_when_absent() -> None:
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "a"}}

    def handler(request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/a"):
            return httpx2.Response(200, json=deployment)
        return status(404, "NotFound", 'deployments.apps "b" not found')

    kube, seen = kube_with(handler)
    got = run(kube, kube.get("Deployment", "vf-acme", "a"))
    assert type(got) is dict and got == deployment
    assert seen[0].url.path == "/apis/apps/v1/namespaces/vf-acme/deployments/a"
    assert seen[0].headers["Authorization"] == "Bearer t0k"
    kube, seen = kube_with(handler)
    assert run(kube, kube.get("Deployment", "vf-acme", "b")) is None


def test_apply_is_a_forced_server_side_apply_as_the_operator() -> None:
    obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "support-config", "namespace": "vf-acme"},
        "data": {"a": "b"},
    }
    kube, seen = kube_with(lambda request: httpx2.Response(200, json=obj))
    assert run(kube, kube.apply(obj)) == obj
    request = seen[0]
    assert (request.method, request.url.path) == (
        "PATCH",
        "/api/v1/namespaces/vf-acme/configmaps/support-config",
    )
    assert request.url.params["fieldManager"] == FIELD_MANAGER
    assert request.url.params["force"] == "true"
    assert request.headers["Content-Type"] == "application/apply-patch+yaml"
    assert json.loads(request.content) == obj


def test_the_autoscaler_applies_the_replicas_as_its_own_field_manager() -> None:
    kube, seen = kube_with(lambda request: httpx2.Response(200, json={}))
    decision = Decision(replicas=3, demand=3, reason=Reason.PINNED, message="")
    run(kube, autoscaler._apply_replicas(kube, "vf-acme", "support", decision))
    request = seen[0]
    assert request.url.path == "/apis/apps/v1/namespaces/vf-acme/deployments/support"
    assert request.url.params["fieldManager"] == autoscaler.FIELD_MANAGER != FIELD_MANAGER
    assert request.url.params["force"] == "true"
    assert json.loads(request.content)["spec"] == {"replicas": 3}


def test_a_status_merge_patch_goes_to_the_status_subresource() -> None:
    kube, seen = kube_with(lambda request: httpx2.Response(200, json={"status": {}}))
    run(
        kube,
        kube.merge_patch(
            "VoiceAgent", "acme", "support", {"status": {"a": 1}}, subresource="status"
        ),
    )
    request = seen[0]
    assert request.url.path == STATUS_PATH
    assert request.headers["Content-Type"] == "application/merge-patch+json"
    kube, seen = kube_with(lambda request: httpx2.Response(200, json={}))
    run(kube, kube.merge_patch("Pod", "vf-acme", "p", {"metadata": {"annotations": {}}}))
    assert seen[0].url.path == "/api/v1/namespaces/vf-acme/pods/p"


def test_delete_in_the_background_and_false_when_absent() -> None:
    answers = iter([httpx2.Response(200, json={}), status(404, "NotFound", "gone")])
    kube, seen = kube_with(lambda request: next(answers))
    assert run(kube, kube.delete("Namespace", None, "vf-acme")) is True
    assert seen[0].method == "DELETE" and seen[0].url.path == "/api/v1/namespaces/vf-acme"
    assert seen[0].url.params["propagationPolicy"] == "Background"
    kube2, _ = kube_with(lambda request: next(answers))
    assert run(kube2, kube2.delete("Namespace", None, "vf-acme")) is False


@pytest.mark.parametrize(
    ("code", "reason", "error_type"),
    [(409, "Conflict", Conflict), (404, "NotFound", NotFound), (422, "Invalid", KubeError)],
)
def test_api_failures_are_kube_errors_with_the_status(
    code: int, reason: str, error_type: type[KubeError]
) -> None:
    kube, _ = kube_with(lambda request: status(code, reason, "the message"))
    patch = kube.merge_patch("VoiceAgent", "acme", "support", {"status": {}}, subresource="status")
    with pytest.raises(error_type) as raised:
        run(kube, patch)
    assert (raised.value.status, raised.value.reason, raised.value.message) == (
        code,
        reason,
        "the message",
    )


def test_an_unreachable_api_server_is_a_kube_error() -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused", request=request)

    kube, _ = kube_with(refuse)
    with pytest.raises(Unreachable):
        run(kube, kube.get("Secret", "acme", "keys"))
    kube, _ = kube_with(refuse)
    with pytest.raises(Unreachable):
        run(kube, kube.list("Pod", "vf-acme"))


def test_a_metadata_only_list_reads_an_empty_partial_list_and_sends_the_selector() -> None:
    kube, seen = kube_with(lambda request: httpx2.Response(200, json=EMPTY_PARTIAL_LIST))
    assert run(kube, kube.list("VoiceAgent", "acme", "a=b,c=d", metadata_only=True)) == []
    assert seen[0].headers["Accept"] == METADATA_ONLY
    assert seen[0].url.params["labelSelector"] == "a=b,c=d"


def test_kopf_logs_in_with_the_same_credentials() -> None:
    config = KubeConfig.from_one(
        cluster=Cluster(server="https://kube.test", certificate_auth_data="Q0E="),
        user=User(token="t0k"),
    ).get()
    assert config is not None
    fields = connection_fields(config)
    assert (fields["server"], fields["ca_data"], fields["scheme"], fields["token"]) == (
        "https://kube.test",
        "Q0E=",
        "Bearer",
        "t0k",
    )
