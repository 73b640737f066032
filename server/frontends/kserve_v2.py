"""inference.GRPCInferenceService: KServe Open Inference Protocol v2 over the same engine.

The LLM convention: one BYTES input ``text_input`` (shape ``[1]``), one BYTES
output ``text_output``; request parameters ``max_tokens``, ``temperature``,
``top_p``, ``top_k``, ``repetition_penalty``, ``seed``, ``stop``,
``ignore_eos``, ``priority``. Raw (Triton binary) inputs get raw outputs back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from collections.abc import Mapping
from typing import Any

import grpc

from autoglm_server import __version__
from autoglm_server.engine.api import AsyncEngine
from autoglm_server.errors import InvalidRequestError
from autoglm_server.frontend import Phase, ServerState, collect, usage_or_count
from autoglm_server.frontends.choices import generation_requests
from autoglm_server.frontends.grpc_common import deadline, engine_stream, max_new_tokens_for
from autoglm_server.proto import grpc_predict_v2_pb2 as v2
from autoglm_server.security.keys import charge_tokens
from autoglm_server.validation import (
    GenerationParams,
    check_room,
    max_prompt_chars,
    validate_params,
    validate_prompt,
    validate_request_id,
)

DEFAULT_MAX_NEW_TOKENS = 128

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


_INT_PARAMS = frozenset({"max_new_tokens", "top_k", "seed", "priority"})
_FLOAT_PARAMS = frozenset({"temperature", "top_p", "repetition_penalty"})


def _number(text: str, field: str, *, integer: bool) -> Any:
    if text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    try:
        return int(text) if integer else float(text)
    except ValueError:
        raise InvalidRequestError(field, f"must be a number, got {text!r}") from None


def params_from_v2(parameters: Mapping[str, v2.InferParameter]) -> GenerationParams:
    """Known parameters are validated; others (client bookkeeping) are ignored, as in KServe."""
    values: dict[str, Any] = {}
    for wire, name in V2_PARAMS.items():
        if wire in parameters:
            value: Any = _param_value(parameters[wire])
            if name == "stop" and isinstance(value, str):
                value = (value,)
            elif isinstance(value, str) and name not in ("stop",):
                # Triton clients often send every parameter as a string.
                value = _number(value, f"parameters.{wire}", integer=name in _INT_PARAMS)
            elif name in _FLOAT_PARAMS and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            values[name] = value
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

    async def ModelConfig(
        self, request: v2.ModelConfigRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> v2.ModelConfigResponse:
        info = self._check_model(request.name, request.version, "name").model_info
        return v2.ModelConfigResponse(
            config=v2.ModelConfig(
                name=info.name,
                platform="pytorch",
                backend="autoglm",
                max_batch_size=0,
                input=[v2.ModelInput(name=TEXT_INPUT, data_type=v2.TYPE_STRING, dims=[1])],
                output=[v2.ModelOutput(name=TEXT_OUTPUT, data_type=v2.TYPE_STRING, dims=[1])],
            )
        )

    async def RepositoryIndex(
        self, request: v2.RepositoryIndexRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> v2.RepositoryIndexResponse:
        """The one served model, with Triton's state names."""
        engine = self._state.engine
        if engine is None:
            return v2.RepositoryIndexResponse()
        ready = self._state.is_ready()
        if request.ready and not ready:
            return v2.RepositoryIndexResponse()
        info = engine.model_info
        state, reason = ("READY", "") if ready else ("UNAVAILABLE", self._state.phase.value)
        entry = v2.RepositoryIndexResponse.ModelIndex(
            name=info.name, version=info.version, state=state, reason=reason
        )
        return v2.RepositoryIndexResponse(models=[entry])

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
        room = check_room(len(prompt_ids), served.model_info.max_model_len, "inputs")
        explicit = params.sampling.max_new_tokens if "max_tokens" in request.parameters else None
        sampling = dataclasses.replace(
            params.sampling,
            max_new_tokens=max_new_tokens_for(
                explicit,
                DEFAULT_MAX_NEW_TOKENS,
                room,
                "parameters.max_tokens",
            ),
        )
        with self._state.admit() as engine:
            (gen,) = generation_requests(prompt_ids, sampling, 1, params.priority)
            # The deadline sits inside the stream's block, so the abort it causes
            # is counted as DEADLINE_EXCEEDED, as the client sees it.
            async with engine_stream(engine, gen, context) as stream, deadline(context):
                done = await collect(stream, gen.request_id)
            charge_tokens(len(done.token_ids))
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
