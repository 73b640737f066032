"""Paged KV cache: block allocation, prefix caching, preemption (CPU, portable path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from autoglm_server.engine.api import GenerationRequest, SamplingParams
from autoglm_server.engine.block_manager import SCRATCH_BLOCK, BlockManager
from autoglm_server.engine.config import BatchingConfig
from autoglm_server.engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput

# -- the block manager ------------------------------------------------------------------------


def test_allocation_grows_tables_and_never_hands_out_the_scratch_block() -> None:
    blocks = BlockManager(5, 4)
    a: list[int] = []
    assert blocks.allocate(a, 9)  # 3 blocks
    assert len(a) == 3 and SCRATCH_BLOCK not in a
    assert blocks.allocate(a, 12)  # still 3
    assert len(a) == 3
    b: list[int] = []
    assert not blocks.allocate(b, 8)  # 2 needed, 1 free: nothing taken
    assert b == [] and blocks.num_free == 1
    assert blocks.allocate(b, 4)
    assert set(a).isdisjoint(b) and blocks.num_free == 0 and blocks.usage() == 1.0
    blocks.free(a)
    assert a == [] and blocks.num_free == 3


def test_full_computed_blocks_are_shared_by_prefix_and_counted() -> None:
    blocks = BlockManager(10, 4)
    tokens = list(range(100, 110))  # 2 full blocks + 2
    a: list[int] = []
    blocks.allocate(a, len(tokens))
    assert blocks.cache_full_blocks(tokens, a, 0, 10) == 8
    b: list[int] = []
    hit = blocks.match_prefix([*tokens[:8], 7, 7, 7], b)
    assert hit == 8 and b == a[:2]
    # A prompt that is exactly the cached blocks still leaves a token to compute.
    c: list[int] = []
    assert blocks.match_prefix(tokens[:8], c) == 4 and c == a[:1]
    # A different first block shares nothing, even with the same second block.
    d: list[int] = []
    assert blocks.match_prefix([0, 0, 0, 0, *tokens[4:]], d) == 0 and d == []
    assert blocks.stats.hit_tokens == 12
    assert blocks.stats.hit_rate == pytest.approx(12 / (11 + 8 + 10))
    # Shared blocks stay until their last user frees them.
    blocks.free(a)
    blocks.free(c)
    assert blocks.num_free == 9 - 2  # b still holds both shared blocks
    blocks.free(b)
    assert blocks.num_free == 9


def test_cached_blocks_are_evicted_last_and_least_recently_freed_first() -> None:
    blocks = BlockManager(5, 2)  # 4 usable blocks
    old, new = [1, 2, 3, 4], [5, 6, 7, 8]
    a: list[int] = []
    blocks.allocate(a, 4)
    blocks.cache_full_blocks(old, a, 0, 4)
    blocks.free(a)  # 2 cached, 2 never used
    b: list[int] = []
    blocks.allocate(b, 4)
    blocks.cache_full_blocks(new, b, 0, 4)
    blocks.free(b)  # all 4 cached; "old" freed first
    assert blocks.num_free == 4
    probe: list[int] = []
    assert blocks.match_prefix([*old, 0], probe) == 4
    blocks.free(probe)  # "old" is now the most recently freed
    c: list[int] = []
    blocks.allocate(c, 4)  # evicts 2 blocks: "new" (least recently freed)
    blocks.free(c)
    probe = []
    assert blocks.match_prefix([*new, 0], probe) == 0
    assert blocks.match_prefix([*old, 0], probe) == 4


def test_prefix_caching_off_never_matches() -> None:
    blocks = BlockManager(10, 4, prefix_caching=False)
    a: list[int] = []
    blocks.allocate(a, 8)
    blocks.cache_full_blocks(list(range(8)), a, 0, 8)
    b: list[int] = []
    assert blocks.match_prefix([*range(8), 9], b) == 0 and b == []


# -- the scheduler ----------------------------------------------------------------------------


def run_fake(sched: Scheduler, token: int = 7) -> list[SchedulerOutput]:
    """Drive the scheduler to the end, sampling ``token`` every time."""
    steps = []
    while sched.has_unfinished():
        step = sched.schedule()
        steps.append(step)
        sched.update(step, RunnerOutput([token for s in step.seqs if s.sample]))
    return steps


def test_a_second_request_with_the_same_prefix_computes_only_the_rest() -> None:
    blocks = BlockManager(64, 16)
    sched = Scheduler(BatchingConfig(max_batch_size=2), 256, blocks=blocks)
    system = list(range(1, 41))  # 2 full blocks + 8 tokens
    params = SamplingParams(max_new_tokens=2)
    sched.add_request(GenerationRequest("a", [*system, 50], params))
    run_fake(sched)
    sched.add_request(GenerationRequest("b", [*system, 60, 61], params))
    first = sched.schedule()
    (seq,) = first.seqs
    assert seq.is_new and seq.start_pos == 32
    assert seq.token_ids == [*system[32:], 60, 61]
    assert seq.cached_token_ids == system[:32]
    assert len(seq.new_blocks) == 3  # 2 shared + 1 new
    assert blocks.stats.hit_tokens == 32


def test_preemption_takes_the_least_important_newest_request_and_it_finishes() -> None:
    # 6 usable blocks of 4 tokens; each request needs 3 blocks at the end (3 + 7 tokens).
    blocks = BlockManager(7, 4, prefix_caching=False)
    config = BatchingConfig(max_batch_size=4, priority_levels=2)
    sched = Scheduler(config, 64, blocks=blocks)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    sched.add_request(GenerationRequest("old", [1, 2, 3], params, priority=1, arrival_time=1.0))
    sched.add_request(GenerationRequest("urgent", [4, 5, 6], params, priority=0, arrival_time=2.0))
    sched.add_request(GenerationRequest("new", [7, 8, 9], params, priority=1, arrival_time=3.0))
    preempted: list[str] = []
    finished: dict[str, int] = {}
    while sched.has_unfinished():
        running = set(sched._running)
        step = sched.schedule()
        preempted += sorted(running - set(sched._running))
        for out in sched.update(step, RunnerOutput([7 for s in step.seqs if s.sample])):
            if out.finish_reason is not None:
                finished[out.request_id] = out.num_output_tokens
    assert sched.num_preemptions >= 1
    assert preempted[0] == "new"  # priority 1 and the newest
    assert "urgent" not in preempted
    assert finished == {"old": 8, "urgent": 8, "new": 8}
    assert blocks.num_free == blocks.num_usable


# -- the runner, portable path ----------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from autoglm_server.engine.runner import ModelRunner  # noqa: E402
from autoglm_server.engine.scheduler import PENDING_TOKEN  # noqa: E402

SHARED = list(range(100, 148))  # 3 full blocks of 16
PROMPTS = [
    [5, 6, 7, 8, 9, 10],
    [*SHARED, 1, 2, 3],
    list(range(20, 45)),
    [*SHARED, 4, 5],
    [40],
    [*SHARED, *range(200, 230)],
]


@pytest.fixture(scope="module")
def runner(tiny_llama_dir: Path) -> ModelRunner:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return ModelRunner(model.eval(), num_slots=8, max_model_len=256, device=torch.device("cpu"))


def drive(
    runner: ModelRunner,
    params: SamplingParams,
    *,
    prefix: bool = True,
    stagger: bool = False,
    budget: int = 8192,
    num_blocks: int | None = None,
    max_batch: int = 8,
    pipelined: bool = False,
) -> tuple[dict[str, list[int]], Scheduler]:
    """Run PROMPTS through a scheduler and the runner like the engine's loop does.

    ``pipelined``: as the engine does by default, launch each step before the
    previous step's tokens are read back and applied (its decodes then feed
    PENDING_TOKEN, which the runner takes from the device).
    """
    blocks = BlockManager(num_blocks or runner.num_blocks, runner.block_size, prefix_caching=prefix)
    config = BatchingConfig(max_batch_size=max_batch, max_batch_tokens=budget)
    sched = Scheduler(config, runner.max_model_len, blocks=blocks)
    outputs: dict[str, list[int]] = {}
    pending = list(enumerate(PROMPTS))
    in_flight: tuple[Any, Any] | None = None
    while pending or sched.has_unfinished() or in_flight is not None:
        if pending and not (stagger and sched.num_waiting):
            i, prompt = pending.pop(0)
            sched.add_request(GenerationRequest(str(i), prompt, params, arrival_time=1.0 + i))
            outputs[str(i)] = []
        step = sched.schedule()
        if not pipelined:
            for out in sched.update(step, runner.execute(step)):
                outputs[out.request_id] += out.new_token_ids
            continue
        launched = runner.launch(step)
        if in_flight is not None:
            for out in sched.update(in_flight[0], runner.collect(in_flight[1])):
                outputs[out.request_id] += out.new_token_ids
        in_flight = (step, launched) if step.seqs else None
    return outputs, sched


GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)


def full_recompute_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """Greedy by definition: argmax of a full forward pass over everything so far.

    (Not ``generate``: its KV-cache path rounds differently, and on a random
    tiny model that flips near-ties; for ``[*SHARED, 1, 2, 3]`` it picks 438
    where the full forward pass's argmax is 240.)
    """
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_with_prefix_hits_and_preemption_equals_one_at_a_time(
    runner: ModelRunner, tiny_llama_dir: Path
) -> None:
    alone, _ = drive(runner, GREEDY, prefix=False, max_batch=1)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.float32
    ).eval()
    for i, prompt in enumerate(PROMPTS):
        assert alone[str(i)] == full_recompute_greedy(reference, prompt, 10)
    hits, sched = drive(runner, GREEDY, stagger=True)
    assert sched.blocks.stats.hit_tokens == 96  # prompts 3 and 5 reuse prompt 1's 3 blocks
    assert hits == alone
    # A pool of 9 blocks and chunks of 8 tokens: preemption by recompute.
    squeezed, sched = drive(runner, GREEDY, budget=8, num_blocks=10)
    assert sched.num_preemptions > 0
    assert squeezed == alone


def test_pipelined_steps_give_the_same_tokens(runner: ModelRunner) -> None:
    """Each step launched before the previous one's tokens are applied (the engine's
    default): prefix hits, chunked prefill and preemption of requests in flight."""
    alone, _ = drive(runner, GREEDY, prefix=False, max_batch=1)
    launch = runner.launch
    fed_pending = []

    def spy(step: Any) -> Any:
        fed_pending.extend(s for s in step.seqs if s.token_ids == [PENDING_TOKEN])
        return launch(step)

    runner.launch = spy  # type: ignore[method-assign]
    try:
        batched, _ = drive(runner, GREEDY, pipelined=True)
    finally:
        runner.launch = launch  # type: ignore[method-assign]
    assert fed_pending  # decodes ran before their input token reached the host
    assert batched == alone
    hits, sched = drive(runner, GREEDY, stagger=True, pipelined=True)
    assert sched.blocks.stats.hit_tokens == 96
    assert hits == alone
    squeezed, sched = drive(runner, GREEDY, budget=8, num_blocks=10, pipelined=True)
    assert sched.num_preemptions > 0
    assert squeezed == alone
    # With penalties the device's per-slot state must also see the pending tokens.
    params = SamplingParams(
        max_new_tokens=10, temperature=0.0, repetition_penalty=5.0, ignore_eos=True
    )
    plain, _ = drive(runner, params, prefix=False, max_batch=1)
    piped, _ = drive(runner, params, stagger=True, pipelined=True)
    assert piped == plain


def test_repetition_penalty_counts_prefix_hits_as_seen(runner: ModelRunner) -> None:
    params = SamplingParams(
        max_new_tokens=10, temperature=0.0, repetition_penalty=5.0, ignore_eos=True
    )
    plain, _ = drive(runner, params, prefix=False, max_batch=1)
    hits, sched = drive(runner, params, stagger=True)
    assert sched.blocks.stats.hit_tokens > 0
    assert hits == plain


def test_runner_keeps_block_tables_and_the_cache_allocated_once(runner: ModelRunner) -> None:
    ptr = runner.k_cache.data_ptr()
    drive(runner, GREEDY, budget=8, num_blocks=10)
    assert runner.k_cache.data_ptr() == ptr
    assert runner.num_blocks == 8 * 16 + 1  # slots x max_model_len / block_size + scratch
    seen: Any = runner.block_tables
    assert tuple(seen.shape) == (8, 16)
