"""The OpenAI wire models: what a request may hold, checked strictly.

Every field OpenAI defines that this server does not implement is refused
with a 400 naming it (``extra="forbid"``), so a client never gets a silently
different behaviour; ``server/README.md`` lists the supported set against
OpenAI's reference. Sampling limits are not repeated here: they live on
:class:`~autoglm_server.engine.api.SamplingParams` and errors are renamed to
the wire names by :func:`sampling_from`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from autoglm_server.engine.api import SamplingParams
from autoglm_server.errors import InvalidRequestError

BaseModelT = TypeVar("BaseModelT", bound=BaseModel)
# StrictInt / StrictFloat: a JSON 1.5 is not silently an int, "3" is not a number.
Number = StrictFloat | StrictInt


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class FunctionDef(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-.]+$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: StrictStr


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: StrictStr | None = None
    # "schema" shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionCallIn(_Strict):
    name: StrictStr
    arguments: StrictStr


class ToolCallIn(_Strict):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ContentPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _Common(_Strict):
    """Fields both endpoints share, plus AutoGLM's extensions (vLLM spells them the same)."""

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: Annotated[int, Field(ge=1, le=16, strict=True)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    user: StrictStr | None = None  # accepted, unused: OpenAI's abuse-tracking hint
    # AutoGLM / vLLM extensions.
    top_k: StrictInt | None = None
    repetition_penalty: Number | None = None
    ignore_eos: StrictBool = False
    priority: StrictInt = 0

    def stop_tuple(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise InvalidRequestError("logit_bias", f"keys must be token ids, got {key!r}")
            pairs.append((int(key), float(bias)))
        return tuple(pairs)


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictStr]
    logprobs: Annotated[int, Field(ge=0, le=20, strict=True)] | None = None
    echo: Literal[False] = False
    suffix: None = None
    best_of: StrictInt | None = None


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None


# Internal SamplingParams names -> the wire names of each endpoint.
COMPLETION_NAMES = {"max_new_tokens": "max_tokens"}
CHAT_NAMES = {"max_new_tokens": "max_tokens", "logprobs": "top_logprobs"}


def sampling_from(
    values: dict[str, Any], wire_names: dict[str, str], vocab_size: int | None = None
) -> SamplingParams:
    """SamplingParams from internal names (None: the default), validated, errors in wire names."""
    params = SamplingParams(**{k: v for k, v in values.items() if v is not None})
    try:
        params.validate(vocab_size)
    except InvalidRequestError as exc:
        raise InvalidRequestError(
            wire_names.get(exc.field, exc.field), str(exc).split(": ", 1)[-1]
        ) from None
    return params
