"""A small async Kubernetes client for the operator's own API calls.

Kopf watches and patches the VoiceAgents itself; everything else the operator does (server-side
apply of children, reading Secrets and Deployments, writing status) goes through this client.
It speaks plain JSON over aiohttp, on the same event loop as kopf (and as livekit-api, which the
telephony code uses), and takes its credentials from the `kubernetes` package's config loaders:
the pod's service account in a cluster, otherwise the kubeconfig ($KUBECONFIG).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp
import kubernetes.client
import kubernetes.config

FIELD_MANAGER = "voicefleet-operator"
"""Field manager of every server-side apply the operator makes."""

METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
"""Accept header of a list that returns only the items' metadata (no spec, no status)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kind:
    """Where a kind lives in the API."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced:
            if namespace is None:
                raise ValueError(f"{self.kind} is namespaced; a namespace is required")
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return f"{base}/{name}" if name else base


KINDS: dict[str, Kind] = {
    kind.kind: kind
    for kind in (
        Kind("v1", "ConfigMap", "configmaps"),
        Kind("v1", "Secret", "secrets"),
        Kind("v1", "Service", "services"),
        Kind("v1", "ServiceAccount", "serviceaccounts"),
        Kind("v1", "Pod", "pods"),
        Kind("v1", "Event", "events"),
        Kind("v1", "Namespace", "namespaces", namespaced=False),
        Kind("apps/v1", "Deployment", "deployments"),
        Kind("apps/v1", "ReplicaSet", "replicasets"),
        Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
        Kind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
        Kind("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers"),
        Kind("rbac.authorization.k8s.io/v1", "Role", "roles"),
        Kind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings"),
        Kind("voicefleet.dev/v1alpha1", "VoiceAgent", "voiceagents"),
    )
}


def kind_of(obj: dict[str, Any]) -> Kind:
    kind = KINDS.get(obj.get("kind", ""))
    if kind is None or kind.api_version != obj.get("apiVersion"):
        raise ValueError(f"unknown kind {obj.get('apiVersion')}/{obj.get('kind')}; add it to KINDS")
    return kind


class KubeError(Exception):
    """An API call failed; `status` is the HTTP status, `reason` the Status reason."""

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


def client_configuration(kubeconfig: str | None = None) -> kubernetes.client.Configuration:
    """Credentials: `kubeconfig` if given; else the pod's service account; else $KUBECONFIG
    (read now: the kubernetes package reads it only once, at import) or ~/.kube/config."""
    configuration = kubernetes.client.Configuration()
    if kubeconfig is None:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
            return configuration
        except kubernetes.config.ConfigException:
            kubeconfig = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    kubernetes.config.load_kube_config(
        config_file=kubeconfig, client_configuration=configuration, persist_config=False
    )
    return configuration


def authorization_header(configuration: kubernetes.client.Configuration) -> str | None:
    """`Bearer <token>` (or None for certificate auth); refreshes rotating tokens."""
    # kubernetes >= 36 keeps the token under BearerToken, older versions under authorization.
    return configuration.get_api_key_with_prefix(
        "BearerToken"
    ) or configuration.get_api_key_with_prefix("authorization")


class Kube:
    """JSON calls to the API server; one instance per operator run (it holds a connection pool)."""

    def __init__(self, configuration: kubernetes.client.Configuration | None = None) -> None:
        self._configuration = configuration or client_configuration()
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | bool = self._ssl_context()

    def _ssl_context(self) -> ssl.SSLContext | bool:
        cfg = self._configuration
        if not cfg.host.startswith("https"):
            return False
        if not cfg.verify_ssl:
            return False
        context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, cfg.key_file)
        return context

    def _headers(self, content_type: str | None, accept: str | None = None) -> dict[str, str]:
        headers = {"Accept": accept or "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        # Re-read on every call: in-cluster service account tokens rotate.
        token = authorization_header(self._configuration)
        if token:
            headers["Authorization"] = token
        return headers

    @property
    def configuration(self) -> kubernetes.client.Configuration:
        return self._configuration

    async def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=30),
                connector=aiohttp.TCPConnector(ssl=self._ssl),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        session = await self._session_for_loop()
        data = None if body is None else json.dumps(body)
        if data is not None and content_type is None:
            content_type = "application/json"
        url = self._configuration.host.rstrip("/") + path
        async with session.request(
            method,
            url,
            params=params,
            data=data,
            headers=self._headers(content_type, accept),
            server_hostname=self._configuration.tls_server_name or None,
        ) as response:
            text = await response.text()
            if response.status >= 400:
                raise _error(method, path, response.status, text)
            return json.loads(text) if text else {}

    # --- typed helpers ---------------------------------------------------------------------

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", KINDS[kind].path(namespace, name))
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
        spec = KINDS[kind]
        path = spec.path(namespace) if namespace or not spec.namespaced else _cluster_path(spec)
        accept = METADATA_ONLY if metadata_only else None
        result = await self.request("GET", path, params=params, accept=accept)
        # An empty PartialObjectMetadataList comes as "items": null.
        return list(result.get("items") or [])

    async def apply(self, obj: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        """Server-side apply `obj` as FIELD_MANAGER (creates it when it does not exist).

        `force` takes over fields another manager changed (e.g. a `kubectl edit` of a child):
        the operator is the only writer of its children and puts them back as rendered.
        """
        kind = kind_of(obj)
        metadata = obj["metadata"]
        params = {"fieldManager": FIELD_MANAGER}
        if force:
            params["force"] = "true"
        return await self.request(
            "PATCH",
            kind.path(metadata.get("namespace"), metadata["name"]),
            params=params,
            body=obj,
            content_type="application/apply-patch+yaml",
        )

    async def merge_patch(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        patch: dict[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        path = KINDS[kind].path(namespace, name)
        if subresource:
            path += f"/{subresource}"
        return await self.request(
            "PATCH", path, body=patch, content_type="application/merge-patch+json"
        )

    async def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        """Delete in the background (dependents by the garbage collector); False if absent."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        try:
            await self.request("DELETE", KINDS[kind].path(namespace, name), body=body)
        except NotFound:
            return False
        return True


def _cluster_path(kind: Kind) -> str:
    base = "/api/v1" if kind.api_version == "v1" else f"/apis/{kind.api_version}"
    return f"{base}/{kind.plural}"


def _error(method: str, path: str, status: int, text: str) -> KubeError:
    try:
        payload = json.loads(text)
        reason = str(payload.get("reason", ""))
        message = str(payload.get("message", text))
    except (ValueError, AttributeError):
        reason, message = "", text[:500]
    error_type = NotFound if status == 404 else Conflict if status == 409 else KubeError
    return error_type(method, path, status, reason, message)


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
