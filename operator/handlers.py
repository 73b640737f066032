"""kopf entry points: a few lines each, all ending in ``reconcile()``.

Run with::

    kopf run --all-namespaces -m autoglm_operator.handlers      # or --namespace=a --namespace=b

Settings come from ``AUTOGLM_OPERATOR_*`` environment variables, read once
into ``settings.Settings`` (see there and README.md).

What kopf watches, and why:
- AutoGLMDeployments: every event reconciles the object (level-based; the
  echo of our own status patch is skipped), and a timer resyncs each one;
- the five child kinds, server pods and nodes: ``@kopf.index`` keeps them in
  memory (``cache.ClusterView`` reads them: a reconcile sends no GET), and a
  child or pod event reconciles its owner at once.
There are no create/update handlers: they would make kopf write progress
annotations on every change; the event handler covers both.

Handlers do not reconcile themselves: they add the object's key to the work
queue (``workqueue.WorkQueue``) and return, and ``WORKERS`` threads run the
reconciles, one at a time per object, triggers coalesced.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import logging
import os
import random
import time
from collections.abc import Mapping
from typing import Any

import kopf

from . import metrics
from .analysis import AnalysisSpec, IntervalResult, Verdict, evaluate, measure_blocking
from .cache import (
    BY_INSTANCE,
    CHILD_INDEXES,
    NODE_INDEX,
    NODES_KEY,
    OWNER_INDEX,
    OWNER_KIND,
    POD_INDEX,
    ClusterView,
    WriteLog,
    build_trimmed_child,
    build_trimmed_node,
    build_trimmed_owner,
    build_trimmed_pod,
)
from .canary import ACTION_ANNOTATION, IN_FLIGHT
from .k8s import FIELD_MANAGER, KubeApi, KubeError
from .owner import INSTANCE_LABEL, MANAGED_BY, MANAGED_BY_LABEL
from .reconcile import Outcome, reconcile
from .settings import PREFIX, Settings
from .spec import GROUP, KIND, PLURAL, VERSION
from .ssa import compute_caused_by
from .workqueue import WorkQueue

SETTINGS = Settings.from_environ(os.environ)
ANNOTATION_PREFIX = "operator.autoglm.io"
CHILD_SELECTOR = {MANAGED_BY_LABEL: MANAGED_BY}
# (group, version, plural, kind) of every child kind
CHILD_RESOURCES = (
    ("apps", "v1", "deployments", "Deployment"),
    ("", "v1", "services", "Service"),
    ("", "v1", "configmaps", "ConfigMap"),
    ("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler"),
    ("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget"),
    ("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy"),
    ("gateway.networking.k8s.io", "v1", "grpcroutes", "GRPCRoute"),
    ("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute"),
    ("networking.istio.io", "v1beta1", "virtualservices", "VirtualService"),
    ("networking.istio.io", "v1beta1", "destinationrules", "DestinationRule"),
)
INDEX_NAMES = (OWNER_INDEX, POD_INDEX, NODE_INDEX, *CHILD_INDEXES.values())
M_ARENA_MAX = -8  # glibc's mallopt parameter
log = logging.getLogger(__name__)


def compute_timestamp(moment: datetime.datetime) -> str:
    """RFC 3339 in UTC, second precision, as conditions and events carry it (pure)."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_clock() -> str:
    return compute_timestamp(datetime.datetime.now(datetime.UTC))


_managed: set[str] = set()


def build_view(memo: Any, kwargs: Mapping[str, Any]) -> ClusterView:
    """The cache view for one reconcile: kopf's indexes (handler kwargs) and our write log."""
    return ClusterView({k: kwargs[k] for k in INDEX_NAMES if k in kwargs}, memo.writes)


def process_key(memo: Any, key: tuple[str, str]) -> float | None:
    """One reconcile from the work queue; the seconds until a retry when it failed.

    kopf's indexes are live mappings: those captured from any handler's
    arguments (``memo.indexes``) show the cache as it is now.
    """
    namespace, name = key
    view = ClusterView(memo.indexes, memo.writes)
    try:
        run_reconcile(memo.api, view, namespace, name, log)
    except kopf.TemporaryError as exc:
        log.warning("%s/%s: reconcile failed, retried in %ss: %s", namespace, name, exc.delay, exc)
        return float(exc.delay or 15)
    return None


def run_reconcile(
    api: KubeApi,
    view: ClusterView,
    namespace: str,
    name: str,
    logger: Any,
) -> Outcome:
    """reconcile() with metrics and errors mapped for kopf. One at a time per object:
    the work queue never hands a key to two workers."""
    started = time.monotonic()
    try:
        outcome = reconcile(api, view, namespace, name, read_clock(), analyzer=analyze)
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
    if outcome.applied or outcome.deleted or outcome.events:
        log.info(
            "%s/%s reconciled: applied=%s deleted=%s status_written=%s ready=%s events=%s "
            "rollout=%s",
            namespace,
            name,
            outcome.applied,
            outcome.deleted,
            outcome.status_written,
            outcome.ready,
            outcome.events,
            outcome.rollout,
        )
    if outcome.api_error is not None:
        metrics.RECONCILE_ERRORS.labels(reason="ApiError").inc()
        raise kopf.TemporaryError(f"API request refused: {outcome.api_error}", delay=15)
    return outcome


def analyze(
    spec: AnalysisSpec, namespace: str, stable_pods: str, canary_pods: str
) -> IntervalResult:
    """One analysis interval against the configured Prometheus (a worker thread's own loop)."""
    url = SETTINGS.prometheus_url
    if not url:
        return IntervalResult(
            Verdict.INCONCLUSIVE,
            f"no Prometheus to ask: set {PREFIX}PROMETHEUS_URL (the chart's operator.prometheusUrl)",
            time.time(),
        )
    sample = measure_blocking(url, spec, namespace, stable_pods, canary_pods)
    return evaluate(spec, sample)


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


def compute_peering_plural(clusterwide: bool) -> str:
    return "clusterkopfpeerings" if clusterwide else "kopfpeerings"


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas (``mallopt(M_ARENA_MAX, arenas)``); False where that
    is not possible (another libc, or ``arenas`` 0). Call before the worker threads start."""
    if arenas <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


@kopf.on.startup()
def on_startup(settings: kopf.OperatorSettings, memo: Any, logger: Any, **_: Any) -> None:
    cfg = SETTINGS
    limit_malloc_arenas(cfg.malloc_arenas)
    verbose = logging.getLogger().level <= logging.DEBUG
    if cfg.log_format == "json":
        kopf.configure(log_format=kopf.LogFormat.JSON, verbose=verbose)
    if not verbose:
        # kopf logs a line per handler call ("Handler ... succeeded"): at 1,000
        # objects that is most of the operator's CPU. Warnings and errors stay;
        # `kopf run --verbose` brings the lines back.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # kopf's own state (only the finalizer that its timers need) under our prefix.
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
    # kopf's thread pool only runs the handlers, which add a key to the work queue
    # and return; the reconciles run on the queue's own WORKERS threads.
    settings.execution.max_workers = 4
    settings.watching.server_timeout = 300
    api = KubeApi.from_environment(qps=cfg.api_qps, burst=cfg.api_burst, pool=cfg.workers + 4)
    memo.api = api
    memo.writes = WriteLog()
    memo.indexes = {}
    queue: WorkQueue[tuple[str, str]] = WorkQueue(
        lambda key: process_key(memo, key),
        cfg.workers,
        on_wait=metrics.QUEUE_WAIT.observe,
    )
    metrics.QUEUE_DEPTH.set_function(lambda: len(queue))
    queue.start()
    memo.queue = queue
    # Leader election: instances share one peering object; the highest priority runs.
    if not settings.peering.standalone:
        settings.peering.name = cfg.peering
        settings.peering.lifetime = cfg.peering_lifetime
        settings.peering.priority = compute_priority(
            str(cfg.priority) if cfg.priority is not None else None,
            started_ms=int(time.time() * 1000),
            jitter=random.randrange(1000),
        )
        plural = compute_peering_plural(settings.peering.clusterwide)
        # Not mandatory: without the peering CRD, kopf runs standalone (and starts
        # peering if the CRD appears later) instead of waiting silently forever.
        settings.peering.mandatory = False
        if not api.has_resource("kopf.dev/v1", plural):
            logger.warning(
                "the kopf peering CRD (%s.kopf.dev) is missing, so this instance runs "
                "WITHOUT leader election: run only one, or install the CRDs "
                "(kubectl apply --server-side -f charts/autoglm/crds/kopf-peering.yaml) "
                "and create the %s %r; --standalone silences this warning",
                plural,
                "ClusterKopfPeering" if settings.peering.clusterwide else "KopfPeering",
                cfg.peering,
            )
    metrics.start_metrics_server(cfg.metrics_port)
    logger.info(
        "autoglm operator started (resync every %.0fs, %d workers, %.0f requests/s, burst %d)",
        cfg.resync_seconds,
        cfg.workers,
        cfg.api_qps,
        cfg.api_burst,
    )


@kopf.on.cleanup()
def on_cleanup(memo: Any, **_: Any) -> None:
    """Take no new reconciles; let those that run finish (briefly)."""
    queue = getattr(memo, "queue", None)
    if queue is not None:
        queue.stop(timeout=10)


# ---- the watch caches (kopf fills them before any handler runs) --------------------------


@kopf.index(GROUP, VERSION, PLURAL, id=OWNER_INDEX)
async def owner_index(namespace: str | None, name: str, body: Any, **_: Any) -> Any:
    return {(namespace, name): build_trimmed_owner(body)}


async def child_index(namespace: str | None, name: str, body: Any, labels: Any, **_: Any) -> Any:
    out: dict[Any, Any] = {(namespace, name): build_trimmed_child(body)}
    instance = labels.get(INSTANCE_LABEL)
    if instance is not None:
        out[(BY_INSTANCE, namespace, instance)] = name
    return out


for _group, _version, _plural, _kind in CHILD_RESOURCES:
    kopf.index(_group, _version, _plural, labels=CHILD_SELECTOR, id=CHILD_INDEXES[_kind])(
        child_index
    )


@kopf.index("", "v1", "pods", labels=CHILD_SELECTOR, id=POD_INDEX)
async def pod_index(namespace: str | None, labels: Any, body: Any, **_: Any) -> Any:
    instance = labels.get(INSTANCE_LABEL)
    if instance is None:
        return None
    return {(namespace, instance): build_trimmed_pod(body)}


@kopf.index("", "v1", "nodes", id=NODE_INDEX)
async def node_index(body: Any, **_: Any) -> Any:
    return {NODES_KEY: build_trimmed_node(body)}


# ---- the AutoGLMDeployment -------------------------------------------------------------


def compute_own_echo(body: Mapping[str, Any]) -> bool:
    """True for the event of our own status patch: nothing new to act on."""
    status = body.get("status") or {}
    generation = body.get("metadata", {}).get("generation")
    return status.get("observedGeneration") == generation and compute_caused_by(
        dict(body), FIELD_MANAGER
    )


@kopf.on.event(GROUP, VERSION, PLURAL)
def on_object_event(
    type: str | None,
    uid: str,
    namespace: str | None,
    name: str,
    body: Any,
    memo: Any,
    logger: Any,
    **kwargs: Any,
) -> None:
    if type == "DELETED":
        _managed.discard(uid)
        memo.writes.discard(OWNER_KIND, namespace or "", name)
        metrics.MANAGED_OBJECTS.set(len(_managed))
        return
    _managed.add(uid)
    metrics.MANAGED_OBJECTS.set(len(_managed))
    assert namespace is not None  # the resource is namespaced
    if type is not None and compute_own_echo(body):
        return  # (type None: the listing at start or after a reconnect; always reconcile)
    reconcile_soon(memo, kwargs, namespace, name, logger)


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    interval=SETTINGS.resync_seconds,
    initial_delay=SETTINGS.resync_seconds,
)
def on_timer(namespace: str | None, name: str, memo: Any, logger: Any, **kwargs: Any) -> None:
    assert namespace is not None
    reconcile_soon(memo, kwargs, namespace, name, logger)


def rollout_in_flight(status: Any, annotations: Any, **_: Any) -> bool:
    """The fast timer runs only while a rollout moves (or an action waits to be handled)."""
    phase = ((status or {}).get("canary") or {}).get("phase")
    return phase in IN_FLIGHT or ACTION_ANNOTATION in (annotations or {})


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    id="rollout",
    interval=SETTINGS.rollout_tick_seconds,
    when=rollout_in_flight,
)
def on_rollout_tick(
    namespace: str | None, name: str, memo: Any, logger: Any, **kwargs: Any
) -> None:
    """Pause durations, analysis intervals and deadlines need time to pass, not events."""
    assert namespace is not None
    reconcile_soon(memo, kwargs, namespace, name, logger)


# ---- children and pods -------------------------------------------------------------------


def _controller_owner(body: Any) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if (
            ref.get("kind") == KIND
            and ref.get("apiVersion", "").startswith(f"{GROUP}/")
            and ref.get("controller")
        ):
            return str(ref.get("name"))
    return None


def enqueue(memo: Any, kwargs: Mapping[str, Any], namespace: str, name: str) -> bool:
    """Add the object to the work queue; False when there is none (handlers called
    directly, as unit tests do: they then reconcile in the calling thread)."""
    queue = getattr(memo, "queue", None)
    if queue is None:
        return False
    if len(memo.indexes) < len(INDEX_NAMES):
        memo.indexes.update({k: kwargs[k] for k in INDEX_NAMES if k in kwargs})
    queue.add((namespace, name))
    return True


def reconcile_soon(
    memo: Any, kwargs: Mapping[str, Any], namespace: str, owner: str, logger: Any
) -> None:
    """Reconcile ``owner`` soon, unless a reconcile of it already waits (it will see this event).

    Every trigger (object, child and pod events, the timers) goes through the
    work queue's coalescing, so an object waits there at most once. Without a
    queue (handlers called directly, as unit tests do) it reconciles now.
    """
    if enqueue(memo, kwargs, namespace, owner):
        return
    try:
        run_reconcile(memo.api, build_view(memo, kwargs), namespace, owner, logger)
    except kopf.TemporaryError as exc:
        logger.warning("reconcile failed; the timer retries: %s", exc)


def on_child_event(
    type: str | None,
    body: Any,
    namespace: str | None,
    name: str,
    memo: Any,
    logger: Any,
    **kwargs: Any,
) -> None:
    """A child changed or went away: reconcile its owner now rather than at the next tick."""
    owner = _controller_owner(body)
    if owner is None or namespace is None or type is None:
        return  # type None: the listing; the owner's own listing event reconciles it
    if type == "DELETED":
        memo.writes.discard(str(body.get("kind", "")), namespace, name)
    elif compute_caused_by(body, FIELD_MANAGER):
        return  # the echo of our own apply: nothing new to see
    reconcile_soon(memo, kwargs, namespace, owner, logger)


for _group, _version, _plural, _kind in CHILD_RESOURCES:
    kopf.on.event(_group, _version, _plural, labels=CHILD_SELECTOR, id=f"child-{_plural}")(
        on_child_event
    )


@kopf.on.event("", "v1", "pods", labels=CHILD_SELECTOR)
def on_pod_event(
    type: str | None, namespace: str | None, labels: Any, memo: Any, logger: Any, **kwargs: Any
) -> None:
    """A server pod changed (started, became ready, crashed, went away): its owner's status may too."""
    owner = labels.get(INSTANCE_LABEL)
    if owner is None or namespace is None or type is None:
        return
    reconcile_soon(memo, kwargs, namespace, owner, logger)
