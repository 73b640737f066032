"""The HTTP front end: OpenAI-compatible API, health probes and Prometheus metrics.

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``
(``stream: true`` is Server-Sent Events ending in ``data: [DONE]``),
``/healthz`` (live), ``/readyz`` (ready) and ``/metrics``.

Like the gRPC servicers, the handlers translate only. Errors use OpenAI's
``{"error": {"message", "type", "param", "code"}}`` shape; bad input is a 400
naming the field (FastAPI's default 422 is remapped, because OpenAI clients
treat 400 as "fix your request"), a full queue is 429 with ``Retry-After``,
not ready is 503. A streaming response is primed with its first delta before
the headers go out, so admission errors still get a real status code; after
that, a client disconnect cancels the body task and aborts the engine request. A non-streaming request is aborted the same
way when its client hangs up while it is being generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from autoglm_server import __version__
from autoglm_server.engine.api import AsyncEngine, GenerationDelta, GenerationRequest, Usage
from autoglm_server.errors import AutoGLMError, InvalidRequestError, QueueFullError
from autoglm_server.errors import CancelledError as RequestCancelledError
from autoglm_server.frontend import (
    Completion,
    GenerationStream,
    ServerState,
    collect,
    new_request_id,
    usage_or_count,
)
from autoglm_server.validation import (
    GenerationParams,
    format_loc,
    max_prompt_chars,
    validate_chat,
    validate_params,
    validate_prompt,
)

logger = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MetricsRenderer = Callable[[], bytes]

_ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    429: "rate_limit_error",
    499: "cancelled",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout_error",
}


# --------------------------------------------------------------------------- wire models


class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIRequest(BaseModel):
    """Fields both OpenAI endpoints share, plus AutoGLM's extensions (top_k ...).

    Unknown fields are ignored, as OpenAI-compatible servers do, so clients
    that send defaults for features we lack still work.
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    user: str | None = None
    # AutoGLM extensions (vLLM spells them the same way).
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    priority: int = 0

    def check_unsupported(self) -> None:
        if self.n != 1:
            raise InvalidRequestError("n", "only n=1 is supported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise InvalidRequestError(name, "is not supported (use repetition_penalty)")
        if self.logprobs not in (None, False, 0):
            raise InvalidRequestError("logprobs", "is not supported")

    def params(self, max_tokens_default: int) -> GenerationParams:
        self.check_unsupported()
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return validate_params(
            {
                "max_new_tokens": self.max_tokens
                if self.max_tokens is not None
                else max_tokens_default,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty,
                "stop": stop,
                "seed": self.seed,
                "ignore_eos": self.ignore_eos,
                "priority": self.priority,
            },
            {"max_new_tokens": "max_tokens"},
        )


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    def text(self, max_chars: int) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise InvalidRequestError("prompt", "only one prompt per request is supported")
            prompt = self.prompt[0]
        else:
            prompt = self.prompt
        if self.echo:
            raise InvalidRequestError("echo", "is not supported")
        if self.suffix:
            raise InvalidRequestError("suffix", "is not supported")
        return validate_prompt(prompt, max_chars=max_chars)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def chat(self, max_chars: int) -> list[dict[str, str]]:
        raw: list[dict[str, Any]] = []
        for i, message in enumerate(self.messages):
            content = message.content
            if isinstance(content, list):
                for j, part in enumerate(content):
                    if part.type != "text":
                        raise InvalidRequestError(
                            f"messages[{i}].content[{j}].type", "only text parts are supported"
                        )
                content = "".join(part.text or "" for part in content)
            raw.append({"role": message.role, "content": content or ""})
        return validate_chat(raw, max_chars=max_chars)


# --------------------------------------------------------------------------- errors


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "error"),
            "param": param,
            "code": None,
        }
    }


def error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def _autoglm_error_response(exc: AutoGLMError) -> JSONResponse:
    status = exc.http_status
    if status >= 500 and status not in (503, 504):
        logger.error("internal error", exc_info=exc)
        return error_response(500, "internal error")
    headers = None
    if isinstance(exc, QueueFullError):
        headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
    param = exc.field if isinstance(exc, InvalidRequestError) else None
    return error_response(status, str(exc), param, headers)


def _install_error_handlers(app: FastAPI, state: ServerState) -> None:
    async def on_autoglm(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AutoGLMError)
        state.record_rejection(exc)
        return _autoglm_error_response(exc)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        loc = [part for part in first.get("loc", ()) if part != "body"]
        field = format_loc(loc) or "body"
        message = f"{field}: {first.get('msg', 'invalid')}"
        state.record_rejection(InvalidRequestError(field, str(first.get("msg"))))
        return error_response(400, message, field)

    app.add_exception_handler(AutoGLMError, on_autoglm)
    app.add_exception_handler(RequestValidationError, on_validation)


class _GuardedRoute(APIRoute):
    """Turns unexpected exceptions into OpenAI's 500 shape, with no detail.

    A plain ``Exception`` handler is not enough: Starlette re-raises after
    answering, so the server would log the traceback twice.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (AutoGLMError, RequestValidationError, HTTPException, _ModelNotFound):
                raise  # handled by the exception handlers
            except Exception as exc:
                logger.error("internal error on %s", request.url.path, exc_info=exc)
                return error_response(500, "internal error")

        return guarded


# --------------------------------------------------------------------------- streaming


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that always runs ``on_close`` when the exchange ends.

    Starlette stops iterating the body when the client goes away but leaves
    the generator for the garbage collector; closing it here frees the engine
    slot deterministically.
    """

    def __init__(
        self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


async def _guard_events(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once the headers are out, an error can only be reported in-band: as a
    final ``data: {"error": ...}`` event (what OpenAI does), never a stack trace."""
    try:
        async for event in events:
            yield event
    except AutoGLMError as exc:
        status = exc.http_status if exc.http_status in _ERROR_TYPES else 500
        message = str(exc) if status < 500 or status in (503, 504) else "internal error"
        if message == "internal error":
            logger.error("internal error while streaming", exc_info=exc)
        yield _sse(error_body(status, message))
    except Exception as exc:
        logger.error("internal error while streaming", exc_info=exc)
        yield _sse(error_body(500, "internal error"))


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage_json(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class _Primed:
    """An admitted stream whose first delta is already in hand."""

    def __init__(
        self, stack: contextlib.ExitStack, stream: GenerationStream, first: GenerationDelta
    ) -> None:
        self.stack = stack
        self.stream = stream
        self.first = first

    async def deltas(self) -> AsyncIterator[GenerationDelta]:
        yield self.first
        async for delta in self.stream:
            yield delta

    async def close(self) -> None:
        try:
            await self.stream.aclose()
        finally:
            self.stack.close()


async def _prime(state: ServerState, build: Callable[[AsyncEngine], GenerationRequest]) -> _Primed:
    stack = contextlib.ExitStack()
    try:
        engine = stack.enter_context(state.admit())
        stream = GenerationStream(engine, build(engine))
        try:
            first = await anext(stream)
        except BaseException:
            await stream.aclose()
            raise
    except BaseException:
        stack.close()
        raise
    return _Primed(stack, stream, first)


# --------------------------------------------------------------------------- app


async def _until_disconnect(request: Request) -> None:
    """Return when the client hangs up. The body has been read by now, so the
    next ASGI message the server sends is ``http.disconnect``."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _complete(
    state: ServerState, request: Request, build: Callable[[AsyncEngine], GenerationRequest]
) -> tuple[GenerationRequest, Completion]:
    """Run a non-streaming request to the end, or abort it when the client
    hangs up: the server doesn't cancel a handler whose client left, so the
    connection is watched alongside the generation."""
    with state.admit() as engine:
        gen = build(engine)
        async with GenerationStream(engine, gen) as stream:
            work = asyncio.ensure_future(collect(stream, gen.request_id))
            watch = asyncio.ensure_future(_until_disconnect(request))
            try:
                await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watch.cancel()
                if not work.done():
                    work.cancel()  # leaving the `async with` aborts the engine request
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
            if work.cancelled():
                raise RequestCancelledError(
                    "the client disconnected before the completion finished"
                )
            return gen, work.result()


def build_http_app(state: ServerState, render_metrics: MetricsRenderer | None) -> FastAPI:
    """The FastAPI app. ``render_metrics`` returns Prometheus text (None: no /metrics)."""
    app = FastAPI(title="AutoGLM", version=__version__, docs_url=None, redoc_url=None)
    app.router.route_class = _GuardedRoute
    _install_error_handlers(app, state)

    def served(model: str | None) -> AsyncEngine:
        engine = state.require_engine()
        if model and model != engine.model_info.name:
            raise _ModelNotFound(model)
        return engine

    @app.exception_handler(_ModelNotFound)
    async def on_model_not_found(request: Request, exc: _ModelNotFound) -> Response:
        return error_response(404, f"model {exc.model!r} does not exist", "model")

    @app.get("/healthz")
    async def healthz() -> Response:
        return PlainTextResponse("ok")

    @app.get("/readyz")
    async def readyz() -> Response:
        if state.is_ready():
            return PlainTextResponse("ready")
        return PlainTextResponse(state.phase.value, status_code=503)

    if render_metrics is not None:
        metrics_fn = render_metrics

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(metrics_fn(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        info = state.require_engine().model_info
        return {
            "object": "list",
            "data": [
                {
                    "id": info.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "autoglm",
                    "root": info.name,
                    "max_model_len": info.max_model_len,
                }
            ],
        }

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response | dict[str, Any]:
        engine = served(body.model)
        prompt = body.text(max_prompt_chars(engine.model_info.max_model_len))
        params = body.params(max_tokens_default=16)  # OpenAI's default for completions
        created = int(time.time())
        cid = f"cmpl-{new_request_id()}"
        name = engine.model_info.name
        # CPU work proportional to the (capped) prompt: off the event loop.
        prompt_ids = await asyncio.to_thread(engine.tokenize, prompt)

        def build(engine: AsyncEngine) -> GenerationRequest:
            return _request(prompt_ids, params)

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            }

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            primed = await _prime(state, build)

            async def events() -> AsyncIterator[str]:
                prompt_len = len(primed.stream.request.prompt_token_ids)
                completion_tokens = 0
                async for delta in primed.deltas():
                    completion_tokens += len(delta.token_ids)
                    finish = delta.finish_reason.value if delta.finish_reason else None
                    if delta.text or finish:
                        yield _sse(chunk(delta.text, finish))
                    if finish and include_usage:
                        usage = delta.usage or Usage(prompt_len, completion_tokens)
                        yield _sse({**chunk("", None), "choices": [], "usage": _usage_json(usage)})
                yield "data: [DONE]\n\n"

            return _SSEResponse(_guard_events(events()), primed.close)

        gen, done = await _complete(state, request, build)
        usage = usage_or_count(done, len(gen.prompt_token_ids))
        finish = done.finish_reason.value if done.finish_reason else None
        return {**chunk(done.text, finish), "usage": _usage_json(usage)}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> Response | dict[str, Any]:
        engine = served(body.model)
        messages = body.chat(max_prompt_chars(engine.model_info.max_model_len))
        if body.max_tokens is None and body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        prompt_ids = await asyncio.to_thread(engine.apply_chat_template, messages)
        # OpenAI's chat default is "until the context is full".
        room = max(1, engine.model_info.max_model_len - len(prompt_ids))
        params = body.params(max_tokens_default=room)
        created = int(time.time())
        cid = f"chatcmpl-{new_request_id()}"
        name = engine.model_info.name

        def build(engine: AsyncEngine) -> GenerationRequest:
            return _request(prompt_ids, params)

        def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            primed = await _prime(state, build)

            async def events() -> AsyncIterator[str]:
                completion_tokens = 0
                yield _sse(chunk({"role": "assistant", "content": ""}, None))
                async for delta in primed.deltas():
                    completion_tokens += len(delta.token_ids)
                    if delta.text:
                        yield _sse(chunk({"content": delta.text}, None))
                    if delta.finish_reason is not None:
                        yield _sse(chunk({}, delta.finish_reason.value))
                        if include_usage:
                            usage = delta.usage or Usage(len(prompt_ids), completion_tokens)
                            yield _sse(
                                {**chunk({}, None), "choices": [], "usage": _usage_json(usage)}
                            )
                yield "data: [DONE]\n\n"

            return _SSEResponse(_guard_events(events()), primed.close)

        _, done = await _complete(state, request, build)
        usage = usage_or_count(done, len(prompt_ids))
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": done.text},
                    "logprobs": None,
                    "finish_reason": done.finish_reason.value if done.finish_reason else None,
                }
            ],
            "usage": _usage_json(usage),
        }

    return app


class _ModelNotFound(Exception):
    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


def _request(prompt_ids: list[int], params: GenerationParams) -> GenerationRequest:
    return GenerationRequest(
        request_id=new_request_id(),
        prompt_token_ids=prompt_ids,
        params=params.to_sampling_params(),
        priority=params.priority,
    )


def build_metrics_app(render_metrics: MetricsRenderer) -> FastAPI:
    """The metrics-only app for the dedicated metrics port."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render_metrics(), media_type=PROMETHEUS_CONTENT_TYPE)

    return app
