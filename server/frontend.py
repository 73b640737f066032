"""What the three front ends (autoglm.v1, KServe v2, OpenAI HTTP) share.

- :class:`ServerState`: one lifecycle for the whole process. gRPC health,
  ``/readyz`` and admission all read it, so a SIGTERM flips all three at the
  same instant: readiness first, then no new work, then a drain.
- :class:`GenerationStream`: wraps ``AsyncEngine.generate()`` so that leaving
  early for any reason (client cancel, deadline, disconnect, error) aborts the
  engine request and frees its batch slot.
- :func:`collect`: the unary form of a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType

from autoglm_server.engine.api import (
    AsyncEngine,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    TokenLogprob,
    Usage,
)
from autoglm_server.engine.grammar import GrammarCompiler
from autoglm_server.errors import (
    AutoGLMError,
    DeadlineExceededError,
    UnavailableError,
)
from autoglm_server.errors import CancelledError as RequestCancelledError
from autoglm_server.frontends.chat import ChatRenderer

logger = logging.getLogger(__name__)


class Phase(enum.Enum):
    STARTING = "starting"  # servers up, model loading: live, not ready
    SERVING = "serving"  # ready; requests admitted
    DRAINING = "draining"  # SIGTERM seen: not ready, in-flight requests finish
    STOPPED = "stopped"  # drained or failed; the process is exiting


class ServerState:
    """Readiness and admission for every front end.

    Admission is counted here, not in the engine, because draining is about
    requests a client is still waiting on: a stream counts from admission
    until its last byte is handed to the transport.
    """

    def __init__(self) -> None:
        self._phase = Phase.STARTING
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._listeners: list[Callable[[Phase], None]] = []
        self.engine: AsyncEngine | None = None
        # Counts requests a front end ended before the engine saw them (see record_rejection).
        self.on_rejected: Callable[[str], None] | None = None
        # --chat-template: a template that replaces the tokenizer's own.
        self.chat_template: str | None = None
        # --tool-call-parser: None picks one from the chat template.
        self.tool_parser: str | None = None
        self._chat: tuple[object, ChatRenderer] | None = None
        self._grammars: tuple[object, GrammarCompiler] | None = None
        self._grammar_lock = threading.Lock()

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def is_ready(self) -> bool:
        return self._phase is Phase.SERVING and self.engine is not None and self.engine.is_ready()

    def add_listener(self, listener: Callable[[Phase], None]) -> None:
        """Called on every phase change (e.g. to update gRPC health)."""
        self._listeners.append(listener)

    def set_phase(self, phase: Phase) -> None:
        if phase is self._phase:
            return
        logger.info("server phase %s -> %s", self._phase.value, phase.value)
        self._phase = phase
        for listener in self._listeners:
            listener(phase)

    def require_engine(self) -> AsyncEngine:
        """The engine for metadata calls; UNAVAILABLE while it is still loading."""
        if self.engine is None:
            raise UnavailableError("the model is still loading")
        return self.engine

    @contextlib.contextmanager
    def admit(self) -> Iterator[AsyncEngine]:
        """Admit one generation request, or refuse it with UnavailableError.

        Refusal happens before any response bytes, so a client can retry on
        another replica knowing nothing was generated.
        """
        if not self.is_ready() or self.engine is None:
            reason = {
                Phase.STARTING: "the model is still loading",
                Phase.DRAINING: "the server is shutting down",
                Phase.STOPPED: "the server is shutting down",
            }.get(self._phase, "the engine is not ready")
            raise UnavailableError(reason)
        self._in_flight += 1
        self._idle.clear()
        try:
            yield self.engine
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def record_rejection(self, exc: BaseException) -> None:
        """Count a request that ended with ``exc`` before the engine counted it.

        The engine counts its own refusals and every request it admitted
        (exceptions that passed through a :class:`GenerationStream` are marked
        as counted); everything else that ends a request in a front end is
        counted here: validation, not ready, unknown model, and internal
        errors too, so an error-rate alert sees every outcome, once.
        """
        if self.on_rejected is None or getattr(exc, _FROM_ENGINE, False):
            return
        self.on_rejected(outcome_code(exc))

    def chat_renderer(self, engine: AsyncEngine) -> ChatRenderer:
        """The chat renderer for ``engine`` (the override template, else the tokenizer's)."""
        cached = self._chat
        if cached is None or cached[0] is not engine:
            cached = (engine, ChatRenderer(engine.tokenizer, self.chat_template))
            self._chat = cached
        return cached[1]

    def grammar_compiler(self, engine: AsyncEngine) -> GrammarCompiler:
        """The grammar compiler for ``engine``'s tokenizer (built on first use; slow: a thread)."""
        with self._grammar_lock:
            cached = self._grammars
            if cached is None or cached[0] is not engine:
                compiler = GrammarCompiler(engine.tokenizer, engine.model_info.vocab_size)
                cached = (engine, compiler)
                self._grammars = cached
            return cached[1]

    async def wait_idle(self, limit_s: float) -> bool:
        """Wait until no admitted request is left; False if ``limit_s`` ran out first."""
        try:
            async with asyncio.timeout(max(limit_s, 0.0)):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


_FROM_ENGINE = "_autoglm_from_engine"


def _mark_from_engine(exc: AutoGLMError) -> None:
    setattr(exc, _FROM_ENGINE, True)


def new_request_id() -> str:
    """Engine request ids are always server-made, so two clients reusing one id can't collide."""
    return uuid.uuid4().hex


class GenerationStream:
    """The deltas of one engine request; ``aclose()`` aborts it unless it finished.

    Use as ``async with GenerationStream(engine, request) as stream: async for d in stream``.
    Exiting the block by any route (return, exception, cancellation) closes the
    engine iterator, which the AsyncEngine contract defines as an abort. The
    abort carries the status the client sees, derived from why the block was
    left (see :func:`abort_code`), so ``autoglm_requests_total`` agrees with
    the wire: put the deadline *inside* the block so its error reaches here.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        request: GenerationRequest,
        *,
        deadline_passed: Callable[[], bool] | None = None,
    ) -> None:
        """``deadline_passed`` says whether the client's deadline has run out; a
        stream cancelled after that (the transport may cancel the handler at the
        deadline itself) is counted as DEADLINE_EXCEEDED, not CANCELLED."""
        self._engine = engine
        self.request = request
        self._deadline_passed = deadline_passed
        try:
            self._it: AsyncIterator[GenerationDelta] = engine.generate(request)
        except AutoGLMError as exc:
            _mark_from_engine(exc)
            raise
        self.finished = False
        self._closed = False

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> GenerationDelta:
        if self.finished:
            raise StopAsyncIteration
        try:
            delta = await anext(self._it)
        except AutoGLMError as exc:
            _mark_from_engine(exc)
            raise
        if delta.finish_reason is not None:
            self.finished = True
        return delta

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        code = abort_code(exc)
        passed = self._deadline_passed
        if code == RequestCancelledError.grpc_code and passed is not None and passed():
            code = DeadlineExceededError.grpc_code
        if isinstance(exc, Exception):
            # The engine counts this request (finished, or aborted with ``code``).
            mark_counted(exc)
        await self.aclose(code)

    async def aclose(self, code: str = RequestCancelledError.grpc_code) -> None:
        """Abort the request unless it finished; ``code`` is the status it is counted under."""
        if self._closed:
            return
        self._closed = True
        closer = getattr(self._it, "aclose", None)
        try:
            if not self.finished:
                logger.debug("aborting request %s (%s)", self.request.request_id, code)
                # The explicit abort carries the code; closing the iterator
                # (the contract's abort) then has nothing left to do.
                await self._engine.abort(self.request.request_id, code)
            if closer is not None:
                await closer()
        except Exception:
            logger.exception("abort of request %s failed", self.request.request_id)


def abort_code(exc: BaseException | None) -> str:
    """The gRPC status name of a request that ends early because of ``exc``.

    Our named errors carry their own (a deadline is DEADLINE_EXCEEDED); a
    client cancel or a disconnect counts as CANCELLED, any other exception
    as INTERNAL (the client gets a 500 / INTERNAL for it).
    """
    if exc is None or isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return RequestCancelledError.grpc_code
    return outcome_code(exc)


def outcome_code(exc: BaseException) -> str:
    """The status a request that failed with ``exc`` is counted under."""
    if isinstance(exc, AutoGLMError):
        return exc.grpc_code
    if isinstance(exc, asyncio.CancelledError):
        return RequestCancelledError.grpc_code
    return "INTERNAL"


def mark_counted(exc: BaseException) -> None:
    """``exc`` ended a request the engine has already counted."""
    setattr(exc, _FROM_ENGINE, True)


@dataclass(slots=True)
class Completion:
    """A whole generation, for the unary APIs."""

    request_id: str
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None


async def collect(stream: AsyncIterator[GenerationDelta], request_id: str) -> Completion:
    """Concatenate a stream's deltas."""
    parts: list[str] = []
    out = Completion(request_id=request_id, text="")
    async for delta in stream:
        parts.append(delta.text)
        out.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            out.logprobs = (out.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            out.finish_reason = delta.finish_reason
            out.usage = delta.usage
    out.text = "".join(parts)
    return out


def usage_or_count(completion: Completion, prompt_tokens: int) -> Usage:
    """The engine's usage, or one counted here if the engine sent none."""
    if completion.usage is not None:
        return completion.usage
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=len(completion.token_ids))
