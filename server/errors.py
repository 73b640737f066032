"""The server's named exceptions. One interceptor (gRPC) and one exception
handler (HTTP) map them to status codes; anything else is INTERNAL / 500 with
no detail sent to the client."""

from __future__ import annotations


class AutoGLMError(Exception):
    """Base class. ``grpc_code`` names a ``grpc.StatusCode`` member, ``http_status`` the HTTP code."""

    grpc_code = "INTERNAL"
    http_status = 500


class InvalidRequestError(AutoGLMError):
    """A bad request: names the offending field."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 400

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelNotFoundError(AutoGLMError):
    """The request names a model this server does not serve."""

    grpc_code = "NOT_FOUND"
    http_status = 404

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} does not exist")
        self.model = model


class QueueFullError(AutoGLMError):
    """Back-pressure: the waiting queue is full."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnavailableError(AutoGLMError):
    """Not ready yet, draining for shutdown, or the engine loop has died."""

    grpc_code = "UNAVAILABLE"
    http_status = 503


class CancelledError(AutoGLMError):
    """The client cancelled, or the server aborted the request."""

    grpc_code = "CANCELLED"
    http_status = 499


class DeadlineExceededError(AutoGLMError):
    grpc_code = "DEADLINE_EXCEEDED"
    http_status = 504


class ModelLoadError(AutoGLMError):
    """The model can't be loaded (missing files, digest mismatch, bad config).
    Raised at start-up; the process exits non-zero with this message."""
