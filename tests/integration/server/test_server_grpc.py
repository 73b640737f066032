"""autoglm.v1 against a real server process: generation, cancellation,
deadlines, validation, reflection."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_helpers import ServerProcess

from autoglm_server.client import AsyncAutoGLMClient, AutoGLMClient
from autoglm_server.proto.autoglm.v1 import autoglm_pb2 as pb
from autoglm_server.proto.autoglm.v1 import autoglm_pb2_grpc as pb_grpc

LONG = 1500  # tokens: seconds of work for the tiny model


@pytest.fixture
def stub(server: ServerProcess) -> pb_grpc.AutoGLMStub:
    return pb_grpc.AutoGLMStub(server.channel)


def test_unary_generation(stub: pb_grpc.AutoGLMStub) -> None:
    resp = stub.Generate(
        pb.GenerateRequest(prompt="Hello, world!", max_new_tokens=8, ignore_eos=True, seed=1),
        timeout=30,
    )
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(resp.token_ids) == 8
    assert resp.usage.completion_tokens == 8
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8
    assert resp.model == "tiny"
    again = stub.Generate(
        pb.GenerateRequest(prompt="Hello, world!", max_new_tokens=8, ignore_eos=True, seed=1),
        timeout=30,
    )
    assert list(again.token_ids) == list(resp.token_ids)  # seeded sampling repeats


def test_streaming_generation_matches_unary(stub: pb_grpc.AutoGLMStub) -> None:
    req = pb.GenerateRequest(
        prompt="The quick brown fox", max_new_tokens=12, temperature=0.0, ignore_eos=True
    )
    whole = stub.Generate(req, timeout=30)
    chunks = list(stub.GenerateStream(req, timeout=30))
    assert len(chunks) >= 2
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_request(stub: pb_grpc.AutoGLMStub) -> None:
    req = pb.GenerateRequest(max_new_tokens=4, ignore_eos=True)
    req.chat.messages.add(role="system", content="Be brief.")
    req.chat.messages.add(role="user", content="Hi!")
    resp = stub.Generate(req, timeout=30)
    tokenized = stub.Tokenize(pb.TokenizeRequest(chat=req.chat), timeout=10)
    assert resp.usage.prompt_tokens == tokenized.count > 0


def test_client_class_and_model_info(server: ServerProcess) -> None:
    with AutoGLMClient(server.target, timeout=30) as client:
        assert client.health() == "SERVING"
        info = client.model_info()
        assert (info.name, info.max_model_len, info.architecture) == (
            "tiny",
            2048,
            "Glm4ForCausalLM",
        )
        result = client.generate("Hi", max_new_tokens=3, ignore_eos=True)
        assert result.finish_reason == "length" and result.completion_tokens == 3
        chunks = list(client.generate_stream("Hi", max_new_tokens=3, ignore_eos=True))
        assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 3


async def test_async_client_answers_as_the_blocking_one(server: ServerProcess) -> None:
    """AsyncAutoGLMClient (the load generator's) builds the same requests and reads the
    same answers as AutoGLMClient; its ``deadline`` reaches the server."""
    knobs: dict[str, Any] = {"max_new_tokens": 4, "ignore_eos": True, "temperature": 0.0}
    with AutoGLMClient(server.target, timeout=30) as blocking:
        want = blocking.generate("Hi", **knobs)
        want_ids = blocking.tokenize("Hello there")
        want_info = blocking.model_info()
    async with AsyncAutoGLMClient(server.target, timeout=30) as client:
        assert await client.health() == "SERVING"
        assert await client.model_info() == want_info
        assert await client.tokenize("Hello there") == want_ids
        got = await client.generate("Hi", **knobs)
        assert (got.text, got.token_ids, got.finish_reason, got.prompt_tokens) == (
            want.text, want.token_ids, "length", want.prompt_tokens,
        )  # fmt: skip
        chunks = [chunk async for chunk in client.generate_stream("Hi", **knobs)]
        assert [t for chunk in chunks for t in chunk.token_ids] == want.token_ids
        assert chunks[-1].completion_tokens == 4
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.generate("go", max_new_tokens=LONG, ignore_eos=True, deadline=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    server.wait_metric("autoglm_running_requests", 0)


def test_cancellation_frees_the_slot(server: ServerProcess, stub: pb_grpc.AutoGLMStub) -> None:
    call = stub.GenerateStream(
        pb.GenerateRequest(prompt="go", max_new_tokens=LONG, ignore_eos=True)
    )
    stream = iter(call)
    next(stream), next(stream)
    assert server.metric("autoglm_running_requests") == 1
    call.cancel()
    server.wait_metric("autoglm_running_requests", 0)
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.CANCELLED


@pytest.mark.parametrize("streaming", [False, True])
def test_deadline_is_deadline_exceeded_and_frees_the_slot(
    server: ServerProcess, stub: pb_grpc.AutoGLMStub, streaming: bool
) -> None:
    def finished(code: str) -> float:
        return server.metric("autoglm_requests_total", default=0.0, code=code)

    before = {code: finished(code) for code in ("DEADLINE_EXCEEDED", "CANCELLED")}
    req = pb.GenerateRequest(prompt="go", max_new_tokens=LONG, ignore_eos=True)
    with pytest.raises(grpc.RpcError) as info:
        if streaming:
            list(stub.GenerateStream(req, timeout=0.5))
        else:
            stub.Generate(req, timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    server.wait_metric("autoglm_running_requests", 0)
    # Counted as the client saw it.
    deadline = time.monotonic() + 10
    while finished("DEADLINE_EXCEEDED") != before["DEADLINE_EXCEEDED"] + 1:
        assert time.monotonic() < deadline, server.metrics()
        time.sleep(0.02)
    assert finished("CANCELLED") == before["CANCELLED"]


def _chat(*messages: tuple[str, str]) -> dict[str, Any]:
    return {
        "chat": pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages])
    }


INVALID = [
    ("no input", {}, "prompt"),
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("zero max_new_tokens", {"prompt": "a", "max_new_tokens": 0}, "max_new_tokens"),
    ("negative max_new_tokens", {"prompt": "a", "max_new_tokens": -4}, "max_new_tokens"),
    ("negative temperature", {"prompt": "a", "temperature": -0.1}, "temperature"),
    ("huge temperature", {"prompt": "a", "temperature": 50.0}, "temperature"),
    ("nan temperature", {"prompt": "a", "temperature": float("nan")}, "temperature"),
    ("zero top_p", {"prompt": "a", "top_p": 0.0}, "top_p"),
    ("top_p above one", {"prompt": "a", "top_p": 1.5}, "top_p"),
    ("negative top_k", {"prompt": "a", "top_k": -1}, "top_k"),
    ("zero repetition_penalty", {"prompt": "a", "repetition_penalty": 0.0}, "repetition_penalty"),
    ("empty stop sequence", {"prompt": "a", "stop": [""]}, "stop"),
    ("too many stop sequences", {"prompt": "a", "stop": [str(i) for i in range(17)]}, "stop"),
    ("negative seed", {"prompt": "a", "seed": -1}, "seed"),
    ("negative priority", {"prompt": "a", "priority": -1}, "priority"),
    ("priority beyond the levels", {"prompt": "a", "priority": 1}, "priority"),
    ("prompt beyond the context", {"prompt": "the " * 3000}, "prompt"),
    ("no chat messages", _chat(), "chat.messages"),
    ("unknown chat role", _chat(("wizard", "hi")), "chat.messages[0].role"),
    ("long request_id", {"prompt": "a", "request_id": "x" * 500}, "request_id"),
]


@pytest.mark.parametrize(
    ("fields", "field"), [(c[1], c[2]) for c in INVALID], ids=[c[0] for c in INVALID]
)
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_invalid_input_is_invalid_argument_naming_the_field(
    stub: pb_grpc.AutoGLMStub, fields: dict[str, Any], field: str, method: str
) -> None:
    req = pb.GenerateRequest(**fields)
    with pytest.raises(grpc.RpcError) as info:
        result = getattr(stub, method)(req, timeout=30)
        if method == "GenerateStream":
            list(result)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}: "), info.value.details()


def test_reflection_lists_the_services(server: ServerProcess) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    (resp,) = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for s in resp.list_services_response.service}
    assert {
        "autoglm.v1.AutoGLM",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
    } <= names
    # ... and serves their descriptors, which is what grpcurl needs.
    (resp,) = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="autoglm.v1.AutoGLM")]),
        timeout=10,
    )
    assert resp.file_descriptor_response.file_descriptor_proto
