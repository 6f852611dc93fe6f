"""The operator's Kubernetes API client: a thin facade over lightkube's async client.

Kopf watches and patches the VoiceAgents itself; everything else the operator does (server-side
apply of children, reading Secrets and Deployments, writing status) goes through `Kube`. It maps
the operator's calls (a kind name, a namespace, a name; plain dicts in and out) onto lightkube,
which owns the credentials (the pod's service account, else $KUBECONFIG, else ~/.kube/config;
a rotated service account token is read again), TLS, the connection pool and where each kind
lives in the API. Objects stay plain dicts: lightkube's generic resources are decoded as dicts,
never into model objects (operator/README.md, "The Kubernetes client", says why lightkube).

Lists, and the leader election's Lease calls, go through `request()`: JSON over lightkube's
connection settings, because a metadata-only list needs its own Accept header (and answers
`"items": null` when empty), which lightkube's typed list does not allow.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx2
from lightkube import ApiError, AsyncClient, KubeConfig, SingleConfig
from lightkube.config.client_adapter import AsyncClient as _connection
from lightkube.config.client_adapter import ConnectionParams
from lightkube.core import resource as lightkube_resource
from lightkube.core.resource_registry import resource_registry
from lightkube.generic_resource import (
    GenericGlobalResource,
    GenericGlobalStatus,
    GenericNamespacedResource,
    GenericNamespacedStatus,
    create_namespaced_resource,
)
from lightkube.types import CascadeType, PatchType

FIELD_MANAGER = "voicefleet-operator"
"""Field manager of every server-side apply the operator makes (the autoscaler has its own)."""

METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
"""Accept header of a list that returns only the items' metadata (no spec, no status)."""

TIMEOUT_SECONDS = 30.0

API_VERSIONS: dict[str, str] = {
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "ServiceAccount": "v1",
    "Pod": "v1",
    "Event": "v1",
    "Namespace": "v1",
    "Deployment": "apps/v1",
    "ReplicaSet": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "VoiceAgent": "voicefleet.dev/v1alpha1",
}
"""The API version the operator speaks for each kind it names. Everything else about a kind
(its plural, whether it is namespaced) comes from lightkube's resource registry; only the
VoiceAgent, the operator's own CRD, is described here (`_RESOURCES`)."""

Resource = Any
"""A lightkube generic resource class (its typed overloads do not take a union of the two)."""

_RESOURCES: dict[str, Resource] = {
    "VoiceAgent": create_namespaced_resource(
        "voicefleet.dev", "v1alpha1", "VoiceAgent", "voiceagents"
    )
}

log = logging.getLogger(__name__)
# httpx2 logs every request at INFO: thousands of lines a minute at scale. Failures reach the
# caller as KubeError instead.
logging.getLogger("httpx2").setLevel(logging.WARNING)


def resource(kind: str) -> Resource:
    """lightkube's generic (dict) resource for `kind`: where it lives comes from lightkube's
    model of the kind; results are decoded as plain dicts, never into the model."""
    found = _RESOURCES.get(kind)
    if found is None:
        api_version = API_VERSIONS.get(kind)
        if api_version is None:
            raise ValueError(f"unknown kind {kind}; add its API version to API_VERSIONS")
        model = resource_registry.load(api_version, kind)
        info = lightkube_resource.api_info(model)
        namespaced = issubclass(model, lightkube_resource.NamespacedResource)
        status_info = lightkube_resource.ApiInfo(
            resource=info.resource,
            parent=info.resource,
            plural=info.plural,
            verbs=["get", "patch", "put"],
            action="status",
        )
        status = type(
            f"{kind}Status",
            (GenericNamespacedStatus if namespaced else GenericGlobalStatus,),
            {"_api_info": status_info},
        )
        base = GenericNamespacedResource if namespaced else GenericGlobalResource
        found = type(kind, (base,), {"_api_info": info, "Status": status})
        _RESOURCES[kind] = found
    return found


def _namespaced(kind: str) -> bool:
    return issubclass(resource(kind), GenericNamespacedResource)


def path(kind: str, namespace: str | None = None, name: str | None = None) -> str:
    """The API path of a kind's collection (in `namespace`, or across namespaces when None for
    a namespaced kind), or of one object when `name` is given."""
    info = lightkube_resource.api_info(resource(kind))
    group, version = info.resource.group, info.resource.version
    base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    if namespace is not None and _namespaced(kind):
        base += f"/namespaces/{namespace}"
    base += f"/{info.plural}"
    return f"{base}/{name}" if name else base


class KubeError(Exception):
    """An API call failed; `status` is the HTTP status (0 when the API server was not reached),
    `reason` the Status reason."""

    def __init__(self, method: str, path: str, status: int, reason: str, message: str) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{method} {path}: {status} {reason}: {message}")


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


class Unreachable(KubeError):
    """No answer: connection refused or reset, TLS failure, timeout."""


def client_configuration(kubeconfig: str | None = None) -> KubeConfig:
    """Credentials: `kubeconfig` if given; else the pod's service account; else $KUBECONFIG
    (read now) or ~/.kube/config."""
    if kubeconfig is not None:
        return KubeConfig.from_file(kubeconfig)
    return KubeConfig.from_env()


def connection_fields(config: SingleConfig) -> dict[str, Any]:
    """The connection settings as `kopf.ConnectionInfo` fields, so that kopf logs in as the
    operator's own client does. A token file (the pod's service account) is read now: kopf
    calls its login handler again when a rotated token is refused."""
    cluster, user = config.cluster, config.user
    token = user.token if user is not None else None
    if user is not None and user.token_file:
        with open(config.abs_file(user.token_file)) as token_file:
            token = token_file.read().strip()

    def file(name: str | None) -> str | None:
        return str(config.abs_file(name)) if name else None

    return {
        "server": cluster.server,
        "ca_path": file(cluster.certificate_auth),
        "ca_data": cluster.certificate_auth_data,
        "insecure": cluster.insecure,
        "scheme": "Bearer" if token else None,
        "token": token or None,
        "certificate_path": file(user.client_cert) if user else None,
        "certificate_data": user.client_cert_data if user else None,
        "private_key_path": file(user.client_key) if user else None,
        "private_key_data": user.client_key_data if user else None,
    }


def _plain(obj: Any) -> dict[str, Any]:
    return dict(obj) if obj is not None else {}


class Kube:
    """The operator's API calls; one instance per operator run (it holds a connection pool)."""

    def __init__(
        self,
        configuration: KubeConfig | SingleConfig | None = None,
        *,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        """`transport` replaces the network (tests)."""
        self._transport = transport
        config = configuration or client_configuration()
        single = config.get() if isinstance(config, KubeConfig) else config
        if single is None:
            raise ValueError("the kubeconfig has no current context")
        self._config: SingleConfig = single
        self._client: AsyncClient | None = None
        self._http: httpx2.AsyncClient | None = None

    @property
    def config(self) -> SingleConfig:
        """The connection settings (server, CA, user): kopf logs in with the same."""
        return self._config

    def _lightkube(self) -> AsyncClient:
        if self._client is None:
            self._client = AsyncClient(
                self._config,
                timeout=httpx2.Timeout(TIMEOUT_SECONDS),
                field_manager=FIELD_MANAGER,
                transport=self._transport,
            )
        return self._client

    async def close(self) -> None:
        client, http = self._client, self._http
        self._client = self._http = None
        if client is not None:
            await client.close()
        if http is not None:
            await http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
        accept: str | None = None,
    ) -> dict[str, Any]:
        """A JSON call by path, over lightkube's connection settings (credentials, TLS)."""
        if self._http is None:
            connection = ConnectionParams(
                timeout=httpx2.Timeout(TIMEOUT_SECONDS),
                transport=self._transport,  # type: ignore[arg-type]  # typed sync, used async
            )
            self._http = _connection(self._config, connection)
        headers = {"Accept": accept or "application/json"}
        data = None if body is None else json.dumps(body)
        if data is not None:
            headers["Content-Type"] = content_type or "application/json"
        try:
            response = await self._http.request(
                method, path, params=params, content=data, headers=headers
            )
        except httpx2.HTTPError as error:
            raise Unreachable(method, path, 0, type(error).__name__, str(error)) from error
        if response.status_code >= 400:
            raise _error(method, path, response.status_code, response.text)
        return response.json() if response.content else {}

    async def _call(self, method: str, kind: str, name: str | None, operation: Any) -> Any:
        """Run a lightkube call, its failures as KubeError (NotFound, Conflict, Unreachable)."""
        try:
            return await operation
        except ApiError as error:
            code = error.status.code or error.response.status_code
            reason, message = error.status.reason or "", error.status.message or ""
            raise _error_type(code)(method, f"{kind}/{name}", code, reason, message) from error
        except httpx2.HTTPStatusError as error:  # an answer that is not a JSON Status
            code = error.response.status_code
            raise _error(method, f"{kind}/{name}", code, error.response.text) from error
        except httpx2.HTTPError as error:
            raise Unreachable(
                method, f"{kind}/{name}", 0, type(error).__name__, str(error)
            ) from error

    # --- typed helpers ---------------------------------------------------------------------

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        call = self._lightkube().get(resource(kind), name, namespace=namespace)
        try:
            return _plain(await self._call("GET", kind, name, call))
        except NotFound:
            return None

    async def list(
        self,
        kind: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        *,
        metadata_only: bool = False,
    ) -> list[dict[str, Any]]:
        """The items; with `metadata_only` each is only {"metadata": ...} (kind and apiVersion
        are PartialObjectMetadata's): a fraction of the bytes when spec and status are large."""
        params = {"labelSelector": label_selector} if label_selector else None
        accept = METADATA_ONLY if metadata_only else None
        result = await self.request("GET", path(kind, namespace), params=params, accept=accept)
        # An empty PartialObjectMetadataList comes as "items": null.
        return list(result.get("items") or [])

    async def apply(
        self, obj: dict[str, Any], *, force: bool = True, field_manager: str = FIELD_MANAGER
    ) -> dict[str, Any]:
        """Server-side apply `obj` as `field_manager` (creates it when it does not exist).

        `force` takes over fields another manager changed (e.g. a `kubectl edit` of a child):
        the operator is the only writer of its children and puts them back as rendered.
        """
        kind = obj.get("kind", "")
        if API_VERSIONS.get(kind) != obj.get("apiVersion"):
            raise ValueError(f"unknown kind {obj.get('apiVersion')}/{kind}; add it to API_VERSIONS")
        metadata = obj["metadata"]
        call = self._lightkube().patch(
            resource(kind),
            metadata["name"],
            obj,
            namespace=metadata.get("namespace"),
            patch_type=PatchType.APPLY,
            field_manager=field_manager,
            force=force,
        )
        return _plain(await self._call("APPLY", kind, metadata["name"], call))

    async def merge_patch(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        patch: dict[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """A JSON merge patch of the object, or of its `status` subresource."""
        target: Any = resource(kind)
        if subresource == "status":
            target = target.Status
        elif subresource is not None:
            raise ValueError(f"subresource {subresource!r}: only 'status' is supported")
        call = self._lightkube().patch(
            target, name, patch, namespace=namespace, patch_type=PatchType.MERGE
        )
        return _plain(await self._call("PATCH", kind, name, call))

    async def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        """Delete in the background (dependents by the garbage collector); False if absent."""
        call = self._lightkube().delete(
            resource(kind), name, namespace=namespace, cascade=CascadeType.BACKGROUND
        )
        try:
            await self._call("DELETE", kind, name, call)
        except NotFound:
            return False
        return True


def _error_type(status: int) -> type[KubeError]:
    return NotFound if status == 404 else Conflict if status == 409 else KubeError


def _error(method: str, path: str, status: int, text: str) -> KubeError:
    try:
        payload = json.loads(text)
        reason = str(payload.get("reason", ""))
        message = str(payload.get("message", text))
    except (ValueError, AttributeError):
        reason, message = "", text[:500]
    return _error_type(status)(method, path, status, reason, message)


async def retry_on_conflict(attempts: int, operation: Any) -> Any:
    """Run `operation()` (an async callable) again when it raises Conflict, a few times."""
    for attempt in range(attempts):
        try:
            return await operation()
        except Conflict:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
    return None
