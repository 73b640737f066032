"""kopf entry points: a few lines each, all ending in ``reconcile()``.

Run with::

    kopf run --all-namespaces -m autoglm_operator.handlers      # or --namespace=a --namespace=b

Settings come from the environment:
- ``AUTOGLM_OPERATOR_RESYNC_SECONDS`` (30): the timer period, so drift is
  repaired within it; child watches usually repair it at once;
- ``AUTOGLM_OPERATOR_METRICS_PORT`` (8080, 0 is off): Prometheus metrics;
- ``AUTOGLM_OPERATOR_PEERING`` (``autoglm-operator``): the kopf peering
  object used for leader election (``--standalone`` turns peering off);
- ``AUTOGLM_OPERATOR_PRIORITY`` (start time): this instance's peering
  priority; the highest one is the leader, the others stand by;
- ``AUTOGLM_OPERATOR_LOG_FORMAT`` (``json``): ``json`` or ``text``.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import kopf

from . import metrics
from .builders import MANAGED_BY
from .k8s import FIELD_MANAGER, KubeApi, KubeError
from .reconcile import Outcome, reconcile
from .spec import GROUP, KIND, PLURAL, VERSION
from .ssa import compute_caused_by

RESYNC_SECONDS = float(os.environ.get("AUTOGLM_OPERATOR_RESYNC_SECONDS", "30"))
ANNOTATION_PREFIX = "operator.autoglm.io"
CHILD_SELECTOR = {"app.kubernetes.io/managed-by": MANAGED_BY}
CHILD_RESOURCES = (
    ("apps", "v1", "deployments"),
    ("", "v1", "services"),
    ("", "v1", "configmaps"),
    ("autoscaling", "v2", "horizontalpodautoscalers"),
    ("policy", "v1", "poddisruptionbudgets"),
)


@dataclass(slots=True)
class _Slot:
    """Per-object bookkeeping: one reconcile at a time, child events coalesced."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    queued: bool = False  # a child-triggered reconcile waits for the lock


_slots: dict[tuple[str, str], _Slot] = {}
_slots_guard = threading.Lock()
_managed: set[str] = set()


def _slot_for(namespace: str, name: str) -> _Slot:
    with _slots_guard:
        return _slots.setdefault((namespace, name), _Slot())


def run_reconcile(
    api: KubeApi, namespace: str, name: str, logger: Any, *, coalesced: bool = False
) -> Outcome:
    """reconcile() with metrics, one at a time per object, and errors mapped for kopf."""
    slot = _slot_for(namespace, name)
    started = time.monotonic()
    try:
        with slot.lock:
            if coalesced:
                with _slots_guard:
                    slot.queued = False  # events from now on need another reconcile
            outcome = reconcile(api, namespace, name)
    except KubeError as exc:
        metrics.RECONCILE_ERRORS.labels(reason="ApiError").inc()
        raise kopf.TemporaryError(
            f"API request failed: {exc}", delay=5 if exc.status in (0, 409, 429) else 15
        ) from exc
    except Exception as exc:  # never crash-loop: unknown trouble is retried later
        metrics.RECONCILE_ERRORS.labels(reason="Unexpected").inc()
        logger.exception("reconcile failed unexpectedly")
        raise kopf.TemporaryError(f"unexpected error: {exc!r}", delay=30) from exc
    finally:
        metrics.RECONCILE_DURATION.observe(time.monotonic() - started)
    if outcome.invalid is not None:
        metrics.RECONCILE_ERRORS.labels(reason="InvalidSpec").inc()
    if outcome.applied or outcome.deleted or outcome.status_written:
        logger.info(
            "reconciled: applied=%s deleted=%s status_written=%s ready=%s",
            outcome.applied,
            outcome.deleted,
            outcome.status_written,
            outcome.ready,
        )
    return outcome


def compute_priority(configured: str | None, started_ms: int, jitter: int) -> int:
    """This instance's peering priority: as configured, else by start time.

    kopf pauses every instance that sees a peer of higher *or equal* priority,
    so replicas need distinct priorities to elect one leader. By start time,
    the newest instance leads: a rolling update hands over at once, and when
    the leader exits it removes itself from the peering object and the next
    one resumes. ``jitter`` (0-999) separates instances started in the same ms.
    """
    if configured:
        return int(configured)
    return started_ms * 1000 + jitter


@kopf.on.startup()
def on_startup(settings: kopf.OperatorSettings, memo: Any, logger: Any, **_: Any) -> None:
    if os.environ.get("AUTOGLM_OPERATOR_LOG_FORMAT", "json") == "json":
        verbose = logging.getLogger().level <= logging.DEBUG
        kopf.configure(log_format=kopf.LogFormat.JSON, verbose=verbose)
    # Progress and the diff base go to annotations under our prefix, not status.kopf.
    settings.persistence.finalizer = f"{ANNOTATION_PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    # Events are posted explicitly (on condition transitions), not from log lines.
    settings.posting.loggers = False
    settings.posting.level = logging.WARNING
    # Leader election: instances share one peering object; the highest priority runs.
    if not settings.peering.standalone:
        settings.peering.name = os.environ.get("AUTOGLM_OPERATOR_PEERING", "autoglm-operator")
        settings.peering.priority = compute_priority(
            os.environ.get("AUTOGLM_OPERATOR_PRIORITY"),
            started_ms=int(time.time() * 1000),
            jitter=random.randrange(1000),
        )
        settings.peering.mandatory = True
    settings.watching.server_timeout = 300
    memo.api = KubeApi.from_environment()
    port = int(os.environ.get("AUTOGLM_OPERATOR_METRICS_PORT", "8080"))
    metrics.start_metrics_server(port)
    logger.info("autoglm operator started (resync every %.0fs)", RESYNC_SECONDS)


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
def on_change(namespace: str | None, name: str, memo: Any, logger: Any, **_: Any) -> None:
    assert namespace is not None  # the resource is namespaced
    outcome = run_reconcile(memo.api, namespace, name, logger)
    if outcome.invalid is not None:
        raise kopf.PermanentError(f"{KIND} can never work as specified: {outcome.invalid}")


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def on_timer(namespace: str | None, name: str, memo: Any, logger: Any, **_: Any) -> None:
    # No PermanentError here: it would stop the timer, and with it drift repair.
    assert namespace is not None
    run_reconcile(memo.api, namespace, name, logger)


@kopf.on.event(GROUP, VERSION, PLURAL)
def on_object_event(type: str, uid: str, namespace: str | None, name: str, **_: Any) -> None:
    if type == "DELETED":
        _managed.discard(uid)
        with _slots_guard:
            _slots.pop((namespace or "", name), None)
    else:
        _managed.add(uid)
    metrics.MANAGED_OBJECTS.set(len(_managed))


def _controller_owner(body: Any) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if (
            ref.get("kind") == KIND
            and ref.get("apiVersion", "").startswith(f"{GROUP}/")
            and ref.get("controller")
        ):
            return str(ref.get("name"))
    return None


def on_child_event(
    type: str | None, body: Any, namespace: str | None, memo: Any, logger: Any, **_: Any
) -> None:
    """A child changed or went away: reconcile its owner now rather than at the next tick."""
    owner = _controller_owner(body)
    if owner is None or namespace is None:
        return
    if type != "DELETED" and compute_caused_by(body, FIELD_MANAGER):
        return  # the echo of our own apply: nothing new to see
    slot = _slot_for(namespace, owner)
    with _slots_guard:
        if slot.queued:
            return  # a reconcile is already waiting; it reads the state after this event
        slot.queued = True
    try:
        run_reconcile(memo.api, namespace, owner, logger, coalesced=True)
    except kopf.TemporaryError as exc:
        logger.warning("reconcile after a child event failed; the timer retries: %s", exc)


for _group, _version, _plural in CHILD_RESOURCES:
    kopf.on.event(_group, _version, _plural, labels=CHILD_SELECTOR, id=f"child-{_plural}")(
        on_child_event
    )
