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

from .owner import (
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
REASON_SCALING = "Scaling"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_UNSCHEDULABLE = "Unschedulable"
REASON_DEADLINE = "ProgressDeadlineExceeded"
REASON_UNAVAILABLE = "ReplicasUnavailable"
REASON_API_ERROR = "ApiError"
REASON_SCALED_TO_ZERO = "ScaledToZero"
REASON_AS_EXPECTED = "AsExpected"
REASON_RECOVERED = "Recovered"

CONDITION_TYPES = ("Ready", "Progressing", "Degraded")
# A container stuck in one of these waiting states will not get better by itself.
FAILED_WAITING_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "ErrImageNeverPull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
TERMINATION_MESSAGE_LIMIT = 512


@dataclass(frozen=True, slots=True)
class Observed:
    """What the operator read from the cluster for one AutoGLMDeployment."""

    generation: int
    previous: dict[str, Any] = field(default_factory=dict)
    deployment: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] | None = None  # None: not readable
    invalid: str | None = None  # why the spec can never work, if it can't
    api_error: str | None = None  # a request the API server refused (not the spec's fault)
    rollout: str | None = None  # a rollout between revisions is in flight: what it does
    traffic_missing: str | None = None  # the traffic provider's CRDs are not served
    canary_problem: Problem | None = None  # the last rollout failed or was rolled back


ConditionValue = tuple[Literal["True", "False", "Unknown"], str, str]  # (status, reason, message)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Ready, Progressing and Degraded, each as (status, reason, message)."""

    ready: ConditionValue
    progressing: ConditionValue
    degraded: ConditionValue


@dataclass(frozen=True, slots=True)
class Problem:
    """Why the model is not served as asked: a Degraded reason and message."""

    reason: str
    message: str


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


# ---- pods ------------------------------------------------------------------------


def compute_pod_problem(pods: list[dict[str, Any]]) -> Problem | None:
    """The first pod whose container cannot run, named with the cause from the pod's state.

    A container waiting in ``CrashLoopBackOff`` (or an image or config error),
    or terminated with a non-zero exit, or a Failed pod. The message names the
    pod, the container, the restart count and the last termination (reason,
    exit code, and the container's termination message).
    """
    for pod in sorted(pods, key=lambda p: p.get("metadata", {}).get("name", "")):
        meta, st = pod.get("metadata", {}), pod.get("status", {})
        if meta.get("deletionTimestamp"):
            continue
        name = meta.get("name", "?")
        statuses = list(st.get("initContainerStatuses") or []) + list(
            st.get("containerStatuses") or []
        )
        for cs in statuses:
            if cs.get("ready"):
                continue
            state = cs.get("state") or {}
            waiting, terminated = state.get("waiting") or {}, state.get("terminated") or {}
            if waiting.get("reason") in FAILED_WAITING_REASONS:
                reason = str(waiting["reason"])
                detail = str(waiting.get("message") or "")
            elif terminated and int(terminated.get("exitCode", 0)) != 0:
                # Between two restarts of a crash loop the container shows as
                # terminated: keep calling it a crash loop, so the reason (and its
                # Warning) does not flap with every restart.
                restarted = int(cs.get("restartCount", 0)) > 0
                reason = (
                    "CrashLoopBackOff" if restarted else str(terminated.get("reason") or "Error")
                )
                detail = ""
            else:
                continue
            parts = [f"pod {name}: container {cs.get('name', '?')}: {reason}"]
            if detail:
                parts.append(detail)
            parts.append(f"{int(cs.get('restartCount', 0))} restarts")
            last = terminated or (cs.get("lastState") or {}).get("terminated") or {}
            if last:
                text = str(last.get("message") or "").strip()[-TERMINATION_MESSAGE_LIMIT:]
                parts.append(
                    f"last exit {last.get('exitCode', '?')} ({last.get('reason', 'Error')})"
                    + (f": {text}" if text else "")
                )
            return Problem(reason, "; ".join(parts))
        if st.get("phase") == "Failed":
            reason = str(st.get("reason") or "PodFailed")
            return Problem(reason, f"pod {name} failed: {st.get('message') or reason}")
    return None


# ---- the verdict -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rollout:
    """The Deployment's numbers, as the verdict reads them."""

    desired: int  # spec.replicas (ours, or the HPA's)
    replicas: int  # pods of any revision that are not terminating
    updated: int  # pods of the current template
    ready: int
    observed: bool  # the Deployment controller has seen the current template
    deadline: bool  # ProgressDeadlineExceeded

    @property
    def rolled_out(self) -> bool:
        """Every pod runs the current template (ready or not) and none of the old ones are left."""
        return self.observed and self.updated >= self.desired and self.replicas <= self.desired

    @property
    def complete(self) -> bool:
        return self.rolled_out and self.ready >= self.desired


def compute_rollout(dep: dict[str, Any]) -> Rollout:
    spec, st, meta = dep.get("spec", {}), dep.get("status", {}), dep.get("metadata", {})
    return Rollout(
        desired=int(spec.get("replicas", 1)),
        replicas=int(st.get("replicas", 0)),
        updated=int(st.get("updatedReplicas", 0)),
        ready=int(st.get("readyReplicas", 0)),
        observed=int(st.get("observedGeneration", 0)) >= int(meta.get("generation", 1)),
        deadline=any(
            c.get("type") == "Progressing"
            and c.get("status") == "False"
            and c.get("reason") == REASON_DEADLINE
            for c in st.get("conditions") or []
        ),
    )


def compute_rollout_complete(dep: dict[str, Any] | None) -> bool:
    return dep is not None and compute_rollout(dep).complete


def compute_required_replicas(spec: AutoGLMDeploymentSpec) -> int:
    """The fewest ready replicas that serve the spec as asked (autoscaling: its minimum)."""
    return spec.autoscaling.min_replicas if spec.autoscaling is not None else spec.replicas


def compute_settled(previous: dict[str, Any], generation: int) -> bool:
    """Whether this generation's rollout finished once before (the previous status says so).

    Replicas missing after that were lost (a pod or node went away, a
    container crashed), not yet to come: that is Degraded, not Progressing.
    """
    prog = _condition(previous, "Progressing")
    return (
        prog is not None
        and prog.get("observedGeneration") == generation
        and prog.get("reason") not in (REASON_IN_PROGRESS, REASON_INVALID_SPEC, REASON_DEADLINE)
    )


def compute_problem(
    spec: AutoGLMDeploymentSpec, observed: Observed, rollout: Rollout, settled: bool
) -> Problem | None:
    """Why the model is not served as asked, most specific cause first; None when all is well."""
    if observed.api_error is not None:
        return Problem(REASON_API_ERROR, observed.api_error)
    if rollout.complete:
        return None
    pod = compute_pod_problem(observed.pods)
    if pod is not None:
        return pod
    capacity = compute_capacity_problem(spec, observed.nodes) or compute_unschedulable_message(
        observed.pods
    )
    if capacity is not None:
        return Problem(
            REASON_UNSCHEDULABLE, f"{capacity} ({rollout.ready}/{rollout.desired} ready)"
        )
    if rollout.deadline:
        return Problem(
            REASON_DEADLINE,
            f"the rollout made no progress within its deadline ({rollout.updated}/"
            f"{rollout.desired} updated, {rollout.ready} ready)",
        )
    degraded = _condition(observed.previous, "Degraded")
    was_degraded = (
        degraded is not None
        and degraded.get("status") == "True"
        and degraded.get("reason") != REASON_API_ERROR
    )
    before = int(observed.previous.get("readyReplicas", 0))
    # Settled: the template is the one that rolled out; pods missing were lost (a pod
    # gone and not yet replaced shows as fewer updated replicas: still lost).
    if settled and rollout.ready < rollout.desired and (rollout.ready < before or was_degraded):
        return Problem(
            REASON_UNAVAILABLE,
            f"{rollout.ready}/{rollout.desired} replicas ready: a replica that was ready is gone "
            "or not ready (its pod or node was lost) and its replacement is not ready yet",
        )
    return None


REASON_TRAFFIC_MISSING = "TrafficProviderMissing"
REASON_CANARY = "CanaryInProgress"


def compute_verdict(spec: AutoGLMDeploymentSpec | None, observed: Observed) -> Verdict:
    """Ready, Progressing and Degraded from the observed state (the table in README.md),
    with the rollout's part on top."""
    verdict = compute_replicas_verdict(spec, observed)
    if spec is None or observed.invalid is not None:
        return verdict
    ready, progressing, degraded = verdict.ready, verdict.progressing, verdict.degraded
    if observed.rollout is not None and progressing[0] != "True":
        progressing = ("True", REASON_CANARY, observed.rollout)
    if observed.canary_problem is not None and degraded[0] != "True":
        degraded = ("True", observed.canary_problem.reason, observed.canary_problem.message)
    if observed.traffic_missing is not None:
        ready = ("False", REASON_TRAFFIC_MISSING, observed.traffic_missing)
        degraded = ("True", REASON_TRAFFIC_MISSING, observed.traffic_missing)
    return Verdict(ready, progressing, degraded)


def compute_replicas_verdict(spec: AutoGLMDeploymentSpec | None, observed: Observed) -> Verdict:
    """Ready, Progressing and Degraded from the stable revision's Deployment and pods."""
    if observed.invalid is not None or spec is None:
        msg = observed.invalid or "the spec is invalid"
        return Verdict(
            ("False", REASON_INVALID_SPEC, msg),
            ("False", REASON_INVALID_SPEC, msg),
            ("True", REASON_INVALID_SPEC, msg),
        )
    ok: ConditionValue = ("False", REASON_AS_EXPECTED, "all is as expected")
    dep = observed.deployment
    if dep is None:
        msg = "the Deployment does not exist yet"
        degraded = ok
        if observed.api_error is not None:
            degraded = ("True", REASON_API_ERROR, observed.api_error)
        return Verdict(
            ("False", REASON_IN_PROGRESS, msg), ("True", REASON_IN_PROGRESS, msg), degraded
        )
    r = compute_rollout(dep)
    settled = compute_settled(observed.previous, observed.generation)
    problem = compute_problem(spec, observed, r, settled)
    degraded = ("True", problem.reason, problem.message) if problem is not None else ok
    if r.complete:
        if r.desired == 0:
            msg = "scaled to zero replicas as the spec asks: nothing serves the model"
            return Verdict(
                ("False", REASON_SCALED_TO_ZERO, msg), ("False", REASON_COMPLETE, msg), degraded
            )
        msg = f"{r.ready}/{r.desired} replicas ready"
        return Verdict(("True", REASON_READY, msg), ("False", REASON_COMPLETE, msg), degraded)
    numbers = f"{r.updated}/{r.desired} replicas updated, {r.ready}/{r.desired} ready"
    # Progressing: a rollout of this generation is under way, or replicas are being added.
    progressing: ConditionValue
    if problem is not None and problem.reason == REASON_DEADLINE:
        progressing = ("False", REASON_DEADLINE, problem.message)
    elif not settled:
        progressing = ("True", REASON_IN_PROGRESS, f"rolling out: {numbers}")
    elif problem is not None:
        progressing = ("False", problem.reason, problem.message)
    else:
        progressing = ("True", REASON_SCALING, f"scaling to {r.desired}: {numbers}")
    # Ready: this generation serves with at least the replicas the spec requires.
    required = compute_required_replicas(spec)
    ready: ConditionValue
    if settled and 0 < required <= r.ready:
        ready = (
            "True",
            REASON_READY,
            f"{r.ready}/{r.desired} replicas ready ({required} required)",
        )
    elif problem is not None:
        ready = ("False", problem.reason, problem.message)
    else:
        ready = ("False", REASON_IN_PROGRESS, f"rolling out: {numbers}")
    return Verdict(ready, progressing, degraded)


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
    if dep is not None and compute_rollout(dep).complete:
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
        "canary",
        "revisions",
    }
)


def compute_merge_patch(previous: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch for the status subresource: set new values, null what went away."""
    patch: dict[str, Any] = {
        k: _merge_diff(previous.get(k), v) for k, v in new.items() if previous.get(k) != v
    }
    for k in previous:
        if k in _OWN_KEYS and k not in new:
            patch[k] = None
    return patch


def _merge_diff(old: Any, new: Any) -> Any:
    """The merge patch from ``old`` to ``new``: maps key by key (null for a key that went
    away, which a plain merge would keep), anything else replaced whole."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    out = {k: _merge_diff(old.get(k), v) for k, v in new.items() if old.get(k) != v}
    out.update({k: None for k in old if k not in new})
    return out


# ---- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventSpec:
    """A Kubernetes Event to post about the AutoGLMDeployment."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def compute_events(previous: dict[str, Any], new: dict[str, Any]) -> list[EventSpec]:
    """Events for condition transitions (nothing while they hold).

    - Degraded turns True, or its reason changes: a Warning with that reason;
    - Degraded turns False again: a Normal ``Recovered``;
    - otherwise Ready turns True: a Normal ``ReplicasReady``; Ready turns
      ``ScaledToZero``: a Normal ``ScaledToZero``.
    """
    events: list[EventSpec] = []
    old_deg, cur_deg = _condition(previous, "Degraded"), _condition(new, "Degraded")
    old_ready, cur_ready = _condition(previous, "Ready"), _condition(new, "Ready")
    was = old_deg is not None and old_deg.get("status") == "True"
    if cur_deg is not None and cur_deg.get("status") == "True":
        if not was or old_deg is None or old_deg.get("reason") != cur_deg.get("reason"):
            events.append(
                EventSpec("Warning", str(cur_deg["reason"]), str(cur_deg.get("message", "")))
            )
        return events
    if was and old_deg is not None:
        now = str((cur_ready or {}).get("message", ""))
        events.append(
            EventSpec("Normal", REASON_RECOVERED, f"recovered from {old_deg.get('reason')}: {now}")
        )
        return events
    if cur_ready is None:
        return events
    old_key = (old_ready or {}).get("status"), (old_ready or {}).get("reason")
    if (cur_ready.get("status"), cur_ready.get("reason")) == old_key:
        return events
    if cur_ready.get("status") == "True" and old_key[0] != "True":
        events.append(EventSpec("Normal", REASON_READY, str(cur_ready.get("message", ""))))
    elif cur_ready.get("reason") == REASON_SCALED_TO_ZERO:
        events.append(EventSpec("Normal", REASON_SCALED_TO_ZERO, str(cur_ready.get("message", ""))))
    return events


def _condition(status: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in status.get("conditions") or []:
        if c.get("type") == ctype:
            return dict(c)
    return None
