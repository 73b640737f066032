"""The operator's own Prometheus metrics (prometheus-client, default registry).

Served by ``start_metrics_server`` from the startup handler on
``AUTOGLM_OPERATOR_METRICS_PORT`` (default 8080; 0 turns it off).
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

RECONCILE_DURATION = Histogram(
    "autoglm_operator_reconcile_duration_seconds",
    "Time one reconcile of an AutoGLMDeployment takes, reads and writes included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RECONCILE_ERRORS = Counter(
    "autoglm_operator_reconcile_errors_total",
    "Reconciles that did not finish, by reason (InvalidSpec, ApiError, Unexpected).",
    ["reason"],
)
MANAGED_OBJECTS = Gauge(
    "autoglm_operator_managed_objects",
    "AutoGLMDeployments this operator instance currently manages.",
)
QUEUE_WAIT = Histogram(
    "autoglm_operator_queue_wait_seconds",
    "Time an AutoGLMDeployment waited in the reconcile work queue before a worker took it.",
    buckets=(0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
QUEUE_DEPTH = Gauge(
    "autoglm_operator_queue_depth",
    "AutoGLMDeployments waiting in the reconcile work queue.",
)
API_WRITES = Counter(
    "autoglm_operator_api_writes_total",
    "Write requests (POST, PUT, PATCH, DELETE) the operator sent to the API server.",
    ["verb", "kind"],
)


def start_metrics_server(port: int) -> bool:
    """Serve /metrics on ``port``; False when the port is 0 (off)."""
    if port <= 0:
        return False
    start_http_server(port)
    log.info("serving operator metrics on :%d", port)
    return True
