"""The watch-cache view and the write log (pure), and the client-side rate limiter."""

from __future__ import annotations

from typing import Any

from autoglm_operator.cache import (
    CHILD_INDEXES,
    NODE_INDEX,
    OWNER_INDEX,
    ClusterView,
    WriteLog,
    build_trimmed_child,
    build_trimmed_owner,
    build_trimmed_pod,
    compute_fresher,
)
from autoglm_operator.k8s import RateLimiter


def obj(rv: str | None, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "x", "namespace": "ns"}
    if rv is not None:
        meta["resourceVersion"] = rv
    return {"metadata": meta, **extra}


def test_the_newer_resource_version_wins() -> None:
    watched, written = obj("10", spec=1), obj("12", spec=2)
    assert compute_fresher(watched, written) is written
    assert compute_fresher(obj("12", spec=3), written)["spec"] == 3  # type: ignore[index]
    assert compute_fresher(None, written) is written  # created; the watch has not seen it yet
    assert compute_fresher(watched, None) is watched
    assert compute_fresher(watched, obj("abc")) is watched  # not a number: trust the watch


def test_tombstone_hides_a_deleted_child_until_the_watch_agrees() -> None:
    log = WriteLog()
    live = obj("20")
    log.record_deleted("ConfigMap", "ns", "x", live)
    assert log.resolve("ConfigMap", "ns", "x", live) is None
    assert log.resolve("ConfigMap", "ns", "x", None) is None
    recreated = obj("25")
    assert log.resolve("ConfigMap", "ns", "x", recreated) is recreated
    assert len(log) == 0


def test_view_reads_indexes_and_prefers_our_newer_write() -> None:
    indexes = {
        OWNER_INDEX: {("ns", "x"): [obj("5", kind="AutoGLMDeployment")]},
        CHILD_INDEXES["Deployment"]: {("ns", "x"): [obj("7", spec={"replicas": 1})]},
        NODE_INDEX: {},
    }
    log = WriteLog()
    view = ClusterView(indexes, log)
    assert view.owner("ns", "x") is not None
    assert view.owner("ns", "gone") is None
    assert view.nodes() is None  # none known: no capacity verdict
    log.record("Deployment", "ns", "x", obj("9", spec={"replicas": 2}))
    assert view.child("Deployment", "ns", "x")["spec"] == {"replicas": 2}  # type: ignore[index]
    assert view.child("Service", "ns", "x") is None
    assert view.pods("ns", "x") == []


def test_trimming_keeps_what_status_and_apply_read() -> None:
    pod = build_trimmed_pod(
        {
            "metadata": {"name": "p", "labels": {"a": "b"}, "managedFields": [{}]},
            "spec": {"containers": [{"name": "server"}]},
            "status": {"phase": "Running", "containerStatuses": [{"name": "server"}], "podIP": "1"},
        }
    )
    assert pod == {
        "metadata": {"name": "p", "deletionTimestamp": None, "labels": {"a": "b"}},
        "status": {"phase": "Running", "containerStatuses": [{"name": "server"}]},
    }
    svc = build_trimmed_child(
        {
            "kind": "Service",
            "metadata": {
                "name": "s",
                "managedFields": [{"manager": "m"}],
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "k": "v"},
            },
            "spec": {"ports": []},
            "status": {"loadBalancer": {}},
        }
    )
    assert svc["metadata"]["annotations"] == {"k": "v"}
    assert svc["metadata"]["managedFields"] == [{"manager": "m"}]
    mine = {"manager": "autoglm-operator", "time": "t", "fieldsV1": {"f:spec": {}}}
    theirs = {"manager": "kubectl", "time": "t", "fieldsV1": {"f:spec": {}}}
    trimmed = build_trimmed_child(
        {"kind": "Service", "metadata": {"managedFields": [mine, theirs]}}
    )
    assert trimmed["metadata"]["managedFields"] == [mine, {"manager": "kubectl", "time": "t"}]
    owner = build_trimmed_owner({"metadata": {"name": "o", "managedFields": [mine]}, "spec": {}})
    assert owner == {"metadata": {"name": "o"}, "spec": {}}
    assert "status" not in svc
    dep = build_trimmed_child({"kind": "Deployment", "metadata": {}, "status": {"replicas": 1}})
    assert dep["status"] == {"replicas": 1}


def test_rate_limiter_lets_a_burst_through_then_spaces_requests() -> None:
    off = RateLimiter(0, 1)
    assert [off.acquire() for _ in range(5)] == [0.0] * 5
    limiter = RateLimiter(qps=1000, burst=3)
    assert [limiter.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire() > 0  # the fourth waits for a token (about 1 ms at 1000/s)
