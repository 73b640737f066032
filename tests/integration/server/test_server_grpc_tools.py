"""autoglm.v1 has what the OpenAI API has: n choices, tools with every tool_choice
(streamed and not), parallel_tool_calls, tool results going back in, json_schema;
through the project's client against a real server process (tiny random GLM-4)."""

from __future__ import annotations

import json
from typing import Any

import grpc
import jsonschema
import pytest
import tool_defs
from server_helpers import ServerProcess
from tool_defs import WEATHER

from autoglm_server.client import AutoGLMClient, StreamChunk

TIME = tool_defs.TIME["function"]  # the flat shape the client also takes
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["parameters"]}
USER = [("user", "What is the weather in Paris?")]


@pytest.fixture
def client(server: ServerProcess) -> Any:
    with AutoGLMClient(server.target, timeout=120) as c:
        yield c


def _assemble(chunks: list[StreamChunk]) -> tuple[dict[int, dict[str, str]], str, str | None]:
    calls: dict[int, dict[str, str]] = {}
    text = ""
    finish = None
    for chunk in chunks:
        text += chunk.text
        for d in chunk.tool_calls:
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = call["id"] or d.id
            call["name"] = call["name"] or d.name
            call["arguments"] += d.arguments
        finish = chunk.finish_reason or finish
    return calls, text, finish


def test_n_choices_unary_and_streamed(client: Any) -> None:
    result = client.generate(
        "Hello", n=4, max_new_tokens=5, ignore_eos=True, seed=7, temperature=1.0
    )
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for c in result.choices)
    assert result.completion_tokens == 20
    assert result.token_ids == result.choices[0].token_ids
    assert len({tuple(c.token_ids) for c in result.choices}) > 1  # seeds seed + i differ
    chunks = list(
        client.generate_stream(
            "Hello", n=4, max_new_tokens=5, ignore_eos=True, seed=7, temperature=1.0
        )
    )
    per_choice: dict[int, list[int]] = {}
    for chunk in chunks:
        per_choice.setdefault(chunk.index, []).extend(chunk.token_ids)
    assert per_choice == {c.index: c.token_ids for c in result.choices}
    assert chunks[-1].completion_tokens == 20
    with pytest.raises(grpc.RpcError) as info:
        client.generate("Hello", n=17)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("n: ")


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_and_named(client: Any, stream: bool) -> None:
    tools = [WEATHER, TIME]
    for choice, want_name in [("required", None), ({"function": "get_time"}, "get_time")]:
        for seed in range(2):
            kwargs = dict(messages=USER, tools=tools, tool_choice=choice, seed=seed)
            kwargs["max_new_tokens"] = 200
            if stream:
                calls, text, finish = _assemble(list(client.generate_stream(**kwargs)))
                got = [calls[i] for i in sorted(calls)]
            else:
                result = client.generate(**kwargs)
                got = [
                    {"id": c.id, "name": c.name, "arguments": c.arguments}
                    for c in result.tool_calls
                ]
                text, finish = result.text, result.finish_reason
            assert finish == "tool_calls" and text == ""
            assert len(got) == 1 and got[0]["id"].startswith("call_")
            assert want_name in (None, got[0]["name"])
            jsonschema.validate(json.loads(got[0]["arguments"]), SCHEMAS[got[0]["name"]])


def test_tool_choice_none_auto_and_tool_results(client: Any) -> None:
    base = dict(messages=USER, tools=[WEATHER], max_new_tokens=6, temperature=0.0)
    none = client.generate(**base, tool_choice="none", ignore_eos=True)
    assert none.tool_calls == [] and none.finish_reason == "length" and none.text
    auto = client.generate(**base, tool_choice="auto", ignore_eos=True)
    assert auto.text == none.text  # the random model writes prose: content
    history = [
        *USER,
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    after = client.generate(messages=history, tools=[WEATHER], max_new_tokens=2)
    assert after.prompt_tokens > none.prompt_tokens


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(prompt="x", tools=[WEATHER]), "tools"),
        (dict(messages=USER, tool_choice="required"), "tool_choice"),
        (
            dict(messages=USER, tools=[WEATHER], tool_choice={"function": "nope"}),
            "tool_choice.function.name",
        ),
        (dict(messages=USER, tools=[{"name": "bad name"}]), "tools[0].name"),
        (dict(messages=USER, tools=[{"name": "f", "parameters": "[1"}]), "tools[0].parameters"),
        (dict(messages=USER, tools=[WEATHER, WEATHER]), "tools"),
        (
            dict(messages=USER, tools=[WEATHER], tool_choice="required", json_schema={}),
            "json_schema",
        ),
        (
            dict(messages=[("user", "x"), {"role": "tool", "content": "r"}]),
            "chat.messages[1].tool_call_id",
        ),
        (
            dict(
                messages=[
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "name": "f", "arguments": "[]"}],
                    }
                ]
            ),
            "chat.messages[0].tool_calls[0].arguments",
        ),
    ],
)
def test_tool_errors_name_the_field(client: Any, kwargs: dict[str, Any], field: str) -> None:
    prompt = kwargs.pop("prompt", None)
    with pytest.raises(grpc.RpcError) as info:
        client.generate(prompt, max_new_tokens=2, **kwargs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(f"{field}: "), info.value.details()


def test_json_object_and_schema(client: Any) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "enum": ["Ann", "Bo"]},
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["name", "n"],
        "additionalProperties": False,
    }
    for seed in range(5):
        out = client.generate("Person:", json_schema=schema, seed=seed, max_new_tokens=100)
        assert out.finish_reason == "stop", out
        jsonschema.validate(json.loads(out.text), schema)
    # {} is any JSON object (OpenAI's json_object); the random model may write a long one.
    anything = client.generate("Any:", json_schema={}, seed=0, max_new_tokens=40)
    assert anything.text.startswith("{")
    if anything.finish_reason == "stop":
        assert isinstance(json.loads(anything.text), dict)
