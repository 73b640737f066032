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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from autoglm_server.engine.api import SamplingParams
from autoglm_server.errors import InvalidRequestError

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_REQUEST_ID_CHARS = 128
# Tokenizing is CPU work proportional to the text, so text is capped before it
# reaches the tokenizer: no prompt that fits the context is longer than this
# many characters per token of ``max_model_len`` (real text is about 4).
MAX_PROMPT_CHARS_PER_TOKEN = 32
SEED_MAX = 2**63  # exclusive; what every torch generator accepts
ChatRole = Literal["system", "user", "assistant"]


class GenerationParams(BaseModel):
    """Sampling and scheduling knobs, with the limits every front end enforces.

    Limits that depend on the loaded model (context length, priority levels)
    are the engine's to check; it raises InvalidRequestError too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=False)

    max_new_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    stop: tuple[str, ...] = Field(default=(), max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(default=None, ge=0, lt=SEED_MAX)
    ignore_eos: bool = False
    priority: int = Field(default=0, ge=0)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if not item:
                raise ValueError("stop sequences must not be empty")
            if len(item) > MAX_STOP_CHARS:
                raise ValueError(f"stop sequences must be at most {MAX_STOP_CHARS} characters")
        return value

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            stop=self.stop,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )


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
    """Build GenerationParams from internal names; unset (None) values take the defaults."""
    present = {k: v for k, v in values.items() if v is not None}
    try:
        return GenerationParams.model_validate(present)
    except ValidationError as exc:
        raise to_invalid_request(exc, wire_names) from None


def validate_sampling(params: SamplingParams) -> None:
    """Check SamplingParams built without :class:`GenerationParams` (the engine's intake)."""
    values = {name: getattr(params, name) for name in SamplingParams.__dataclass_fields__}
    try:
        GenerationParams.model_validate(values)
    except ValidationError as exc:
        raise to_invalid_request(exc) from None


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
        raise InvalidRequestError(field, _too_long(max_chars))
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
        raise InvalidRequestError(field, _too_long(max_chars))
    return prompt


def _too_long(max_chars: int) -> str:
    return (
        f"must be at most {max_chars} characters "
        f"({MAX_PROMPT_CHARS_PER_TOKEN} per token of the context limit)"
    )
