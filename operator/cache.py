"""What the operator knows of the cluster, without asking the API server.

kopf watches the AutoGLMDeployments, their children, their pods and the nodes,
and keeps what ``handlers.py``'s ``@kopf.index`` functions return in memory
(kopf fills every index before it runs the first handler, so a restarted
operator sees the children that exist before it decides anything).
``ClusterView`` reads those indexes; a reconcile sends no GET at all.

A watch event arrives a little after the write that caused it. So that the
next reconcile does not act on what it already changed, ``WriteLog`` keeps the
API server's answer to each of our writes (the object after an apply or a
status patch, a tombstone after a delete) until the watch catches up: the
view prefers whichever is newer by ``resourceVersion`` (etcd revisions, which
grow; for a value that is not a number the watch wins).

Reads happen on kopf's worker threads while its event loop updates the
indexes: each read takes one dict lookup and copies the store's values in a
single C-level call, so it never sees a store half-changed.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping
from typing import Any

Body = dict[str, Any]
Key = tuple[str, str, str]  # (kind, namespace, name)

# kind -> the name of the kopf index that holds the children of that kind
CHILD_INDEXES: dict[str, str] = {
    "Deployment": "child_deployments",
    "Service": "child_services",
    "ConfigMap": "child_configmaps",
    "HorizontalPodAutoscaler": "child_hpas",
    "PodDisruptionBudget": "child_pdbs",
    "NetworkPolicy": "child_networkpolicies",
    "GRPCRoute": "child_grpcroutes",
    "HTTPRoute": "child_httproutes",
    "VirtualService": "child_virtualservices",
    "DestinationRule": "child_destinationrules",
}
# A child index also maps (BY_INSTANCE, namespace, instance label) to the child's
# name, so a reconcile can list its children of a kind (names that change with
# the revision) without scanning the index.
BY_INSTANCE = "by-instance"
OWNER_INDEX = "owner_index"  # AutoGLMDeployments by (namespace, name)
POD_INDEX = "pod_index"  # server pods by (namespace, instance label)
NODE_INDEX = "node_index"  # every node, under the key NODES_KEY
NODES_KEY = "nodes"
OWNER_KIND = "AutoGLMDeployment"


def compute_resource_version(body: Mapping[str, Any] | None) -> int | None:
    raw = (body or {}).get("metadata", {}).get("resourceVersion")
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


def compute_fresher(watched: Body | None, written: Body | None) -> Body | None:
    """The newer of what the watch last saw and what our last write returned.

    ``written`` may be a tombstone (``{"metadata": {"resourceVersion": rv}, "deleted": True}``).
    """
    if written is None:
        return watched
    mine = compute_resource_version(written)
    theirs = compute_resource_version(watched)
    deleted = bool(written.get("deleted"))
    if mine is None:
        return watched
    if theirs is not None and (theirs > mine or (theirs == mine and not deleted)):
        return watched  # the watch caught up (or the object was made again after our delete)
    return None if deleted else written


class WriteLog:
    """Our latest write per object, until the watch has caught up with it (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[Key, Body] = {}

    def record(self, kind: str, namespace: str, name: str, body: Body) -> None:
        """The object as the API server returned it after our write."""
        with self._lock:
            self._entries[(kind, namespace, name)] = body

    def record_deleted(self, kind: str, namespace: str, name: str, last: Body) -> None:
        """A tombstone: the object is gone as of ``last``'s resourceVersion."""
        rv = last.get("metadata", {}).get("resourceVersion")
        with self._lock:
            self._entries[(kind, namespace, name)] = {
                "metadata": {"resourceVersion": rv},
                "deleted": True,
            }

    def resolve(self, kind: str, namespace: str, name: str, watched: Body | None) -> Body | None:
        key = (kind, namespace, name)
        with self._lock:
            written = self._entries.get(key)
            if written is None:
                return watched
            best = compute_fresher(watched, written)
            if best is watched:
                del self._entries[key]  # the watch caught up
            return best

    def discard(self, kind: str, namespace: str, name: str) -> None:
        """Forget an object the watch saw deleted (a DELETED event settles it)."""
        with self._lock:
            self._entries.pop((kind, namespace, name), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def _first(index: Any, key: Any) -> Body | None:
    if index is None:
        return None
    store = index.get(key) if hasattr(index, "get") else None
    if store is None:
        return None
    values = list(store)
    return values[0] if values else None


def _all(index: Any, key: Any) -> list[Body]:
    if index is None:
        return []
    store = index.get(key) if hasattr(index, "get") else None
    return list(store) if store is not None else []


class ClusterView:
    """Reads for one reconcile: kopf's indexes, corrected by our own recent writes."""

    def __init__(self, indexes: Mapping[str, Any], writes: WriteLog) -> None:
        self._indexes = indexes
        self.writes = writes

    def owner(self, namespace: str, name: str) -> Body | None:
        watched = _first(self._indexes.get(OWNER_INDEX), (namespace, name))
        if watched is None:
            return None  # we only ever write to an owner the watch has shown us
        return self.writes.resolve(OWNER_KIND, namespace, name, watched)

    def child(self, kind: str, namespace: str, name: str) -> Body | None:
        watched = _first(self._indexes.get(CHILD_INDEXES[kind]), (namespace, name))
        return self.writes.resolve(kind, namespace, name, watched)

    def child_names(self, kind: str, namespace: str, instance: str) -> list[str]:
        """Names of the live children of ``kind`` labelled with the owner's instance."""
        index = self._indexes.get(CHILD_INDEXES[kind])
        return sorted({str(n) for n in _all(index, (BY_INSTANCE, namespace, instance))})

    def pods(self, namespace: str, instance: str) -> list[Body]:
        return _all(self._indexes.get(POD_INDEX), (namespace, instance))

    def nodes(self) -> list[Body] | None:
        """Every node; None when none is known (the operator may not watch them)."""
        return _all(self._indexes.get(NODE_INDEX), NODES_KEY) or None


# Strings up to this long are interned when an object enters the cache: every
# cached object repeats the same keys ("metadata", "f:spec", "containerPort"...)
# and many values (image, labels, probe settings), and one shared copy of each
# halves the caches (measured on a 300-object namespace: a Deployment 27 -> 14
# KiB, a Service 6.3 -> 3.0 KiB, an AutoGLMDeployment 10 -> 4.9 KiB).
INTERN_MAX = 64


def compute_interned(value: Any) -> Any:
    """A copy of a JSON value whose keys and short strings are interned (equal to ``value``)."""
    if isinstance(value, dict):
        return {
            (sys.intern(k) if isinstance(k, str) else k): compute_interned(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [compute_interned(v) for v in value]
    if isinstance(value, str) and len(value) <= INTERN_MAX:
        return sys.intern(value)
    return value


def build_trimmed_pod(body: Mapping[str, Any]) -> Body:
    """The parts of a pod the status reads (the index keeps this, not the whole pod)."""
    meta, st = body.get("metadata", {}), body.get("status", {})
    pod = {
        "metadata": {
            "name": meta.get("name"),
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "labels": dict(meta.get("labels") or {}),
        },
        "status": {
            k: st[k]
            for k in (
                "phase",
                "reason",
                "message",
                "conditions",
                "containerStatuses",
                "initContainerStatuses",
            )
            if k in st
        },
    }
    return dict(compute_interned(pod))


def build_trimmed_node(body: Mapping[str, Any]) -> Body:
    """The parts of a node the GPU capacity check reads."""
    meta, spec, st = body.get("metadata", {}), body.get("spec", {}), body.get("status", {})
    node = {
        "metadata": {"name": meta.get("name"), "labels": dict(meta.get("labels") or {})},
        "spec": {"unschedulable": bool(spec.get("unschedulable", False))},
        "status": {"allocatable": dict(st.get("allocatable") or {})},
    }
    return dict(compute_interned(node))


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
# Managers whose field sets a reconcile reads (ssa.py); the others keep only
# who and when (the echo check reads the times).
OUR_MANAGERS = frozenset({"autoglm-operator", "autoglm-operator-handover"})


def _trim_meta(meta: Mapping[str, Any], *, managed: bool) -> Body:
    out = dict(meta)
    annotations = out.get("annotations")
    if annotations and LAST_APPLIED in annotations:
        out["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    entries = out.get("managedFields")
    if entries is not None:
        if not managed:
            del out["managedFields"]
        else:
            out["managedFields"] = [
                e
                if e.get("manager") in OUR_MANAGERS
                else {k: v for k, v in e.items() if k != "fieldsV1"}
                for e in entries
            ]
    return out


def build_trimmed_child(body: Mapping[str, Any]) -> Body:
    """A child as a reconcile reads it: other managers' field sets, a kubectl
    last-applied copy and any status but a Deployment's left out (memory at scale)."""
    out = {k: v for k, v in body.items() if k != "status" or body.get("kind") == "Deployment"}
    out["metadata"] = _trim_meta(out.get("metadata") or {}, managed=True)
    return dict(compute_interned(out))


def build_trimmed_owner(body: Mapping[str, Any]) -> Body:
    """An AutoGLMDeployment as a reconcile reads it: spec, status, identity; no managedFields."""
    out = dict(body)
    out["metadata"] = _trim_meta(out.get("metadata") or {}, managed=False)
    return dict(compute_interned(out))
