"""Request validation shared by every front end.

Each protocol spells the same knobs differently (``max_new_tokens`` in
autoglm.v1, ``max_tokens`` in OpenAI and KServe v2), but the rules are the
same, so they live in one pydantic model. A front end passes its wire names in
``wire_names``; a bad value then raises :class:`InvalidRequestError` naming the
field exactly as the client spelled it, which is what a client needs to fix
the request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autoglm_server.engine.api import SamplingParams
from autoglm_server.errors import InvalidRequestError

MAX_REQUEST_ID_CHARS = 128
# Tokenizing is CPU work proportional to the text, so text is capped before it
# reaches the tokenizer: no prompt that fits the context is longer than this
# many characters per token of ``max_model_len`` (real text is about 4).
MAX_PROMPT_CHARS_PER_TOKEN = 32
ChatRole = Literal["system", "user", "assistant"]
# The sampling fields of SamplingParams (grammar is built by a front end, not sent).
_SAMPLING_FIELDS = frozenset(SamplingParams.__dataclass_fields__) - {"grammar"}


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Validated sampling settings plus the request's priority."""

    sampling: SamplingParams
    priority: int = 0

    def to_sampling_params(self) -> SamplingParams:
        return self.sampling


class ChatMessageIn(BaseModel):
    """One chat turn. Only the roles every chat template understands."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: ChatRole
    content: str


class ChatIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: list[ChatMessageIn] = Field(min_length=1)


def format_loc(loc: Sequence[str | int], wire_names: Mapping[str, str] | None = None) -> str:
    """``("messages", 0, "role")`` -> ``messages[0].role``; the first part is renamed."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        name = wire_names.get(part, part) if (wire_names and i == 0) else part
        out += f".{name}" if out else name
    return out


def to_invalid_request(
    exc: ValidationError,
    wire_names: Mapping[str, str] | None = None,
    prefix: str = "",
) -> InvalidRequestError:
    """The first pydantic error as an InvalidRequestError naming the wire field."""
    err = exc.errors(include_url=False)[0]
    field = format_loc(err["loc"], wire_names) or "request"
    if prefix:
        field = f"{prefix}.{field}" if field != "request" else prefix
    return InvalidRequestError(field, err["msg"])


def validate_params(
    values: Mapping[str, Any], wire_names: Mapping[str, str] | None = None
) -> GenerationParams:
    """Build GenerationParams from internal names; unset (None) values take the defaults.

    The limits are :meth:`SamplingParams.validate`'s; errors are renamed to
    the wire names in ``wire_names``.
    """
    names = wire_names or {}
    present = {k: v for k, v in values.items() if v is not None}
    priority = present.pop("priority", 0)
    unknown = set(present) - _SAMPLING_FIELDS
    if unknown:
        raise InvalidRequestError(sorted(unknown)[0], "is not a sampling parameter")
    if "stop" in present:
        present["stop"] = tuple(present["stop"])
    params = SamplingParams(**present)
    try:
        params.validate()
        if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
            raise InvalidRequestError("priority", "must be an integer >= 0")
    except InvalidRequestError as exc:
        raise InvalidRequestError(
            names.get(exc.field, exc.field), str(exc).split(": ", 1)[-1]
        ) from None
    return GenerationParams(params, priority)


def validate_sampling(params: SamplingParams) -> None:
    """The engine's intake check: the same limits, internal names."""
    params.validate()


def check_room(prompt_tokens: int, max_model_len: int, field: str) -> int:
    """Tokens left to generate after a prompt; InvalidRequestError naming ``field`` if none."""
    if prompt_tokens >= max_model_len:
        raise InvalidRequestError(
            field,
            f"{prompt_tokens} tokens leave no room to generate within the context limit "
            f"of {max_model_len}",
        )
    return max_model_len - prompt_tokens


def max_prompt_chars(max_model_len: int) -> int:
    """The longest prompt text (characters) accepted for a model with this context."""
    return MAX_PROMPT_CHARS_PER_TOKEN * max_model_len


def validate_chat(
    messages: Sequence[Mapping[str, Any]],
    field: str = "messages",
    *,
    max_chars: int | None = None,
) -> list[dict[str, str]]:
    """Check chat messages; return them in the engine's ``[{"role", "content"}]`` shape.

    ``max_chars`` caps the total content of all messages (see :func:`max_prompt_chars`).
    """
    try:
        chat = ChatIn.model_validate({"messages": list(messages)})
    except ValidationError as exc:
        raise to_invalid_request(exc, {"messages": field}) from None
    if max_chars is not None and sum(len(m.content) for m in chat.messages) > max_chars:
        raise InvalidRequestError(field, too_long(max_chars))
    return [{"role": m.role, "content": m.content} for m in chat.messages]


def validate_request_id(value: str, field: str = "request_id") -> str:
    """Client ids are echoed back and may land in logs, so keep them short and printable."""
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError(field, f"must be at most {MAX_REQUEST_ID_CHARS} characters")
    if not value.isprintable():
        raise InvalidRequestError(field, "must be printable")
    return value


def validate_prompt(prompt: str, field: str = "prompt", *, max_chars: int | None = None) -> str:
    """A non-empty prompt of at most ``max_chars`` characters (see :func:`max_prompt_chars`)."""
    if not prompt:
        raise InvalidRequestError(field, "must not be empty")
    if max_chars is not None and len(prompt) > max_chars:
        raise InvalidRequestError(field, too_long(max_chars))
    return prompt


def too_long(max_chars: int) -> str:
    return (
        f"must be at most {max_chars} characters "
        f"({MAX_PROMPT_CHARS_PER_TOKEN} per token of the context limit)"
    )
