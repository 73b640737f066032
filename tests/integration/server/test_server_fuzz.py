"""Fuzzing, bounded: every input gets a 4xx / INVALID_ARGUMENT (or a normal answer),
never a 5xx, INTERNAL/UNKNOWN, a crash or a hang.

- schemathesis over the HTTP API's own OpenAPI description (request bodies
  included, see ``openai_http._openapi``);
- hypothesis over autoglm.v1 GenerateRequest messages (every field, edge
  values, tools, chat with tool calls) and over raw bytes sent as a message.

A dedicated server with a 96-token context keeps each generated request short;
each call has a 60 s deadline, so a hang fails the test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import ServerProcess, serving

from autoglm_server.proto.autoglm.v1 import autoglm_pb2 as pb

EXAMPLES = int(os.environ.get("AUTOGLM_FUZZ_EXAMPLES", "60"))  # more for a longer hunt
ALLOWED_GRPC = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "NOT_FOUND"}
CALL_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def fuzz_server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tiny_model, tmp_path_factory.mktemp("fuzz"), "--served-model-name", "tiny",
        "--max-model-len", "96", "--http-max-body-bytes", "65536",
    )  # fmt: skip
    with serving(proc):
        yield proc
        assert proc.metric("autoglm_requests_total", default=0.0, code="INTERNAL") == 0.0
        assert proc.metric("autoglm_requests_total", default=0.0, code="UNKNOWN") == 0.0


def _operations() -> list[Any]:
    """The HTTP API's operations, from the app's own OpenAPI description."""
    from autoglm_server.frontend import ServerState
    from autoglm_server.http_server import build_http_app

    raw = build_http_app(ServerState(), None).openapi()
    return [result.ok() for result in schemathesis.openapi.from_dict(raw).get_all_operations()]


OPERATIONS = {op.label: op for op in _operations()}


# GETs take no input: only valid cases exist for them.
CASES = [(label, "positive") for label in sorted(OPERATIONS)] + [
    (label, "negative") for label in sorted(OPERATIONS) if label.startswith("POST")
]


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_http_openapi_fuzz(fuzz_server: ServerProcess, label: str, mode: str) -> None:
    """Cases schemathesis derives from the OpenAPI description: valid ones (positive) and
    ones that break it (negative), sent to the real server."""
    op = OPERATIONS[label]
    base = f"http://127.0.0.1:{fuzz_server.http_port}"
    strategy = op.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    def run(case: Any) -> None:
        response = case.call(base_url=base, timeout=CALL_TIMEOUT_S)
        assert response.status_code < 500, (case.body, response.text[:500])
        if response.status_code >= 400:
            assert "error" in response.json()

    run()


# --------------------------------------------------------------------------- gRPC

_text = st.text(max_size=40) | st.sampled_from(["", "\x00", "\ufffd", "😀" * 5, "a" * 300])
_small_int = st.integers(-3, 6) | st.sampled_from([2**31 - 1, -(2**31), 97, 0])
_float = st.floats(allow_nan=True, allow_infinity=True, width=64) | st.sampled_from(
    [0.0, -0.0, 1e-300, 2.0, 2.0000001, -2.0]
)
_schema_text = st.sampled_from(
    ["{}", '{"type": "object"}', "[1]", "nope", '{"type": "integer"}', '{"$ref": "#/x"}', ""]
) | st.text(max_size=30)
_tool = st.builds(
    pb.Tool,
    name=st.sampled_from(["get_weather", "f", "bad name", "", "x" * 70]),
    description=_text,
    parameters=_schema_text,
)
_call = st.builds(
    pb.ToolCall, id=_text, name=st.sampled_from(["get_weather", "f", ""]), arguments=_schema_text
)
_message = st.builds(
    pb.ChatMessage,
    role=st.sampled_from(["system", "user", "assistant", "tool", "developer", "", "root"]),
    content=_text,
    tool_call_id=_text,
    tool_calls=st.lists(_call, max_size=2),
    name=st.sampled_from(["", "bob"]),
)
_choice = st.one_of(
    st.none(),
    st.builds(pb.ToolChoice, mode=st.integers(0, 5)),
    st.builds(pb.ToolChoice, function=st.sampled_from(["get_weather", "nope", ""])),
)


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    req = pb.GenerateRequest()
    if draw(st.booleans()):
        req.prompt = draw(_text)
    elif draw(st.booleans()):
        req.chat.messages.extend(draw(st.lists(_message, max_size=3)))
    for name, strategy in (
        ("max_new_tokens", _small_int),
        ("temperature", _float),
        ("top_p", _float),
        ("top_k", _small_int),
        ("repetition_penalty", _float),
        ("seed", st.integers(-(2**63), 2**63 - 1)),
        ("presence_penalty", _float),
        ("frequency_penalty", _float),
        ("logprobs", _small_int),
        ("json_schema", _schema_text),
        ("n", _small_int),
        ("parallel_tool_calls", st.booleans()),
    ):
        if draw(st.booleans()):
            setattr(req, name, draw(strategy))
    req.stop.extend(draw(st.lists(_text, max_size=3)))
    req.priority = draw(_small_int)
    req.ignore_eos = draw(st.booleans())
    req.request_id = draw(_text)
    for token, bias in draw(st.dictionaries(st.integers(0, 2**32 - 1), _float, max_size=3)).items():
        req.logit_bias[token] = bias
    req.tools.extend(draw(st.lists(_tool, max_size=2)))
    choice = draw(_choice)
    if choice is not None:
        req.tool_choice.CopyFrom(choice)
    return req


def _code(call: Any) -> str:
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            list(result)
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


@given(request=generate_requests(), stream=st.booleans())
@settings(
    max_examples=EXAMPLES * 2, deadline=None, suppress_health_check=list(HealthCheck), database=None
)
def test_grpc_messages_fuzz(
    fuzz_server: ServerProcess, request: pb.GenerateRequest, stream: bool
) -> None:
    channel = fuzz_server.channel
    method = "/autoglm.v1.AutoGLM/GenerateStream" if stream else "/autoglm.v1.AutoGLM/Generate"
    rpc = (channel.unary_stream if stream else channel.unary_unary)(
        method,
        request_serializer=pb.GenerateRequest.SerializeToString,
        response_deserializer=(
            pb.GenerateStreamResponse if stream else pb.GenerateResponse
        ).FromString,
    )
    code = _code(lambda: rpc(request, timeout=CALL_TIMEOUT_S))
    assert code in ALLOWED_GRPC, (code, request)


@given(data=st.binary(max_size=200))
@settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
)
def test_grpc_raw_bytes_fuzz(fuzz_server: ServerProcess, data: bytes) -> None:
    rpc = fuzz_server.channel.unary_unary(
        "/autoglm.v1.AutoGLM/Generate",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    code = _code(lambda: rpc(data, timeout=CALL_TIMEOUT_S))
    assert code in ALLOWED_GRPC, (code, data)
