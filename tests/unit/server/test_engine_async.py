"""LLMEngine end to end on the tiny model: streams, aborts, back-pressure, failures."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from autoglm_server.engine.api import (  # noqa: E402
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    SamplingParams,
)
from autoglm_server.engine.config import BatchingConfig, EngineConfig  # noqa: E402
from autoglm_server.engine.engine import EngineStepError, LLMEngine, build_engine  # noqa: E402
from autoglm_server.errors import (  # noqa: E402
    DeadlineExceededError,
    InvalidRequestError,
    QueueFullError,
    UnavailableError,
)
from autoglm_server.frontend import GenerationStream  # noqa: E402

LONG = SamplingParams(max_new_tokens=400, ignore_eos=True, temperature=0.0)


async def make_engine(
    model_dir: Path,
    on_fatal: Callable[[BaseException], None] | None = None,
    max_model_len: int = 512,
    **batching: Any,
) -> LLMEngine:
    cfg = EngineConfig(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        max_model_len=max_model_len,
        batching=BatchingConfig(**batching),
    )
    engine = build_engine(cfg, on_fatal=on_fatal)
    await engine.start()
    return engine


@pytest.fixture
async def engine(tiny_model_dir: Path) -> AsyncIterator[LLMEngine]:
    eng = await make_engine(tiny_model_dir, max_batch_size=8, max_batch_tokens=256)
    yield eng
    await eng.shutdown(grace_s=0)


def request(rid: str, prompt: list[int], params: SamplingParams | None = None) -> GenerationRequest:
    return GenerationRequest(
        rid, prompt, params or SamplingParams(max_new_tokens=8, temperature=0.0)
    )


async def collect(engine: LLMEngine, req: GenerationRequest) -> list[GenerationDelta]:
    return [d async for d in engine.generate(req)]


def finished(engine: LLMEngine, code: str) -> float:
    labels = {"model": engine.served_model_name, "version": "local", "code": code}
    return engine.metrics.registry.get_sample_value("autoglm_requests_total", labels) or 0.0


async def wait_for(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not predicate():  # noqa: ASYNC110 - polls engine state, there is no event to wait on
            await asyncio.sleep(0.005)


async def test_generate_streams_tokens_and_text_then_usage(engine: LLMEngine) -> None:
    assert engine.is_ready()
    prompt = engine.apply_chat_template([{"role": "user", "content": "héllo 🚀"}])
    deltas = await collect(engine, request("r1", prompt))
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    last = deltas[-1]
    assert last.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert last.usage is not None and last.usage.prompt_tokens == len(prompt)
    tokens = [t for d in deltas for t in d.token_ids]
    assert last.usage.completion_tokens == len(tokens) <= 8
    assert "".join(d.text for d in deltas) == engine.detokenize(tokens)
    info = engine.model_info
    assert (info.architecture, info.max_model_len, info.dtype) == (
        "Glm4ForCausalLM",
        512,
        "float32",
    )


async def test_concurrent_requests_equal_each_request_alone(engine: LLMEngine) -> None:
    prompts = [engine.tokenize(t) for t in ("a", "the quick brown fox", "你好 世界", "x" * 40)]
    alone = [await collect(engine, request(f"alone{i}", p)) for i, p in enumerate(prompts)]
    together = await asyncio.gather(
        *(collect(engine, request(f"batch{i}", p)) for i, p in enumerate(prompts))
    )
    for a, b in zip(alone, together, strict=True):
        assert [d.token_ids for d in a] == [d.token_ids for d in b]


async def test_closing_the_stream_aborts_and_frees_the_slot(engine: LLMEngine) -> None:
    stream = engine.generate(request("long", [5, 6, 7], LONG))
    first = await stream.__anext__()
    assert first.token_ids and engine.stats().running == 1
    await stream.aclose()
    assert engine.stats().running == 0 and engine.stats().kv_usage == 0.0
    # The freed slot is usable at once.
    deltas = await collect(engine, request("next", [5, 6, 7]))
    assert deltas[-1].finish_reason is not None


async def test_breaking_out_of_async_for_aborts(engine: LLMEngine) -> None:
    async def consume_two() -> None:
        n = 0
        async for _ in engine.generate(request("long", [5, 6, 7], LONG)):
            n += 1
            if n == 2:
                break

    await consume_two()
    gc.collect()
    await wait_for(lambda: engine.stats().running == 0)
    assert finished(engine, "CANCELLED") == 1 and finished(engine, "OK") == 0


async def test_cancelled_consumer_aborts(engine: LLMEngine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(request("long", [5, 6, 7], LONG)):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.stats().running == 0
    assert finished(engine, "CANCELLED") == 1 and finished(engine, "OK") == 0


async def test_abort_is_counted_under_the_code_it_carries(engine: LLMEngine) -> None:
    stream = engine.generate(request("late", [5, 6, 7], LONG))
    await stream.__anext__()
    await engine.abort("late", "DEADLINE_EXCEEDED")
    assert finished(engine, "DEADLINE_EXCEEDED") == 1 and finished(engine, "CANCELLED") == 0


async def test_deadline_while_waiting_is_counted_as_deadline_exceeded(engine: LLMEngine) -> None:
    # A deadline cancels the consumer while it waits inside the engine stream;
    # the front end's stream then aborts with DEADLINE_EXCEEDED, and that is
    # the code counted, not the CANCELLED of the cancellation itself.
    with pytest.raises(DeadlineExceededError):
        async with GenerationStream(engine, request("late", [5, 6, 7], LONG)) as stream:
            try:
                async with asyncio.timeout(0.05):
                    async for _ in stream:
                        pass
            except TimeoutError:
                raise DeadlineExceededError("deadline exceeded") from None
    await wait_for(lambda: engine.stats().running == 0)
    assert finished(engine, "DEADLINE_EXCEEDED") == 1 and finished(engine, "CANCELLED") == 0


async def test_abort_by_id_ends_the_stream_with_abort(engine: LLMEngine) -> None:
    stream = engine.generate(request("victim", [5, 6, 7], LONG))
    await stream.__anext__()
    await engine.abort("victim")
    rest = [d async for d in stream]
    assert rest[-1].finish_reason is FinishReason.ABORT
    assert engine.stats().running == 0
    await engine.abort("never-existed")  # ignored


async def test_queue_overflow_raises_at_once(tiny_model_dir: Path) -> None:
    # A long queue delay keeps the first requests waiting, so the queue length is exact.
    eng = await make_engine(
        tiny_model_dir, max_batch_size=4, max_queue_length=2, max_queue_delay_ms=60_000
    )
    try:
        s1 = eng.generate(request("q1", [5]))
        s2 = eng.generate(request("q2", [6]))
        with pytest.raises(QueueFullError):
            eng.generate(request("q3", [7]))
        assert eng.stats().waiting == 2
        await s1.aclose()
        eng.generate(request("q3", [7]))  # room again
        assert eng.stats().waiting == 2
        await s2.aclose()
        text = eng.metrics.render().decode()
        assert 'autoglm_requests_total{code="RESOURCE_EXHAUSTED"' in text
        assert "autoglm_queue_depth{" in text
    finally:
        await eng.shutdown(grace_s=0)


@pytest.mark.parametrize(
    ("field", "req"),
    [
        ("prompt", request("a", [])),
        ("prompt", request("a", list(range(2, 514)))),
        ("prompt", request("a", [10**9])),
        ("max_new_tokens", request("a", [5], SamplingParams(max_new_tokens=0))),
        ("temperature", request("a", [5], SamplingParams(temperature=-1.0))),
        ("temperature", request("a", [5], SamplingParams(temperature=float("nan")))),
        ("top_p", request("a", [5], SamplingParams(top_p=0.0))),
        ("top_p", request("a", [5], SamplingParams(top_p=1.5))),
        ("top_k", request("a", [5], SamplingParams(top_k=-1))),
        ("repetition_penalty", request("a", [5], SamplingParams(repetition_penalty=0.0))),
        ("stop", request("a", [5], SamplingParams(stop=("",)))),
        ("seed", request("a", [5], SamplingParams(seed=2**70))),
        # The engine applies the front ends' limits (validation.py), not looser ones.
        ("seed", request("a", [5], SamplingParams(seed=-1))),
        ("temperature", request("a", [5], SamplingParams(temperature=2.5))),
        ("repetition_penalty", request("a", [5], SamplingParams(repetition_penalty=11.0))),
        ("stop", request("a", [5], SamplingParams(stop=("x",) * 17))),
        ("priority", GenerationRequest("a", [5], SamplingParams(), priority=1)),
        ("request_id", request("", [5])),
    ],
)
async def test_invalid_requests_name_the_field(
    engine: LLMEngine, field: str, req: GenerationRequest
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        engine.generate(req)
    assert info.value.field == field
    assert engine.stats().waiting == 0


async def test_duplicate_request_id_is_refused(engine: LLMEngine) -> None:
    stream = engine.generate(request("dup", [5], LONG))
    with pytest.raises(InvalidRequestError, match="request_id"):
        engine.generate(request("dup", [5]))
    await stream.aclose()


async def test_stop_sequence_ends_the_request(engine: LLMEngine) -> None:
    # Find what the model says greedily, then stop in the middle of it.
    prompt = engine.tokenize("hello")
    free = await collect(
        engine,
        request(
            "free", prompt, SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
        ),
    )
    text = "".join(d.text for d in free)
    assert len(text) >= 6, text
    stop = text[3:6]
    deltas = await collect(
        engine,
        request(
            "s",
            prompt,
            SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True, stop=(stop,)),
        ),
    )
    assert deltas[-1].finish_reason is FinishReason.STOP
    assert "".join(d.text for d in deltas) == text[: text.index(stop)]
    assert engine.stats().running == 0


async def test_seeded_requests_reproduce_through_the_engine(engine: LLMEngine) -> None:
    params = SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.9, seed=7, ignore_eos=True)
    a = await collect(engine, request("a", [5, 6], params))
    b, _ = await asyncio.gather(
        collect(engine, request("b", [5, 6], params)),
        collect(
            engine, request("c", [9, 9, 9], SamplingParams(max_new_tokens=12, temperature=1.0))
        ),
    )
    assert [d.token_ids for d in a] == [d.token_ids for d in b]


@pytest.mark.parametrize("phase", ["launch", "collect"])
async def test_step_failure_fails_only_that_batch(engine: LLMEngine, phase: str) -> None:
    runner = engine._runner
    original = getattr(runner, phase)
    calls = {"n": 0}

    def flaky(arg: Any) -> Any:
        if arg is not None and calls["n"] == 0 and (phase == "collect" or arg.seqs):
            calls["n"] += 1
            raise RuntimeError("simulated CUDA error")
        return original(arg)

    setattr(runner, phase, flaky)
    with pytest.raises(EngineStepError):
        await collect(engine, request("doomed", [5, 6]))
    assert engine.is_ready()
    assert engine.stats().running == 0
    deltas = await collect(engine, request("fine", [5, 6]))
    assert deltas[-1].finish_reason is not None
    assert 'code="INTERNAL"' in engine.metrics.render().decode()


async def test_loop_death_is_fatal_and_reported(tiny_model_dir: Path) -> None:
    fatal: list[BaseException] = []
    eng = await make_engine(tiny_model_dir, on_fatal=fatal.append)
    try:
        assert eng._scheduler is not None

        def broken() -> Any:
            raise RuntimeError("scheduler bug")

        eng._scheduler.schedule = broken  # type: ignore[method-assign]
        with pytest.raises(UnavailableError):
            await collect(eng, request("x", [5]))
        # The request the death failed is counted once, as its client saw it.
        assert finished(eng, "UNAVAILABLE") == 1
        await wait_for(lambda: bool(fatal))
        assert not eng.is_ready()
        assert "scheduler bug" in str(fatal[0])
        with pytest.raises(UnavailableError):
            eng.generate(request("y", [5]))
    finally:
        await eng.shutdown(grace_s=0)


async def test_shutdown_refuses_new_requests_and_drains_in_flight(tiny_model_dir: Path) -> None:
    eng = await make_engine(tiny_model_dir)
    stream = eng.generate(
        request("inflight", [5, 6], SamplingParams(max_new_tokens=20, ignore_eos=True))
    )
    consumer = asyncio.create_task(asyncio.wait_for(asyncio.shield(_drain(stream)), 10))
    await asyncio.sleep(0)
    shutdown = asyncio.create_task(eng.shutdown(grace_s=10))
    await asyncio.sleep(0)
    assert not eng.is_ready()
    with pytest.raises(UnavailableError):
        eng.generate(request("late", [5]))
    deltas = await consumer
    await shutdown
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 20


async def test_shutdown_aborts_what_is_left_after_the_grace(tiny_model_dir: Path) -> None:
    eng = await make_engine(tiny_model_dir)
    stream = eng.generate(request("forever", [5, 6], LONG))
    await stream.__anext__()
    await eng.shutdown(grace_s=0)
    rest = [d async for d in stream]
    assert rest[-1].finish_reason is FinishReason.ABORT


async def _drain(stream: Any) -> list[GenerationDelta]:
    return [d async for d in stream]


async def test_not_ready_before_start(tiny_model_dir: Path) -> None:
    eng = build_engine(EngineConfig(model=str(tiny_model_dir), device="cpu"))
    assert not eng.is_ready()
    with pytest.raises(UnavailableError):
        eng.generate(request("early", [5]))


async def test_detokenization_runs_off_the_step_thread(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from autoglm_server.engine.detokenizer import IncrementalDetokenizer

    threads: set[str] = set()
    original = IncrementalDetokenizer.add

    def add(self: Any, *args: Any, **kwargs: Any) -> Any:
        threads.add(threading.current_thread().name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IncrementalDetokenizer, "add", add)
    deltas = await collect(engine, request("d1", engine.tokenize("the quick brown fox")))
    assert "".join(d.text for d in deltas)
    assert threads == {"autoglm-detokenizer"}
