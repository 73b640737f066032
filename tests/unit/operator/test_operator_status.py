"""Status computation (pure) and the reconcile shell against an in-memory API."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from autoglm_operator.builders import REVISION_ANNOTATION, Owner, build_deployment
from autoglm_operator.k8s import ApplyResult, KubeError
from autoglm_operator.reconcile import reconcile
from autoglm_operator.spec import parse_spec
from autoglm_operator.status import (
    Observed,
    compute_capacity_problem,
    compute_events,
    compute_merge_patch,
    compute_status,
    compute_status_changed,
)

OWNER = Owner("glm", "ns", "uid-1")
SPEC = parse_spec({"model": {"source": "hf://THUDM/glm-4@rev9"}, "replicas": 2})
T0 = "2025-01-01T00:00:00Z"
T1 = "2025-01-01T00:05:00Z"


def node(name: str, gpus: int, product: str = "NVIDIA-H100-80GB-HBM3") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.product": product}},
        "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}},
    }


NODES = [node("n0", 8), node("n1", 8)]


def deployment(
    *,
    generation: int = 1,
    observed: int = 1,
    desired: int = 2,
    ready: int = 2,
    updated: int = 2,
    replicas: int | None = None,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    dep = build_deployment(SPEC, OWNER)
    dep["metadata"]["generation"] = generation
    dep["spec"]["replicas"] = desired
    dep["status"] = {
        "observedGeneration": observed,
        "replicas": desired if replicas is None else replicas,
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "conditions": conditions or [],
    }
    return dep


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_ready_when_rollout_complete() -> None:
    status = compute_status(
        SPEC, OWNER, Observed(generation=3, deployment=deployment(), nodes=NODES), T0
    )
    assert conditions(status) == {
        "Ready": ("True", "ReplicasReady"),
        "Progressing": ("False", "RolloutComplete"),
        "Degraded": ("False", "AsExpected"),
    }
    assert status["observedGeneration"] == 3
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])
    assert (status["replicas"], status["readyReplicas"]) == (2, 2)
    assert status["modelRevision"] == "rev9"
    assert (
        status["selector"]
        == "app.kubernetes.io/component=server,app.kubernetes.io/instance=glm,app.kubernetes.io/name=autoglm"
    )
    assert status["endpoints"] == {
        "grpc": "glm.ns.svc:8001",
        "grpcHeadless": "dns:///glm-headless.ns.svc:8001",
        "http": "http://glm.ns.svc:8000",
    }


@pytest.mark.parametrize(
    "dep",
    [
        deployment(observed=0),  # controller has not seen the new template
        deployment(ready=1),  # not all ready
        deployment(updated=1, replicas=3),  # old pods still there
    ],
)
def test_not_ready_while_rolling_out(dep: dict[str, Any]) -> None:
    status = compute_status(SPEC, OWNER, Observed(generation=1, deployment=dep, nodes=NODES), T0)
    assert conditions(status)["Ready"] == ("False", "RolloutInProgress")
    assert conditions(status)["Progressing"] == ("True", "RolloutInProgress")


def test_served_revision_only_changes_when_rollout_completes() -> None:
    prev = {"modelRevision": "old"}
    rolling = compute_status(
        SPEC,
        OWNER,
        Observed(generation=2, previous=prev, deployment=deployment(ready=1), nodes=NODES),
        T0,
    )
    assert rolling["modelRevision"] == "old"
    done = deployment()
    done["spec"]["template"]["metadata"]["annotations"][REVISION_ANNOTATION] = "new"
    assert (
        compute_status(
            SPEC, OWNER, Observed(generation=2, previous=prev, deployment=done, nodes=NODES), T0
        )["modelRevision"]
        == "new"
    )


def test_unschedulable_when_no_node_has_enough_gpus() -> None:
    spec = parse_spec({"model": {"source": "/m"}, "resources": {"gpus": 16}})
    assert compute_capacity_problem(spec, NODES) is not None
    status = compute_status(
        spec, OWNER, Observed(generation=1, deployment=deployment(ready=0), nodes=NODES), T0
    )
    assert conditions(status)["Ready"] == ("False", "Unschedulable")
    assert conditions(status)["Degraded"] == ("True", "Unschedulable")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert "16 nvidia.com/gpu" in ready["message"] and "8 allocatable" in ready["message"]


def test_unschedulable_when_no_node_has_the_gpu_product() -> None:
    spec = parse_spec({"model": {"source": "/m"}, "resources": {"gpuProduct": "NVIDIA-B200"}})
    assert "NVIDIA-B200" in (compute_capacity_problem(spec, NODES) or "")
    assert compute_capacity_problem(spec, None) is None  # nodes unreadable: no verdict


def test_unschedulable_from_the_scheduler() -> None:
    pod = {
        "metadata": {"name": "glm-abc"},
        "status": {
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/4 nodes are available: 4 Insufficient memory.",
                }
            ]
        },
    }
    status = compute_status(
        SPEC,
        OWNER,
        Observed(generation=1, deployment=deployment(ready=0), pods=[pod], nodes=NODES),
        T0,
    )
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "Unschedulable"
    assert "Insufficient memory" in ready["message"]


def test_invalid_spec() -> None:
    status = compute_status(
        None, OWNER, Observed(generation=4, invalid="spec.model.source: bad"), T0
    )
    assert conditions(status)["Ready"] == ("False", "InvalidSpec")
    assert conditions(status)["Degraded"] == ("True", "InvalidSpec")
    assert "endpoints" not in status


def test_progress_deadline_exceeded_is_degraded() -> None:
    dep = deployment(
        ready=0,
        conditions=[
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
        ],
    )
    status = compute_status(SPEC, OWNER, Observed(generation=1, deployment=dep, nodes=NODES), T0)
    assert conditions(status)["Degraded"] == ("True", "ProgressDeadlineExceeded")


def test_scaled_to_zero_is_not_ready() -> None:
    status = compute_status(
        SPEC,
        OWNER,
        Observed(generation=1, deployment=deployment(desired=0, ready=0, updated=0), nodes=NODES),
        T0,
    )
    assert conditions(status)["Ready"] == ("False", "ScaledToZero")


def test_same_world_gives_same_status_and_keeps_transition_times() -> None:
    first = compute_status(
        SPEC, OWNER, Observed(generation=1, deployment=deployment(), nodes=NODES), T0
    )
    second = compute_status(
        SPEC,
        OWNER,
        Observed(generation=1, previous=first, deployment=deployment(), nodes=NODES),
        T1,
    )
    assert second == first
    assert not compute_status_changed(first, second)
    assert compute_merge_patch(first, second) == {}
    assert compute_events(first, second) == []


def test_transition_time_moves_only_when_status_flips() -> None:
    rolling = compute_status(
        SPEC, OWNER, Observed(generation=1, deployment=deployment(ready=1), nodes=NODES), T0
    )
    ready = compute_status(
        SPEC,
        OWNER,
        Observed(generation=1, previous=rolling, deployment=deployment(), nodes=NODES),
        T1,
    )
    times = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    assert times == {"Ready": T1, "Progressing": T1, "Degraded": T0}
    patch = compute_merge_patch(rolling, ready)
    assert set(patch) == {"conditions", "readyReplicas", "modelRevision"}


def test_events_on_transitions() -> None:
    invalid = compute_status(None, OWNER, Observed(generation=1, invalid="bad"), T0)
    (event,) = compute_events({}, invalid)
    assert (event.type, event.reason) == ("Warning", "InvalidSpec")
    ready = compute_status(
        SPEC,
        OWNER,
        Observed(generation=2, previous=invalid, deployment=deployment(), nodes=NODES),
        T1,
    )
    (event,) = compute_events(invalid, ready)
    assert (event.type, event.reason) == ("Normal", "ReplicasReady")
    rolling = compute_status(
        SPEC,
        OWNER,
        Observed(generation=3, previous=ready, deployment=deployment(ready=1), nodes=NODES),
        T1,
    )
    assert compute_events(ready, rolling) == []


def test_merge_patch_nulls_keys_that_went_away() -> None:
    assert compute_merge_patch({"endpoints": {"grpc": "x"}, "replicas": 1}, {"replicas": 1}) == {
        "endpoints": None
    }


# ---- the reconcile shell, with an in-memory API ---------------------------------------


class FakeApi:
    """Just enough of KubeApi: objects by (kind, name); counts writes."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {
            ("AutoGLMDeployment", body["metadata"]["name"]): body
        }
        self.writes: list[str] = []
        self.events: list[tuple[str, str]] = []
        self.reject: str | None = None

    def get(
        self, api_version: str, kind: str, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        obj = self.objects.get((kind, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list_objects(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        return []

    def list_nodes(self) -> list[dict[str, Any]]:
        return NODES

    def ensure_applied(self, manifest: dict[str, Any]) -> ApplyResult:
        if manifest["kind"] == self.reject:
            raise KubeError(422, "Invalid", f"{manifest['kind']} is invalid: spec.template: bad")
        key = (manifest["kind"], manifest["metadata"]["name"])
        if self.objects.get(key, {}).get("spec") == manifest.get("spec"):
            return ApplyResult(manifest["kind"], manifest["metadata"]["name"], applied=False)
        self.writes.append(f"apply {key}")
        self.objects[key] = copy.deepcopy(manifest)
        return ApplyResult(manifest["kind"], manifest["metadata"]["name"], applied=True)

    def delete_owned(
        self, api_version: str, kind: str, namespace: str, name: str, owner_uid: str
    ) -> bool:
        if self.objects.pop((kind, name), None) is not None:
            self.writes.append(f"delete {kind}/{name}")
            return True
        return False

    def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, patch: dict[str, Any]
    ) -> None:
        self.writes.append("status")
        body = self.objects[(kind, name)]
        status = body.setdefault("status", {})
        for k, v in patch.items():
            if v is None:
                status.pop(k, None)
            else:
                status[k] = v

    def create_event(
        self, involved: dict[str, Any], event_type: str, reason: str, message: str, now: str
    ) -> None:
        self.writes.append("event")
        self.events.append((event_type, reason))


def agd(spec: dict[str, Any], name: str = "glm") -> dict[str, Any]:
    return {
        "apiVersion": "serving.autoglm.io/v1alpha1",
        "kind": "AutoGLMDeployment",
        "metadata": {"name": name, "namespace": "ns", "uid": "uid-1", "generation": 1},
        "spec": spec,
    }


def test_reconcile_twice_writes_once() -> None:
    api = FakeApi(agd({"model": {"source": "/m"}}))
    first = reconcile(api, "ns", "glm", now=T0)  # type: ignore[arg-type]
    assert first.applied == ["Deployment/glm", "Service/glm", "Service/glm-headless"]
    assert first.status_written
    before = len(api.writes)
    second = reconcile(api, "ns", "glm", now=T1)  # type: ignore[arg-type]
    assert (second.applied, second.deleted, second.status_written) == ([], [], False)
    assert len(api.writes) == before


def test_reconcile_invalid_spec_sets_status_and_event_and_touches_no_child() -> None:
    api = FakeApi(agd({"model": {"source": "s3://bucket/x"}}))
    outcome = reconcile(api, "ns", "glm", now=T0)  # type: ignore[arg-type]
    assert outcome.invalid is not None and "spec.model" in outcome.invalid
    assert outcome.applied == []
    status = api.objects[("AutoGLMDeployment", "glm")]["status"]
    assert conditions(status)["Ready"] == ("False", "InvalidSpec")
    assert api.events == [("Warning", "InvalidSpec")]
    # Again: nothing new to say, nothing written.
    before = len(api.writes)
    reconcile(api, "ns", "glm", now=T1)  # type: ignore[arg-type]
    assert len(api.writes) == before


def test_reconcile_maps_an_api_rejection_to_invalid_spec() -> None:
    api = FakeApi(agd({"model": {"source": "/m"}}))
    api.reject = "Deployment"
    outcome = reconcile(api, "ns", "glm", now=T0)  # type: ignore[arg-type]
    assert outcome.invalid is not None and "rejected Deployment glm" in outcome.invalid
    assert ("Warning", "InvalidSpec") in api.events


def test_reconcile_removes_children_no_longer_wanted() -> None:
    api = FakeApi(
        agd(
            {
                "model": {"source": "/m"},
                "autoscaling": {
                    "minReplicas": 2,
                    "maxReplicas": 4,
                    "targets": [{"type": "queueDepth", "averageValue": "4"}],
                },
            }
        )
    )
    assert "HorizontalPodAutoscaler/glm" in reconcile(api, "ns", "glm", now=T0).applied  # type: ignore[arg-type]
    api.objects[("AutoGLMDeployment", "glm")]["spec"] = {"model": {"source": "/m"}}
    outcome = reconcile(api, "ns", "glm", now=T1)  # type: ignore[arg-type]
    assert sorted(outcome.deleted) == ["HorizontalPodAutoscaler/glm", "PodDisruptionBudget/glm"]


def test_reconcile_of_a_missing_object_does_nothing() -> None:
    api = FakeApi(agd({"model": {"source": "/m"}}))
    assert reconcile(api, "ns", "other", now=T0).found is False  # type: ignore[arg-type]
    assert api.writes == []
