"""One reconcile of one AutoGLMDeployment: the thin I/O shell around the pure core.

    read the object --parse--> spec --build--> children --ensure--> applied
    read children, pods, nodes --compute--> status --patch if changed--> status

Every kopf handler (create, update, resume, timer, child events) ends up here.
A reconcile that finds nothing to change sends no write request.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from .builders import Owner, build_children, build_selector_string, plan_deletions
from .k8s import KubeApi, KubeError
from .spec import API_VERSION, KIND, AutoGLMDeploymentSpec, check_name, parse_spec
from .status import (
    Observed,
    compute_events,
    compute_merge_patch,
    compute_rollout_complete,
    compute_status,
    compute_status_changed,
)


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


def compute_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    api: KubeApi, spec: AutoGLMDeploymentSpec, owner: Owner, outcome: Outcome
) -> str | None:
    """Apply what differs and delete what is no longer wanted; the API's verdict if it rejects a child."""
    for manifest in build_children(spec, owner):
        try:
            result = api.ensure_applied(manifest)
        except KubeError as exc:
            if exc.invalid:
                return f"the API server rejected {manifest['kind']} {manifest['metadata']['name']}: {exc.message}"
            raise
        if result.applied:
            outcome.applied.append(f"{result.kind}/{result.name}")
    for api_version, kind, name in plan_deletions(spec, owner):
        if api.delete_owned(api_version, kind, owner.namespace, name, owner.uid):
            outcome.deleted.append(f"{kind}/{name}")
    return None


def reconcile(api: KubeApi, namespace: str, name: str, *, now: str | None = None) -> Outcome:
    """Bring one AutoGLMDeployment's children and status in line with its spec."""
    body = api.get(API_VERSION, KIND, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return Outcome(found=False)  # gone or going: garbage collection handles the children
    meta = body["metadata"]
    owner = Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
    outcome = Outcome()
    spec, invalid = parse_object(body)
    if spec is not None:
        invalid = ensure_children(api, spec, owner, outcome)
    observed = Observed(
        generation=int(meta.get("generation", 1)),
        previous=dict(body.get("status") or {}),
        invalid=invalid,
    )
    if invalid is None and spec is not None:
        deployment = api.get("apps/v1", "Deployment", owner.namespace, owner.name)
        complete = compute_rollout_complete(deployment)
        # Pods and nodes only matter for telling why a rollout is stuck.
        observed = Observed(
            generation=observed.generation,
            previous=observed.previous,
            deployment=deployment,
            pods=[]
            if complete
            else api.list_objects("v1", "Pod", owner.namespace, build_selector_string(owner)),
            nodes=None if complete else api.list_nodes(),
        )
    outcome.invalid = invalid
    stamp = now or compute_now()
    status = compute_status(spec if invalid is None else None, owner, observed, stamp)
    for cond in status["conditions"]:
        if cond["type"] == "Ready":
            outcome.ready = cond["status"]
    if compute_status_changed(observed.previous, status):
        api.patch_status(
            API_VERSION,
            KIND,
            owner.namespace,
            owner.name,
            compute_merge_patch(observed.previous, status),
        )
        outcome.status_written = True
        for event in compute_events(observed.previous, status):
            api.create_event(body, event.type, event.reason, event.message, stamp)
            outcome.events.append(event.reason)
    return outcome
