"""autoglm.v1.AutoGLM: our own gRPC API over the engine (translate only).

Wire message -> :class:`GenerationRequest`, engine deltas -> wire messages;
errors are raised and mapped by :mod:`.grpc_common`'s interceptor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import grpc

from autoglm_server.engine.api import (
    AsyncEngine,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    TokenLogprob,
    Usage,
)
from autoglm_server.engine.grammar import GrammarSpec
from autoglm_server.errors import InvalidRequestError
from autoglm_server.frontend import ServerState, collect, new_request_id, usage_or_count
from autoglm_server.frontends.grpc_common import deadline, engine_stream, max_new_tokens_for
from autoglm_server.proto.autoglm.v1 import autoglm_pb2 as pb
from autoglm_server.validation import (
    GenerationParams,
    check_room,
    max_prompt_chars,
    validate_chat,
    validate_params,
    validate_prompt,
    validate_request_id,
)

DEFAULT_MAX_NEW_TOKENS = 128

_FINISH_TO_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}


def _optional(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def params_from_pb(request: pb.GenerateRequest) -> GenerationParams:
    """Validate the sampling fields of a GenerateRequest (proto names are ours)."""
    return validate_params(
        {
            "max_new_tokens": _optional(request, "max_new_tokens"),
            "temperature": _optional(request, "temperature"),
            "top_p": _optional(request, "top_p"),
            "top_k": _optional(request, "top_k"),
            "repetition_penalty": _optional(request, "repetition_penalty"),
            "presence_penalty": _optional(request, "presence_penalty"),
            "frequency_penalty": _optional(request, "frequency_penalty"),
            "logit_bias": tuple(sorted((int(k), float(v)) for k, v in request.logit_bias.items()))
            or None,
            "logprobs": _optional(request, "logprobs"),
            "stop": tuple(request.stop),
            "seed": _optional(request, "seed"),
            "ignore_eos": request.ignore_eos,
            "priority": request.priority,
        }
    )


async def prompt_ids(
    state: ServerState, engine: AsyncEngine, message: Any, text_field: str
) -> tuple[list[int], str]:
    """Token ids of a request's ``oneof input`` and the field they came from.

    Raw text is tokenized as is; chat goes through the chat template. Both are
    CPU work proportional to the (capped) text, so they run on a worker thread.
    """
    max_chars = max_prompt_chars(engine.model_info.max_model_len)
    which = message.WhichOneof("input")
    if which == text_field:
        text = validate_prompt(getattr(message, text_field), text_field, max_chars=max_chars)
        return await asyncio.to_thread(engine.tokenize, text), text_field
    if which == "chat":
        field = "chat.messages"
        chat = validate_chat(
            [{"role": m.role, "content": m.content} for m in message.chat.messages],
            field,
            max_chars=max_chars,
        )
        renderer = state.chat_renderer(engine)
        ids = await asyncio.to_thread(renderer.render, list(chat), field=field)
        return ids, field
    raise InvalidRequestError(text_field, f"one of {text_field} or chat is required")


def _finish_pb(reason: FinishReason | None) -> pb.FinishReason:
    return pb.FINISH_REASON_UNSPECIFIED if reason is None else _FINISH_TO_PB[reason]


def _usage_pb(usage: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


def _logprobs_pb(entries: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=e.token_id,
            logprob=e.logprob,
            top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in e.top],
        )
        for e in entries or ()
    ]


class AutoGLMServicer:
    """autoglm.v1.AutoGLM. Registered with ``add_AutoGLMServicer_to_server``."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    async def _build(
        self, engine: AsyncEngine, request: pb.GenerateRequest, params: GenerationParams
    ) -> GenerationRequest:
        ids, field = await prompt_ids(self._state, engine, request, "prompt")
        room = check_room(len(ids), engine.model_info.max_model_len, field)
        explicit = _optional(request, "max_new_tokens")
        sampling = dataclasses.replace(
            params.sampling,
            max_new_tokens=max_new_tokens_for(
                explicit, DEFAULT_MAX_NEW_TOKENS, room, "max_new_tokens"
            ),
        )
        if request.HasField("json_schema"):
            sampling = dataclasses.replace(
                sampling, grammar=await self._grammar(engine, request.json_schema)
            )
            sampling.validate()
        return GenerationRequest(
            request_id=new_request_id(),
            prompt_token_ids=ids,
            params=sampling,
            priority=params.priority,
        )

    async def _grammar(self, engine: AsyncEngine, text: str) -> Any:
        try:
            schema = json.loads(text)
        except ValueError:
            raise InvalidRequestError("json_schema", "must be a JSON schema (JSON text)") from None
        if not isinstance(schema, dict):
            raise InvalidRequestError("json_schema", "must be a JSON object")
        compiler = await asyncio.to_thread(self._state.grammar_compiler, engine)
        spec = GrammarSpec.json(schema or None)
        return await asyncio.to_thread(compiler.compile, spec, "json_schema")

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        params = params_from_pb(request)
        client_id = validate_request_id(request.request_id)
        with self._state.admit() as engine:
            gen = await self._build(engine, request, params)
            # The deadline sits inside the stream's block, so the abort it causes
            # is counted as DEADLINE_EXCEEDED, as the client sees it.
            async with engine_stream(engine, gen, context) as stream, deadline(context):
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
            logprobs=_logprobs_pb(done.logprobs),
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
            async with engine_stream(engine, gen, context) as stream, deadline(context):
                async for delta in stream:
                    await context.write(_stream_pb(reply_id, delta))

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TokenizeResponse:
        ids, _ = await prompt_ids(self._state, self._state.require_engine(), request, "text")
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
        request_id=request_id,
        text=delta.text,
        token_ids=delta.token_ids,
        logprobs=_logprobs_pb(delta.logprobs),
    )
    if delta.finish_reason is not None:
        out.finish_reason = _finish_pb(delta.finish_reason)
    if delta.usage is not None:
        out.usage.CopyFrom(_usage_pb(delta.usage))
    return out
