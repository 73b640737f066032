"""Status computation (pure): one test per row of the table in operator/README.md."""

from __future__ import annotations

from typing import Any

import pytest

from autoglm_operator.builders import REVISION_ANNOTATION, Owner, build_deployment
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
    # gpus is 1, 2, 4 or 8 (tensor parallelism): 8 on nodes of 4 GPUs.
    spec = parse_spec({"model": {"source": "/m"}, "resources": {"gpus": 8}})
    nodes = [node("n0", 4), node("n1", 4)]
    assert compute_capacity_problem(spec, nodes) is not None
    status = compute_status(
        spec, OWNER, Observed(generation=1, deployment=deployment(ready=0), nodes=nodes), T0
    )
    assert conditions(status)["Ready"] == ("False", "Unschedulable")
    assert conditions(status)["Degraded"] == ("True", "Unschedulable")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert "8 nvidia.com/gpu" in ready["message"] and "4 allocatable" in ready["message"]


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
    assert (event.type, event.reason) == ("Normal", "Recovered")
    assert "InvalidSpec" in event.message
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


# ---- one test per row of the status table (operator/README.md) ----------------------------

SPEC1 = parse_spec({"model": {"source": "/m"}, "replicas": 1})


def settle(spec: Any, dep: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    """The status after this generation rolled out and turned Ready."""
    rolling = compute_status(
        spec, OWNER, Observed(generation=generation, deployment=dep, nodes=NODES), T0
    )
    return compute_status(
        spec,
        OWNER,
        Observed(generation=generation, previous=rolling, deployment=dep, nodes=NODES),
        T0,
    )


def test_row_new_object_rolling_out_is_progressing_not_degraded() -> None:
    dep = deployment(desired=1, ready=0, updated=1)  # pod created, not ready yet
    status = compute_status(SPEC1, OWNER, Observed(generation=1, deployment=dep, nodes=NODES), T0)
    assert conditions(status) == {
        "Ready": ("False", "RolloutInProgress"),
        "Progressing": ("True", "RolloutInProgress"),
        "Degraded": ("False", "AsExpected"),
    }
    assert compute_events({}, status) == []


def test_row_lost_replica_is_degraded_with_a_warning_then_recovers() -> None:
    ready = settle(SPEC1, deployment(desired=1, ready=1, updated=1))
    assert conditions(ready)["Ready"] == ("True", "ReplicasReady")
    # The node dies: the pod goes NotReady; the spec and the template are unchanged.
    lost_dep = deployment(desired=1, ready=0, updated=1)
    lost = compute_status(
        SPEC1, OWNER, Observed(generation=1, previous=ready, deployment=lost_dep, nodes=NODES), T1
    )
    assert conditions(lost) == {
        "Ready": ("False", "ReplicasUnavailable"),
        "Progressing": ("False", "ReplicasUnavailable"),
        "Degraded": ("True", "ReplicasUnavailable"),
    }
    (event,) = compute_events(ready, lost)
    assert (event.type, event.reason) == ("Warning", "ReplicasUnavailable")
    # The pod is gone and its replacement not made yet (0 updated): still lost, not a rollout.
    gone = compute_status(
        SPEC1,
        OWNER,
        Observed(
            generation=1,
            previous=lost,
            deployment=deployment(desired=1, ready=0, updated=0, replicas=0),
            nodes=NODES,
        ),
        T1,
    )
    assert conditions(gone) == conditions(lost)
    assert compute_events(lost, gone) == []
    lost = gone
    # The replacement pod exists but is not ready yet: still Degraded, nothing new to say.
    still = compute_status(
        SPEC1, OWNER, Observed(generation=1, previous=lost, deployment=lost_dep, nodes=NODES), T1
    )
    assert conditions(still)["Degraded"] == ("True", "ReplicasUnavailable")
    assert compute_events(lost, still) == []
    back = compute_status(
        SPEC1,
        OWNER,
        Observed(
            generation=1,
            previous=still,
            deployment=deployment(desired=1, ready=1, updated=1),
            nodes=NODES,
        ),
        T1,
    )
    assert conditions(back) == conditions(ready)
    (event,) = compute_events(still, back)
    assert (event.type, event.reason) == ("Normal", "Recovered")


def test_row_autoscaler_adding_a_replica_is_not_degraded() -> None:
    spec = parse_spec(
        {
            "model": {"source": "/m"},
            "autoscaling": {
                "minReplicas": 2,
                "maxReplicas": 4,
                "targets": [{"type": "queueDepth", "averageValue": "4"}],
            },
        }
    )
    ready = settle(spec, deployment(desired=2, ready=2, updated=2))
    scaling = compute_status(
        spec,
        OWNER,
        Observed(
            generation=1,
            previous=ready,
            deployment=deployment(desired=3, ready=2, updated=3),
            nodes=NODES,
        ),
        T1,
    )
    assert conditions(scaling) == {
        "Ready": ("True", "ReplicasReady"),
        "Progressing": ("True", "Scaling"),
        "Degraded": ("False", "AsExpected"),
    }
    assert compute_events(ready, scaling) == []
    # Still scaling at the next reconcile: the generation stays settled.
    again = compute_status(
        spec,
        OWNER,
        Observed(
            generation=1,
            previous=scaling,
            deployment=deployment(desired=3, ready=2, updated=3),
            nodes=NODES,
        ),
        T1,
    )
    assert conditions(again) == conditions(scaling)


def crash_looping_pod(name: str = "glm-7d9-abc") -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "server",
                    "ready": False,
                    "restartCount": 4,
                    "state": {
                        "waiting": {
                            "reason": "CrashLoopBackOff",
                            "message": "back-off 1m20s restarting failed container=server",
                        }
                    },
                    "lastState": {
                        "terminated": {
                            "exitCode": 1,
                            "reason": "Error",
                            "message": "ModelLoadError: sha256 mismatch for model.safetensors",
                        }
                    },
                }
            ],
        },
    }


def test_row_crash_loop_names_the_cause_from_the_pod_state() -> None:
    dep = deployment(desired=1, ready=0, updated=1)
    status = compute_status(
        SPEC1,
        OWNER,
        Observed(generation=1, deployment=dep, pods=[crash_looping_pod()], nodes=NODES),
        T0,
    )
    assert conditions(status) == {
        "Ready": ("False", "CrashLoopBackOff"),
        "Progressing": ("True", "RolloutInProgress"),
        "Degraded": ("True", "CrashLoopBackOff"),
    }
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert "pod glm-7d9-abc" in ready["message"] and "4 restarts" in ready["message"]
    assert "last exit 1 (Error): ModelLoadError: sha256 mismatch" in ready["message"]
    (event,) = compute_events({}, status)
    assert (event.type, event.reason) == ("Warning", "CrashLoopBackOff")


def test_crash_loop_reason_does_not_flap_between_restarts() -> None:
    pod = crash_looping_pod()
    cs = pod["status"]["containerStatuses"][0]
    cs["state"] = {"terminated": {"exitCode": 1, "reason": "Error", "message": "does not match"}}
    dep = deployment(desired=1, ready=0, updated=1)
    status = compute_status(
        SPEC1, OWNER, Observed(generation=1, deployment=dep, pods=[pod], nodes=NODES), T0
    )
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "CrashLoopBackOff" and "does not match" in ready["message"]
    cs["restartCount"] = 0  # the very first exit: no loop yet
    status = compute_status(
        SPEC1, OWNER, Observed(generation=1, deployment=dep, pods=[pod], nodes=NODES), T0
    )
    assert conditions(status)["Ready"] == ("False", "Error")


def test_row_crash_loop_after_ready_is_degraded_and_not_progressing() -> None:
    ready = settle(SPEC1, deployment(desired=1, ready=1, updated=1))
    status = compute_status(
        SPEC1,
        OWNER,
        Observed(
            generation=1,
            previous=ready,
            deployment=deployment(desired=1, ready=0, updated=1),
            pods=[crash_looping_pod()],
            nodes=NODES,
        ),
        T1,
    )
    assert conditions(status) == {
        "Ready": ("False", "CrashLoopBackOff"),
        "Progressing": ("False", "CrashLoopBackOff"),
        "Degraded": ("True", "CrashLoopBackOff"),
    }


def test_row_image_pull_failure_and_failed_pod() -> None:
    pull = crash_looping_pod()
    pull["status"]["containerStatuses"][0]["state"] = {
        "waiting": {"reason": "ImagePullBackOff", "message": "pull access denied"}
    }
    pull["status"]["containerStatuses"][0]["lastState"] = {}
    dep = deployment(desired=1, ready=0, updated=1)
    status = compute_status(
        SPEC1, OWNER, Observed(generation=1, deployment=dep, pods=[pull], nodes=NODES), T0
    )
    assert conditions(status)["Ready"] == ("False", "ImagePullBackOff")
    failed = {"metadata": {"name": "p"}, "status": {"phase": "Failed", "reason": "Evicted"}}
    status = compute_status(
        SPEC1, OWNER, Observed(generation=1, deployment=dep, pods=[failed], nodes=NODES), T0
    )
    assert conditions(status)["Degraded"] == ("True", "Evicted")


def test_row_unschedulable_is_degraded_and_still_progressing() -> None:
    spec = parse_spec({"model": {"source": "/m"}, "resources": {"gpuProduct": "NVIDIA-B200"}})
    dep = deployment(desired=1, ready=0, updated=1)
    status = compute_status(spec, OWNER, Observed(generation=1, deployment=dep, nodes=NODES), T0)
    assert conditions(status) == {
        "Ready": ("False", "Unschedulable"),
        "Progressing": ("True", "RolloutInProgress"),
        "Degraded": ("True", "Unschedulable"),
    }


def test_row_scaled_to_zero_on_purpose_is_not_degraded() -> None:
    spec = parse_spec({"model": {"source": "/m"}, "replicas": 0})
    dep = deployment(desired=0, ready=0, updated=0)
    status = compute_status(spec, OWNER, Observed(generation=1, deployment=dep, nodes=NODES), T0)
    assert conditions(status) == {
        "Ready": ("False", "ScaledToZero"),
        "Progressing": ("False", "RolloutComplete"),
        "Degraded": ("False", "AsExpected"),
    }
    (event,) = compute_events({}, status)
    assert (event.type, event.reason) == ("Normal", "ScaledToZero")


def test_row_api_trouble_keeps_what_is_observed_and_is_degraded() -> None:
    ready = settle(SPEC1, deployment(desired=1, ready=1, updated=1))
    status = compute_status(
        SPEC1,
        OWNER,
        Observed(
            generation=1,
            previous=ready,
            deployment=deployment(desired=1, ready=1, updated=1),
            nodes=NODES,
            api_error="the API server refused a request (403 Forbidden): no",
        ),
        T1,
    )
    assert conditions(status) == {
        "Ready": ("True", "ReplicasReady"),
        "Progressing": ("False", "RolloutComplete"),
        "Degraded": ("True", "ApiError"),
    }
    (event,) = compute_events(ready, status)
    assert (event.type, event.reason) == ("Warning", "ApiError")
    # An API error does not make lost replicas out of a rollout that is not done.
    fresh = compute_status(
        SPEC1,
        OWNER,
        Observed(generation=1, deployment=None, api_error="403"),
        T1,
    )
    assert conditions(fresh)["Degraded"] == ("True", "ApiError")


def test_merge_patch_nulls_nested_keys_that_went_away() -> None:
    """status.canary is patched key by key: a key of the last rollout (weightZeroAt of a
    rollback) must not outlive it, or the next rollout's timing would read it."""
    previous = {
        "canary": {
            "phase": "RolledBack",
            "weightZeroAt": "t0",
            "lastAnalysis": {"values": {"a": 1.0}},
        }
    }
    new = {"canary": {"phase": "Progressing", "lastAnalysis": {"values": {"b": 2.0}}}}
    patch = compute_merge_patch(previous, new)
    assert patch == {
        "canary": {
            "phase": "Progressing",
            "weightZeroAt": None,
            "lastAnalysis": {"values": {"b": 2.0, "a": None}},
        }
    }
    merged = apply_merge_patch(previous, patch)
    assert merged == new


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies it."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = apply_merge_patch(out.get(k), v)
    return out


# ---- the rollout's rows -----------------------------------------------------------------------


def settled_previous() -> dict[str, Any]:
    first = compute_status(
        SPEC, OWNER, Observed(generation=1, deployment=deployment(), nodes=NODES), T0
    )
    return first


def test_canary_in_flight_is_progressing_while_the_stable_keeps_ready() -> None:
    obs = Observed(
        generation=1,
        previous=settled_previous(),
        deployment=deployment(),
        rollout="rollout Analyzing: step 1: 2 good intervals",
    )
    got = conditions(compute_status(SPEC, OWNER, obs, T1))
    assert got == {
        "Ready": ("True", "ReplicasReady"),
        "Progressing": ("True", "CanaryInProgress"),
        "Degraded": ("False", "AsExpected"),
    }


def test_failed_canary_is_degraded_with_its_reason_and_a_warning() -> None:
    from autoglm_operator.status import Problem

    previous = settled_previous()
    obs = Observed(
        generation=1,
        previous=previous,
        deployment=deployment(),
        canary_problem=Problem("CanaryNotReady", "canary revision x was not Ready within 2m"),
    )
    status = compute_status(SPEC, OWNER, obs, T1)
    assert conditions(status)["Degraded"] == ("True", "CanaryNotReady")
    assert conditions(status)["Ready"] == ("True", "ReplicasReady")  # the stable still serves
    (event,) = compute_events(previous, status)
    assert (event.type, event.reason) == ("Warning", "CanaryNotReady")


def test_missing_traffic_provider_is_not_ready_and_degraded() -> None:
    obs = Observed(
        generation=1,
        previous=settled_previous(),
        deployment=deployment(),
        traffic_missing="the cluster does not serve gateway.networking.k8s.io/v1 GRPCRoute",
    )
    got = conditions(compute_status(SPEC, OWNER, obs, T1))
    assert got["Ready"] == ("False", "TrafficProviderMissing")
    assert got["Degraded"] == ("True", "TrafficProviderMissing")
