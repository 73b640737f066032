"""One reconcile of one AutoGLMDeployment: the thin I/O shell around the pure core.

    the object (cache) --parse--> spec --build, once--> children --ensure--> applied
    children, pods, nodes (cache) --compute--> status --patch if changed--> status

Every kopf handler (object and child events, the resync timer) ends up here.
Reads come from kopf's watch caches (``cache.ClusterView``), never from the API
server; a reconcile that finds nothing to change sends no request at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from .analysis import AnalysisSpec, IntervalResult, pods_regex
from .builders import CHILD_KINDS, Manifest, build_children, plan_deletions
from .cache import OWNER_KIND, ClusterView, build_trimmed_child, build_trimmed_owner
from .canary import (
    ACTION_ANNOTATION,
    Inputs,
    Pods,
    RolloutError,
    RolloutPlan,
    compute_analysis_due,
    compute_next,
    format_time,
)
from .k8s import KubeApi, KubeError
from .owner import REVISION_LABEL, Owner, digests_configmap_name, revision_name
from .spec import API_VERSION, KIND, AutoGLMDeploymentSpec, check_name, parse_spec
from .status import (
    Observed,
    Problem,
    compute_events,
    compute_merge_patch,
    compute_pod_problem,
    compute_rollout_complete,
    compute_status,
    compute_status_changed,
)
from .traffic import TRAFFIC_KINDS

# Measures one analysis interval: (analysis, namespace, stable pods regex, canary pods regex).
Analyzer = Callable[[AnalysisSpec, str, str, str], IntervalResult]

REASON_CONFLICT = "FieldManagerConflict"


@dataclass(slots=True)
class Outcome:
    """What one reconcile did."""

    found: bool = True
    invalid: str | None = None
    applied: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    status_written: bool = False
    events: list[str] = field(default_factory=list)
    ready: str | None = None  # Ready condition: "True"/"False"
    api_error: KubeError | None = None  # a refused request: retry later
    rollout: str | None = None  # the rollout's phase and weights, when there is one
    in_flight: bool = False


def describe_validation_error(exc: ValidationError) -> str:
    """``spec.a.b: message; ...`` naming the fields, as kubectl apply would."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        where = f"spec.{loc}" if loc else "spec"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_object(body: dict[str, Any]) -> tuple[AutoGLMDeploymentSpec | None, str | None]:
    """The parsed spec, or why it can never work."""
    problem = check_name(body["metadata"]["name"])
    if problem is not None:
        return None, problem
    try:
        return parse_spec(body.get("spec") or {}), None
    except ValidationError as exc:
        return None, describe_validation_error(exc)


@dataclass(slots=True)
class Applied:
    """What ensure_children found."""

    invalid: str | None = None  # the API server rejected a child: the spec can never work
    conflicts: list[str] = field(default_factory=list)  # fields taken back from other managers
    traffic_missing: str | None = None  # the provider's resources are not served
    routes_at: float | None = None  # when the routes were written


def ensure_children(
    api: KubeApi,
    view: ClusterView,
    children: list[Manifest],
    owner: Owner,
    outcome: Outcome,
    keep: set[tuple[str, str]] | None = None,
    clock: Callable[[], float] = time.time,
) -> Applied:
    """Apply what differs (in order: the routes first), then delete what is no longer wanted.

    Returns the API server's verdict if it rejects a child (the spec can never
    work), the conflicts with other field managers that the applies overrode,
    and whether the traffic provider's resources are missing (a 404 on apply).
    """
    done = Applied()
    for manifest in children:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        if kind in TRAFFIC_KINDS and done.traffic_missing is not None:
            continue
        try:
            result = api.ensure_applied(manifest, view.child(kind, owner.namespace, name))
        except KubeError as exc:
            if exc.invalid:
                done.invalid = f"the API server rejected {kind} {name}: {exc.message}"
                return done
            if exc.status == 404 and kind in TRAFFIC_KINDS:
                done.traffic_missing = (
                    f"the cluster does not serve {manifest['apiVersion']} {kind} "
                    "(install the traffic provider's CRDs, or choose another spec.traffic.provider)"
                )
                continue
            raise
        if kind in TRAFFIC_KINDS and result.applied:
            done.routes_at = clock()
        if result.applied:
            outcome.applied.append(f"{kind}/{name}")
            if result.body is not None:
                view.writes.record(kind, owner.namespace, name, build_trimmed_child(result.body))
        if result.conflict is not None:
            done.conflicts.append(f"{kind} {name}: {result.conflict}")
    live = {kind: view.child_names(kind, owner.namespace, owner.name) for kind in CHILD_KINDS}
    for api_version, kind, name in plan_deletions(children, owner, live, keep or set()):
        child = view.child(kind, owner.namespace, name)
        if api.delete_owned(api_version, kind, child, owner.uid):
            assert child is not None
            view.writes.record_deleted(kind, owner.namespace, name, child)
            outcome.deleted.append(f"{kind}/{name}")
    return done


def observe_revisions(view: ClusterView, owner: Owner) -> dict[str, Pods]:
    """Each revision's Deployment, by its revision label."""
    out: dict[str, Pods] = {}
    for name in view.child_names("Deployment", owner.namespace, owner.name):
        dep = view.child("Deployment", owner.namespace, name)
        if dep is None:
            continue
        revision = (dep.get("metadata", {}).get("labels") or {}).get(REVISION_LABEL)
        if not revision:
            continue
        st = dep.get("status") or {}
        out[str(revision)] = Pods(
            desired=int(dep.get("spec", {}).get("replicas", 0)),
            ready=int(st.get("readyReplicas", 0)),
            replicas=int(st.get("replicas", 0)),
            exists=True,
        )
    return out


def compute_canary_problem(view: ClusterView, owner: Owner, revision: str | None) -> str | None:
    """Why the canary revision's pods don't run (crash loop, image pull...), if they don't."""
    if revision is None:
        return None
    pods = [
        p
        for p in view.pods(owner.namespace, owner.name)
        if (p.get("metadata", {}).get("labels") or {}).get(REVISION_LABEL) == revision
    ]
    problem = compute_pod_problem(pods)
    return f"{problem.reason}: {problem.message}" if problem is not None else None


def measure_analysis(
    spec: AutoGLMDeploymentSpec,
    previous: dict[str, Any],
    owner: Owner,
    at: float,
    analyzer: Analyzer | None,
) -> IntervalResult | None:
    """This tick's analysis interval, when one is due (the only Prometheus I/O)."""
    due = compute_analysis_due(spec, previous, at)
    canary = previous.get("canary") or {}
    if due is None or analyzer is None:
        return None
    stable = pods_regex(revision_name(owner, str(canary.get("stableRevision"))))
    candidate = pods_regex(revision_name(owner, str(canary.get("canaryRevision"))))
    return analyzer(due, owner.namespace, stable, candidate)


def plan_rollout(
    spec: AutoGLMDeploymentSpec,
    body: dict[str, Any],
    view: ClusterView,
    owner: Owner,
    at: float,
    analyzer: Analyzer | None,
) -> RolloutPlan:
    previous = dict(body.get("status") or {})
    annotations = body.get("metadata", {}).get("annotations") or {}
    in_flight = (previous.get("canary") or {}).get("canaryRevision")
    return compute_next(
        Inputs(
            spec=spec,
            status=previous,
            now=at,
            pods=observe_revisions(view, owner),
            analysis=measure_analysis(spec, previous, owner, at, analyzer),
            action=annotations.get(ACTION_ANNOTATION),
            canary_problem=compute_canary_problem(view, owner, in_flight),
        )
    )


def compute_keep(plan: RolloutPlan, view: ClusterView, owner: Owner) -> set[tuple[str, str]]:
    """Children that stay although no longer built: a draining canary's, and the
    Deployment from before revisions (``<name>``) until the stable revision is Ready."""
    keep: set[tuple[str, str]] = set()
    for revision in plan.keep:
        name = revision_name(owner, revision)
        keep |= {
            ("Deployment", name),
            ("Service", name),
            ("HorizontalPodAutoscaler", name),
            ("ConfigMap", digests_configmap_name(owner, revision)),
        }
    stable = view.child("Deployment", owner.namespace, revision_name(owner, plan.stable.revision))
    if not compute_rollout_complete(stable):
        keep |= {("Deployment", owner.name), ("ConfigMap", digests_configmap_name(owner))}
    return keep


def serving_deployment(
    view: ClusterView, owner: Owner, plan: RolloutPlan | None, spec: AutoGLMDeploymentSpec
) -> Any:
    """The Deployment the conditions describe: the stable revision's (or, while it is
    not complete yet, the one from before revisions, ``<name>``, which still serves).
    A replacement without steps (no spec.canary, or rollbackTo) is the spec's own
    rollout, as a rolling update was: its new revision's Deployment."""
    if plan is None:
        return None
    if plan.in_flight and (spec.canary is None or spec.rollback_to is not None):
        for version in plan.versions:
            if version.role == "canary":
                return view.child(
                    "Deployment", owner.namespace, revision_name(owner, version.revision)
                )
    stable = view.child("Deployment", owner.namespace, revision_name(owner, plan.stable.revision))
    if compute_rollout_complete(stable):
        return stable
    legacy = view.child("Deployment", owner.namespace, owner.name)
    return legacy if compute_rollout_complete(legacy) else stable


def compute_rollout_problem(plan: RolloutPlan | None) -> Problem | None:
    canary = (plan.canary if plan is not None else None) or {}
    if canary.get("phase") in ("Failed", "RolledBack") and canary.get("reason") not in (
        "CanaryRemoved",
        "Superseded",
        "Aborted",
    ):
        return Problem(str(canary.get("reason")), str(canary.get("message", "")))
    return None


def describe_api_error(exc: KubeError) -> str:
    return f"the API server refused a request ({exc.status} {exc.reason}): {exc.message}"[:1024]


def reconcile(
    api: KubeApi,
    view: ClusterView,
    namespace: str,
    name: str,
    now: str,
    *,
    at: float | None = None,
    analyzer: Analyzer | None = None,
    clock: Callable[[], float] = time.time,
) -> Outcome:
    """Bring one AutoGLMDeployment's children and status in line with its spec.

    ``now`` (RFC 3339, UTC) stamps condition transitions and events; ``at``
    (seconds since the epoch, default ``clock()``) drives the rollout machine;
    ``analyzer`` measures an analysis interval when one is due.
    """
    body = view.owner(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Outcome(found=False)  # gone or going: garbage collection handles the children
    at = clock() if at is None else at
    meta = body["metadata"]
    owner = Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
    outcome = Outcome()
    spec, invalid = parse_object(body)
    applied = Applied()
    api_error: str | None = None
    plan: RolloutPlan | None = None
    if spec is not None:
        try:
            plan = plan_rollout(spec, body, view, owner, at, analyzer)
        except (RolloutError, ValidationError) as exc:
            invalid = str(exc) if isinstance(exc, RolloutError) else describe_validation_error(exc)
    if spec is not None and plan is not None and invalid is None:
        children = build_children(spec, owner, plan.versions)
        try:
            applied = ensure_children(
                api, view, children, owner, outcome, compute_keep(plan, view, owner), clock
            )
            invalid = applied.invalid
        except KubeError as exc:
            if not exc.refused:
                raise  # no answer, overloaded or unavailable: nothing to write now; retried
            api_error, outcome.api_error = describe_api_error(exc), exc
    previous = dict(body.get("status") or {})
    observed = Observed(
        generation=int(meta.get("generation", 1)), previous=previous, invalid=invalid
    )
    if invalid is None and spec is not None:
        deployment = serving_deployment(view, owner, plan, spec)
        complete = compute_rollout_complete(deployment)
        # Pods and nodes only matter for telling why a rollout is not complete.
        observed = Observed(
            generation=observed.generation,
            previous=observed.previous,
            deployment=deployment,
            pods=[] if complete else view.pods(owner.namespace, owner.name),
            nodes=None if complete else view.nodes(),
            api_error=api_error,
            rollout=(
                f"rollout {plan.canary.get('phase')}: {plan.canary.get('message', '')}"
                if plan is not None and plan.in_flight and plan.canary is not None
                else None
            ),
            traffic_missing=applied.traffic_missing,
            canary_problem=compute_rollout_problem(plan),
        )
    outcome.invalid = invalid
    status = compute_status(spec if invalid is None else None, owner, observed, now)
    if plan is not None and invalid is None and applied.traffic_missing is None:
        canary = plan.canary
        if canary is not None:
            canary = dict(canary)
            if applied.routes_at is not None and canary.get("weightZeroAt") == format_time(at):
                # When the route with weight 0 was actually written.
                canary["weightZeroAt"] = format_time(applied.routes_at)
            status["canary"] = canary
            outcome.rollout = f"{canary.get('phase')} {plan.weights()}"
            outcome.in_flight = plan.in_flight
        status["revisions"] = plan.revisions
    elif "canary" in previous or "revisions" in previous:
        for key in ("canary", "revisions"):
            if key in previous:
                status[key] = previous[key]
    for cond in status["conditions"]:
        if cond["type"] == "Ready":
            outcome.ready = cond["status"]
    for conflict in applied.conflicts:
        message = f"{conflict} (our fields were applied again)"
        api.create_event(body, "Warning", REASON_CONFLICT, message, now)
        outcome.events.append(REASON_CONFLICT)
    if plan is not None and plan.action_done is not None and invalid is None:
        after = api.remove_annotation(
            API_VERSION, KIND, owner.namespace, owner.name, ACTION_ANNOTATION
        )
        if after:
            view.writes.record(OWNER_KIND, owner.namespace, owner.name, build_trimmed_owner(after))
    if compute_status_changed(previous, status):
        after = api.patch_status(
            API_VERSION,
            KIND,
            owner.namespace,
            owner.name,
            compute_merge_patch(previous, status),
        )
        if after:
            view.writes.record(OWNER_KIND, owner.namespace, owner.name, build_trimmed_owner(after))
        outcome.status_written = True
        for event in compute_events(previous, status):
            api.create_event(body, event.type, event.reason, event.message, now)
            outcome.events.append(event.reason)
        if plan is not None and invalid is None and applied.traffic_missing is None:
            for event in plan.events:
                api.create_event(body, event.type, event.reason, event.message, now)
                outcome.events.append(event.reason)
    return outcome
