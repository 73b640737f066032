"""The HTTP front end: OpenAI-compatible API, health probes and Prometheus metrics.

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``
(``stream: true`` is Server-Sent Events ending in ``data: [DONE]``),
``/healthz`` (live), ``/readyz`` (ready) and ``/metrics``.

The handlers translate only. Bodies are parsed here, strictly
(:mod:`.body`): invalid UTF-8, lone surrogates, deep nesting and unknown
fields are all 400s naming the field, never 500s. Errors use OpenAI's
``{"error": {"message", "type", "param", "code"}}`` shape; a full queue is 429
with ``Retry-After``, not ready is 503. Every request that ends here without
reaching the engine is counted in ``autoglm_requests_total`` (internal errors
too); the engine counts the rest.

A streaming response is opened (engine admission done) before the headers go
out, so admission errors get a real status code; after that a client
disconnect cancels the body task and aborts the engine requests. A
non-streaming request is aborted the same way when its client hangs up.
``n`` > 1 runs n engine requests and merges them by ``index``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from autoglm_server import __version__
from autoglm_server.engine.api import (
    AsyncEngine,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    TokenLogprob,
)
from autoglm_server.engine.grammar import GrammarSpec
from autoglm_server.errors import (
    AutoGLMError,
    InvalidRequestError,
    ModelNotFoundError,
    QueueFullError,
)
from autoglm_server.errors import CancelledError as RequestCancelledError
from autoglm_server.frontend import GenerationStream, ServerState, new_request_id
from autoglm_server.frontends import openai_protocol as proto
from autoglm_server.frontends.body import parse_json_body
from autoglm_server.frontends.chat import template_messages
from autoglm_server.frontends.choices import generation_requests, merge
from autoglm_server.frontends.http_guard import DEFAULT_MAX_BODY_BYTES, HttpGuard
from autoglm_server.frontends.tool_stream import ChatStream, ToolPlan, plan_tools
from autoglm_server.frontends.tools import ToolSpec
from autoglm_server.security.keys import KeyGuard
from autoglm_server.validation import (
    check_room,
    format_loc,
    max_prompt_chars,
    too_long,
    validate_prompt,
)

logger = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MetricsRenderer = Callable[[], bytes]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    413: "invalid_request_error",
    404: "not_found_error",
    429: "rate_limit_error",
    499: "cancelled",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout_error",
}
# OpenAI's finish_reason values; ours that are not among them are answered as
# "stop" with the real reason in "autoglm_finish_reason".
_OPENAI_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}
_LOGPROB_FLOOR = -9999.0  # JSON has no -inf; what OpenAI and vLLM send for impossible tokens


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


def _response_for(exc: Exception, path: str) -> JSONResponse:
    if not isinstance(exc, AutoGLMError):
        logger.error("internal error on %s", path, exc_info=exc)
        return error_response(500, "internal error")
    status = exc.http_status
    if status >= 500 and status not in (503, 504):
        logger.error("internal error on %s", path, exc_info=exc)
        return error_response(500, "internal error")
    headers = None
    if isinstance(exc, QueueFullError):
        headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
    param = exc.field if isinstance(exc, InvalidRequestError) else None
    if isinstance(exc, ModelNotFoundError):
        param = "model"
    if isinstance(exc, RequestCancelledError):
        logger.debug("%s: %s", path, exc)  # the client left; nobody reads this answer
    return error_response(status, str(exc), param, headers)


def _field_names() -> frozenset[str]:
    names: set[str] = set()
    for obj in vars(proto).values():
        if isinstance(obj, type) and issubclass(obj, BaseModel):
            for name, info in obj.model_fields.items():
                names.add(info.alias or name)
    return frozenset(names)


_FIELDS = _field_names()


def _parse(model: type[proto.BaseModelT], data: dict[str, Any]) -> proto.BaseModelT:
    """Validate a body; the first error names the wire field (union branch tags dropped)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        best: tuple[list[str | int], str, str] | None = None
        for err in exc.errors(include_url=False):
            loc = [p for p in err["loc"] if isinstance(p, int) or p in _FIELDS]
            if err["type"] == "extra_forbidden" and err["loc"]:
                loc = [*loc, err["loc"][-1]] if err["loc"][-1] not in loc[-1:] else loc
            # Of a union's errors, the deepest names the field best.
            if best is None or len(loc) > len(best[0]):
                best = (loc, err["type"], err["msg"])
        assert best is not None
        loc, kind, msg = best
        field = format_loc(loc) or "body"
        if kind == "extra_forbidden":
            msg = "is not supported by this server (see the supported set in its README)"
        raise InvalidRequestError(field, msg) from None


# --------------------------------------------------------------------------- streaming


class _SSEResponse(StreamingResponse):
    """A StreamingResponse that always runs ``on_close`` when the exchange ends.

    Starlette stops iterating the body when the client goes away but leaves
    the generator for the garbage collector; closing it here frees the engine
    slots deterministically.
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
        except OSError as exc:  # the client hung up mid-write: not a server error
            logger.debug("stream ended by the client: %s", exc)
        finally:
            await self._on_close()


async def _guard_events(
    events: AsyncIterator[str], opened: _OpenStreams | None = None
) -> AsyncIterator[str]:
    """Once the headers are out, an error can only be reported in-band: as a
    final ``data: {"error": ...}`` event (what OpenAI does), never a stack trace.
    The error is handed to ``opened``, so the engine requests it ends are
    counted under its status, not as cancelled."""
    try:
        async for event in events:
            yield event
    except AutoGLMError as exc:
        if opened is not None:
            opened.error = exc
        status = exc.http_status if exc.http_status in _ERROR_TYPES else 500
        message = str(exc) if status < 500 or status in (503, 504) else "internal error"
        if message == "internal error":
            logger.error("internal error while streaming", exc_info=exc)
        yield _sse(error_body(status, message))
    except Exception as exc:
        if opened is not None:
            opened.error = exc
        logger.error("internal error while streaming", exc_info=exc)
        yield _sse(error_body(500, "internal error"))


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage_json(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class _OpenStreams:
    """The admitted engine streams of one request (one per choice)."""

    def __init__(
        self,
        stack: contextlib.AsyncExitStack,
        streams: list[GenerationStream],
        primed: dict[int, GenerationDelta] | None = None,
    ):
        self.stack = stack
        self.streams = streams
        self._primed = primed or {}  # first deltas already read (see _open)
        self.error: Exception | None = None  # what ended the stream, if it failed

    async def _deltas(self, index: int) -> AsyncIterator[GenerationDelta]:
        first = self._primed.pop(index, None)
        if first is not None:
            yield first
        async for delta in self.streams[index]:
            yield delta

    async def merged(self) -> AsyncIterator[tuple[int, GenerationDelta]]:
        """(choice index, delta) as they come, from every stream."""
        async for item in merge([self._deltas(i) for i in range(len(self.streams))]):
            yield item

    async def close(self) -> None:
        """Abort what is unfinished, counted under ``error``'s status (CANCELLED if none)."""
        error = self.error
        if error is None:
            await self.stack.aclose()
        else:
            await self.stack.__aexit__(type(error), error, error.__traceback__)


def _shares_prefixes(engine: AsyncEngine) -> bool:
    """Does the engine reuse the KV of a prompt another request computed (prefix caching)?"""
    return bool(getattr(getattr(engine, "config", None), "prefix_caching", False))


async def _open(state: ServerState, gens: list[GenerationRequest]) -> _OpenStreams:
    """Admit the request and start every engine request (admission errors raise here).

    With n > 1 on an engine with prefix caching, the first choice runs its
    prefill alone; the others start once its first token is out, so they find
    the prompt's KV blocks in the cache instead of computing them again.
    """
    stack = contextlib.AsyncExitStack()
    primed: dict[int, GenerationDelta] = {}
    try:
        engine = stack.enter_context(state.admit())
        share = len(gens) > 1 and _shares_prefixes(engine)
        streams = []
        for i, gen in enumerate(gens):
            stream = GenerationStream(engine, gen)
            stack.push_async_exit(stream)
            streams.append(stream)
            if share and i == 0:
                primed[0] = await anext(stream)
    except BaseException:
        await stack.aclose()
        raise
    return _OpenStreams(stack, streams, primed)


async def _until_disconnect(request: Request) -> None:
    """Return when the client hangs up. The body has been read by now, so the
    next ASGI message the server sends is ``http.disconnect``."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _run_to_end(
    state: ServerState, request: Request, gens: list[GenerationRequest]
) -> list[_Choice]:
    """Run every choice to the end, or abort them all when the client hangs up (the
    server doesn't cancel a handler whose client left, so the connection is watched)."""
    opened = await _open(state, gens)
    choices = [_Choice() for _ in gens]

    async def work() -> None:
        async for index, delta in opened.merged():
            choices[index].add(delta)

    # Leaving the stack aborts the engine requests that have not finished,
    # counted under the status of the exception that left it.
    async with opened.stack:
        job = asyncio.ensure_future(work())
        watch = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not job.done():
                job.cancel()
            for task in (job, watch):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if job.cancelled():
            raise RequestCancelledError("the client disconnected before the completion finished")
        job.result()
    return choices


@dataclass(slots=True)
class _Choice:
    """One choice's output, gathered from its deltas."""

    parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: FinishReason | None = None

    def add(self, delta: GenerationDelta) -> None:
        self.parts.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish = delta.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _finish_fields(reason: FinishReason | None, override: str | None = None) -> dict[str, Any]:
    """``finish_reason`` in OpenAI's vocabulary, plus ours when it says more."""
    if reason is None:
        return {"finish_reason": None}
    out: dict[str, Any] = {"finish_reason": override or _OPENAI_FINISH.get(reason, "stop")}
    if reason not in _OPENAI_FINISH:
        out["autoglm_finish_reason"] = reason.value
    return out


# --------------------------------------------------------------------------- logprobs


def _byte_decoder() -> dict[str, int]:
    """The inverse of byte-level BPE's bytes -> printable characters table (GPT-2's)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


_BYTE_DECODER = _byte_decoder()
_HEX_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class _TokenText:
    """Token id -> its text and its UTF-8 bytes, cached per tokenizer.

    The text is the token decoded alone (a token holding part of a character
    decodes to U+FFFD); the bytes are the token's own bytes, so a client can
    join the bytes of consecutive tokens into the exact output, as OpenAI's
    ``bytes`` field promises.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._tokenizer = engine.tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def _entry(self, token_id: int) -> tuple[str, list[int]]:
        entry = self._cache.get(token_id)
        if entry is None:
            text = str(self._tokenizer.decode([token_id]))
            entry = (text, self._raw_bytes(token_id, text))
            self._cache[token_id] = entry
        return entry

    def _raw_bytes(self, token_id: int, text: str) -> list[int]:
        convert = getattr(self._tokenizer, "convert_ids_to_tokens", None)
        piece = convert(token_id) if convert is not None and "\ufffd" in text else None
        if isinstance(piece, str):
            hex_byte = _HEX_BYTE.match(piece)
            if hex_byte:  # sentencepiece byte fallback
                return [int(hex_byte.group(1), 16)]
            if all(c in _BYTE_DECODER for c in piece):  # byte-level BPE
                return [_BYTE_DECODER[c] for c in piece]
        return list(text.encode("utf-8"))

    def __call__(self, token_id: int) -> str:
        return self._entry(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return self._entry(token_id)[1]


def _lp(value: float) -> float:
    return max(value, _LOGPROB_FLOOR)


def _chat_logprobs(entries: Sequence[TokenLogprob], text_of: _TokenText) -> list[dict[str, Any]]:
    out = []
    for e in entries:
        out.append(
            {
                "token": text_of(e.token_id),
                "logprob": _lp(e.logprob),
                "bytes": text_of.bytes(e.token_id),
                "top_logprobs": [
                    {"token": text_of(t), "logprob": _lp(lp), "bytes": text_of.bytes(t)}
                    for t, lp in e.top
                ],
            }
        )
    return out


def _completion_logprobs(
    entries: Sequence[TokenLogprob], text_of: _TokenText, offset: int
) -> dict[str, Any]:
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        token = text_of(e.token_id)
        tokens.append(token)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [_lp(e.logprob) for e in entries],
        "top_logprobs": [{text_of(t): _lp(lp) for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


# --------------------------------------------------------------------------- requests


def _max_new_tokens(
    value: int | None, field: str, prompt_len: int, max_model_len: int, default: int | None
) -> int:
    """An explicit limit must fit the context (400 otherwise, as OpenAI); a default is capped."""
    room = max(0, max_model_len - prompt_len)
    if value is None:
        return room if default is None else min(default, room)
    if value > room:
        raise InvalidRequestError(
            field,
            f"{value} tokens do not fit: the prompt has {prompt_len} of the "
            f"{max_model_len}-token context, leaving {room}",
        )
    return value


def _check_stream_options(body: proto.CompletionRequest | proto.ChatCompletionRequest) -> None:
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError("stream_options", "is only allowed with stream: true")


def _check_priority(priority: int) -> None:
    if priority < 0:
        raise InvalidRequestError("priority", "must be >= 0")


def _tool_plan(
    body: proto.ChatCompletionRequest, state: ServerState, template: str | None
) -> ToolPlan:
    tools = (
        None
        if body.tools is None
        else [ToolSpec(t.function.name, t.function.parameters) for t in body.tools]
    )
    named = body.tool_choice
    choice = (
        f"function:{named.function.name}" if isinstance(named, proto.NamedToolChoice) else named
    )
    return plan_tools(
        tools,
        choice,
        parser_name=state.tool_parser,
        template=template,
        parallel=body.parallel_tool_calls,
    )


def _grammar_spec(
    body: proto.ChatCompletionRequest, plan: ToolPlan
) -> tuple[GrammarSpec, str] | None:
    fmt = body.response_format
    wants_json = fmt is not None and fmt.type != "text"
    if wants_json and plan.forced:
        raise InvalidRequestError(
            "response_format", "cannot be combined with tool_choice required or a named tool"
        )
    if plan.forced:
        return plan.grammar(), "tool_choice"
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec.json(None), "response_format"
    if fmt.json_schema is None:
        raise InvalidRequestError("response_format.json_schema", "is required for json_schema")
    schema = fmt.json_schema.schema_
    return GrammarSpec.json(schema if schema is not None else {}), "response_format.json_schema"


# --------------------------------------------------------------------------- app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's description plus the request bodies, which the handlers parse themselves
    (strictly, see :mod:`.body`): schemathesis and client generators read them here."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    _, defs = models_json_schema(
        [(proto.CompletionRequest, "validation"), (proto.ChatCompletionRequest, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    for path, model in (
        ("/v1/completions", "CompletionRequest"),
        ("/v1/chat/completions", "ChatCompletionRequest"),
    ):
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}},
        }
    app.openapi_schema = schema
    return schema


def build_http_app(
    state: ServerState,
    render_metrics: MetricsRenderer | None,
    *,
    keys: KeyGuard | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    request_timeout_s: float | None = None,
) -> FastAPI:
    """The FastAPI app. ``render_metrics`` returns Prometheus text (None: no /metrics).

    ``keys``, ``max_body_bytes`` and ``request_timeout_s`` configure the guard in
    front of it (:mod:`.http_guard`).
    """
    app = FastAPI(title="AutoGLM", version=__version__, docs_url=None, redoc_url=None)
    app.add_middleware(
        HttpGuard,
        state=state,
        respond=_response_for,
        keys=keys,
        max_body_bytes=max_body_bytes,
        request_timeout_s=request_timeout_s,
    )

    class GuardedRoute(APIRoute):
        """Every exception becomes an OpenAI error response, and is counted once."""

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:
                    state.record_rejection(exc)
                    return _response_for(exc, request.url.path)

            return guarded

    app.router.route_class = GuardedRoute
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    def served(model: str | None) -> AsyncEngine:
        engine = state.require_engine()
        if model and model != engine.model_info.name:
            raise ModelNotFoundError(model)
        return engine

    async def read_body(request: Request) -> dict[str, Any]:
        return parse_json_body(await request.body())

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
    async def completions(request: Request) -> Response:
        body = _parse(proto.CompletionRequest, await read_body(request))
        _check_stream_options(body)
        engine = served(body.model)
        info = engine.model_info
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise InvalidRequestError("prompt", "only one prompt per request is supported")
            prompt = body.prompt[0]
        else:
            prompt = body.prompt
        if body.best_of not in (None, body.n):
            raise InvalidRequestError("best_of", "is not supported (only best_of == n)")
        prompt = validate_prompt(prompt, max_chars=max_prompt_chars(info.max_model_len))
        _check_priority(body.priority)
        # CPU work proportional to the (capped) prompt: off the event loop.
        prompt_ids = await asyncio.to_thread(engine.tokenize, prompt)
        check_room(len(prompt_ids), info.max_model_len, "prompt")
        max_new = _max_new_tokens(
            body.max_tokens, "max_tokens", len(prompt_ids), info.max_model_len, 16
        )
        params = proto.sampling_from(
            {
                "max_new_tokens": max_new,
                "temperature": body.temperature,
                "top_p": body.top_p,
                "top_k": body.top_k,
                "repetition_penalty": body.repetition_penalty,
                "presence_penalty": body.presence_penalty,
                "frequency_penalty": body.frequency_penalty,
                "logit_bias": body.logit_bias_pairs(),
                "logprobs": body.logprobs,
                "stop": body.stop_tuple(),
                "seed": body.seed,
                "ignore_eos": body.ignore_eos,
            },
            proto.COMPLETION_NAMES,
            info.vocab_size,
        )
        gens = generation_requests(prompt_ids, params, body.n, body.priority)
        created = int(time.time())
        cid = f"cmpl-{new_request_id()}"
        text_of = _TokenText(engine) if params.logprobs is not None else None

        def chunk(index: int, text: str, finish: dict[str, Any], lps: Any) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": info.name,
                "choices": [
                    {"index": index, "text": text, "logprobs": lps, "finish_reason": None, **finish}
                ],
            }

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            opened = await _open(state, gens)

            async def events() -> AsyncIterator[str]:
                completion_tokens = 0
                offsets = [0] * len(gens)
                async for index, delta in opened.merged():
                    completion_tokens += len(delta.token_ids)
                    finish = _finish_fields(delta.finish_reason)
                    if delta.text or delta.finish_reason is not None or delta.logprobs:
                        lps = None
                        if text_of is not None and delta.logprobs is not None:
                            lps = _completion_logprobs(delta.logprobs, text_of, offsets[index])
                        offsets[index] += len(delta.text)
                        yield _sse(chunk(index, delta.text, finish, lps))
                if include_usage:
                    usage = _usage_json(len(prompt_ids), completion_tokens)
                    yield _sse({**chunk(0, "", {}, None), "choices": [], "usage": usage})
                yield "data: [DONE]\n\n"

            return _SSEResponse(_guard_events(events(), opened), opened.close)

        choices = await _run_to_end(state, request, gens)
        out = chunk(0, "", {}, None)
        out["choices"] = [
            {
                "index": i,
                "text": c.text,
                "logprobs": None
                if text_of is None
                else _completion_logprobs(c.logprobs, text_of, 0),
                **_finish_fields(c.finish),
            }
            for i, c in enumerate(choices)
        ]
        out["usage"] = _usage_json(len(prompt_ids), sum(len(c.token_ids) for c in choices))
        return JSONResponse(out)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        body = _parse(proto.ChatCompletionRequest, await read_body(request))
        _check_stream_options(body)
        engine = served(body.model)
        info = engine.model_info
        max_chars = max_prompt_chars(info.max_model_len)
        if sum(len(m.text()) for m in body.messages) > max_chars:
            raise InvalidRequestError("messages", too_long(max_chars))
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise InvalidRequestError("max_completion_tokens", "give it or max_tokens, not both")
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequestError("top_logprobs", "needs logprobs: true")
        _check_priority(body.priority)
        messages = template_messages(body.messages)
        renderer = state.chat_renderer(engine)
        plan = _tool_plan(body, state, renderer.template)
        tools_json = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        prompt_ids = await asyncio.to_thread(renderer.render, messages, tools=tools_json)
        check_room(len(prompt_ids), info.max_model_len, "messages")
        limit_field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        max_new = _max_new_tokens(
            body.max_completion_tokens or body.max_tokens,
            limit_field,
            len(prompt_ids),
            info.max_model_len,
            None,  # OpenAI's chat default is "until the context is full"
        )
        grammar = None
        spec = _grammar_spec(body, plan)
        if spec is not None:
            compiler = await asyncio.to_thread(state.grammar_compiler, engine)
            grammar = await asyncio.to_thread(compiler.compile, spec[0], spec[1])
        params = proto.sampling_from(
            {
                "max_new_tokens": max_new,
                "temperature": body.temperature,
                "top_p": body.top_p,
                "top_k": body.top_k,
                "repetition_penalty": body.repetition_penalty,
                "presence_penalty": body.presence_penalty,
                "frequency_penalty": body.frequency_penalty,
                "logit_bias": body.logit_bias_pairs(),
                "logprobs": (body.top_logprobs or 0) if body.logprobs else None,
                "stop": body.stop_tuple(),
                "seed": body.seed,
                "ignore_eos": body.ignore_eos,
                "grammar": grammar,
            },
            {**proto.CHAT_NAMES, "max_new_tokens": limit_field},
            info.vocab_size,
        )
        gens = generation_requests(prompt_ids, params, body.n, body.priority)
        created = int(time.time())
        cid = f"chatcmpl-{new_request_id()}"
        text_of = _TokenText(engine) if params.logprobs is not None else None
        call_finish = plan.call_finish

        def chunk(index: int, delta: dict[str, Any], finish: dict[str, Any], lps: Any):  # type: ignore[no-untyped-def]
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": info.name,
                "choices": [
                    {
                        "index": index,
                        "delta": delta,
                        "logprobs": lps,
                        "finish_reason": None,
                        **finish,
                    }
                ],
            }

        def lp_json(entries: Sequence[TokenLogprob]) -> dict[str, Any] | None:
            if text_of is None:
                return None
            return {"content": _chat_logprobs(entries, text_of)}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            opened = await _open(state, gens)

            async def events() -> AsyncIterator[str]:
                completion_tokens = 0
                streams = [ChatStream(plan) for _ in gens]
                for i in range(len(gens)):
                    yield _sse(chunk(i, {"role": "assistant", "content": ""}, {}, None))
                async for index, delta in opened.merged():
                    completion_tokens += len(delta.token_ids)
                    cs = streams[index]
                    for piece, entries in cs.add(delta):
                        yield _sse(chunk(index, piece, {}, lp_json(entries)))
                    if delta.finish_reason is not None:
                        for piece, entries in cs.finish():
                            if piece or entries:
                                yield _sse(chunk(index, piece, {}, lp_json(entries)))
                        override = call_finish if cs.has_calls else None
                        finish = _finish_fields(delta.finish_reason, override)
                        yield _sse(chunk(index, {}, finish, None))
                if include_usage:
                    usage = _usage_json(len(prompt_ids), completion_tokens)
                    yield _sse({**chunk(0, {}, {}, None), "choices": [], "usage": usage})
                yield "data: [DONE]\n\n"

            return _SSEResponse(_guard_events(events(), opened), opened.close)

        choices = await _run_to_end(state, request, gens)
        out_choices = []
        for i, c in enumerate(choices):
            calls = plan.parse(c.text)
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            if calls:
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [call.to_json() for call in calls],
                }
            out_choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": lp_json(c.logprobs),
                    **_finish_fields(c.finish, call_finish if calls else None),
                }
            )
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": info.name,
                "choices": out_choices,
                "usage": _usage_json(len(prompt_ids), sum(len(c.token_ids) for c in choices)),
            }
        )

    return app


def build_metrics_app(
    render_metrics: MetricsRenderer,
    state: ServerState | None = None,
    keys: KeyGuard | None = None,
) -> FastAPI:
    """The metrics-only app for the dedicated metrics port (plain HTTP even when the
    API ports use TLS). With ``state`` it also answers ``/healthz`` and ``/readyz``,
    so probes work when the HTTP port needs client certificates; with ``keys`` and
    ``--metrics-auth``, /metrics needs a key with the metrics scope."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    if state is not None:
        app.add_middleware(HttpGuard, state=state, respond=_response_for, keys=keys)

        @app.get("/healthz")
        async def healthz() -> Response:
            return PlainTextResponse("ok")

        @app.get("/readyz")
        async def readyz() -> Response:
            if state.is_ready():
                return PlainTextResponse("ready")
            return PlainTextResponse(state.phase.value, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render_metrics(), media_type=PROMETHEUS_CONTENT_TYPE)

    return app
