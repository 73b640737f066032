"""A scriptable fake of ``AsyncEngine`` for the front-end unit tests.

It honours the contract the real engine does (admission errors raised by
``generate()`` itself, closing the stream aborts) and records what the front
ends did with it: which requests arrived, with which parameters, and which
were aborted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from autoglm_server.engine.api import (
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    ModelInfo,
    Usage,
)
from autoglm_server.errors import InvalidRequestError


class FakeStream(AsyncIterator[GenerationDelta]):
    def __init__(self, engine: FakeEngine, request: GenerationRequest) -> None:
        self._engine = engine
        self._request = request
        self._sent = 0
        self._done = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> GenerationDelta:
        if self._done:
            raise StopAsyncIteration
        if self._engine.fail_mid_stream is not None and self._sent == 1:
            self._done = True
            raise self._engine.fail_mid_stream
        if self._engine.step_s:
            await asyncio.sleep(self._engine.step_s)
        self._sent += 1
        n = self._request.params.max_new_tokens
        if self._engine.script:
            n = min(n, len(self._engine.script))
        last = self._sent >= n
        if last:
            self._engine.running.discard(self._request.request_id)
        script = self._engine.script
        self._engine.events.append(("delta", self._request.request_id))
        delta = GenerationDelta(
            request_id=self._request.request_id,
            text=script[self._sent - 1] if script else self._engine.token_text,
            token_ids=[self._sent],
        )
        if last:
            self._done = True
            delta.finish_reason = self._engine.finish_reason
            delta.usage = Usage(len(self._request.prompt_token_ids), n)
        return delta

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            await self._engine.abort(self._request.request_id)


class FakeTokenizer:
    """Bytes as token ids; a chat template of ``<role>content`` turns."""

    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], **kwargs: object) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: object) -> str:
        if any(m["role"] == "boom" for m in conversation):
            raise ValueError("the template refuses this")
        return "".join(f"<{m['role']}>{m['content']}" for m in conversation) + "<assistant>"


class FakeEngine:
    """Emits ``max_new_tokens`` deltas of ``token_text``, one per ``step_s``."""

    def __init__(self, *, step_s: float = 0.0, max_model_len: int = 64) -> None:
        self.step_s = step_s
        self.token_text = "x"
        self.ready = True
        self.admission_error: BaseException | None = None
        self.fail_mid_stream: BaseException | None = None
        self.finish_reason = FinishReason.LENGTH  # how every request ends
        self.script: list[str] = []  # if set: the texts of the deltas, one per step
        self.events: list[tuple[str, str]] = []  # ("generate" | "delta", request id), in order
        self.config: object = None  # an EngineConfig-like object (prefix_caching)
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.abort_codes: dict[str, str] = {}  # request id -> the code it was aborted with
        self.running: set[str] = set()
        self._tokenizer = FakeTokenizer()
        self.info = ModelInfo(
            name="fake",
            version="v1",
            max_model_len=max_model_len,
            dtype="float32",
            device="cpu",
            vocab_size=256,
            architecture="FakeForCausalLM",
        )

    @property
    def model_info(self) -> ModelInfo:
        return self.info

    def is_ready(self) -> bool:
        return self.ready

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    @property
    def tokenizer(self) -> FakeTokenizer:
        return self._tokenizer

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return self.tokenize(text)

    def generate(self, request: GenerationRequest) -> FakeStream:
        self.events.append(("generate", request.request_id))
        if self.admission_error is not None:
            raise self.admission_error
        if request.priority >= 2:
            raise InvalidRequestError("priority", "must be in [0, 2)")
        self.requests.append(request)
        self.running.add(request.request_id)
        return FakeStream(self, request)

    async def abort(self, request_id: str, code: str = "CANCELLED") -> None:
        if request_id in self.running:
            self.running.discard(request_id)
            self.aborted.append(request_id)
            self.abort_codes[request_id] = code
