"""Compatibility import path: the gRPC front end lives in :mod:`autoglm_server.frontends`
(``grpc_common``: interceptor, health, server; ``grpc_v1``: autoglm.v1;
``kserve_v2``: KServe Open Inference Protocol v2)."""

from autoglm_server.frontends.grpc_common import (
    AUTOGLM_SERVICE,
    HEALTH_NAMES,
    HEALTH_SERVICE,
    INFERENCE_SERVICE,
    MAX_RECEIVE_BYTES,
    MAX_SEND_BYTES,
    ErrorInterceptor,
    HealthServicer,
    build_grpc_server,
    status_for,
)
from autoglm_server.frontends.grpc_v1 import AutoGLMServicer, params_from_pb
from autoglm_server.frontends.kserve_v2 import (
    TEXT_INPUT,
    TEXT_OUTPUT,
    V2_PARAMS,
    InferenceServicer,
    params_from_v2,
)

__all__ = [
    "AUTOGLM_SERVICE",
    "HEALTH_NAMES",
    "HEALTH_SERVICE",
    "INFERENCE_SERVICE",
    "MAX_RECEIVE_BYTES",
    "MAX_SEND_BYTES",
    "TEXT_INPUT",
    "TEXT_OUTPUT",
    "V2_PARAMS",
    "AutoGLMServicer",
    "ErrorInterceptor",
    "HealthServicer",
    "InferenceServicer",
    "build_grpc_server",
    "params_from_pb",
    "params_from_v2",
    "status_for",
]
