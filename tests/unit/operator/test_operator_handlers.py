"""The thin kopf layer: what can be checked without a cluster."""

from __future__ import annotations

import copy
import json
import logging
from types import SimpleNamespace
from typing import Any

import kopf
import pytest

from autoglm_operator.cache import (
    BY_INSTANCE,
    CHILD_INDEXES,
    NODE_INDEX,
    NODES_KEY,
    OWNER_INDEX,
    ClusterView,
    WriteLog,
    build_trimmed_child,
)
from autoglm_operator.canary import compute_revision
from autoglm_operator.handlers import (
    _controller_owner,
    compute_own_echo,
    compute_priority,
    compute_timestamp,
    on_object_event,
    on_timer,
    run_reconcile,
)
from autoglm_operator.k8s import KubeApi, KubeError, build_path
from autoglm_operator.reconcile import reconcile
from autoglm_operator.settings import Settings, SettingsError
from autoglm_operator.spec import parse_spec

REV = compute_revision(parse_spec({"model": {"source": "/m"}}))
DEP = f"glm-{REV}"


def test_priority_is_configured_or_newest_first() -> None:
    assert compute_priority("7", started_ms=5, jitter=1) == 7
    older = compute_priority(None, started_ms=1_000, jitter=999)
    newer = compute_priority(None, started_ms=1_001, jitter=0)
    assert newer > older
    assert compute_priority(None, started_ms=1_000, jitter=1) != compute_priority(
        None, started_ms=1_000, jitter=2
    )


def test_child_events_find_the_controlling_owner() -> None:
    child = {
        "metadata": {
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Other", "name": "x", "controller": False},
                {
                    "apiVersion": "serving.autoglm.io/v1alpha1",
                    "kind": "AutoGLMDeployment",
                    "name": "glm",
                    "controller": True,
                },
            ]
        }
    }
    assert _controller_owner(child) == "glm"
    assert _controller_owner({"metadata": {}}) is None


# ---- the reconcile shell against a fake transport and in-memory watch caches ----------

MANAGER = "autoglm-operator"
T0 = "2025-01-01T00:00:00Z"
T1 = "2025-01-01T00:05:00Z"
LOG = logging.getLogger("test-handlers")


def fields_of(value: Any, top: bool = True) -> dict[str, Any]:
    """A fieldsV1 set covering every key of ``value`` (lists taken whole), as an apply records it."""
    if not isinstance(value, dict):
        return {}
    out = {
        f"f:{k}": fields_of(v, False) for k, v in value.items() if k not in ("apiVersion", "kind")
    }
    if top and "f:metadata" in out:
        out["f:metadata"] = {
            k: v for k, v in out["f:metadata"].items() if k not in ("f:name", "f:namespace")
        }
    return out


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies it."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


class FakeKube(KubeApi):
    """KubeApi with the transport replaced: an in-memory store, every request recorded.

    ``snapshot()`` gives kopf-like indexes of the store, as the watches would
    have them once caught up; GETs are counted so a test can show there are none.
    """

    def __init__(self, objects: list[dict[str, Any]], fail: KubeError | None = None) -> None:
        super().__init__(api_client=None)
        self.store: dict[str, dict[str, Any]] = {}
        self.fail = fail
        self.conflict_with: str | None = None  # a manager whose fields a non-forced apply hits
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.rv = 100
        for obj in objects:
            self._put(self._path(obj), copy.deepcopy(obj))

    @staticmethod
    def _path(obj: dict[str, Any]) -> str:
        meta = obj["metadata"]
        return build_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])

    def _put(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.store[path] = obj
        return copy.deepcopy(obj)

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
        self.requests.append((method, path, dict(query or {}), body))
        if self.fail is not None:
            raise self.fail
        if method == "GET":
            raise AssertionError(f"a reconcile sent a GET {path}")
        if method == "PATCH" and path.endswith("/status"):
            obj = self.store[path.removesuffix("/status")]
            obj["status"] = merge_patch(obj.get("status") or {}, body["status"])
            obj["metadata"]["managedFields"] = [
                {"manager": MANAGER, "operation": "Update", "subresource": "status", "time": T1}
            ]
            return self._put(path.removesuffix("/status"), obj)
        if method == "PATCH":  # server-side apply
            if (
                query
                and query.get("force") == "false"
                and self.conflict_with
                and path in self.store
            ):
                raise KubeError(
                    409,
                    "Conflict",
                    f'Apply failed with 1 conflict: conflict with "{self.conflict_with}": .spec',
                )
            obj = copy.deepcopy(body)
            obj["metadata"]["uid"] = f"uid-{obj['metadata']['name']}"
            obj["metadata"]["managedFields"] = [
                {
                    "manager": query["fieldManager"] if query else MANAGER,
                    "operation": "Apply",
                    "fieldsV1": fields_of(
                        {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}
                    ),
                }
            ]
            old = self.store.get(path)
            if old is not None and "status" in old:
                obj["status"] = old["status"]
            return self._put(path, obj)
        if method == "DELETE":
            self.store.pop(path, None)
            return {}
        return {}  # POST: events

    def writes_sent(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _, _ in self.requests if m != "GET"]

    def status_patches(self) -> list[dict[str, Any]]:
        return [
            b["status"] for m, p, _, b in self.requests if m == "PATCH" and p.endswith("/status")
        ]

    def events(self) -> list[dict[str, Any]]:
        return [b for m, p, _, b in self.requests if m == "POST" and p.endswith("/events")]

    def snapshot(self) -> dict[str, dict[Any, list[dict[str, Any]]]]:
        """kopf-like indexes of everything in the store (the watches caught up)."""
        out: dict[str, dict[Any, list[dict[str, Any]]]] = {
            name: {} for name in CHILD_INDEXES.values()
        }
        out[OWNER_INDEX], out[NODE_INDEX] = {}, {}
        for obj in self.store.values():
            meta = obj["metadata"]
            key = (meta.get("namespace"), meta["name"])
            if obj["kind"] == "AutoGLMDeployment":
                out[OWNER_INDEX][key] = [copy.deepcopy(obj)]
            elif obj["kind"] == "Node":
                out[NODE_INDEX].setdefault(NODES_KEY, []).append(copy.deepcopy(obj))
            else:
                index = out[CHILD_INDEXES[obj["kind"]]]
                index[key] = [build_trimmed_child(copy.deepcopy(obj))]
                instance = (meta.get("labels") or {}).get("app.kubernetes.io/instance")
                if instance is not None:
                    by = (BY_INSTANCE, meta.get("namespace"), instance)
                    index.setdefault(by, []).append(meta["name"])
        return out


def agd_body(spec: dict[str, Any], generation: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": "serving.autoglm.io/v1alpha1",
        "kind": "AutoGLMDeployment",
        "metadata": {"name": "glm", "namespace": "ns", "uid": "u1", "generation": generation},
        "spec": spec,
    }


GPU_NODE = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {"name": "n0", "labels": {}},
    "status": {"allocatable": {"nvidia.com/gpu": "8"}},
}


def memo_for(api: FakeKube) -> SimpleNamespace:
    return SimpleNamespace(api=api, writes=WriteLog())


def test_settings_from_the_environment_name_the_bad_variable() -> None:
    assert Settings.from_environ({}) == Settings()
    cfg = Settings.from_environ(
        {"AUTOGLM_OPERATOR_WORKERS": "4", "AUTOGLM_OPERATOR_API_QPS": "20", "OTHER": "x"}
    )
    assert (cfg.workers, cfg.api_qps, cfg.resync_seconds) == (4, 20.0, 60.0)
    with pytest.raises(SettingsError, match="AUTOGLM_OPERATOR_WORKERS"):
        Settings.from_environ({"AUTOGLM_OPERATOR_WORKERS": "many"})
    with pytest.raises(SettingsError, match="AUTOGLM_OPERATOR_LOG_FORMAT"):
        Settings.from_environ({"AUTOGLM_OPERATOR_LOG_FORMAT": "xml"})
    cfg = Settings.from_environ(
        {
            "AUTOGLM_OPERATOR_PROMETHEUS_URL": "http://prometheus:9090",
            "AUTOGLM_OPERATOR_ROLLOUT_TICK_SECONDS": "0.5",
        }
    )
    assert (cfg.prometheus_url, cfg.rollout_tick_seconds) == ("http://prometheus:9090", 0.5)
    with pytest.raises(SettingsError, match="AUTOGLM_OPERATOR_PROMETHEUS_URL"):
        Settings.from_environ({"AUTOGLM_OPERATOR_PROMETHEUS_URL": "prometheus:9090"})
    with pytest.raises(SettingsError, match="AUTOGLM_OPERATOR_ROLLOUT_TICK_SECONDS"):
        Settings.from_environ({"AUTOGLM_OPERATOR_ROLLOUT_TICK_SECONDS": "0"})


def test_timestamp_is_rfc3339_utc() -> None:
    import datetime

    moment = datetime.datetime(2025, 1, 2, 3, 4, 5, 678, tzinfo=datetime.UTC)
    assert compute_timestamp(moment) == "2025-01-02T03:04:05Z"


@pytest.mark.parametrize(("status", "delay"), [(0, 5), (429, 5), (503, 15)])
def test_api_trouble_is_a_temporary_error(status: int, delay: float) -> None:
    api = FakeKube([agd_body({"model": {"source": "/m"}}), GPU_NODE])
    view = ClusterView(api.snapshot(), WriteLog())
    api.fail = KubeError(status, "Trouble", "the API server is unhappy")
    with pytest.raises(kopf.TemporaryError) as info:
        run_reconcile(api, view, "ns", "glm", LOG)
    assert info.value.delay == delay
    assert isinstance(info.value.__cause__, KubeError)


def test_a_refused_request_is_reported_in_status_and_retried() -> None:
    api = FakeKube([agd_body({"model": {"source": "/m"}}), GPU_NODE])
    view = ClusterView(api.snapshot(), WriteLog())
    real = api._request

    def refuse_applies(method: str, path: str, **kw: Any) -> dict[str, Any]:
        if method == "PATCH" and not path.endswith("/status"):
            raise KubeError(403, "Forbidden", "deployments.apps is forbidden")
        return real(method, path, **kw)

    api._request = refuse_applies  # type: ignore[method-assign]
    with pytest.raises(kopf.TemporaryError):
        run_reconcile(api, view, "ns", "glm", LOG)
    (patch,) = api.status_patches()
    degraded = next(c for c in patch["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ApiError")
    assert "403 Forbidden" in degraded["message"]
    assert [(e["type"], e["reason"]) for e in api.events()] == [("Warning", "ApiError")]


def test_unexpected_error_is_a_temporary_error_too() -> None:
    api = FakeKube([])
    view = ClusterView({OWNER_INDEX: {("ns", "glm"): [{"metadata": {}}]}}, WriteLog())
    with pytest.raises(kopf.TemporaryError):
        run_reconcile(api, view, "ns", "glm", LOG)


def test_invalid_spec_writes_ready_false_and_a_warning_and_applies_nothing() -> None:
    # A spec the API server let through (a CRD older than the operator) that pydantic rejects.
    api = FakeKube([agd_body({"model": {"source": "s3://bucket/glm"}})])
    memo = memo_for(api)
    body = api.snapshot()[OWNER_INDEX][("ns", "glm")][0]
    on_object_event(
        type="ADDED",
        uid="u1",
        namespace="ns",
        name="glm",
        body=body,
        memo=memo,
        logger=LOG,
        **api.snapshot(),
    )
    (patch,) = api.status_patches()
    ready = next(c for c in patch["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert ready["observedGeneration"] == 2
    assert "hf://, pvc:// or /" in ready["message"]
    assert [(e["type"], e["reason"]) for e in api.events()] == [("Warning", "InvalidSpec")]
    assert not [r for r in api.requests if r[0] == "PATCH" and not r[1].endswith("/status")]
    # The timer tick after it has nothing to say.
    before = len(api.requests)
    on_timer(namespace="ns", name="glm", memo=memo, logger=LOG, **api.snapshot())
    assert len(api.requests) == before


def test_gone_object_sends_no_request() -> None:
    api = FakeKube([])
    outcome = run_reconcile(api, ClusterView(api.snapshot(), WriteLog()), "ns", "glm", LOG)
    assert outcome.found is False
    assert api.requests == []


def test_reconcile_reads_nothing_and_an_unchanged_world_writes_nothing() -> None:
    api = FakeKube([agd_body({"model": {"source": "/m"}}), GPU_NODE])
    writes = WriteLog()
    first = reconcile(api, ClusterView(api.snapshot(), writes), "ns", "glm", T0)
    assert first.applied == [
        f"Deployment/{DEP}",
        "Service/glm",
        "Service/glm-headless",
        "NetworkPolicy/glm",
    ]
    assert first.status_written
    before = len(api.requests)
    # The watches caught up: nothing to do, and no request at all (no GET either).
    second = reconcile(api, ClusterView(api.snapshot(), writes), "ns", "glm", T1)
    assert (second.applied, second.deleted, second.status_written) == ([], [], False)
    assert len(api.requests) == before
    assert not [r for r in api.requests if r[0] == "GET"]


def test_our_own_writes_count_before_the_watch_reports_them() -> None:
    api = FakeKube([agd_body({"model": {"source": "/m"}}), GPU_NODE])
    stale = api.snapshot()  # what the watches knew before the first reconcile
    writes = WriteLog()
    reconcile(api, ClusterView(stale, writes), "ns", "glm", T0)
    before = len(api.requests)
    again = reconcile(api, ClusterView(stale, writes), "ns", "glm", T1)
    assert (again.applied, again.status_written, again.events) == ([], False, [])
    assert len(api.requests) == before
    # Once the watch has caught up, the write log lets go of its entries.
    reconcile(api, ClusterView(api.snapshot(), writes), "ns", "glm", T1)
    assert len(writes) == 0


def test_children_the_spec_cannot_have_are_never_looked_up_or_deleted() -> None:
    api = FakeKube([agd_body({"model": {"source": "/m"}}), GPU_NODE])
    reconcile(api, ClusterView(api.snapshot(), WriteLog()), "ns", "glm", T0)
    assert not [r for r in api.requests if r[0] == "DELETE"]


def test_children_no_longer_wanted_are_deleted() -> None:
    auto = {
        "model": {"source": "/m"},
        "autoscaling": {
            "minReplicas": 2,
            "maxReplicas": 4,
            "targets": [{"type": "queueDepth", "averageValue": "4"}],
        },
    }
    api = FakeKube([agd_body(auto), GPU_NODE])
    writes = WriteLog()
    assert (
        "HorizontalPodAutoscaler/glm"
        in reconcile(api, ClusterView(api.snapshot(), writes), "ns", "glm", T0).applied
    )
    path = build_path("serving.autoglm.io/v1alpha1", "AutoGLMDeployment", "ns", "glm")
    api.store[path]["spec"] = {"model": {"source": "/m"}}
    outcome = reconcile(api, ClusterView(api.snapshot(), writes), "ns", "glm", T1)
    assert sorted(outcome.deleted) == ["HorizontalPodAutoscaler/glm", "PodDisruptionBudget/glm"]
    # Before the watch reports the deletions, the tombstones keep us from deleting twice.
    stale_again = reconcile(api, ClusterView(api.snapshot(), writes), "ns", "glm", T1)
    assert stale_again.deleted == []


def test_an_apply_rejected_by_the_api_server_is_invalid_spec() -> None:
    api = FakeKube([agd_body({"model": {"source": "/m"}}), GPU_NODE])
    real = api._request

    def reject(method: str, path: str, **kw: Any) -> dict[str, Any]:
        if method == "PATCH" and "/deployments/" in path:
            raise KubeError(422, "Invalid", "Deployment is invalid: spec.template: bad")
        return real(method, path, **kw)

    api._request = reject  # type: ignore[method-assign]
    outcome = reconcile(api, ClusterView(api.snapshot(), WriteLog()), "ns", "glm", T0)
    assert outcome.invalid is not None and f"rejected Deployment {DEP}" in outcome.invalid
    assert [(e["type"], e["reason"]) for e in api.events()] == [("Warning", "InvalidSpec")]


def test_a_conflict_with_another_field_manager_posts_a_warning_and_wins() -> None:
    api = FakeKube([agd_body({"model": {"source": "/m"}}), GPU_NODE])
    writes = WriteLog()
    reconcile(api, ClusterView(api.snapshot(), writes), "ns", "glm", T0)
    # Someone edits the Deployment by hand: the field moves to their manager.
    path = build_path("apps/v1", "Deployment", "ns", DEP)
    api.store[path]["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest"
    api.store[path]["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"].pop("f:template")
    api.conflict_with = "kubectl-edit"
    api.requests.clear()
    outcome = reconcile(api, ClusterView(api.snapshot(), writes), "ns", "glm", T1)
    assert outcome.applied == [f"Deployment/{DEP}"]
    applies = [q.get("force") for m, p, q, _ in api.requests if m == "PATCH" and p == path]
    assert applies == ["false", "true"]
    (event,) = api.events()
    assert (event["type"], event["reason"]) == ("Warning", "FieldManagerConflict")
    assert "kubectl-edit" in event["message"] and f"Deployment {DEP}" in event["message"]
    assert api.store[path]["spec"]["template"]["spec"]["containers"][0]["image"] != "evil:latest"


def test_the_echo_of_our_status_patch_is_skipped() -> None:
    api = FakeKube([agd_body({"model": {"source": "/m"}}), GPU_NODE])
    memo = memo_for(api)
    reconcile(api, ClusterView(api.snapshot(), memo.writes), "ns", "glm", T0)
    body = api.snapshot()[OWNER_INDEX][("ns", "glm")][0]
    assert compute_own_echo(body)
    api.requests.clear()
    on_object_event(
        type="MODIFIED",
        uid="u1",
        namespace="ns",
        name="glm",
        body=body,
        memo=memo,
        logger=LOG,
        **api.snapshot(),
    )
    assert api.requests == []
    # A spec change (a new generation) is never an echo.
    body = json.loads(json.dumps(body))
    body["metadata"]["generation"] = 3
    assert not compute_own_echo(body)


def _settle_deployments(api: FakeKube) -> None:
    """What the Deployment controller and kubelets would do: every pod ready."""
    for obj in api.store.values():
        if obj["kind"] == "Deployment":
            n = obj["spec"].get("replicas", 1)
            obj["status"] = {
                "observedGeneration": obj["metadata"].get("generation", 1),
                "replicas": n,
                "readyReplicas": n,
                "updatedReplicas": n,
            }
            obj["metadata"].setdefault("generation", 1)


def test_a_failed_analysis_writes_route_weight_zero_before_anything_scales_down() -> None:
    from autoglm_operator.analysis import Action, IntervalResult, Verdict

    spec = {
        "model": {"source": "/m"},
        "replicas": 2,
        "traffic": {"provider": "gatewayAPI", "gateway": {"name": "gw"}},
    }
    api = FakeKube([agd_body(spec), GPU_NODE])
    writes = WriteLog()
    path = build_path("serving.autoglm.io/v1alpha1", "AutoGLMDeployment", "ns", "glm")
    clock = [1_800_000_000.0]

    def tick(seconds: float = 1.0, analyzer: Any = None) -> Any:
        clock[0] += seconds
        outcome = reconcile(
            api, ClusterView(api.snapshot(), writes), "ns", "glm", T1,
            at=clock[0], analyzer=analyzer, clock=lambda: clock[0] + 0.25,
        )  # fmt: skip
        _settle_deployments(api)
        return outcome

    tick()
    api.store[path]["spec"] = {
        **spec,
        "canary": {
            "image": "img:2",
            "steps": [{"setWeight": 50}, {"analysis": {"interval": "1s", "failedIntervals": 1}}],
        },
    }
    for _ in range(4):
        tick()
    assert api.store[path]["status"]["canary"]["phase"] == "Analyzing"
    canary = api.store[path]["status"]["canary"]["canaryRevision"]

    def failing(analysis: Any, namespace: str, stable: str, candidate: str) -> IntervalResult:
        assert candidate.startswith(f"glm-{canary}-")
        return IntervalResult(Verdict.FAIL, "server error rate 50%", clock[0], Action.ROLLBACK)

    api.requests.clear()
    outcome = tick(analyzer=failing)
    st = api.store[path]["status"]["canary"]
    assert st["phase"] == "RollingBack" and st["weight"] == 0
    writes_in_order = [(m, p.rsplit("/", 2)[-2]) for m, p, _, _ in api.requests if m != "POST"]
    assert writes_in_order[0] == ("PATCH", "grpcroutes")
    assert writes_in_order[1] == ("PATCH", "httproutes")
    route = api.store[build_path("gateway.networking.k8s.io/v1", "HTTPRoute", "ns", "glm")]
    weights = {r["name"]: r["weight"] for r in route["spec"]["rules"][0]["backendRefs"]}
    assert weights[f"glm-{canary}"] == 0
    assert not [r for r in api.requests if r[0] == "DELETE"]  # nothing removed yet
    # weightZeroAt is when the route was written (sub-second), not when it was decided.
    assert st["weightZeroAt"].endswith(".250000Z")
    assert "AnalysisFailed" in outcome.events
    for _ in range(6):
        tick()
    assert api.store[path]["status"]["canary"]["phase"] == "RolledBack"
    assert build_path("apps/v1", "Deployment", "ns", f"glm-{canary}") not in api.store
