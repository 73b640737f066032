"""The one module that talks to the API server.

Every request goes through ``KubeApi._request``, which:
- counts write requests (POST, PUT, PATCH, DELETE) per verb and kind, both on
  the instance (``writes``) and in the operator's Prometheus metrics, which is
  how a no-op reconcile is shown to write nothing;
- maps HTTP errors to ``KubeError`` in one place (404 on delete and read is
  "absent", not an error).

Children are applied with server-side apply under one field manager
(``autoglm-operator``, force), but only when ``ssa.compute_needs_apply`` says
the apply would change something. A field we stop setting that another
controller takes over (``spec.replicas`` of a Deployment once an HPA scales
it) is first applied at its live value under ``autoglm-operator-handover``, so
dropping it from our apply does not reset it (``ssa.compute_handover``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from . import metrics
from .spec import GROUP, PLURAL, VERSION
from .ssa import compute_handover, compute_needs_apply

log = logging.getLogger(__name__)

FIELD_MANAGER = "autoglm-operator"
# Holds fields we stop setting until their new owner (the HPA) takes them over.
HANDOVER_FIELD_MANAGER = "autoglm-operator-handover"
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# kind -> (api prefix, plural, namespaced)
_RESOURCES: dict[tuple[str, str], tuple[str, str, bool]] = {
    ("v1", "ConfigMap"): ("/api/v1", "configmaps", True),
    ("v1", "Service"): ("/api/v1", "services", True),
    ("v1", "Pod"): ("/api/v1", "pods", True),
    ("v1", "Node"): ("/api/v1", "nodes", False),
    ("v1", "Event"): ("/api/v1", "events", True),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments", True),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): (
        "/apis/autoscaling/v2",
        "horizontalpodautoscalers",
        True,
    ),
    ("policy/v1", "PodDisruptionBudget"): ("/apis/policy/v1", "poddisruptionbudgets", True),
    (f"{GROUP}/{VERSION}", "AutoGLMDeployment"): (f"/apis/{GROUP}/{VERSION}", PLURAL, True),
}


class KubeError(Exception):
    """An API request failed; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def invalid(self) -> bool:
        """The API server rejected the object itself (it can never be applied as is)."""
        return self.status in (400, 422)

    @property
    def transient(self) -> bool:
        return not self.invalid


@dataclass(frozen=True, slots=True)
class ApplyResult:
    kind: str
    name: str
    applied: bool  # False: the live object already matched


def build_path(
    api_version: str,
    kind: str,
    namespace: str | None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The REST path of a kind, collection or object (pure)."""
    prefix, plural, namespaced = _RESOURCES[(api_version, kind)]
    path = prefix
    if namespaced and namespace is not None:
        path += f"/namespaces/{quote(namespace)}"
    path += f"/{plural}"
    if name is not None:
        path += f"/{quote(name)}"
    if subresource is not None:
        path += f"/{subresource}"
    return path


class KubeApi:
    """A small synchronous client over ``kubernetes.client.ApiClient``."""

    def __init__(self, api_client: Any, field_manager: str = FIELD_MANAGER) -> None:
        self._client = api_client
        self.field_manager = field_manager
        self.writes: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls) -> KubeApi:
        """In-cluster config when running in a pod, else $KUBECONFIG / ~/.kube/config."""
        import kubernetes

        try:
            kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
        return cls(kubernetes.client.ApiClient())

    @property
    def write_count(self) -> int:
        with self._lock:
            return sum(self.writes.values())

    # ---- transport ------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        kind: str,
        query: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        if method in WRITE_VERBS:
            with self._lock:
                self.writes[(method, kind)] += 1
            metrics.API_WRITES.labels(verb=method, kind=kind).inc()
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _method, url, headers, _body, _post = self._client.param_serialize(
            method=method,
            resource_path=path,
            header_params=headers,
            auth_settings=["BearerToken"],
        )
        if query:
            url += "?" + urlencode(query)
        try:
            # The REST client JSON-encodes a dict body for JSON and YAML content types alike.
            resp = self._client.call_api(
                method, url, header_params=headers, body=body, _request_timeout=(5, 30)
            )
            resp.read()
        except Exception as exc:  # urllib3/SSL failures come through as many types
            raise KubeError(0, type(exc).__name__, str(exc)) from exc
        data = resp.data or b""
        if 200 <= resp.status < 300:
            return dict(json.loads(data)) if data else {}
        try:
            err = json.loads(data)
            message, reason = str(err.get("message", "")), str(err.get("reason", resp.reason))
        except ValueError:
            message, reason = data.decode(errors="replace")[:500], str(resp.reason)
        raise KubeError(resp.status, reason, message)

    # ---- reads ------------------------------------------------------------------

    def get(
        self, api_version: str, kind: str, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        """The live object, or None when it does not exist."""
        try:
            return self._request("GET", build_path(api_version, kind, namespace, name), kind=kind)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list_objects(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector} if label_selector else None
        data = self._request(
            "GET", build_path(api_version, kind, namespace), kind=kind, query=query
        )
        return list(data.get("items") or [])

    def list_nodes(self) -> list[dict[str, Any]] | None:
        """Every node, or None when the operator may not list them."""
        try:
            return self.list_objects("v1", "Node", None)
        except KubeError as exc:
            if exc.status in (401, 403):
                log.warning("cannot list nodes (%s); skipping the GPU capacity check", exc.status)
                return None
            raise

    # ---- writes -----------------------------------------------------------------

    def apply(
        self, manifest: dict[str, Any], *, field_manager: str | None = None, force: bool = True
    ) -> dict[str, Any]:
        """Server-side apply under our field manager (or ``field_manager``), by default forced."""
        meta = manifest["metadata"]
        path = build_path(
            manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"]
        )
        return self._request(
            "PATCH",
            path,
            kind=manifest["kind"],
            query={
                "fieldManager": field_manager or self.field_manager,
                "force": "true" if force else "false",
            },
            body=manifest,
            content_type="application/apply-patch+yaml",
        )

    def hand_over(self, handover: dict[str, Any]) -> None:
        """Apply ``handover`` (fields at their live values) under the handover manager.

        Not forced: a conflict means another manager holds the field already,
        which is all the handover is for.
        """
        try:
            self.apply(handover, field_manager=HANDOVER_FIELD_MANAGER, force=False)
        except KubeError as exc:
            if exc.status != 409:
                raise

    def ensure_applied(self, manifest: dict[str, Any]) -> ApplyResult:
        """Apply ``manifest`` unless the live object already has exactly our fields."""
        meta = manifest["metadata"]
        live = self.get(
            manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"]
        )
        if not compute_needs_apply(manifest, live, self.field_manager):
            return ApplyResult(manifest["kind"], meta["name"], applied=False)
        handover = compute_handover(manifest, live, self.field_manager)
        if handover is not None:
            self.hand_over(handover)
        self.apply(manifest)
        return ApplyResult(manifest["kind"], meta["name"], applied=True)

    def delete_owned(
        self, api_version: str, kind: str, namespace: str, name: str, owner_uid: str
    ) -> bool:
        """Delete a child if it exists and ``owner_uid`` owns it. True when a delete was sent."""
        live = self.get(api_version, kind, namespace, name)
        if live is None:
            return False
        owners = live.get("metadata", {}).get("ownerReferences") or []
        if not any(o.get("uid") == owner_uid for o in owners):
            return False
        try:
            self._request(
                "DELETE",
                build_path(api_version, kind, namespace, name),
                kind=kind,
                body={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "propagationPolicy": "Background",
                },
            )
        except KubeError as exc:
            if exc.status != 404:  # already gone: what we wanted
                raise
        return True

    def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, patch: dict[str, Any]
    ) -> None:
        """JSON merge patch of the status subresource."""
        self._request(
            "PATCH",
            build_path(api_version, kind, namespace, name, "status"),
            kind=kind,
            body={"status": patch},
            content_type="application/merge-patch+json",
        )

    def create_event(
        self, involved: dict[str, Any], event_type: str, reason: str, message: str, now: str
    ) -> None:
        """Post a core/v1 Event about ``involved`` (an object's apiVersion, kind and metadata)."""
        meta = involved["metadata"]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid", ""),
                "resourceVersion": meta.get("resourceVersion", ""),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": os.environ.get("POD_NAME", socket.gethostname())[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self._request(
                "POST", build_path("v1", "Event", meta["namespace"]), kind="Event", body=event
            )
        except KubeError as exc:
            # An event is a courtesy: never fail a reconcile over one.
            log.warning("could not post event %s for %s: %s", reason, meta["name"], exc)
