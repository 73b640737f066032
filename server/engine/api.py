"""The contract between the protocol front ends and the engine.

Every front end (autoglm.v1 gRPC, KServe v2 gRPC, OpenAI HTTP) translates its
wire request into a :class:`GenerationRequest`, hands it to
``AsyncEngine.generate()`` and translates the :class:`GenerationDelta` stream
back. Nothing below this line knows about gRPC or HTTP.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


class FinishReason(enum.StrEnum):
    """Why a request stopped producing tokens (OpenAI's vocabulary)."""

    STOP = "stop"  # EOS token or a stop sequence
    LENGTH = "length"  # max_new_tokens or the context limit
    ABORT = "abort"  # cancelled by the client, a deadline or shutdown
    ERROR = "error"  # an internal error that failed this request only


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling. Validated before it reaches the engine."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 means off
    repetition_penalty: float = 1.0  # > 0; 1 means off
    stop: tuple[str, ...] = ()  # stop sequences, not included in the output
    seed: int | None = None  # per-request generator seed
    ignore_eos: bool = False  # benchmarks: always produce max_new_tokens


@dataclass(slots=True)
class GenerationRequest:
    """One request as the engine sees it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # 0 is the most urgent; must be < BatchingConfig.priority_levels
    arrival_time: float = 0.0  # time.monotonic() at intake; set by the engine if 0


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class GenerationDelta:
    """One streamed piece of output. The last one has ``finish_reason`` set."""

    request_id: str
    text: str  # newly decoded text (incremental, valid UTF-8)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None  # set on the last delta


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str  # served model name, e.g. "glm-4-9b"
    version: str  # served revision, e.g. a commit hash or "local"
    max_model_len: int  # prompt + generated tokens
    dtype: str  # "float32" | "float16" | "bfloat16"
    device: str  # "cpu" | "cuda" | "cuda:0"
    vocab_size: int
    architecture: str  # e.g. "Glm4ForCausalLM"


class AsyncEngine(Protocol):
    """What front ends depend on."""

    @property
    def model_info(self) -> ModelInfo: ...

    def is_ready(self) -> bool:
        """True once the model is loaded and warmed up, and until shutdown begins."""
        ...

    def tokenize(self, text: str) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Admit the request (or raise QueueFullError / InvalidRequestError at once)
        and stream its output. Closing the iterator early aborts the request: its
        slot is free before the next engine step."""
        ...

    async def abort(self, request_id: str, code: str = "CANCELLED") -> None:
        """End a request early; ``code`` (a gRPC status name, e.g. DEADLINE_EXCEEDED)
        is the status it is counted under in ``autoglm_requests_total``."""
        ...
