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
import socket
import threading
import time
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
    ("networking.k8s.io/v1", "NetworkPolicy"): (
        "/apis/networking.k8s.io/v1",
        "networkpolicies",
        True,
    ),
    (f"{GROUP}/{VERSION}", "AutoGLMDeployment"): (f"/apis/{GROUP}/{VERSION}", PLURAL, True),
    ("gateway.networking.k8s.io/v1", "GRPCRoute"): (
        "/apis/gateway.networking.k8s.io/v1",
        "grpcroutes",
        True,
    ),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): (
        "/apis/gateway.networking.k8s.io/v1",
        "httproutes",
        True,
    ),
    ("networking.istio.io/v1beta1", "VirtualService"): (
        "/apis/networking.istio.io/v1beta1",
        "virtualservices",
        True,
    ),
    ("networking.istio.io/v1beta1", "DestinationRule"): (
        "/apis/networking.istio.io/v1beta1",
        "destinationrules",
        True,
    ),
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
    def refused(self) -> bool:
        """The API server answered and refused for a reason other than the object
        (RBAC, a conflict, a namespace going away): worth reporting in status."""
        return 400 <= self.status < 500 and self.status not in (400, 408, 422, 429)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    kind: str
    name: str
    applied: bool  # False: the live object already matched
    body: dict[str, Any] | None = None  # the object after the apply, as the API server returned it
    conflict: str | None = None  # another field manager held fields we set (its message)


class RateLimiter:
    """A token bucket shared by every request of the process (kopf itself has none).

    ``qps`` tokens a second, at most ``burst`` saved up; ``qps`` <= 0 turns it off.
    ``acquire`` blocks the calling worker thread until a token is free.
    """

    def __init__(self, qps: float, burst: int) -> None:
        self.qps = qps
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token; returns the seconds waited."""
        if self.qps <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.qps)
            self._stamp = now
            self._tokens -= 1.0
            wait = -self._tokens / self.qps if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)  # a worker thread, never kopf's event loop
        return wait


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

    def __init__(
        self,
        api_client: Any,
        field_manager: str = FIELD_MANAGER,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._client = api_client
        self.field_manager = field_manager
        self.limiter = limiter or RateLimiter(0, 1)
        self.writes: Counter[tuple[str, str]] = Counter()
        # Events name the reporting instance: the host name, which is the pod's name in a pod.
        self.instance = socket.gethostname()[:128]
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls, qps: float = 0, burst: int = 1, pool: int = 16) -> KubeApi:
        """In-cluster config when running in a pod, else $KUBECONFIG / ~/.kube/config.

        ``qps``/``burst``: the client-side rate limit; ``pool``: HTTP connections
        kept open (one per worker thread that may send at once).
        """
        import kubernetes

        try:
            kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
        config = kubernetes.client.Configuration.get_default_copy()
        config.connection_pool_maxsize = pool
        return cls(kubernetes.client.ApiClient(config), limiter=RateLimiter(qps, burst))

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
        self.limiter.acquire()
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

    def has_resource(self, group_version: str, plural: str) -> bool:
        """Whether the API server serves ``plural`` in ``group_version`` (discovery)."""
        try:
            data = self._request("GET", f"/apis/{group_version}", kind="APIResourceList")
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in data.get("resources") or [])

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

    def ensure_applied(self, manifest: dict[str, Any], live: dict[str, Any] | None) -> ApplyResult:
        """Apply ``manifest`` unless ``live`` (the cached object) already has exactly our fields.

        An existing object is applied without force first: a 409 means another
        field manager changed fields we set (a hand edit, or a controller
        fighting us). That is reported in ``conflict`` (the API server's
        message names the manager and the fields) and the apply is forced.
        """
        meta = manifest["metadata"]
        kind, name = manifest["kind"], meta["name"]
        if not compute_needs_apply(manifest, live, self.field_manager):
            return ApplyResult(kind, name, applied=False)
        handover = compute_handover(manifest, live, self.field_manager)
        if handover is not None:
            self.hand_over(handover)
        conflict = None
        if live is None:
            body = self.apply(manifest)
        else:
            try:
                body = self.apply(manifest, force=False)
            except KubeError as exc:
                if exc.status != 409:
                    raise
                conflict = exc.message
                body = self.apply(manifest)
        return ApplyResult(kind, name, applied=True, body=body, conflict=conflict)

    def delete_owned(
        self, api_version: str, kind: str, live: dict[str, Any] | None, owner_uid: str
    ) -> bool:
        """Delete ``live`` (the cached child) if ``owner_uid`` owns it. True when a delete was sent."""
        if live is None:
            return False
        meta = live.get("metadata", {})
        owners = meta.get("ownerReferences") or []
        if not any(o.get("uid") == owner_uid for o in owners):
            return False
        try:
            self._request(
                "DELETE",
                build_path(api_version, kind, meta.get("namespace"), meta["name"]),
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
    ) -> dict[str, Any]:
        """JSON merge patch of the status subresource, under our field manager; the object after it."""
        return self._request(
            "PATCH",
            build_path(api_version, kind, namespace, name, "status"),
            kind=kind,
            query={"fieldManager": self.field_manager},
            body={"status": patch},
            content_type="application/merge-patch+json",
        )

    def remove_annotation(
        self, api_version: str, kind: str, namespace: str, name: str, key: str
    ) -> dict[str, Any]:
        """Drop one annotation (a JSON merge patch under our field manager); the object after it."""
        return self._request(
            "PATCH",
            build_path(api_version, kind, namespace, name),
            kind=kind,
            query={"fieldManager": self.field_manager},
            body={"metadata": {"annotations": {key: None}}},
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
            "reportingInstance": self.instance,
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
