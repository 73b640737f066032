"""What the gRPC services share: the one error interceptor, deadlines, health, the server.

Servicers raise :mod:`autoglm_server.errors` exceptions; :class:`ErrorInterceptor`
turns them into status codes in one place, so every RPC maps the same failure
to the same code and no stack trace ever reaches a client. It also parses
requests itself: a message protobuf refuses (a string field that is not
UTF-8) is answered INVALID_ARGUMENT naming the field, not UNKNOWN. Every
outcome the engine did not count is counted here (``ServerState.record_rejection``).

Cancellation and deadlines: a client cancel (or a dropped connection) cancels
the handler task; a deadline runs out through ``asyncio.timeout`` on
``context.time_remaining()``. Both leave the ``GenerationStream`` block, which
aborts the engine request, so the batch slot is free before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from autoglm_server.engine.api import AsyncEngine, GenerationRequest
from autoglm_server.errors import (
    AutoGLMError,
    DeadlineExceededError,
    InvalidRequestError,
    QueueFullError,
)
from autoglm_server.frontend import GenerationStream, Phase, ServerState, outcome_code
from autoglm_server.frontends.wire import find_bad_field
from autoglm_server.proto import grpc_predict_v2_pb2 as v2
from autoglm_server.proto.autoglm.v1 import autoglm_pb2 as pb
from autoglm_server.security.keys import KeyGuard, Ticket, bearer, current_ticket, grpc_scope

logger = logging.getLogger(__name__)

AUTOGLM_SERVICE = pb.DESCRIPTOR.services_by_name["AutoGLM"].full_name
INFERENCE_SERVICE = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Health answers for the whole server ("") and for the generation service.
HEALTH_NAMES = ("", AUTOGLM_SERVICE)
# Requests are a prompt and a few knobs; a larger message is refused by gRPC
# (RESOURCE_EXHAUSTED) before it is parsed. Prompt text is capped further by
# validation.max_prompt_chars.
MAX_RECEIVE_BYTES = 4 * 1024 * 1024
MAX_SEND_BYTES = 64 * 1024 * 1024
_DEADLINE_SLACK_S = 0.25


# --------------------------------------------------------------------------- errors


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one mapping from exceptions to gRPC status. Unknown errors say nothing more."""
    if isinstance(exc, AutoGLMError):
        code = getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)
        return code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error"


async def _abort_with(
    context: grpc.aio.ServicerContext[Any, Any], exc: Exception, method: str, state: ServerState
) -> None:
    state.record_rejection(exc)
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        logger.error("internal error in %s", method, exc_info=exc)
    else:
        logger.debug("%s -> %s: %s", method, code.name, message)
    if isinstance(exc, QueueFullError):
        context.set_trailing_metadata(retry_metadata(code, message, exc.retry_after_s))
    await context.abort(code, message)


def retry_metadata(
    code: grpc.StatusCode, message: str, retry_after_s: float
) -> tuple[tuple[str, str | bytes], ...]:
    """When to retry, twice: gRPC's rich error model (``google.rpc.RetryInfo`` in
    ``grpc-status-details-bin``, what Google's client libraries read) and a plain
    ``retry-after`` (seconds) for everyone else."""
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(retry_after_s * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return (
        ("grpc-status-details-bin", status.SerializeToString()),
        ("retry-after", f"{retry_after_s:.3g}"),
    )


class _Unparsable:
    """Stands in for a request protobuf refused; the guarded handler reports it."""

    def __init__(self, error: InvalidRequestError) -> None:
        self.error = error


def _tolerant(deserializer: Any) -> Any:
    """A deserializer that hands a refused message on as :class:`_Unparsable`."""
    if deserializer is None:
        return None
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # google.protobuf.message.DecodeError
            field = find_bad_field(descriptor, data) if descriptor is not None else None
            if field is not None:
                return _Unparsable(InvalidRequestError(field, "must be valid UTF-8 text"))
            logger.debug("unparsable request: %s", exc)
            return _Unparsable(InvalidRequestError("request", "is not a valid message"))

    return parse


class _Guard:
    """The API-key check of one RPC (None: no keys configured)."""

    def __init__(self, keys: KeyGuard | None, method: str) -> None:
        self._keys = keys
        self._scope = grpc_scope(method)

    def admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> Ticket | None:
        if self._keys is None:
            return None
        token = None
        for name, value in context.invocation_metadata() or ():
            if name == "authorization" and isinstance(value, str):
                token = bearer(value)
        ticket = self._keys.admit(token, self._scope)
        current_ticket.set(ticket)
        return ticket


def _release(ticket: Ticket | None, exc: BaseException | None) -> None:
    if ticket is not None:
        ticket.release("OK" if exc is None else outcome_code(exc))


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps exceptions raised by our servicers to status codes (see :func:`status_for`),
    and checks API keys first when ``keys`` is given (health and reflection stay open)."""

    _PREFIXES = (f"/{AUTOGLM_SERVICE}/", f"/{INFERENCE_SERVICE}/")

    def __init__(self, state: ServerState, keys: KeyGuard | None = None) -> None:
        self._state = state
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(self._PREFIXES):
            return handler
        deserializer = _tolerant(handler.request_deserializer)
        guard = _Guard(self._keys, method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary, method, self._state, guard),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, method, self._state, guard),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _guard_unary(behavior: Any, method: str, state: ServerState, guard: _Guard) -> Any:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        ticket = None
        try:
            ticket = guard.admit(context)
            if isinstance(request, _Unparsable):
                raise request.error
            result = await behavior(request, context)
            _release(ticket, None)
            return result
        except grpc.aio.AbortError as exc:
            _release(ticket, exc)
            raise
        except BaseException as exc:
            _release(ticket, exc)
            if not isinstance(exc, Exception):
                raise
            await _abort_with(context, exc, method, state)

    return guarded


def _guard_stream(behavior: Any, method: str, state: ServerState, guard: _Guard) -> Any:
    if inspect.isasyncgenfunction(behavior):

        async def guarded_gen(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            ticket = None
            try:
                ticket = guard.admit(context)
                if isinstance(request, _Unparsable):
                    raise request.error
                async for item in behavior(request, context):
                    yield item
                _release(ticket, None)
            except grpc.aio.AbortError as exc:
                _release(ticket, exc)
                raise
            except BaseException as exc:
                _release(ticket, exc)
                if not isinstance(exc, Exception):
                    raise
                await _abort_with(context, exc, method, state)

        return guarded_gen
    return _guard_unary(behavior, method, state, guard)


def engine_stream(
    engine: AsyncEngine, gen: GenerationRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> GenerationStream:
    """The engine stream of one RPC; an abort after the deadline counts as DEADLINE_EXCEEDED."""

    def deadline_passed() -> bool:
        # The client's deadline fires before the server's (which started when the
        # request arrived): a cancel that comes just before the server's own
        # deadline is the client's deadline, not a cancel.
        remaining = context.time_remaining()
        return remaining is not None and remaining <= _DEADLINE_SLACK_S

    return GenerationStream(engine, gen, deadline_passed=deadline_passed)


@contextlib.asynccontextmanager
async def deadline(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
    """Enforce the client's deadline on the work inside, as DeadlineExceededError."""
    try:
        async with asyncio.timeout(context.time_remaining()):
            yield
    except TimeoutError:
        raise DeadlineExceededError("deadline exceeded") from None


def max_new_tokens_for(explicit: int | None, default: int, room: int, field: str) -> int:
    """An explicit limit must fit what the context leaves (INVALID_ARGUMENT); a default is capped."""
    if explicit is None:
        return min(default, room)
    if explicit > room:
        raise InvalidRequestError(
            field, f"{explicit} tokens do not fit: the prompt leaves {room} of the context"
        )
    return explicit


# --------------------------------------------------------------------------- health


_SERVING: int = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING
_SERVICE_UNKNOWN: int = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 read live from :class:`ServerState`.

    Reading the state on every Check (rather than pushing statuses into
    grpc's stock servicer) means an engine that dies reports NOT_SERVING on
    the very next probe, with no update path to forget.
    """

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._changed = asyncio.Event()
        state.add_listener(self._on_phase)

    def _status(self, service: str) -> int | None:
        if service not in HEALTH_NAMES:
            return None
        return _SERVING if self._state.is_ready() else _NOT_SERVING

    def _on_phase(self, phase: Phase) -> None:
        # Wake every Watch; each re-reads the state and sends what changed.
        self._changed.set()
        self._changed = asyncio.Event()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        last = None
        while True:
            status = self._status(request.service)
            if status is None:
                status = _SERVICE_UNKNOWN
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            changed = self._changed
            # The timeout also catches readiness changes that are not phase
            # changes (the engine failing between phases).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await changed.wait()


# --------------------------------------------------------------------------- server


def build_grpc_server(
    state: ServerState,
    host: str,
    port: int,
    *,
    keys: KeyGuard | None = None,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """An unstarted grpc.aio server with every service; returns it and the bound port.

    ``keys``: API keys are required on autoglm.v1 and KServe v2 (health and
    reflection stay open); ``credentials``: TLS (see :mod:`autoglm_server.security.tls`).
    """
    from autoglm_server.frontends.grpc_v1 import AutoGLMServicer
    from autoglm_server.frontends.kserve_v2 import InferenceServicer
    from autoglm_server.proto import grpc_predict_v2_pb2_grpc as v2_grpc
    from autoglm_server.proto.autoglm.v1 import autoglm_pb2_grpc as pb_grpc

    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(state, keys)],
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_AutoGLMServicer_to_server(AutoGLMServicer(state), server)
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(state), server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(state), server)
    reflection.enable_server_reflection(
        (AUTOGLM_SERVICE, INFERENCE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    try:
        address = f"{host}:{port}"
        if credentials is not None:
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc reports a busy port as RuntimeError
        raise OSError(f"cannot listen on {host}:{port} (grpc): {exc}") from None
    return server, bound
