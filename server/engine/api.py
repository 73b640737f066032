"""The contract between the protocol front ends and the engine.

Every front end (autoglm.v1 gRPC, KServe v2 gRPC, OpenAI HTTP) translates its
wire request into a :class:`GenerationRequest`, hands it to
``AsyncEngine.generate()`` and translates the :class:`GenerationDelta` stream
back. Nothing below this line knows about gRPC or HTTP.
"""

from __future__ import annotations

import enum
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import InvalidRequestError


class FinishReason(enum.StrEnum):
    """Why a request stopped producing tokens (OpenAI's vocabulary)."""

    STOP = "stop"  # EOS token or a stop sequence
    LENGTH = "length"  # max_new_tokens or the context limit
    ABORT = "abort"  # cancelled by the client, a deadline or shutdown (not an OpenAI value:
    # the HTTP front end answers "stop" and keeps "abort" in its own field)
    ERROR = "error"  # an internal error that failed this request only


# Limits of SamplingParams; the front ends quote them in docs and errors.
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries per request, as OpenAI
SEED_MAX = 2**63  # exclusive; what every torch generator accepts


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling, with its limits in :meth:`validate` (the one place they live).

    Front ends build it from their wire names and call ``validate()``, mapping
    the internal field names to theirs; the engine validates again at intake.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 means off
    repetition_penalty: float = 1.0  # > 0; 1 means off (prompt and output tokens)
    stop: tuple[str, ...] = ()  # stop sequences, not included in the output
    seed: int | None = None  # per-request generator seed
    ignore_eos: bool = False  # benchmarks: always produce max_new_tokens
    # OpenAI's penalties, over the tokens generated so far: logit -= presence
    # * (count > 0) + frequency * count. [-2, 2]; 0 means off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias) added to the logits before sampling; [-100, 100].
    logit_bias: tuple[tuple[int, float], ...] = ()
    # None: no logprobs; k >= 0: the sampled token's logprob and the top k.
    logprobs: int | None = None
    # A compiled grammar (autoglm_server.engine.grammar.Grammar) that every
    # sampled token must keep valid; None means unconstrained.
    grammar: Any = None

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequestError naming the first bad field (internal names)."""
        _check_int(self.max_new_tokens, "max_new_tokens", lo=1)
        _check_float(self.temperature, "temperature", 0.0, 2.0)
        _check_float(self.top_p, "top_p", 0.0, 1.0, lo_open=True)
        _check_int(self.top_k, "top_k", lo=0)
        _check_float(self.repetition_penalty, "repetition_penalty", 0.0, 10.0, lo_open=True)
        _check_float(self.presence_penalty, "presence_penalty", -2.0, 2.0)
        _check_float(self.frequency_penalty, "frequency_penalty", -2.0, 2.0)
        if not isinstance(self.stop, tuple) or len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequestError("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences")
        for item in self.stop:
            if not isinstance(item, str) or not item:
                raise InvalidRequestError("stop", "stop sequences must be non-empty strings")
            if len(item) > MAX_STOP_CHARS:
                raise InvalidRequestError(
                    "stop", f"stop sequences must be at most {MAX_STOP_CHARS} characters"
                )
        if self.seed is not None:
            _check_int(self.seed, "seed", lo=0, hi=SEED_MAX - 1)
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError("logit_bias", f"at most {MAX_LOGIT_BIAS} entries")
        for token, bias in self.logit_bias:
            hi = None if vocab_size is None else vocab_size - 1
            _check_int(token, "logit_bias", lo=0, hi=hi)
            _check_float(bias, "logit_bias", -100.0, 100.0)
        if self.logprobs is not None:
            _check_int(self.logprobs, "logprobs", lo=0, hi=MAX_TOP_LOGPROBS)
        if self.grammar is not None and self.ignore_eos:
            raise InvalidRequestError("ignore_eos", "cannot be combined with a grammar")


def _check_int(value: Any, name: str, *, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(name, "must be an integer")
    if value < lo:
        raise InvalidRequestError(name, f"must be >= {lo}")
    if hi is not None and value > hi:
        raise InvalidRequestError(name, f"must be <= {hi}")


def _check_float(value: Any, name: str, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(name, "must be a number")
    if not math.isfinite(value):
        raise InvalidRequestError(name, "must be a finite number")
    if value < lo or (lo_open and value == lo) or value > hi:
        left = "(" if lo_open else "["
        raise InvalidRequestError(name, f"must be in {left}{lo:g}, {hi:g}]")


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The logprob of one sampled token, and the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


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
    # One per token in token_ids when the request asked for logprobs, else None.
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str  # served model name, e.g. "glm-4-9b"
    version: str  # served revision, e.g. a commit hash or "local"
    max_model_len: int  # prompt + generated tokens
    dtype: str  # "float32" | "float16" | "bfloat16"
    device: str  # "cpu" | "cuda" | "cuda:0"
    vocab_size: int
    architecture: str  # e.g. "Glm4ForCausalLM"
    quantization: str = "none"  # none | fp8 | int8 | int4 | checkpoint:<format>
    tensor_parallel_size: int = 1  # GPUs (processes) the model is sharded over


class AsyncEngine(Protocol):
    """What front ends depend on."""

    @property
    def model_info(self) -> ModelInfo: ...

    def is_ready(self) -> bool:
        """True once the model is loaded and warmed up, and until shutdown begins."""
        ...

    def tokenize(self, text: str) -> list[int]: ...

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer (chat templates, grammars, token text)."""
        ...

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
