"""The HTTP port against a real server: the official openai client unmodified,
OpenAI-shaped errors, client disconnects, and /metrics."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import openai
import pytest
from server_helpers import ServerProcess, hang_up_mid_generation

from autoglm_server.client import AutoGLMClient
from autoglm_server.proto.autoglm.v1 import autoglm_pb2 as pb
from autoglm_server.proto.autoglm.v1 import autoglm_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[3]


def test_openai_models(oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list()] == ["tiny"]


def test_openai_chat(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello!"},
        ],
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert resp.object == "chat.completion"
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 6
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 6


def test_openai_streaming_chat(oai: openai.OpenAI) -> None:
    kwargs = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Count to three."}],
        "max_tokens": 8,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    whole = oai.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    stream = oai.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )  # type: ignore[call-overload]
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_openai_completions(oai: openai.OpenAI) -> None:
    resp = oai.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 5
    streamed = list(
        oai.completions.create(
            model="tiny",
            prompt="Once upon a time",
            max_tokens=5,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert streamed[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"n": 17}, "n"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_openai_client_sees_400_naming_the_field(
    oai: openai.OpenAI, kwargs: dict[str, object], param: str
) -> None:
    request = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(**request)  # type: ignore[call-overload]
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param
    assert body["message"].startswith(f"{param}: ")


def test_unknown_model_is_404(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-17", prompt="hi", max_tokens=1)


def test_stream_disconnect_aborts_the_request(server: ServerProcess) -> None:
    body = {
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with server.http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        seen = 0
        for line in resp.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                assert server.metric("autoglm_running_requests") == 1
                break  # closes the connection mid-stream
    assert seen == 3
    server.wait_metric("autoglm_running_requests", 0)


def test_non_streaming_disconnect_aborts_the_request(server: ServerProcess) -> None:
    cancelled = server.metric("autoglm_requests_total", 0.0, code="CANCELLED")
    ok = server.metric("autoglm_requests_total", 0.0, code="OK")
    # The client is gone mid-generation: the slot is freed and the request is
    # counted as cancelled, not run to its 1500 tokens.
    hang_up_mid_generation(server)
    assert server.metric("autoglm_requests_total", 0.0, code="CANCELLED") == cancelled + 1
    assert server.metric("autoglm_requests_total", 0.0, code="OK") == ok


def _documented_metric_names() -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("## Contract: metrics") :]
    return re.findall(r"^\| `(autoglm_[a-z0-9_]+)` \|", section, flags=re.M)


def test_metrics_expose_the_documented_names_and_move(server: ServerProcess) -> None:
    names = _documented_metric_names()
    assert len(names) >= 10
    before = server.metric("autoglm_requests_total", 0.0, code="OK")
    tokens_before = server.metric("autoglm_generation_tokens_total")
    prompt_before = server.metric("autoglm_prompt_tokens_total")
    ttft_before = server.metric("autoglm_time_to_first_token_seconds_count")
    with AutoGLMClient(server.target, timeout=30) as client:
        for _ in range(3):
            client.generate("Hello there", max_new_tokens=4, ignore_eos=True)
    assert server.metric("autoglm_requests_total", code="OK") == before + 3
    assert server.metric("autoglm_generation_tokens_total") >= tokens_before + 12
    assert server.metric("autoglm_prompt_tokens_total") > prompt_before
    assert server.metric("autoglm_time_to_first_token_seconds_count") == ttft_before + 3
    assert server.metric("autoglm_requests_per_second") > 0
    # Refusals count once each, whether the front end or the engine refused.
    invalid_before = server.metric("autoglm_requests_total", 0.0, code="INVALID_ARGUMENT")
    stub = pb_grpc.AutoGLMStub(server.channel)
    for bad in (
        pb.GenerateRequest(prompt="a", top_p=2.0),
        pb.GenerateRequest(prompt="a", priority=3),
    ):
        with pytest.raises(grpc.RpcError):
            stub.Generate(bad, timeout=10)
    assert (
        server.http.post("/v1/completions", json={"prompt": "a", "max_tokens": 0}).status_code
        == 400
    )
    assert server.metric("autoglm_requests_total", code="INVALID_ARGUMENT") == invalid_before + 3
    assert server.metric("autoglm_time_to_first_token_p95_seconds") > 0
    for port in (server.http_port, server.metrics_port):
        samples = server.metrics(port)
        exposed = {name for name, _ in samples}
        for name in names:
            if name.startswith("autoglm_gpu_"):
                continue  # NVML gauges exist only on GPU machines
            histogram = {f"{name}_count", f"{name}_sum"}
            assert name in exposed or histogram <= exposed, f"{name} missing on port {port}"
        for (name, labels), _ in samples.items():
            if name.startswith("autoglm_"):
                keys = {k for k, _ in labels} - {"le", "code", "gpu"}
                # The config info gauge also names what the server chose at load.
                extra = {"quantization", "tensor_parallel_size"}
                expected = {"model", "version"} | (
                    extra if name == "autoglm_model_config_info" else set()
                )
                assert keys == expected, (name, labels)
