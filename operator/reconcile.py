"""One reconcile of one AutoGLMDeployment: the thin I/O shell around the pure core.

    the object (cache) --parse--> spec --build, once--> children --ensure--> applied
    children, pods, nodes (cache) --compute--> status --patch if changed--> status

Every kopf handler (object and child events, the resync timer) ends up here.
Reads come from kopf's watch caches (``cache.ClusterView``), never from the API
server; a reconcile that finds nothing to change sends no request at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from .builders import Manifest, build_children, plan_deletions
from .cache import OWNER_KIND, ClusterView, build_trimmed_child, build_trimmed_owner
from .k8s import KubeApi, KubeError
from .owner import Owner
from .spec import API_VERSION, KIND, AutoGLMDeploymentSpec, check_name, parse_spec
from .status import (
    Observed,
    compute_events,
    compute_merge_patch,
    compute_rollout_complete,
    compute_status,
    compute_status_changed,
)

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


def ensure_children(
    api: KubeApi,
    view: ClusterView,
    children: list[Manifest],
    owner: Owner,
    outcome: Outcome,
) -> tuple[str | None, list[str]]:
    """Apply what differs and delete what is no longer wanted.

    Returns the API server's verdict if it rejects a child (the spec can never
    work), and the conflicts with other field managers that the applies overrode.
    """
    conflicts: list[str] = []
    for manifest in children:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        try:
            result = api.ensure_applied(manifest, view.child(kind, owner.namespace, name))
        except KubeError as exc:
            if exc.invalid:
                return f"the API server rejected {kind} {name}: {exc.message}", conflicts
            raise
        if result.applied:
            outcome.applied.append(f"{kind}/{name}")
            if result.body is not None:
                view.writes.record(kind, owner.namespace, name, build_trimmed_child(result.body))
        if result.conflict is not None:
            conflicts.append(f"{kind} {name}: {result.conflict}")
    for api_version, kind, name in plan_deletions(children, owner):
        live = view.child(kind, owner.namespace, name)
        if api.delete_owned(api_version, kind, live, owner.uid):
            assert live is not None
            view.writes.record_deleted(kind, owner.namespace, name, live)
            outcome.deleted.append(f"{kind}/{name}")
    return None, conflicts


def describe_api_error(exc: KubeError) -> str:
    return f"the API server refused a request ({exc.status} {exc.reason}): {exc.message}"[:1024]


def reconcile(api: KubeApi, view: ClusterView, namespace: str, name: str, now: str) -> Outcome:
    """Bring one AutoGLMDeployment's children and status in line with its spec.

    ``now`` (RFC 3339, UTC) stamps condition transitions and events.
    """
    body = view.owner(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Outcome(found=False)  # gone or going: garbage collection handles the children
    meta = body["metadata"]
    owner = Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
    outcome = Outcome()
    spec, invalid = parse_object(body)
    conflicts: list[str] = []
    api_error: str | None = None
    if spec is not None:
        children = build_children(spec, owner)
        try:
            invalid, conflicts = ensure_children(api, view, children, owner, outcome)
        except KubeError as exc:
            if not exc.refused:
                raise  # no answer, overloaded or unavailable: nothing to write now; retried
            api_error, outcome.api_error = describe_api_error(exc), exc
    observed = Observed(
        generation=int(meta.get("generation", 1)),
        previous=dict(body.get("status") or {}),
        invalid=invalid,
    )
    if invalid is None and spec is not None:
        deployment = view.child("Deployment", owner.namespace, owner.name)
        complete = compute_rollout_complete(deployment)
        # Pods and nodes only matter for telling why a rollout is not complete.
        observed = Observed(
            generation=observed.generation,
            previous=observed.previous,
            deployment=deployment,
            pods=[] if complete else view.pods(owner.namespace, owner.name),
            nodes=None if complete else view.nodes(),
            api_error=api_error,
        )
    outcome.invalid = invalid
    status = compute_status(spec if invalid is None else None, owner, observed, now)
    for cond in status["conditions"]:
        if cond["type"] == "Ready":
            outcome.ready = cond["status"]
    for conflict in conflicts:
        message = f"{conflict} (our fields were applied again)"
        api.create_event(body, "Warning", REASON_CONFLICT, message, now)
        outcome.events.append(REASON_CONFLICT)
    if compute_status_changed(observed.previous, status):
        after = api.patch_status(
            API_VERSION,
            KIND,
            owner.namespace,
            owner.name,
            compute_merge_patch(observed.previous, status),
        )
        if after:
            view.writes.record(OWNER_KIND, owner.namespace, owner.name, build_trimmed_owner(after))
        outcome.status_written = True
        for event in compute_events(observed.previous, status):
            api.create_event(body, event.type, event.reason, event.message, now)
            outcome.events.append(event.reason)
    return outcome
