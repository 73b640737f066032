"""Status from observed children: pure.

``compute_status`` turns what the operator observed (the Deployment, its pods,
the GPU nodes, the previous status) into the next ``status``. It reads no
clock (``now`` is an argument) and keeps a condition's lastTransitionTime while
its status stays the same, so an unchanged world gives an identical status and
the operator writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .builders import (
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    REVISION_ANNOTATION,
    Owner,
    build_selector_string,
    headless_service_name,
)
from .spec import AutoGLMDeploymentSpec

# Reasons, CamelCase as Kubernetes conventions ask.
REASON_READY = "ReplicasReady"
REASON_COMPLETE = "RolloutComplete"
REASON_IN_PROGRESS = "RolloutInProgress"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_UNSCHEDULABLE = "Unschedulable"
REASON_DEADLINE = "ProgressDeadlineExceeded"
REASON_SCALED_TO_ZERO = "ScaledToZero"
REASON_AS_EXPECTED = "AsExpected"

CONDITION_TYPES = ("Ready", "Progressing", "Degraded")
PROBLEM_REASONS = frozenset({REASON_INVALID_SPEC, REASON_UNSCHEDULABLE, REASON_DEADLINE})


@dataclass(frozen=True, slots=True)
class Observed:
    """What the operator read from the cluster for one AutoGLMDeployment."""

    generation: int
    previous: dict[str, Any] = field(default_factory=dict)
    deployment: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] | None = None  # None: not readable
    invalid: str | None = None  # why the spec can never work, if it can't


ConditionValue = tuple[Literal["True", "False", "Unknown"], str, str]  # (status, reason, message)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Ready, Progressing and Degraded, each as (status, reason, message)."""

    ready: ConditionValue
    progressing: ConditionValue
    degraded: ConditionValue


# ---- scheduling ------------------------------------------------------------------


def compute_capacity_problem(
    spec: AutoGLMDeploymentSpec, nodes: list[dict[str, Any]] | None
) -> str | None:
    """Why no node can ever hold one server pod, or None when some node can."""
    if nodes is None:
        return None
    product = spec.resources.gpu_product
    candidates = [
        n
        for n in nodes
        if not n.get("spec", {}).get("unschedulable")
        and (
            product is None
            or n.get("metadata", {}).get("labels", {}).get(GPU_PRODUCT_LABEL) == product
        )
    ]
    if not candidates:
        where = f"with {GPU_PRODUCT_LABEL}={product}" if product else "that is schedulable"
        return f"no node {where} exists"
    most = max(_allocatable_gpus(n) for n in candidates)
    if spec.resources.gpus > most:
        return (
            f"each pod requests {spec.resources.gpus} {GPU_RESOURCE} but the largest matching node "
            f"has {most} allocatable"
        )
    return None


def _allocatable_gpus(node: dict[str, Any]) -> int:
    raw = node.get("status", {}).get("allocatable", {}).get(GPU_RESOURCE, "0")
    try:
        return int(str(raw))
    except ValueError:
        return 0


def compute_unschedulable_message(pods: list[dict[str, Any]]) -> str | None:
    """The scheduler's message for the first pod it could not place, if any."""
    for pod in sorted(pods, key=lambda p: p.get("metadata", {}).get("name", "")):
        if pod.get("metadata", {}).get("deletionTimestamp"):
            continue
        for cond in pod.get("status", {}).get("conditions") or []:
            if (
                cond.get("type") == "PodScheduled"
                and cond.get("status") == "False"
                and cond.get("reason") == "Unschedulable"
            ):
                name = pod["metadata"].get("name", "?")
                return f"pod {name}: {cond.get('message', 'unschedulable')}"
    return None


# ---- the verdict -------------------------------------------------------------------


def _deployment_numbers(dep: dict[str, Any]) -> tuple[int, int, int, int, bool, bool]:
    """(desired, replicas, updated, ready, observed_current, deadline_exceeded)."""
    spec, st, meta = dep.get("spec", {}), dep.get("status", {}), dep.get("metadata", {})
    desired = int(spec.get("replicas", 1))
    observed = int(st.get("observedGeneration", 0)) >= int(meta.get("generation", 1))
    deadline = any(
        c.get("type") == "Progressing"
        and c.get("status") == "False"
        and c.get("reason") == REASON_DEADLINE
        for c in st.get("conditions") or []
    )
    return (
        desired,
        int(st.get("replicas", 0)),
        int(st.get("updatedReplicas", 0)),
        int(st.get("readyReplicas", 0)),
        observed,
        deadline,
    )


def compute_rollout_complete(dep: dict[str, Any] | None) -> bool:
    if dep is None:
        return False
    desired, replicas, updated, ready, observed, _ = _deployment_numbers(dep)
    return observed and updated == desired and replicas == desired and ready >= desired


def compute_verdict(spec: AutoGLMDeploymentSpec | None, observed: Observed) -> Verdict:
    """Ready, Progressing and Degraded from the observed state."""
    if observed.invalid is not None or spec is None:
        msg = observed.invalid or "the spec is invalid"
        return Verdict(
            ("False", REASON_INVALID_SPEC, msg),
            ("False", REASON_INVALID_SPEC, msg),
            ("True", REASON_INVALID_SPEC, msg),
        )
    dep = observed.deployment
    if dep is None:
        msg = "the Deployment does not exist yet"
        return Verdict(
            ("False", REASON_IN_PROGRESS, msg),
            ("True", REASON_IN_PROGRESS, msg),
            ("False", REASON_AS_EXPECTED, msg),
        )
    desired, _replicas, updated, ready, _obs, deadline = _deployment_numbers(dep)
    ok: ConditionValue = ("False", REASON_AS_EXPECTED, "all is as expected")
    if compute_rollout_complete(dep):
        if desired == 0:
            msg = "scaled to zero replicas: nothing serves the model"
            return Verdict(
                ("False", REASON_SCALED_TO_ZERO, msg), ("False", REASON_COMPLETE, msg), ok
            )
        msg = f"{ready}/{desired} replicas ready"
        return Verdict(("True", REASON_READY, msg), ("False", REASON_COMPLETE, msg), ok)
    problem = compute_capacity_problem(spec, observed.nodes) or compute_unschedulable_message(
        observed.pods
    )
    if problem is not None:
        msg = f"{problem} ({ready}/{desired} replicas ready)"
        return Verdict(
            ("False", REASON_UNSCHEDULABLE, msg),
            ("True", REASON_IN_PROGRESS, msg),
            ("True", REASON_UNSCHEDULABLE, msg),
        )
    if deadline:
        msg = f"the rollout made no progress within its deadline ({updated}/{desired} updated, {ready} ready)"
        return Verdict(
            ("False", REASON_DEADLINE, msg),
            ("False", REASON_DEADLINE, msg),
            ("True", REASON_DEADLINE, msg),
        )
    msg = f"rolling out: {updated}/{desired} replicas updated, {ready}/{desired} ready"
    return Verdict(("False", REASON_IN_PROGRESS, msg), ("True", REASON_IN_PROGRESS, msg), ok)


# ---- the status ------------------------------------------------------------------------


def compute_conditions(
    verdict: Verdict, generation: int, previous: list[dict[str, Any]], now: str
) -> list[dict[str, Any]]:
    """The three conditions, keeping lastTransitionTime while a status holds."""
    before = {c.get("type"): c for c in previous}
    out: list[dict[str, Any]] = []
    for ctype, (status, reason, message) in zip(
        CONDITION_TYPES, (verdict.ready, verdict.progressing, verdict.degraded), strict=True
    ):
        old = before.get(ctype)
        since = (
            old["lastTransitionTime"]
            if old and old.get("status") == status and old.get("lastTransitionTime")
            else now
        )
        out.append(
            {
                "type": ctype,
                "status": status,
                "observedGeneration": generation,
                "lastTransitionTime": since,
                "reason": reason,
                "message": message,
            }
        )
    return out


def compute_endpoints(spec: AutoGLMDeploymentSpec | None, owner: Owner) -> dict[str, str] | None:
    if spec is None:
        return None
    host = f"{owner.name}.{owner.namespace}.svc"
    headless = f"{headless_service_name(owner)}.{owner.namespace}.svc"
    return {
        "grpc": f"{host}:{spec.server.grpc_port}",
        "grpcHeadless": f"dns:///{headless}:{spec.server.grpc_port}",
        "http": f"http://{host}:{spec.server.http_port}",
    }


def compute_status(
    spec: AutoGLMDeploymentSpec | None, owner: Owner, observed: Observed, now: str
) -> dict[str, Any]:
    """The whole ``status`` for the observed state. ``now`` is RFC 3339, UTC."""
    verdict = compute_verdict(spec, observed)
    prev = observed.previous
    dep = observed.deployment
    st = dep.get("status", {}) if dep else {}
    status: dict[str, Any] = {
        "observedGeneration": observed.generation,
        "conditions": compute_conditions(
            verdict, observed.generation, prev.get("conditions") or [], now
        ),
        "replicas": int(st.get("replicas", 0)),
        "readyReplicas": int(st.get("readyReplicas", 0)),
        "updatedReplicas": int(st.get("updatedReplicas", 0)),
        "selector": build_selector_string(owner),
    }
    revision = prev.get("modelRevision")
    if dep is not None and compute_rollout_complete(dep):
        annotations = (
            dep.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
        )
        revision = annotations.get(REVISION_ANNOTATION, revision)
    if revision is not None:
        status["modelRevision"] = revision
    endpoints = compute_endpoints(spec, owner)
    if endpoints is not None:
        status["endpoints"] = endpoints
    return status


def compute_status_changed(previous: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether ``new`` differs from the live status (which may hold other writers' keys)."""
    return any(previous.get(k) != v for k, v in new.items()) or any(
        k not in new for k in previous if k in _OWN_KEYS
    )


_OWN_KEYS = frozenset(
    {
        "observedGeneration",
        "conditions",
        "replicas",
        "readyReplicas",
        "updatedReplicas",
        "selector",
        "modelRevision",
        "endpoints",
    }
)


def compute_merge_patch(previous: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch for the status subresource: set new values, null what went away."""
    patch: dict[str, Any] = {k: v for k, v in new.items() if previous.get(k) != v}
    for k in previous:
        if k in _OWN_KEYS and k not in new:
            patch[k] = None
    return patch


# ---- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventSpec:
    """A Kubernetes Event to post about the AutoGLMDeployment."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def compute_events(previous: dict[str, Any], new: dict[str, Any]) -> list[EventSpec]:
    """Events for transitions of the Ready condition (nothing when it holds)."""
    old = _condition(previous, "Ready")
    cur = _condition(new, "Ready")
    if cur is None:
        return []
    key = (cur.get("status"), cur.get("reason"))
    if old is not None and (old.get("status"), old.get("reason")) == key:
        return []
    if cur.get("reason") in PROBLEM_REASONS:
        return [EventSpec("Warning", str(cur["reason"]), str(cur.get("message", "")))]
    if cur.get("status") == "True":
        return [EventSpec("Normal", str(cur["reason"]), str(cur.get("message", "")))]
    return []


def _condition(status: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in status.get("conditions") or []:
        if c.get("type") == ctype:
            return dict(c)
    return None
