"""Request validation: defaults, limits, and that errors name the wire field."""

from __future__ import annotations

from typing import Any

import pytest

from autoglm_server.engine.api import SamplingParams
from autoglm_server.errors import InvalidRequestError
from autoglm_server.validation import (
    format_loc,
    validate_chat,
    validate_params,
    validate_prompt,
    validate_request_id,
)


def test_unset_values_take_the_engine_defaults() -> None:
    params = validate_params({"temperature": None, "top_p": None, "stop": ()})
    assert params.to_sampling_params() == SamplingParams()
    assert params.priority == 0


def test_values_reach_sampling_params() -> None:
    params = validate_params(
        {
            "max_new_tokens": 7,
            "temperature": 0.0,
            "top_p": 0.5,
            "top_k": 3,
            "repetition_penalty": 1.2,
            "stop": ("\n",),
            "seed": 42,
            "ignore_eos": True,
            "priority": 1,
        }
    )
    assert params.to_sampling_params() == SamplingParams(
        max_new_tokens=7,
        temperature=0.0,
        top_p=0.5,
        top_k=3,
        repetition_penalty=1.2,
        stop=("\n",),
        seed=42,
        ignore_eos=True,
    )
    assert params.priority == 1


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": ("",)}, "stop"),
        ({"stop": tuple(str(i) for i in range(17))}, "stop"),
        ({"stop": ("x" * 257,)}, "stop"),
        ({"seed": -1}, "seed"),
        ({"priority": -1}, "priority"),
        ({"max_new_tokens": "many"}, "max_new_tokens"),
    ],
)
def test_bad_values_name_the_field(values: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_params(values)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_wire_names_are_used_in_errors() -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_params({"max_new_tokens": 0}, {"max_new_tokens": "max_tokens"})
    assert info.value.field == "max_tokens"


def test_format_loc() -> None:
    assert format_loc(("messages", 0, "role")) == "messages[0].role"
    assert format_loc(("messages", 0, "role"), {"messages": "chat.messages"}) == (
        "chat.messages[0].role"
    )
    assert format_loc(()) == ""


def test_chat_validation() -> None:
    assert validate_chat([{"role": "user", "content": "hi"}]) == [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidRequestError) as info:
        validate_chat([{"role": "wizard", "content": "hi"}], "chat.messages")
    assert info.value.field == "chat.messages[0].role"
    with pytest.raises(InvalidRequestError) as info:
        validate_chat([])
    assert info.value.field == "messages"


def test_prompt_and_request_id() -> None:
    assert validate_prompt("a") == "a"
    with pytest.raises(InvalidRequestError, match="prompt"):
        validate_prompt("")
    assert validate_request_id("abc-1") == "abc-1"
    with pytest.raises(InvalidRequestError, match="request_id"):
        validate_request_id("x" * 200)
    with pytest.raises(InvalidRequestError, match="request_id"):
        validate_request_id("a\nb")
