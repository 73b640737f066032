"""Compatibility import path: the HTTP front end lives in :mod:`autoglm_server.frontends.openai_http`."""

from autoglm_server.frontends.openai_http import (
    PROMETHEUS_CONTENT_TYPE,
    MetricsRenderer,
    build_http_app,
    build_metrics_app,
    error_body,
    error_response,
)

__all__ = [
    "PROMETHEUS_CONTENT_TYPE",
    "MetricsRenderer",
    "build_http_app",
    "build_metrics_app",
    "error_body",
    "error_response",
]
