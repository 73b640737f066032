"""The gRPC front end against a fake engine, over real loopback gRPC.

Covers translation (autoglm.v1 and KServe v2), the one error mapping,
cancellation and deadlines aborting the engine request, health and reflection.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from frontend_fakes import FakeEngine
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from autoglm_server import errors
from autoglm_server.frontend import Phase, ServerState
from autoglm_server.grpc_server import build_grpc_server
from autoglm_server.proto import grpc_predict_v2_pb2 as v2
from autoglm_server.proto import grpc_predict_v2_pb2_grpc as v2_grpc
from autoglm_server.proto.autoglm.v1 import autoglm_pb2 as pb
from autoglm_server.proto.autoglm.v1 import autoglm_pb2_grpc as pb_grpc
from autoglm_server.validation import max_prompt_chars


@dataclass
class Harness:
    state: ServerState
    engine: FakeEngine
    channel: grpc.aio.Channel
    rejected: list[str]  # codes the front end counted as refusals

    @property
    def stub(self) -> pb_grpc.AutoGLMStub:
        return pb_grpc.AutoGLMStub(self.channel)

    @property
    def v2(self) -> v2_grpc.GRPCInferenceServiceStub:
        return v2_grpc.GRPCInferenceServiceStub(self.channel)

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel)


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    state = ServerState()
    engine = FakeEngine()
    state.engine = engine
    rejected: list[str] = []
    state.on_rejected = rejected.append
    state.set_phase(Phase.SERVING)
    server, port = build_grpc_server(state, "127.0.0.1", 0)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Harness(state, engine, channel, rejected)
    finally:
        await channel.close()
        await server.stop(grace=None)


async def _eventually(check: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- autoglm.v1


async def test_generate_translates_both_ways(h: Harness) -> None:
    resp = await h.stub.Generate(
        pb.GenerateRequest(
            prompt="hi", max_new_tokens=3, temperature=0.0, top_k=5, seed=7, request_id="mine"
        )
    )
    assert resp.text == "xxx"
    assert list(resp.token_ids) == [1, 2, 3]
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (
        2,
        3,
        5,
    )
    assert resp.request_id == "mine"
    assert (resp.model, resp.model_version) == ("fake", "v1")
    (req,) = h.engine.requests
    assert req.prompt_token_ids == list(b"hi")
    assert req.request_id != "mine"  # engine ids are server-made
    assert req.params.max_new_tokens == 3
    assert req.params.temperature == 0.0
    assert req.params.top_k == 5
    assert req.params.seed == 7
    assert req.params.top_p == 1.0  # unset -> default


async def test_chat_goes_through_the_template(h: Harness) -> None:
    req = pb.GenerateRequest(max_new_tokens=1)
    req.chat.messages.add(role="user", content="yo")
    await h.stub.Generate(req)
    assert bytes(h.engine.requests[0].prompt_token_ids) == b"<user>yo<assistant>"


async def test_stream_sends_every_delta_then_the_finish(h: Harness) -> None:
    chunks = [
        c async for c in h.stub.GenerateStream(pb.GenerateRequest(prompt="a", max_new_tokens=4))
    ]
    assert [c.text for c in chunks] == ["x"] * 4
    assert [c.finish_reason for c in chunks[:-1]] == [pb.FINISH_REASON_UNSPECIFIED] * 3
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 4
    assert not any(c.HasField("usage") for c in chunks[:-1])
    assert len({c.request_id for c in chunks}) == 1


async def test_tokenize_and_model_info(h: Harness) -> None:
    tok = await h.stub.Tokenize(pb.TokenizeRequest(text="ab"))
    assert list(tok.token_ids) == [97, 98] and tok.count == 2
    info = await h.stub.ModelInfo(pb.ModelInfoRequest())
    assert (info.name, info.max_model_len, info.architecture) == ("fake", 64, "FakeForCausalLM")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidRequestError("prompt", "too long"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.QueueFullError("queue is full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.UnavailableError("draining"), grpc.StatusCode.UNAVAILABLE),
        (errors.CancelledError("aborted"), grpc.StatusCode.CANCELLED),
        (errors.DeadlineExceededError("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.AutoGLMError("base class"), grpc.StatusCode.INTERNAL),
    ],
)
async def test_named_errors_map_to_status_codes(
    h: Harness, error: errors.AutoGLMError, code: grpc.StatusCode
) -> None:
    h.engine.admission_error = error
    for call in (h.stub.Generate, h.stub.GenerateStream):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            result = call(pb.GenerateRequest(prompt="a"))
            if isinstance(result, grpc.aio.UnaryStreamCall):
                async for _ in result:
                    pass
            else:
                await result
        assert info.value.code() == code
        assert info.value.details() == str(error)
    assert h.rejected == []  # the engine counts what it raised


async def test_queue_full_carries_retry_after(h: Harness) -> None:
    h.engine.admission_error = errors.QueueFullError("full", retry_after_s=2.0)
    call = h.stub.Generate(pb.GenerateRequest(prompt="a"))
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    assert ("retry-after", "2") in tuple(await call.trailing_metadata())


async def test_unknown_errors_are_internal_without_detail(h: Harness) -> None:
    h.engine.admission_error = RuntimeError("secret /etc/passwd in a stack")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await h.stub.Generate(pb.GenerateRequest(prompt="a"))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "internal error"
    assert "secret" not in (info.value.debug_error_string() or "")


async def test_error_after_streaming_started_is_still_mapped(h: Harness) -> None:
    h.engine.fail_mid_stream = RuntimeError("boom")
    got: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for chunk in h.stub.GenerateStream(pb.GenerateRequest(prompt="a", max_new_tokens=5)):
            got.append(chunk.text)
    assert got == ["x"]
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "internal error"


async def test_validation_errors_name_the_proto_field(h: Harness) -> None:
    cases = [
        (pb.GenerateRequest(), "prompt"),
        (pb.GenerateRequest(prompt="a", max_new_tokens=0), "max_new_tokens"),
        (pb.GenerateRequest(prompt="a", top_p=0.0), "top_p"),
        (pb.GenerateRequest(prompt="a", priority=3), "priority"),  # the engine's check
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.stub.Generate(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(f"{field}: "), info.value.details()
    assert h.engine.requests == []  # nothing invalid was admitted
    # Front-end refusals are counted once each; the engine counts its own (priority).
    assert h.rejected == ["INVALID_ARGUMENT"] * 3


async def test_client_cancel_aborts_the_engine_request(h: Harness) -> None:
    h.engine.step_s = 0.02
    call = h.stub.GenerateStream(pb.GenerateRequest(prompt="a", max_new_tokens=60))
    await call.read()
    (req,) = h.engine.requests
    assert req.request_id in h.engine.running
    call.cancel()
    await _eventually(lambda: req.request_id in h.engine.aborted)
    assert req.request_id not in h.engine.running
    await _eventually(lambda: h.state.in_flight == 0)


async def test_deadline_is_deadline_exceeded_and_aborts(h: Harness) -> None:
    h.engine.step_s = 0.02
    for call in (h.stub.Generate, h.stub.GenerateStream):
        h.engine.requests.clear()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            result = call(pb.GenerateRequest(prompt="a", max_new_tokens=60), timeout=0.3)
            if isinstance(result, grpc.aio.UnaryStreamCall):
                async for _ in result:
                    pass
            else:
                await result
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        (req,) = h.engine.requests
        await _eventually(lambda req=req: req.request_id in h.engine.aborted)


async def test_deadline_abort_is_counted_as_deadline_exceeded(h: Harness) -> None:
    # The engine counts an aborted request under the code it is given: it must
    # be the one the client sees, not CANCELLED.
    h.engine.step_s = 0.02
    for call in (h.stub.Generate, h.stub.GenerateStream):
        h.engine.requests.clear()
        with pytest.raises(grpc.aio.AioRpcError):
            result = call(pb.GenerateRequest(prompt="a", max_new_tokens=60), timeout=0.3)
            if isinstance(result, grpc.aio.UnaryStreamCall):
                async for _ in result:
                    pass
            else:
                await result
        (req,) = h.engine.requests
        await _eventually(lambda req=req: req.request_id in h.engine.abort_codes)
        assert h.engine.abort_codes[req.request_id] == "DEADLINE_EXCEEDED"


async def test_prompt_over_the_size_cap_is_invalid_argument(h: Harness) -> None:
    too_long = "x" * (max_prompt_chars(h.engine.info.max_model_len) + 1)
    chat = pb.GenerateRequest()
    chat.chat.messages.add(role="user", content=too_long)
    calls = [
        (h.stub.Generate(pb.GenerateRequest(prompt=too_long)), "prompt"),
        (h.stub.Generate(chat), "chat.messages"),
        (h.stub.Tokenize(pb.TokenizeRequest(text=too_long)), "text"),
        (h.v2.ModelInfer(_infer_request(too_long.encode())), "inputs[0].contents"),
    ]
    tokenized: list[str] = []
    h.engine.tokenize = lambda text: tokenized.append(text) or []  # type: ignore[method-assign]
    for call, field in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(f"{field}: must be at most"), info.value.details()
    assert tokenized == [] and h.engine.requests == []


async def test_oversized_message_is_refused_before_parsing(h: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await h.stub.Generate(pb.GenerateRequest(prompt="x" * (5 * 1024 * 1024)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert h.engine.requests == []


async def test_tokenizing_does_not_block_the_event_loop(h: Harness) -> None:
    # A slow tokenizer (a long prompt) must not stall health checks or other streams.
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    fast = h.engine.tokenize

    def slow_tokenize(text: str) -> list[int]:
        started.set()
        release.wait(3)  # on the event loop's thread, this would hold everything for 3 s
        finished.set()
        return fast(text)

    h.engine.tokenize = slow_tokenize  # type: ignore[method-assign]
    calls: list[Callable[[], Any]] = [
        lambda: h.stub.Generate(pb.GenerateRequest(prompt="a", max_new_tokens=1)),
        lambda: h.stub.Tokenize(pb.TokenizeRequest(text="a")),
        lambda: h.v2.ModelInfer(_infer_request(b"a")),
    ]
    for start in calls:
        started.clear()
        release.clear()
        finished.clear()
        call = asyncio.ensure_future(start())
        try:
            assert await asyncio.to_thread(started.wait, 5)
            check = h.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            assert (await check).status == health_pb2.HealthCheckResponse.SERVING
            assert not finished.is_set()  # health answered while the tokenizer worked
        finally:
            release.set()
        await call


async def test_not_ready_and_draining_refuse_with_unavailable(h: Harness) -> None:
    h.engine.ready = False
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await h.stub.Generate(pb.GenerateRequest(prompt="a"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    h.engine.ready = True
    h.state.set_phase(Phase.DRAINING)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await h.stub.Generate(pb.GenerateRequest(prompt="a"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in info.value.details()
    assert h.engine.requests == []
    assert h.rejected == ["UNAVAILABLE", "UNAVAILABLE"]


# --------------------------------------------------------------------------- health, reflection


async def test_health_follows_the_state(h: Harness) -> None:
    async def status(service: str) -> int:
        resp = await h.health.Check(health_pb2.HealthCheckRequest(service=service))
        return int(resp.status)

    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    for service in ("", "autoglm.v1.AutoGLM"):
        assert await status(service) == serving
    watch = h.health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await watch.read()).status == serving
    h.engine.ready = False  # the engine died: next probe says so
    assert await status("") == not_serving
    h.engine.ready = True
    h.state.set_phase(Phase.DRAINING)
    assert await status("autoglm.v1.AutoGLM") == not_serving
    assert (await asyncio.wait_for(watch.read(), 5)).status == not_serving
    watch.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await status("no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_before_the_engine_exists() -> None:
    state = ServerState()
    server, port = build_grpc_server(state, "127.0.0.1", 0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.AutoGLMStub(channel).ModelInfo(pb.ModelInfoRequest())
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(grace=None)


async def test_reflection_lists_every_service(h: Harness) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(h.channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    resp = await call.read()
    await call.done_writing()
    names = {s.name for s in resp.list_services_response.service}
    assert {
        "autoglm.v1.AutoGLM",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


# --------------------------------------------------------------------------- KServe v2


def _infer_request(
    text: bytes, raw: bool = False, **params: v2.InferParameter
) -> v2.ModelInferRequest:
    req = v2.ModelInferRequest(model_name="fake", id="r1")
    tensor = req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    if raw:
        req.raw_input_contents.append(struct.pack("<I", len(text)) + text)
    else:
        tensor.contents.bytes_contents.append(text)
    for name, value in params.items():
        req.parameters[name].CopyFrom(value)
    return req


async def test_v2_model_infer_with_contents(h: Harness) -> None:
    resp = await h.v2.ModelInfer(
        _infer_request(
            b"hey",
            max_tokens=v2.InferParameter(int64_param=2),
            temperature=v2.InferParameter(double_param=0.25),
            top_p=v2.InferParameter(string_param="0.5"),
            stop=v2.InferParameter(string_param="\n"),
            client_tag=v2.InferParameter(string_param="ignored"),
        )
    )
    assert (resp.model_name, resp.model_version, resp.id) == ("fake", "v1", "r1")
    (out,) = resp.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("text_output", "BYTES", [1])
    assert list(out.contents.bytes_contents) == [b"xx"]
    assert resp.parameters["finish_reason"].string_param == "length"
    assert resp.parameters["completion_tokens"].int64_param == 2
    params = h.engine.requests[0].params
    assert (params.max_new_tokens, params.temperature, params.top_p, params.stop) == (
        2,
        0.25,
        0.5,
        ("\n",),
    )


async def test_v2_raw_contents_get_raw_output(h: Harness) -> None:
    resp = await h.v2.ModelInfer(
        _infer_request("é".encode(), raw=True, max_tokens=v2.InferParameter(int64_param=3))
    )
    assert bytes(h.engine.requests[0].prompt_token_ids) == "é".encode()
    (raw,) = resp.raw_output_contents
    assert raw == struct.pack("<I", 3) + b"xxx"
    assert not resp.outputs[0].contents.bytes_contents


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.inputs[0].__setattr__("datatype", "FP32"), "inputs[0].datatype"),
        (lambda r: r.inputs[0].shape.__setitem__(0, 2), "inputs[0].shape"),
        (lambda r: r.inputs[0].__setattr__("name", "prompt"), "inputs"),
        (lambda r: r.__setattr__("model_name", "other"), "model_name"),
        (lambda r: r.outputs.add(name="logits"), "outputs[0].name"),
        (
            lambda r: r.parameters["max_tokens"].__setattr__("int64_param", 0),
            "parameters.max_tokens",
        ),
        (
            lambda r: r.parameters["temperature"].__setattr__("string_param", "hot"),
            "parameters.temperature",
        ),
    ],
)
async def test_v2_bad_requests_name_the_field(
    h: Harness, mutate: Callable[[v2.ModelInferRequest], object], field: str
) -> None:
    req = _infer_request(b"hey")
    mutate(req)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await h.v2.ModelInfer(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}: "), info.value.details()


async def test_v2_metadata_and_readiness(h: Harness) -> None:
    assert (await h.v2.ServerLive(v2.ServerLiveRequest())).live
    assert (await h.v2.ServerReady(v2.ServerReadyRequest())).ready
    assert (await h.v2.ModelReady(v2.ModelReadyRequest(name="fake"))).ready
    assert not (await h.v2.ModelReady(v2.ModelReadyRequest(name="other"))).ready
    meta = await h.v2.ModelMetadata(v2.ModelMetadataRequest(name="fake"))
    assert list(meta.versions) == ["v1"]
    assert [(t.name, t.datatype) for t in meta.inputs] == [("text_input", "BYTES")]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("text_output", "BYTES")]
    server = await h.v2.ServerMetadata(v2.ServerMetadataRequest())
    assert server.name == "autoglm"
    h.state.set_phase(Phase.DRAINING)
    assert not (await h.v2.ServerReady(v2.ServerReadyRequest())).ready


# --------------------------------------------------------------------------- bad input (issue 9)


def _raw_call(channel: grpc.aio.Channel, method: str) -> Any:
    """A unary call that sends raw bytes, as a client with a broken encoder would."""
    return channel.unary_unary(
        method, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: pb.GenerateRequest(prompt="XX"), "prompt"),
        (lambda: pb.GenerateRequest(prompt="a", stop=["ok", "XX"]), "stop[1]"),
        (lambda: pb.GenerateRequest(prompt="a", request_id="XX"), "request_id"),
    ],
)
async def test_invalid_utf8_is_invalid_argument_naming_the_field(
    h: Harness, build: Callable[[], pb.GenerateRequest], field: str
) -> None:
    raw = build().SerializeToString().replace(b"XX", b"\xff\xfe")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _raw_call(h.channel, "/autoglm.v1.AutoGLM/Generate")(raw)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}: ")
    assert h.engine.requests == []
    assert h.rejected == ["INVALID_ARGUMENT"]


async def test_invalid_utf8_in_chat_and_v2_names_the_nested_field(h: Harness) -> None:
    req = pb.GenerateRequest(max_new_tokens=1)
    req.chat.messages.add(role="user", content="fine")
    req.chat.messages.add(role="user", content="XX")
    raw = req.SerializeToString().replace(b"XX", b"\xc3(")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _raw_call(h.channel, "/autoglm.v1.AutoGLM/GenerateStream")(raw)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("chat.messages[1].content: ")
    v2_req = v2.ModelInferRequest(model_name="fake", id="XX")
    raw = v2_req.SerializeToString().replace(b"XX", b"\xff")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _raw_call(h.channel, "/inference.GRPCInferenceService/ModelInfer")(raw)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("id: ")
    assert h.rejected == ["INVALID_ARGUMENT"] * 2


@pytest.mark.parametrize("value", [2**31 - 1, 64, 63])
async def test_max_new_tokens_beyond_the_context_is_invalid_argument(
    h: Harness, value: int
) -> None:
    # "ab" is 2 tokens of the fake's 64-token context: 62 fit, 63 do not.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await h.stub.Generate(pb.GenerateRequest(prompt="ab", max_new_tokens=value))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("max_new_tokens: ")
    assert h.engine.requests == []
    assert h.rejected == ["INVALID_ARGUMENT"]
    ok = await h.stub.Generate(pb.GenerateRequest(prompt="ab", max_new_tokens=62))
    assert ok.usage.completion_tokens == 62


async def test_unset_max_new_tokens_is_capped_by_the_context(h: Harness) -> None:
    resp = await h.stub.Generate(pb.GenerateRequest(prompt="a" * 60))
    assert resp.usage.completion_tokens == 4  # 128 by default, 4 left in the context


async def test_too_long_chat_names_chat_messages(h: Harness) -> None:
    req = pb.GenerateRequest(max_new_tokens=1)
    req.chat.messages.add(role="user", content="x" * 70)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await h.stub.Generate(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("chat.messages: ")


async def test_v2_max_tokens_beyond_the_context_is_invalid_argument(h: Harness) -> None:
    req = v2.ModelInferRequest(
        model_name="fake", parameters={"max_tokens": v2.InferParameter(int64_param=2**31 - 1)}
    )
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        b"hi"
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await h.v2.ModelInfer(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("parameters.max_tokens: ")


async def test_internal_errors_are_counted(h: Harness) -> None:
    h.engine.admission_error = RuntimeError("secret")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await h.stub.Generate(pb.GenerateRequest(prompt="a", max_new_tokens=1))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in info.value.details()
    assert h.rejected == ["INTERNAL"]


async def test_v2_repository_index_and_model_config(h: Harness) -> None:
    index = await h.v2.RepositoryIndex(v2.RepositoryIndexRequest())
    assert [(m.name, m.version, m.state) for m in index.models] == [("fake", "v1", "READY")]
    config = (await h.v2.ModelConfig(v2.ModelConfigRequest(name="fake"))).config
    assert (config.name, config.max_batch_size) == ("fake", 0)
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("text_input", v2.TYPE_STRING, [1])
    ]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await h.v2.ModelConfig(v2.ModelConfigRequest(name="other"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    h.state.set_phase(Phase.DRAINING)
    assert list((await h.v2.RepositoryIndex(v2.RepositoryIndexRequest(ready=True))).models) == []
    (entry,) = (await h.v2.RepositoryIndex(v2.RepositoryIndexRequest())).models
    assert (entry.state, entry.reason) == ("UNAVAILABLE", "draining")
