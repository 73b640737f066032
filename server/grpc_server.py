"""The gRPC front end: autoglm.v1, KServe Open Inference Protocol v2, health, reflection.

Servicers translate only: wire message -> :class:`GenerationRequest`, engine
deltas -> wire messages. Errors are raised as :mod:`autoglm_server.errors`
exceptions and turned into status codes in one place, :class:`ErrorInterceptor`,
so every RPC maps the same failure to the same code and no stack trace ever
reaches a client.

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
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from autoglm_server import __version__
from autoglm_server.engine.api import (
    AsyncEngine,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    Usage,
)
from autoglm_server.errors import (
    AutoGLMError,
    DeadlineExceededError,
    InvalidRequestError,
    QueueFullError,
)
from autoglm_server.frontend import (
    GenerationStream,
    Phase,
    ServerState,
    collect,
    new_request_id,
    usage_or_count,
)
from autoglm_server.proto import grpc_predict_v2_pb2 as v2
from autoglm_server.proto import grpc_predict_v2_pb2_grpc as v2_grpc
from autoglm_server.proto.autoglm.v1 import autoglm_pb2 as pb
from autoglm_server.proto.autoglm.v1 import autoglm_pb2_grpc as pb_grpc
from autoglm_server.validation import (
    GenerationParams,
    max_prompt_chars,
    validate_chat,
    validate_params,
    validate_prompt,
    validate_request_id,
)

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

_FINISH_TO_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}


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
        # A hint for clients that back off; gRPC has no standard Retry-After.
        context.set_trailing_metadata((("retry-after", f"{exc.retry_after_s:g}"),))
    await context.abort(code, message)


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps exceptions raised by our servicers to status codes (see :func:`status_for`)."""

    _PREFIXES = (f"/{AUTOGLM_SERVICE}/", f"/{INFERENCE_SERVICE}/")

    def __init__(self, state: ServerState) -> None:
        self._state = state

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(self._PREFIXES):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary, method, self._state),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, method, self._state),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _guard_unary(behavior: Any, method: str, state: ServerState) -> Any:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_with(context, exc, method, state)

    return guarded


def _guard_stream(behavior: Any, method: str, state: ServerState) -> Any:
    if inspect.isasyncgenfunction(behavior):

        async def guarded_gen(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort_with(context, exc, method, state)

        return guarded_gen
    return _guard_unary(behavior, method, state)


def _stream(
    engine: AsyncEngine, gen: GenerationRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> GenerationStream:
    """The engine stream of one RPC; an abort after the deadline counts as DEADLINE_EXCEEDED."""

    def deadline_passed() -> bool:
        remaining = context.time_remaining()
        return remaining is not None and remaining <= 0

    return GenerationStream(engine, gen, deadline_passed=deadline_passed)


@contextlib.asynccontextmanager
async def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
    """Enforce the client's deadline on the work inside, as DeadlineExceededError."""
    try:
        async with asyncio.timeout(context.time_remaining()):
            yield
    except TimeoutError:
        raise DeadlineExceededError("deadline exceeded") from None


# --------------------------------------------------------------------------- autoglm.v1


def _optional(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def _chat_from_pb(chat: pb.ChatMessages, field: str, max_chars: int) -> list[dict[str, str]]:
    return validate_chat(
        [{"role": m.role, "content": m.content} for m in chat.messages],
        field,
        max_chars=max_chars,
    )


def params_from_pb(request: pb.GenerateRequest) -> GenerationParams:
    """Validate the sampling fields of a GenerateRequest (proto names are ours)."""
    return validate_params(
        {
            "max_new_tokens": _optional(request, "max_new_tokens"),
            "temperature": _optional(request, "temperature"),
            "top_p": _optional(request, "top_p"),
            "top_k": _optional(request, "top_k"),
            "repetition_penalty": _optional(request, "repetition_penalty"),
            "stop": tuple(request.stop),
            "seed": _optional(request, "seed"),
            "ignore_eos": request.ignore_eos,
            "priority": request.priority,
        }
    )


async def _prompt_ids(engine: AsyncEngine, message: Any, text_field: str) -> list[int]:
    """Token ids of a request's ``oneof input``: raw text, or chat through the template.

    Tokenizing is CPU work proportional to the (capped) text: it runs on a
    worker thread so health checks and other streams keep being served.
    """
    max_chars = max_prompt_chars(engine.model_info.max_model_len)
    which = message.WhichOneof("input")
    if which == text_field:
        text = validate_prompt(getattr(message, text_field), text_field, max_chars=max_chars)
        return await asyncio.to_thread(engine.tokenize, text)
    if which == "chat":
        chat = _chat_from_pb(message.chat, "chat.messages", max_chars)
        return await asyncio.to_thread(engine.apply_chat_template, chat)
    raise InvalidRequestError(text_field, f"one of {text_field} or chat is required")


def _finish_pb(reason: FinishReason | None) -> pb.FinishReason:
    return pb.FINISH_REASON_UNSPECIFIED if reason is None else _FINISH_TO_PB[reason]


def _usage_pb(usage: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


class AutoGLMServicer:
    """autoglm.v1.AutoGLM. Registered with ``add_AutoGLMServicer_to_server``."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    async def _build(
        self, engine: AsyncEngine, request: pb.GenerateRequest, params: GenerationParams
    ) -> GenerationRequest:
        return GenerationRequest(
            request_id=new_request_id(),
            prompt_token_ids=await _prompt_ids(engine, request, "prompt"),
            params=params.to_sampling_params(),
            priority=params.priority,
        )

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        params = params_from_pb(request)
        client_id = validate_request_id(request.request_id)
        with self._state.admit() as engine:
            gen = await self._build(engine, request, params)
            # The deadline sits inside the stream's block, so the abort it causes
            # is counted as DEADLINE_EXCEEDED, as the client sees it.
            async with _stream(engine, gen, context) as stream, _deadline(context):
                done = await collect(stream, gen.request_id)
        info = engine.model_info
        return pb.GenerateResponse(
            request_id=client_id or gen.request_id,
            text=done.text,
            token_ids=done.token_ids,
            finish_reason=_finish_pb(done.finish_reason),
            usage=_usage_pb(usage_or_count(done, len(gen.prompt_token_ids))),
            model=info.name,
            model_version=info.version,
        )

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        params = params_from_pb(request)
        client_id = validate_request_id(request.request_id)
        with self._state.admit() as engine:
            gen = await self._build(engine, request, params)
            reply_id = client_id or gen.request_id
            # The deadline sits inside the stream's block, so the abort it causes
            # is counted as DEADLINE_EXCEEDED, as the client sees it.
            async with _stream(engine, gen, context) as stream, _deadline(context):
                async for delta in stream:
                    await context.write(_stream_pb(reply_id, delta))

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TokenizeResponse:
        ids = await _prompt_ids(self._state.require_engine(), request, "text")
        return pb.TokenizeResponse(token_ids=ids, count=len(ids))

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInfoResponse:
        info = self._state.require_engine().model_info
        return pb.ModelInfoResponse(
            name=info.name,
            version=info.version,
            max_model_len=info.max_model_len,
            dtype=info.dtype,
            device=info.device,
            vocab_size=info.vocab_size,
            architecture=info.architecture,
        )


def _stream_pb(request_id: str, delta: GenerationDelta) -> pb.GenerateStreamResponse:
    out = pb.GenerateStreamResponse(
        request_id=request_id, text=delta.text, token_ids=delta.token_ids
    )
    if delta.finish_reason is not None:
        out.finish_reason = _finish_pb(delta.finish_reason)
    if delta.usage is not None:
        out.usage.CopyFrom(_usage_pb(delta.usage))
    return out


# --------------------------------------------------------------------------- KServe v2

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"
# v2 request parameter -> GenerationParams field.
V2_PARAMS = {
    "max_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repetition_penalty",
    "seed": "seed",
    "stop": "stop",
    "ignore_eos": "ignore_eos",
    "priority": "priority",
}


def _param_value(param: v2.InferParameter) -> bool | int | float | str | None:
    which = param.WhichOneof("parameter_choice")
    return None if which is None else getattr(param, which)


def params_from_v2(parameters: Mapping[str, v2.InferParameter]) -> GenerationParams:
    """Known parameters are validated; others (client bookkeeping) are ignored, as in KServe."""
    values: dict[str, Any] = {}
    for wire, name in V2_PARAMS.items():
        if wire in parameters:
            value = _param_value(parameters[wire])
            values[name] = (value,) if name == "stop" and isinstance(value, str) else value
    wire_names = {v: f"parameters.{k}" for k, v in V2_PARAMS.items()}
    return validate_params(values, wire_names)


def _decode_raw_bytes(raw: bytes, field: str) -> list[bytes]:
    """Triton's BYTES wire format: each element is a uint32 LE length, then the bytes."""
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidRequestError(field, "truncated BYTES element length")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise InvalidRequestError(field, "truncated BYTES element")
        items.append(raw[pos : pos + size])
        pos += size
    return items


def text_from_v2(request: v2.ModelInferRequest, max_chars: int | None = None) -> str:
    """The single ``text_input`` string of a ModelInferRequest."""
    for i, tensor in enumerate(request.inputs):
        if tensor.name != TEXT_INPUT:
            continue
        if tensor.datatype != "BYTES":
            raise InvalidRequestError(
                f"inputs[{i}].datatype", f"must be BYTES, got {tensor.datatype!r}"
            )
        count = 1
        for dim in tensor.shape:
            count *= dim
        if count != 1:
            raise InvalidRequestError(
                f"inputs[{i}].shape", "must hold exactly one element (batch 1)"
            )
        if request.raw_input_contents:
            if len(request.raw_input_contents) != len(request.inputs):
                raise InvalidRequestError("raw_input_contents", "needs one entry per input")
            items = _decode_raw_bytes(request.raw_input_contents[i], "raw_input_contents")
        else:
            items = list(tensor.contents.bytes_contents)
        if len(items) != 1:
            raise InvalidRequestError(f"inputs[{i}].contents", "must hold exactly one element")
        try:
            text = items[0].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError(f"inputs[{i}].contents", "must be UTF-8 text") from None
        return validate_prompt(text, f"inputs[{i}].contents", max_chars=max_chars)
    raise InvalidRequestError("inputs", f"needs a BYTES input named {TEXT_INPUT!r}")


class InferenceServicer:
    """inference.GRPCInferenceService (KServe v2) over the same engine."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    def _check_model(self, name: str, version: str, field: str) -> AsyncEngine:
        engine = self._state.require_engine()
        info = engine.model_info
        if name != info.name:
            raise InvalidRequestError(
                field, f"unknown model {name!r}; this server has {info.name!r}"
            )
        if version and version != info.version:
            raise InvalidRequestError(
                field.replace("name", "version"),
                f"unknown version {version!r}; this server has {info.version!r}",
            )
        return engine

    async def ServerLive(
        self, request: v2.ServerLiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=self._state.phase is not Phase.STOPPED)

    async def ServerReady(
        self, request: v2.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self._state.is_ready())

    async def ModelReady(
        self, request: v2.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> v2.ModelReadyResponse:
        engine = self._state.engine
        known = engine is not None and request.name == engine.model_info.name
        return v2.ModelReadyResponse(ready=known and self._state.is_ready())

    async def ServerMetadata(
        self, request: v2.ServerMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(name="autoglm", version=__version__, extensions=[])

    async def ModelMetadata(
        self, request: v2.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> v2.ModelMetadataResponse:
        info = self._check_model(request.name, request.version, "name").model_info
        tensor = v2.ModelMetadataResponse.TensorMetadata
        return v2.ModelMetadataResponse(
            name=info.name,
            versions=[info.version],
            platform="pytorch",
            inputs=[tensor(name=TEXT_INPUT, datatype="BYTES", shape=[1])],
            outputs=[tensor(name=TEXT_OUTPUT, datatype="BYTES", shape=[1])],
        )

    async def ModelInfer(
        self, request: v2.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> v2.ModelInferResponse:
        params = params_from_v2(request.parameters)
        served = self._check_model(request.model_name, request.model_version, "model_name")
        text = text_from_v2(request, max_prompt_chars(served.model_info.max_model_len))
        for j, wanted in enumerate(request.outputs):
            if wanted.name != TEXT_OUTPUT:
                raise InvalidRequestError(f"outputs[{j}].name", f"only {TEXT_OUTPUT!r} exists")
        validate_request_id(request.id, "id")
        prompt_ids = await asyncio.to_thread(served.tokenize, text)
        with self._state.admit() as engine:
            gen = GenerationRequest(
                request_id=new_request_id(),
                prompt_token_ids=prompt_ids,
                params=params.to_sampling_params(),
                priority=params.priority,
            )
            # The deadline sits inside the stream's block, so the abort it causes
            # is counted as DEADLINE_EXCEEDED, as the client sees it.
            async with _stream(engine, gen, context) as stream, _deadline(context):
                done = await collect(stream, gen.request_id)
        usage = usage_or_count(done, len(gen.prompt_token_ids))
        info = engine.model_info
        data = done.text.encode("utf-8")
        out = v2.ModelInferResponse(
            model_name=info.name,
            model_version=info.version,
            id=request.id,
            parameters={
                "finish_reason": v2.InferParameter(
                    string_param=done.finish_reason.value if done.finish_reason else ""
                ),
                "prompt_tokens": v2.InferParameter(int64_param=usage.prompt_tokens),
                "completion_tokens": v2.InferParameter(int64_param=usage.completion_tokens),
            },
        )
        tensor = out.outputs.add(name=TEXT_OUTPUT, datatype="BYTES", shape=[1])
        if request.raw_input_contents:
            # Answer in the form the client used (tritonclient reads raw only).
            out.raw_output_contents.append(struct.pack("<I", len(data)) + data)
        else:
            tensor.contents.bytes_contents.append(data)
        return out


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


def build_grpc_server(state: ServerState, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """An unstarted grpc.aio server with every service; returns it and the bound port."""
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(state)],
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
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:  # grpc reports a busy port as RuntimeError
        raise OSError(f"cannot listen on {host}:{port} (grpc): {exc}") from None
    return server, bound
