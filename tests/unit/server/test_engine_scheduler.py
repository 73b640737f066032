"""The scheduler, driven by a fake runner: no torch, no model."""

from __future__ import annotations

import pytest

from autoglm_server.engine.api import FinishReason, GenerationRequest, SamplingParams
from autoglm_server.engine.config import BatchingConfig
from autoglm_server.engine.scheduler import (
    RequestOutput,
    RunnerOutput,
    Scheduler,
    SchedulerOutput,
)
from autoglm_server.errors import QueueFullError

EOS = 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRunner:
    """Samples token 7 unless told otherwise; checks the runner-side invariants."""

    def __init__(self, num_slots: int) -> None:
        self.next_token: dict[str, int] = {}
        self.slot_owner: dict[int, str] = {}
        self.steps: list[SchedulerOutput] = []

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self.steps.append(sched)
        for slot in sched.freed_slots:
            self.slot_owner.pop(slot, None)
        seen_slots: set[int] = set()
        out = []
        for seq in sched.seqs:
            assert seq.slot not in seen_slots, "a slot appears twice in one step"
            seen_slots.add(seq.slot)
            if seq.is_new:
                assert seq.slot not in self.slot_owner, "slot handed out while still owned"
                self.slot_owner[seq.slot] = seq.request_id
            assert self.slot_owner[seq.slot] == seq.request_id
            if seq.sample:
                out.append(self.next_token.get(seq.request_id, 7))
        return RunnerOutput(sampled_token_ids=out)


def make_request(
    rid: str, n_prompt: int = 4, *, max_new: int = 4, priority: int = 0, arrival: float = 0.0
) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt_token_ids=list(range(1, n_prompt + 1)),
        params=SamplingParams(max_new_tokens=max_new),
        priority=priority,
        arrival_time=arrival,
    )


def make(
    clock: FakeClock | None = None, max_model_len: int = 64, **policy: int | float | bool
) -> tuple[Scheduler, FakeRunner]:
    config = BatchingConfig(**policy)  # type: ignore[arg-type]
    sched = Scheduler(config, max_model_len, clock=clock or FakeClock())
    return sched, FakeRunner(config.max_batch_size)


def step(sched: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[RequestOutput]]:
    out = sched.schedule()
    return out, sched.update(out, runner.execute(out))


def test_requests_join_and_leave_the_running_batch_every_step() -> None:
    sched, runner = make(max_batch_size=4, max_batch_tokens=64)
    sched.add_request(make_request("a", max_new=2), [EOS])
    out, res = step(sched, runner)
    assert [s.request_id for s in out.seqs] == ["a"]
    assert out.seqs[0].is_new and out.seqs[0].sample and out.seqs[0].token_ids == [1, 2, 3, 4]
    assert [r.new_token_ids for r in res] == [[7]]

    # b joins while a decodes; a finishes (max_new=2) in this same step.
    sched.add_request(make_request("b", max_new=3), [EOS])
    out, res = step(sched, runner)
    assert [(s.request_id, len(s.token_ids)) for s in out.seqs] == [("a", 1), ("b", 4)]
    assert out.seqs[0].start_pos == 4 and out.seqs[0].token_ids == [7]
    finished = {r.request_id: r.finish_reason for r in res}
    assert finished == {"a": FinishReason.LENGTH, "b": None}
    assert sched.num_running == 1

    # a has left; b decodes alone.
    out, _ = step(sched, runner)
    assert [s.request_id for s in out.seqs] == ["b"]
    assert out.freed_slots == [0]


def test_eos_finishes_with_stop_unless_ignore_eos() -> None:
    sched, runner = make()
    sched.add_request(make_request("a", max_new=10), [EOS])
    req = make_request("b", max_new=3)
    req.params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    sched.add_request(req, [EOS])
    runner.next_token = {"a": EOS, "b": EOS}
    _, res = step(sched, runner)
    assert {r.request_id: r.finish_reason for r in res} == {"a": FinishReason.STOP, "b": None}
    step(sched, runner)
    _, res = step(sched, runner)
    assert res[0].finish_reason is FinishReason.LENGTH and res[0].num_output_tokens == 3


def test_context_limit_finishes_with_length() -> None:
    sched, runner = make(max_model_len=6)
    sched.add_request(make_request("a", n_prompt=4, max_new=100), [EOS])
    step(sched, runner)  # 5 tokens
    _, res = step(sched, runner)  # 6 tokens = max_model_len
    assert res[0].finish_reason is FinishReason.LENGTH
    assert res[0].num_output_tokens == 2


def test_prefill_is_admitted_under_the_token_budget() -> None:
    sched, runner = make(max_batch_size=8, max_batch_tokens=10, chunked_prefill=False)
    for rid in "abc":
        sched.add_request(make_request(rid, n_prompt=4, max_new=5), [EOS])
    out, _ = step(sched, runner)
    assert [s.request_id for s in out.seqs] == ["a", "b"]  # 8 tokens; c (4 more) would exceed 10
    assert out.num_tokens == 8
    out, _ = step(sched, runner)
    # a and b decode (2 tokens) and c's whole prompt fits now (4).
    assert [(s.request_id, len(s.token_ids)) for s in out.seqs] == [("a", 1), ("b", 1), ("c", 4)]
    assert all(o.num_tokens <= 10 for o in runner.steps)


def test_chunked_prefill_splits_a_long_prompt_across_steps() -> None:
    sched, runner = make(max_batch_size=4, max_batch_tokens=8)
    sched.add_request(make_request("long", n_prompt=20, max_new=2), [EOS])
    chunks = []
    for _ in range(3):
        out, res = step(sched, runner)
        chunks.append((out.seqs[0].start_pos, len(out.seqs[0].token_ids), out.seqs[0].sample))
        assert out.num_tokens <= 8
    assert chunks == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert res[0].new_token_ids == [7]
    assert [s.is_new for o in runner.steps for s in o.seqs] == [True, False, False]


def test_running_decodes_are_never_starved_by_prefill() -> None:
    sched, runner = make(max_batch_size=4, max_batch_tokens=8)
    sched.add_request(make_request("a", n_prompt=2, max_new=50), [EOS])
    step(sched, runner)
    sched.add_request(make_request("big", n_prompt=30, max_new=2), [EOS])
    for _ in range(4):
        out, _ = step(sched, runner)
        ids = [s.request_id for s in out.seqs]
        assert ids[0] == "a" and len(out.seqs[0].token_ids) == 1
        assert out.num_tokens <= 8


def test_priorities_lower_number_first_fifo_within_a_level() -> None:
    sched, runner = make(max_batch_size=1, max_batch_tokens=16, priority_levels=3)
    sched.add_request(make_request("low1", priority=2, max_new=1), [EOS])
    sched.add_request(make_request("mid", priority=1, max_new=1), [EOS])
    sched.add_request(make_request("low2", priority=2, max_new=1), [EOS])
    sched.add_request(make_request("urgent", priority=0, max_new=1), [EOS])
    order = []
    while sched.has_unfinished():
        out, _ = step(sched, runner)
        order.extend(s.request_id for s in out.seqs)
    assert order == ["urgent", "mid", "low1", "low2"]


def test_queue_delay_waits_for_company_only_when_idle() -> None:
    clock = FakeClock()
    sched, runner = make(clock, max_batch_size=4, max_queue_delay_ms=50)
    sched.add_request(make_request("a", arrival=clock.now), [EOS])
    out = sched.schedule()
    assert out.is_empty and out.wait_s == pytest.approx(0.05)
    clock.now += 0.02
    sched.add_request(make_request("b", arrival=clock.now), [EOS])
    out = sched.schedule()
    assert out.is_empty and out.wait_s == pytest.approx(0.03)
    clock.now += 0.031
    out, _ = step(sched, runner)
    assert [s.request_id for s in out.seqs] == ["a", "b"]
    # Now the batch is busy: a newcomer is admitted on the next step without waiting.
    sched.add_request(make_request("c", arrival=clock.now), [EOS])
    out, _ = step(sched, runner)
    assert "c" in [s.request_id for s in out.seqs]


def test_queue_delay_ends_early_when_the_batch_would_be_full() -> None:
    clock = FakeClock()
    sched, runner = make(clock, max_batch_size=2, max_queue_delay_ms=1000)
    sched.add_request(make_request("a", arrival=clock.now), [EOS])
    assert sched.schedule().is_empty
    sched.add_request(make_request("b", arrival=clock.now), [EOS])
    out, _ = step(sched, runner)
    assert len(out.seqs) == 2


def test_queue_full_raises_at_admission() -> None:
    sched, runner = make(max_batch_size=1, max_queue_length=2)
    sched.add_request(make_request("a"), [EOS])
    sched.add_request(make_request("b"), [EOS])
    with pytest.raises(QueueFullError):
        sched.add_request(make_request("c"), [EOS])
    step(sched, runner)  # a is admitted: one place frees up in the queue
    sched.add_request(make_request("c"), [EOS])
    assert sched.num_waiting == 2 and sched.num_running == 1


def test_abort_between_steps_frees_the_slot_for_the_next_request() -> None:
    sched, runner = make(max_batch_size=1)
    sched.add_request(make_request("a", max_new=100), [EOS])
    sched.add_request(make_request("b", max_new=100), [EOS])
    out, _ = step(sched, runner)
    assert [s.request_id for s in out.seqs] == ["a"]
    # KV usage counts blocks: a's 4 tokens hold 1 of the 4 blocks of its slot's share.
    assert sched.num_free_slots == 0 and sched.kv_usage() == 0.25
    aborted = sched.abort_request("a")
    assert aborted is not None and aborted.finish_reason is FinishReason.ABORT
    assert sched.num_running == 0 and sched.kv_usage() == 0.0
    out, _ = step(sched, runner)
    assert [(s.request_id, s.slot, s.is_new) for s in out.seqs] == [("b", 0, True)]
    assert out.freed_slots == [0]
    # Aborting a waiting request removes it from the queue.
    sched.add_request(make_request("c"), [EOS])
    sched.abort_request("c")
    assert sched.num_waiting == 0
    assert sched.abort_request("unknown") is None


def test_result_of_a_request_aborted_during_the_step_is_dropped() -> None:
    sched, runner = make(max_batch_size=2)
    sched.add_request(make_request("a", max_new=100), [EOS])
    sched.add_request(make_request("b", max_new=100), [EOS])
    out = sched.schedule()
    result = runner.execute(out)
    sched.abort_request("a")  # e.g. the client went away while the forward pass ran
    res = sched.update(out, result)
    assert [r.request_id for r in res] == ["b"]


def test_slots_are_reused_and_never_double_booked() -> None:
    sched, runner = make(max_batch_size=3, max_batch_tokens=64)
    for i in range(12):
        sched.add_request(make_request(f"r{i}", n_prompt=1 + i % 5, max_new=1 + i % 4), [EOS])
    while sched.has_unfinished():
        out, _ = step(sched, runner)
        assert len(out.seqs) <= 3
        assert sorted(s.slot for s in out.seqs) == sorted({s.slot for s in out.seqs})
    assert sched.num_free_slots == 3 and sched.kv_usage() == 0.0
    used = {s.slot for o in runner.steps for s in o.seqs}
    assert used == {0, 1, 2}


def test_decodes_are_ordered_by_slot() -> None:
    sched, runner = make(max_batch_size=4)
    for rid in "abcd":
        sched.add_request(make_request(rid, max_new=10), [EOS])
    step(sched, runner)
    sched.abort_request("b")
    sched.add_request(make_request("e", max_new=10), [EOS])
    step(sched, runner)  # e takes slot 1, admitted after c and d
    out, _ = step(sched, runner)
    assert [s.slot for s in out.seqs] == [0, 1, 2, 3]
    assert [s.request_id for s in out.seqs] == ["a", "e", "c", "d"]


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("max_batch_size", {"max_batch_size": 0}),
        ("max_batch_tokens", {"max_batch_size": 64, "max_batch_tokens": 32}),
        ("max_queue_delay_ms", {"max_queue_delay_ms": -1}),
        ("max_queue_length", {"max_queue_length": -1}),
        # 0 would refuse every request (RESOURCE_EXHAUSTED) even with free slots.
        ("max_queue_length", {"max_queue_length": 0}),
        ("priority_levels", {"priority_levels": 0}),
    ],
)
def test_batching_config_validation_names_the_field(field: str, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=f"^{field}: must be"):
        BatchingConfig(**kwargs)  # type: ignore[arg-type]


def test_a_queue_of_one_admits_with_free_slots() -> None:
    sched, _ = make(max_batch_size=2, max_queue_length=1)
    sched.add_request(GenerationRequest("a", [1, 2], SamplingParams(max_new_tokens=2)), [EOS])
    assert sched.schedule().seqs[0].request_id == "a"


# -- pipelined steps (the engine launches step N+1 before applying step N) ----------------------


def test_a_step_can_be_scheduled_while_the_previous_one_is_in_flight() -> None:
    from autoglm_server.engine.scheduler import PENDING_TOKEN

    sched, runner = make(max_batch_size=2, max_batch_tokens=64)
    sched.add_request(make_request("a", n_prompt=4, max_new=3))
    first = sched.schedule()  # the prompt; samples token 1
    second = sched.schedule()  # before first's result: decodes the pending token
    assert [s.token_ids for s in second.seqs] == [[PENDING_TOKEN]]
    assert second.seqs[0].start_pos == 4
    third = sched.schedule()  # and again (the device feeds each step the one before's)
    assert [(s.token_ids, s.start_pos) for s in third.seqs] == [([PENDING_TOKEN], 5)]
    assert sched.schedule().is_empty  # a fourth token would pass max_new_tokens: not run
    runner.next_token["a"] = 11
    (out,) = sched.update(first, runner.execute(first))
    assert out.new_token_ids == [11] and out.finish_reason is None
    sched.update(second, runner.execute(second))
    assert sched.schedule().is_empty
    (out,) = sched.update(third, runner.execute(third))
    assert out.finish_reason is FinishReason.LENGTH
    assert sched.get("a") is None and not sched.has_unfinished()


def test_a_result_from_before_a_preemption_is_dropped_even_in_the_same_slot() -> None:
    sched, runner = make(max_batch_size=1, max_batch_tokens=64)
    state = sched.add_request(make_request("a", n_prompt=4, max_new=8))
    first = sched.schedule()
    sched.update(first, runner.execute(first))
    in_flight = sched.schedule()  # decodes token 2 at position 4 ...
    sched._preempt(state)  # ... and is preempted before its result arrives
    again = sched.schedule()  # readmitted at once, in the same slot, recomputing
    assert again.seqs[0].is_new and again.seqs[0].slot == in_flight.seqs[0].slot
    runner.next_token["a"] = 99
    assert sched.update(in_flight, runner.execute(in_flight)) == []
    assert state.output_token_ids == [7]
