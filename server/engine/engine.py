"""The engine: intake, a step loop on its own thread, and per-request streams.

Threads and ownership
---------------------
The asyncio event loop (the gRPC/HTTP front ends) calls :meth:`LLMEngine.generate`
and :meth:`LLMEngine.abort`. ONE dedicated thread runs the step loop, so the
forward pass never blocks the event loop. The loop is pipelined by one step
(``pipeline``, on): it schedules and launches step N+1 on the device *before*
it reads step N's tokens back (``runner.launch`` / ``runner.collect``), so the
host's work of a step (scheduling, packing, applying results, handing them
on) runs while the device computes the next one, instead of leaving the GPU
idle. A decode of step N+1 whose input token step N is still sampling carries
``PENDING_TOKEN``; the runner reads it from the device. The scheduler does not
run a request ahead when its pending token already ends it by length, or when
it has a grammar (its matcher needs the token on the host); a request that
stops on EOS or a stop string wastes one step's row, whose result is dropped.
The scheduler is shared between the event loop and the step thread and guarded
by one lock, which is held only for book-keeping, never across a forward pass.

Each request has an ``asyncio.Queue``. The step thread does no text work: it
hands each step's sampled token ids to a second thread, the *detokenizer*,
and goes on with the next step; the detokenizer turns them into text (and
finds stop strings), then hands the step's results to the event loop with ONE
``call_soon_threadsafe`` per step, not one per token. Steps are detokenized
in order, so a request's deltas stay in order. A stop string found there
finishes the request under the lock; a step that ran meanwhile may have
produced one more token for it, which is dropped.

Aborts (an explicit :meth:`abort`, or the consumer closing or dropping its
stream) remove the request from the scheduler at once, under the lock. If a
forward pass is running at that moment, the request's result from that pass is
dropped in ``update()`` and its slot is handed out again only by the next
``schedule()``, so the runner never sees a slot change under a running pass.

Failure
-------
An exception inside ``runner.execute`` fails only the requests of that batch
(``FinishReason.ERROR``; their streams raise :class:`EngineStepError`). An
exception anywhere else in the loop is fatal: ``is_ready()`` turns False, every
stream raises ``UnavailableError``, and ``on_fatal`` is called so the process
can exit non-zero and be restarted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import Any

from ..errors import (
    AutoGLMError,
    InvalidRequestError,
    UnavailableError,
)
from ..metrics import EngineStats, Metrics
from ..threads import run_in_daemon_thread
from ..validation import validate_sampling
from .api import (
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    ModelInfo,
    Usage,
)
from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer, TokenDecoder
from .loader import LoadedModel, load_model
from .scheduler import RequestOutput, ScheduledSeq, Scheduler, SchedulerOutput

logger = logging.getLogger(__name__)

_Item = GenerationDelta | BaseException


class EngineStepError(AutoGLMError):
    """A forward pass failed; only the requests in that batch fail (gRPC INTERNAL)."""


class EngineFatalError(AutoGLMError):
    """A step failed in a way that leaves the engine unusable (a tensor-parallel rank
    died or a collective failed): the engine dies and the process exits non-zero."""


# What a request whose logits were NaN or inf is told (gRPC INTERNAL; HTTP 500).
NON_FINITE_MESSAGE = (
    "the model produced non-finite logits (NaN or inf); this model revision is broken"
)


@dataclass(slots=True)
class _Tracked:
    """Engine-side state of one live request (touched under the engine lock)."""

    request: GenerationRequest
    queue: asyncio.Queue[_Item]
    detok: IncrementalDetokenizer
    first_token_time: float | None = None
    done: bool = False
    claimed: bool = False  # finished by the scheduler; its last delta is on its way
    stopped: bool = False  # the detokenizer found a stop string (detokenizer thread only)


class RequestStream(AsyncIterator[GenerationDelta]):
    """The stream ``generate()`` returns.

    A plain class rather than an async generator, for two reasons: admission
    (and its errors) happens in ``generate()`` itself, before the first
    ``await``; and dropping the stream (``break`` out of ``async for``, a
    cancelled task: on the next loop turn) aborts the request promptly via
    ``__del__``/``aclose`` instead of whenever the garbage collector finalises
    an async generator.
    """

    def __init__(self, engine: LLMEngine, tracked: _Tracked) -> None:
        self._engine = engine
        self._tracked = tracked
        self._finished = False

    @property
    def request_id(self) -> str:
        return self._tracked.request.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> GenerationDelta:
        if self._finished:
            raise StopAsyncIteration
        try:
            item = await self._tracked.queue.get()
        except asyncio.CancelledError:
            # Cancelled while waiting: the consumer is going away. Abort on the
            # next loop turn rather than now, so an owner that knows why (a
            # deadline) can first abort with that status via ``abort(id, code)``.
            asyncio.get_running_loop().call_soon(self._close)
            raise
        except BaseException:
            self._close()
            raise
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if item.finish_reason is not None:
            self._finished = True
        return item

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._finished:
            self._finished = True
            self._engine._abort_now(self.request_id, code="CANCELLED", notify=False)

    def __del__(self) -> None:
        # No lock here: a finaliser can run in any thread, even one that holds
        # the engine lock. The step thread applies the abort before its next step.
        if not self._finished:
            self._finished = True
            self._engine._pending_aborts.append(self.request_id)


class LLMEngine:
    """Implements ``autoglm_server.engine.api.AsyncEngine``."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        metrics: Metrics | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        loader: Callable[[EngineConfig], LoadedModel] = load_model,
    ) -> None:
        self.config = config
        self.served_model_name = config.served_model_name or _default_name(config.model)
        self.metrics = metrics or Metrics(self.served_model_name, config.model_version)
        self.on_fatal = on_fatal
        self._loader = loader
        self._lock = threading.Condition(threading.Lock())
        self._tracked: dict[str, _Tracked] = {}
        self._pending_aborts: deque[str] = deque()  # from finalisers; applied by the step thread
        self._loaded: LoadedModel | None = None
        self._runner: Any = None  # ModelRunner; imported lazily with torch
        self._scheduler: Scheduler | None = None
        self._decoder: TokenDecoder | None = None
        self._info: ModelInfo | None = None
        self._thread: threading.Thread | None = None
        # Work for the detokenizer thread, in step order; None stops it.
        self._detok_queue: SimpleQueue[Callable[[], None] | None] = SimpleQueue()
        self._detok_thread: threading.Thread | None = None
        self._preemptions_seen = 0
        # Launch step N+1 before reading step N's tokens back (needs runner.launch/collect).
        self._pipelined = False
        self._tp: Any = None  # parallel.TensorParallelGroup when tensor_parallel_size > 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = False
        self._accepting = False
        self._stopping = False
        self._fatal: BaseException | None = None
        self.metrics.track_engine(self.stats)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model, allocate the KV cache, warm up, start the step loop; then ready."""
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._loop = asyncio.get_running_loop()
        # Daemon threads, not the default executor: a start-up abandoned on
        # SIGTERM (this task cancelled) must not hold the process until the
        # load finishes (see autoglm_server.threads).
        try:
            if self.config.tensor_parallel_size > 1:
                from .parallel import TensorParallelGroup

                self._tp = TensorParallelGroup(
                    self.config, on_failure=self._die, loader=self._loader
                )
                self._tp.spawn()  # here: the children outlive only the thread that forks them
                await run_in_daemon_thread(self._tp.connect)
            loaded = await run_in_daemon_thread(self._loader, self.config)
            runner = await run_in_daemon_thread(self._build_runner, loaded)
            if self._tp is not None:  # agrees the KV size with the other ranks: blocks
                runner = await run_in_daemon_thread(self._tp.wrap, runner)
            self._runner = runner
            await run_in_daemon_thread(self._runner.warmup)
        except BaseException:
            if self._tp is not None:
                self._tp.stop(timeout_s=0.0)
            raise
        self._pipelined = self.config.pipeline and hasattr(self._runner, "launch")
        self._loaded = loaded
        self._decoder = TokenDecoder(loaded.tokenizer)
        blocks = BlockManager(
            self._runner.num_blocks,
            self._runner.block_size,
            prefix_caching=self.config.prefix_caching,
        )
        self._scheduler = Scheduler(self.config.batching, loaded.max_model_len, blocks=blocks)
        self._info = ModelInfo(
            name=self.served_model_name,
            version=self.config.model_version,
            max_model_len=loaded.max_model_len,
            dtype=str(loaded.dtype).removeprefix("torch."),
            device=str(loaded.device),
            vocab_size=loaded.vocab_size,
            architecture=loaded.architecture,
            quantization=loaded.quantization,
            tensor_parallel_size=loaded.tensor_parallel_size,
        )
        self.metrics.set_model_config(loaded.quantization, loaded.tensor_parallel_size)
        self._detok_thread = threading.Thread(
            target=self._detok_loop, name="autoglm-detokenizer", daemon=True
        )
        self._detok_thread.start()
        self._thread = threading.Thread(target=self._run_loop, name="autoglm-engine", daemon=True)
        self._thread.start()
        self._accepting = True
        self._ready = True
        logger.info("engine ready: %s (%s)", self.served_model_name, loaded.architecture)

    def _build_runner(self, loaded: LoadedModel) -> Any:
        from .runner import ModelRunner

        cfg = self.config
        return ModelRunner(
            loaded.model,
            num_slots=cfg.batching.max_batch_size,
            max_model_len=loaded.max_model_len,
            device=loaded.device,
            block_size=cfg.kv_block_size,
            num_blocks=cfg.num_kv_blocks,
            memory_fraction=cfg.kv_cache_memory_fraction,
            max_batch_tokens=cfg.batching.max_batch_tokens,
            attention_backend=cfg.attention_backend,
            compile=cfg.compile,
            compile_cache_dir=cfg.compile_cache_dir,
            compile_scope=cfg.compile_scope,
        )

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop admitting (UnavailableError), drain for up to ``grace_s``, abort the rest."""
        self._accepting = False
        self._ready = False
        deadline = time.monotonic() + max(0.0, grace_s)
        while self._thread is not None and self._fatal is None and time.monotonic() < deadline:
            with self._lock:
                if not self._tracked:
                    break
            await asyncio.sleep(0.01)
        with self._lock:
            remaining = list(self._tracked)
        for request_id in remaining:
            self._abort_now(request_id, code="UNAVAILABLE", notify=True)
        if remaining:
            logger.warning("shutdown: aborted %d unfinished requests", len(remaining))
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._detok_thread is not None:
            self._detok_queue.put(None)
            await asyncio.to_thread(self._detok_thread.join)
            self._detok_thread = None
        if self._tp is not None:
            await asyncio.to_thread(self._tp.stop)
        self.metrics.close()

    def is_ready(self) -> bool:
        return self._ready and self._fatal is None

    # -- AsyncEngine -----------------------------------------------------------------------------

    @property
    def model_info(self) -> ModelInfo:
        if self._info is None:
            raise UnavailableError("the model is not loaded yet")
        return self._info

    @property
    def tokenizer(self) -> Any:
        if self._loaded is None:
            raise UnavailableError("the model is not loaded yet")
        return self._loaded.tokenizer

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def detokenize(self, token_ids: list[int]) -> str:
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise InvalidRequestError("messages", "this model has no chat template")
        if not messages:
            raise InvalidRequestError("messages", "must not be empty")
        try:
            ids = tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as exc:  # a template error is the caller's messages, not ours
            raise InvalidRequestError("messages", f"cannot apply the chat template: {exc}") from exc
        return [int(i) for i in ids]

    def generate(self, request: GenerationRequest) -> RequestStream:
        """Validate and admit at once (raising here), then stream deltas."""
        try:
            self._validate(request)
            if not request.arrival_time:
                request.arrival_time = time.monotonic()
            assert self._scheduler is not None and self._loaded is not None
            assert self._decoder is not None
            tracked = _Tracked(
                request=request,
                queue=asyncio.Queue(),
                detok=IncrementalDetokenizer(self._decoder, request.params.stop),
            )
            with self._lock:
                if request.request_id in self._tracked:
                    raise InvalidRequestError("request_id", "a request with this id is running")
                self._scheduler.add_request(request, self._loaded.eos_token_ids)
                self._tracked[request.request_id] = tracked
                self._lock.notify_all()
        except AutoGLMError as exc:
            self.metrics.on_rejected(exc.grpc_code)
            raise
        self.metrics.on_arrival(len(request.prompt_token_ids))
        return RequestStream(self, tracked)

    async def abort(self, request_id: str, code: str = "CANCELLED") -> None:
        """Abort a request; its stream ends with ``FinishReason.ABORT``. Unknown ids are ignored.

        ``code`` (a gRPC status name) is what ``autoglm_requests_total`` counts it as.
        """
        self._abort_now(request_id, code=code, notify=True)

    def stats(self) -> EngineStats:
        scheduler = self._scheduler
        if scheduler is None:
            return EngineStats(running=0, waiting=0, kv_usage=0.0)
        return EngineStats(
            running=scheduler.num_running,
            waiting=scheduler.num_waiting,
            kv_usage=scheduler.kv_usage(),
            prefix_hit_rate=scheduler.blocks.stats.hit_rate,
        )

    # -- intake ----------------------------------------------------------------------------------

    def _validate(self, request: GenerationRequest) -> None:
        if self._fatal is not None:
            raise UnavailableError("the engine has failed")
        if not self._accepting or self._scheduler is None or self._loaded is None:
            raise UnavailableError("the engine is not accepting requests")
        if not request.request_id:
            raise InvalidRequestError("request_id", "must not be empty")
        validate_request(
            request,
            max_model_len=self._loaded.max_model_len,
            vocab_size=self._loaded.vocab_size,
            priority_levels=self.config.batching.priority_levels,
        )

    # -- abort -----------------------------------------------------------------------------------

    def _abort_now(self, request_id: str, *, code: str, notify: bool) -> None:
        """Thread-safe: drop the request from the scheduler and free its slot now."""
        scheduler = self._scheduler
        if scheduler is None:
            return
        with self._lock:
            tracked = self._tracked.pop(request_id, None)
            if tracked is None or tracked.done:
                return
            tracked.done = True
            state = scheduler.abort_request(request_id)
        now = time.monotonic()
        n_out = len(state.output_token_ids) if state is not None else 0
        self.metrics.on_finish(
            code,
            e2e_s=now - tracked.request.arrival_time,
            ttft_s=_ttft(tracked),
            output_tokens=n_out,
        )
        if notify:
            delta = GenerationDelta(
                request_id=request_id,
                text="",
                finish_reason=FinishReason.ABORT,
                usage=Usage(len(tracked.request.prompt_token_ids), n_out),
            )
            self._post([(tracked.queue, delta)])

    # -- the step loop (engine thread) ----------------------------------------------------------

    def _run_loop(self) -> None:
        """Schedule, launch, then finish the step launched before (see the module doc)."""
        in_flight: tuple[SchedulerOutput, Any] | None = None
        try:
            while True:
                while self._pending_aborts:
                    self._abort_now(self._pending_aborts.popleft(), code="CANCELLED", notify=False)
                with self._lock:
                    scheduler = self._scheduler
                    assert scheduler is not None
                    while (
                        not self._stopping and in_flight is None and not scheduler.has_unfinished()
                    ):
                        self._lock.wait()
                    if self._stopping:
                        return
                    sched = scheduler.schedule()
                    preempted = scheduler.num_preemptions - self._preemptions_seen
                    self._preemptions_seen = scheduler.num_preemptions
                if preempted:
                    self.metrics.on_preemptions(preempted)
                launched = self._launch(sched) if sched.seqs or sched.freed_slots else None
                had_in_flight = in_flight is not None
                if in_flight is not None:
                    # While this step runs on the device: the previous step's results.
                    self._finish_step(*in_flight)
                    in_flight = None
                if sched.seqs:
                    if launched is not None:
                        if self._pipelined:
                            in_flight = (sched, launched[0])
                        else:
                            self._finish_step(sched, launched[0])
                    continue
                if had_in_flight:
                    continue  # its results may make the next schedule() possible
                with self._lock:
                    if not self._stopping:
                        self._lock.wait(timeout=sched.wait_s if sched.wait_s else 0.005)
        except BaseException as exc:
            self._die(exc)

    def _launch(self, sched: SchedulerOutput) -> tuple[Any] | None:
        """Queue the step on the device; None if that failed (its requests fail)."""
        try:
            if self._pipelined:
                return (self._runner.launch(sched),)
            return (self._runner.execute(sched),)
        except EngineFatalError:
            raise
        except Exception as exc:
            logger.exception(
                "engine step %d failed; failing its %d requests", sched.step_id, len(sched.seqs)
            )
            self._fail_batch(sched, exc)
            return None

    def _finish_step(self, sched: SchedulerOutput, launched: Any) -> None:
        """Wait for a launched step's tokens, apply them, hand them to the detokenizer."""
        scheduler = self._scheduler
        assert scheduler is not None
        try:
            result = self._runner.collect(launched) if self._pipelined else launched
        except EngineFatalError:
            raise
        except Exception as exc:
            logger.exception(
                "engine step %d failed; failing its %d requests", sched.step_id, len(sched.seqs)
            )
            self._fail_batch(sched, exc)
            return
        if result.non_finite_rows:
            sampled = [s for s in sched.seqs if s.sample]
            bad = [sampled[i] for i in result.non_finite_rows]
            logger.error(
                "engine step %d: the model produced non-finite logits (NaN or inf) for %d of %d "
                "requests; failing them",
                sched.step_id,
                len(bad),
                len(sampled),
            )
            self._fail_seqs(bad, NON_FINITE_MESSAGE)
        with self._lock:
            outputs = scheduler.update(sched, result)
            work: list[tuple[RequestOutput, _Tracked]] = []
            for out in outputs:
                tracked = self._tracked.get(out.request_id)
                if tracked is None or tracked.done:
                    continue
                if out.finish_reason is not None:
                    # Finished by the scheduler (EOS, length): claim it now, so a
                    # concurrent abort() cannot also finish it.
                    del self._tracked[out.request_id]
                    tracked.done = True
                    tracked.claimed = True
                work.append((out, tracked))
        now = time.monotonic()
        self.metrics.on_tokens(len(outputs))
        if work:
            self._detok_queue.put(lambda: self._deliver_step(work, now))

    def _detok_loop(self) -> None:
        """The detokenizer thread: runs the step thread's work items in order."""
        while True:
            item = self._detok_queue.get()
            if item is None:
                return
            try:
                item()
            except BaseException as exc:
                self._die(exc)
                return

    def _deliver_step(self, work: list[tuple[RequestOutput, _Tracked]], now: float) -> None:
        """Detokenize one step's tokens, handle stop strings, post the deltas (detokenizer)."""
        scheduler = self._scheduler
        assert scheduler is not None
        deliveries: list[tuple[asyncio.Queue[_Item], _Item]] = []
        stopped: list[tuple[_Tracked, GenerationDelta]] = []
        for out, tracked in work:
            if tracked.stopped:
                continue  # a token produced after its stop string was found
            delta = self._make_delta(out, tracked, now)
            if delta.finish_reason is not None and out.finish_reason is None:
                stopped.append((tracked, delta))  # a stop string: claimed below, under the lock
            else:
                deliveries.append((tracked.queue, delta))
        if stopped:
            with self._lock:
                for tracked, delta in stopped:
                    tracked.stopped = True
                    if self._tracked.get(delta.request_id) is tracked and not tracked.done:
                        del self._tracked[delta.request_id]
                        tracked.done = True
                        scheduler.finish_request(delta.request_id, FinishReason.STOP)
                    elif not tracked.claimed:
                        continue  # aborted meanwhile: the abort already ended the stream
                    # else: the scheduler finished it in a later step; this stop ends it first
                    deliveries.append((tracked.queue, delta))
                    self._record_finish(tracked, delta, now)
        self._post(deliveries)

    def _make_delta(self, out: RequestOutput, tracked: _Tracked, now: float) -> GenerationDelta:
        request = tracked.request
        if tracked.first_token_time is None:
            tracked.first_token_time = now
            self.metrics.on_first_token(now - request.arrival_time)
        finish = out.finish_reason
        result = tracked.detok.add(out.new_token_ids, final=finish is not None)
        if result.stopped:
            finish = FinishReason.STOP
        delta = GenerationDelta(
            request_id=out.request_id,
            text=result.text,
            token_ids=out.new_token_ids,
            finish_reason=finish,
            usage=Usage(out.num_prompt_tokens, out.num_output_tokens) if finish else None,
            logprobs=out.logprobs,
        )
        if out.finish_reason is not None:
            self._record_finish(tracked, delta, now)
        return delta

    def _record_finish(self, tracked: _Tracked, delta: GenerationDelta, now: float) -> None:
        assert delta.usage is not None
        self.metrics.on_finish(
            "OK",
            e2e_s=now - tracked.request.arrival_time,
            ttft_s=_ttft(tracked),
            output_tokens=delta.usage.completion_tokens,
        )

    def _fail_batch(self, sched: SchedulerOutput, exc: BaseException) -> None:
        self._fail_seqs(sched.seqs, "internal error while generating", exc)

    def _fail_seqs(
        self, seqs: list[ScheduledSeq], message: str, exc: BaseException | None = None
    ) -> None:
        """End these requests with EngineStepError(message) (INTERNAL), counted once."""
        scheduler = self._scheduler
        assert scheduler is not None
        deliveries: list[tuple[asyncio.Queue[_Item], _Item]] = []
        with self._lock:
            for seq in seqs:
                scheduler.finish_request(seq.request_id, FinishReason.ERROR)
                tracked = self._tracked.pop(seq.request_id, None)
                if tracked is None or tracked.done:
                    continue
                tracked.done = True
                error = EngineStepError(message)
                error.__cause__ = exc
                deliveries.append((tracked.queue, error))
        for _ in deliveries:
            self.metrics.on_finish("INTERNAL")
        # Behind the detokenizer's work, so earlier tokens arrive before the error.
        self._detok_queue.put(lambda: self._post(deliveries))

    def _die(self, exc: BaseException) -> None:
        logger.critical("the engine loop died: %s", exc, exc_info=exc)
        self._fatal = exc
        self._ready = False
        self._accepting = False
        with self._lock:
            tracked = list(self._tracked.values())
            self._tracked.clear()
        now = time.monotonic()
        deliveries: list[tuple[asyncio.Queue[_Item], _Item]] = []
        for t in tracked:
            t.done = True
            deliveries.append((t.queue, UnavailableError("the engine has failed")))
            self.metrics.on_finish(
                UnavailableError.grpc_code, e2e_s=now - t.request.arrival_time, ttft_s=_ttft(t)
            )
        self._post(deliveries)
        loop = self._loop
        if self.on_fatal is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.on_fatal, exc)

    def _post(self, deliveries: list[tuple[asyncio.Queue[_Item], _Item]]) -> None:
        """Hand results to the event loop: one wake-up for the whole batch."""
        loop = self._loop
        if not deliveries or loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(_deliver, deliveries)
        except RuntimeError:  # the loop closed between the check and the call
            logger.debug("event loop closed; %d results dropped", len(deliveries))


def _deliver(deliveries: list[tuple[asyncio.Queue[_Item], _Item]]) -> None:
    for queue, item in deliveries:
        queue.put_nowait(item)


def _ttft(tracked: _Tracked) -> float | None:
    if tracked.first_token_time is None:
        return None
    return tracked.first_token_time - tracked.request.arrival_time


def _default_name(source: str) -> str:
    if source.startswith("hf://"):
        return source.removeprefix("hf://").split("@", 1)[0]
    return Path(source).expanduser().resolve().name or source


def validate_request(
    request: GenerationRequest, *, max_model_len: int, vocab_size: int, priority_levels: int
) -> None:
    """Raise InvalidRequestError naming the first bad field. Pure.

    Checks the limits that depend on the loaded model and the batching policy
    (context length, vocabulary, priority levels); the sampling limits live in
    one place, :mod:`autoglm_server.validation`, and are applied from there.
    """
    prompt = request.prompt_token_ids
    n = len(prompt)
    if n == 0:
        raise InvalidRequestError("prompt", "must not be empty")
    if n >= max_model_len:
        raise InvalidRequestError(
            "prompt",
            f"{n} tokens leave no room to generate within the context limit of {max_model_len}",
        )
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise InvalidRequestError("prompt", f"token ids must be in [0, {vocab_size})")
    validate_sampling(request.params)
    if not 0 <= request.priority < priority_levels:
        raise InvalidRequestError("priority", f"must be in [0, {priority_levels})")


def build_engine(
    cfg: EngineConfig,
    *,
    metrics: Metrics | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> LLMEngine:
    """Create an engine (not started: ``await engine.start()`` loads and warms up)."""
    return LLMEngine(cfg, metrics=metrics, on_fatal=on_fatal)
