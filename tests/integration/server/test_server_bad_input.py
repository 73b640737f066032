"""Bad input against a real server process: every one is the client's error (4xx /
INVALID_ARGUMENT naming the field) and is counted in autoglm_requests_total; a
client hanging up is not logged as a server error; --log-format json keeps
stderr JSON."""

from __future__ import annotations

import json

import grpc
import pytest
from server_helpers import ServerProcess, hang_up_mid_generation

from autoglm_server.proto.autoglm.v1 import autoglm_pb2 as pb

JSON = {"content-type": "application/json"}


def _count(server: ServerProcess, code: str) -> float:
    return server.metric("autoglm_requests_total", 0.0, code=code)


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', "body"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800"}', "prompt"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
            "messages[0].content",
        ),
        ("/v1/chat/completions", b"[" * 5000 + b"]" * 5000, "body"),
        ("/v1/completions", b'{"prompt": "hi", "max_tokens": 1000000000}', "max_tokens"),
        ("/v1/completions", b'{"prompt": "hi", "max_tokens": 9223372036854775808}', "max_tokens"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 50}',
            "top_logprobs",
        ),
    ],
)
def test_http_bad_input_is_400_and_counted(
    server: ServerProcess, path: str, raw: bytes, param: str
) -> None:
    before = _count(server, "INVALID_ARGUMENT")
    resp = server.http.post(path, content=raw, headers=JSON)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert _count(server, "INVALID_ARGUMENT") == before + 1


def test_too_long_chat_names_messages(server: ServerProcess) -> None:
    words = " ".join(f"w{i}" for i in range(3000))  # far more than the 2048-token context
    resp = server.http.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": words}]}
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "messages"


def test_grpc_invalid_utf8_is_invalid_argument_naming_the_field(server: ServerProcess) -> None:
    before = _count(server, "INVALID_ARGUMENT")
    raw = pb.GenerateRequest(prompt="XX", max_new_tokens=1).SerializeToString()
    call = server.channel.unary_unary(
        "/autoglm.v1.AutoGLM/Generate",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as info:
        call(raw.replace(b"XX", b"\xff\xfe"), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("prompt: ")
    with pytest.raises(grpc.RpcError) as info:
        call(pb.GenerateRequest(prompt="hi", max_new_tokens=2**31 - 1).SerializeToString())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("max_new_tokens: ")
    assert _count(server, "INVALID_ARGUMENT") == before + 2
    assert "Traceback" not in server.log()


def test_client_hang_up_is_not_logged_as_an_error(server: ServerProcess) -> None:
    start = len(server.log())
    hang_up_mid_generation(server)
    # One more request, so anything logged after the hang-up has been written.
    assert server.http.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).is_success
    tail = server.log()[start:]
    assert " ERROR " not in tail and "Traceback" not in tail, tail[-3000:]


def test_json_log_format_keeps_stderr_json(start_server: type[ServerProcess]) -> None:
    proc = start_server("--served-model-name", "tiny", "--log-format", "json")
    proc.wait_serving()
    assert proc.http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).is_success
    # The grammar path runs native code (xgrammar) that may write to fd 2 itself.
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    body = {"messages": [{"role": "user", "content": "x"}], "response_format": fmt}
    assert proc.http.post("/v1/chat/completions", json={**body, "max_tokens": 8}).is_success
    assert proc.stop() == 0
    lines = [line for line in proc.log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        record = json.loads(line)  # a plain-text line (a progress bar, a warning) fails here
        assert {"ts", "level", "logger", "msg"} <= set(record)
