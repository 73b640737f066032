"""Chat templates (GLM-4 and Llama-3 styles, built here) and the tool-call parsers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from autoglm_server.errors import InvalidRequestError
from autoglm_server.frontends.chat import ChatRenderer, read_template, template_messages
from autoglm_server.frontends.openai_protocol import ChatCompletionRequest
from autoglm_server.frontends.tools import (
    Glm4ToolParser,
    Llama3JsonToolParser,
    ToolSpec,
    parser_for_template,
)

GLM4 = (
    "[gMASK]<sop>"
    "{% if tools %}<|system|>\n# Tools\n{% for t in tools %}{{ t.function.name }}: "
    "{{ t.function.parameters | tojson }}\n{% endfor %}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|observation|>\n{{ m.content }}"
    "{% elif m.role == 'assistant' and m.tool_calls %}"
    "{% for c in m.tool_calls %}<|assistant|>{{ c.function.name }}\n"
    "{{ c.function.arguments | tojson }}{% endfor %}"
    "{% else %}<|{{ m.role }}|>\n{{ m.content }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
LLAMA3 = (
    "<|begin_of_text|>"
    "{% for m in messages %}"
    "{% if loop.index0 == 0 and m.role == 'assistant' %}"
    "{{ raise_exception('the first message must not be the assistant') }}{% endif %}"
    "<|start_header_id|>{{ 'ipython' if m.role == 'tool' else m.role }}<|end_header_id|>\n\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}'
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CONVERSATION: dict[str, Any] = {
    "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ],
    "tools": TOOLS,
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _render(tokenizer: Any, template: str | None, body: dict[str, Any]) -> str:
    request = ChatCompletionRequest.model_validate(body)
    ids = ChatRenderer(tokenizer, template).render(
        template_messages(request.messages), tools=body.get("tools")
    )
    return str(tokenizer.decode(ids))


def test_glm4_template_renders_tools_calls_and_results(tokenizer: Any) -> None:
    text = _render(tokenizer, GLM4, CONVERSATION)
    assert text.startswith("[gMASK]<sop><|system|>\n# Tools\nget_weather: ")
    assert "<|system|>\nBe brief." in text  # developer is rendered as system
    assert '<|assistant|>get_weather\n{"city": "Paris"}' in text  # arguments as an object
    assert text.endswith("<|observation|>\nsunny<|assistant|>\n")


def test_llama3_template_and_its_errors(tokenizer: Any) -> None:
    text = _render(tokenizer, LLAMA3, CONVERSATION)
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\nsunny<|eot_id|>" in text
    with pytest.raises(InvalidRequestError) as info:
        _render(tokenizer, LLAMA3, {"messages": [{"role": "assistant", "content": "hi"}]})
    assert info.value.field == "messages"
    assert "must not be the assistant" in str(info.value)


def test_the_tokenizer_template_is_the_default(tokenizer: Any) -> None:
    text = _render(tokenizer, None, {"messages": [{"role": "user", "content": "hi"}]})
    assert text == "<|user|>\nhi<|assistant|>\n"


def test_bad_tool_messages_name_the_field() -> None:
    for messages, field in [
        ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{"}}
                    ],
                }
            ],
            "messages[0].tool_calls[0].function.arguments",
        ),
    ]:
        request = ChatCompletionRequest.model_validate({"messages": messages})
        with pytest.raises(InvalidRequestError) as info:
            template_messages(request.messages)
        assert info.value.field == field


def test_read_template_names_the_flag(tmp_path: Path) -> None:
    good = tmp_path / "t.jinja"
    good.write_text(GLM4)
    assert read_template(str(good)) == GLM4
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for x in %}")
    with pytest.raises(ValueError, match="chat_template"):
        read_template(str(bad))
    with pytest.raises(ValueError, match="chat_template"):
        read_template(str(tmp_path / "missing.jinja"))


SPECS = [ToolSpec("get_weather", {"type": "object"}), ToolSpec("get_time", None)]


def test_glm4_parser() -> None:
    p = Glm4ToolParser()
    (call,) = p.parse('get_weather\n{"city": "Paris"}', SPECS)
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert p.parse("The weather is fine.", SPECS) == []
    assert p.parse('unknown\n{"a": 1}', SPECS) == []
    assert p.parse("get_weather\n[1]", SPECS) == []
    assert p.may_be_call("get_w", SPECS) and p.may_be_call("get_weather\n{", SPECS)
    assert not p.may_be_call("The", SPECS) and not p.may_be_call("get_weatherman\n", SPECS)
    assert p.grammar(SPECS[:1]).alternatives == (("get_weather\n", '{"type": "object"}'),)


def test_llama3_parser() -> None:
    p = Llama3JsonToolParser()
    text = '<|python_tag|>{"name": "get_time", "parameters": {}}; {"name": "get_weather", "arguments": {"city": "Lima"}}'
    calls = p.parse(text, SPECS)
    assert [c.name for c in calls] == ["get_time", "get_weather"]
    assert len({c.id for c in calls}) == 2
    assert p.parse('{"name": "nope", "parameters": {}}', SPECS) == []
    assert p.parse("plain words", SPECS) == []
    assert p.may_be_call("  {", SPECS) and p.may_be_call("<|pyth", SPECS)
    assert not p.may_be_call("Hi", SPECS)
    schema = json.loads(p.grammar(SPECS).alternatives[0][1])
    assert [v["properties"]["name"]["const"] for v in schema["anyOf"]] == [
        "get_weather",
        "get_time",
    ]


def test_parser_picked_from_the_template() -> None:
    assert isinstance(parser_for_template(LLAMA3), Llama3JsonToolParser)
    assert isinstance(parser_for_template(GLM4), Glm4ToolParser)


def test_logprob_bytes_join_into_the_exact_output(tokenizer: Any) -> None:
    from types import SimpleNamespace

    from autoglm_server.frontends.openai_http import _TokenText

    text = "Grüße, 你好\uff0c世界\u3002🚀✨ ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    token_text = _TokenText(SimpleNamespace(tokenizer=tokenizer))  # type: ignore[arg-type]
    assert any("\ufffd" in token_text(i) for i in ids)  # some tokens hold part of a character
    assert bytes(b for i in ids for b in token_text.bytes(i)) == text.encode("utf-8")
