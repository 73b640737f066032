"""The runner against Hugging Face's own forward pass, on the tiny models (CPU, fp32)."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from autoglm_server.engine.api import GenerationRequest, SamplingParams  # noqa: E402
from autoglm_server.engine.block_manager import BlockManager  # noqa: E402
from autoglm_server.engine.config import BatchingConfig  # noqa: E402
from autoglm_server.engine.runner import ModelRunner  # noqa: E402
from autoglm_server.engine.scheduler import (  # noqa: E402
    RunnerOutput,
    ScheduledSeq,
    Scheduler,
    SchedulerOutput,
)

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [
    [5, 6, 7, 8, 9, 10],
    [11, 12, 13],
    [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32],
    [40],
    [50, 51, 52, 53, 54, 55, 56, 57],
]


def load(model_dir: Path) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def make_runner(model_dir: Path, num_slots: int = 8, max_len: int = 128) -> ModelRunner:
    return ModelRunner(
        load(model_dir), num_slots=num_slots, max_model_len=max_len, device=torch.device("cpu")
    )


# Per runner (weakly held: an id() could be reused by the next test's runner).
_BLOCKS: weakref.WeakKeyDictionary[ModelRunner, tuple[BlockManager, dict[int, list[int]]]] = (
    weakref.WeakKeyDictionary()
)


def execute(runner: ModelRunner, step: SchedulerOutput) -> RunnerOutput:
    """runner.execute with KV blocks assigned the way the scheduler would (no prefix cache)."""
    if runner not in _BLOCKS:
        _BLOCKS[runner] = (
            BlockManager(runner.num_blocks, runner.block_size, prefix_caching=False),
            {},
        )
    manager, tables = _BLOCKS[runner]
    for seq in step.seqs:
        table = tables.setdefault(seq.slot, [])
        if seq.is_new:
            manager.free(table)
        before = len(table)
        assert manager.allocate(table, seq.start_pos + len(seq.token_ids))
        seq.new_blocks = table[before:]
    return runner.execute(step)


def capture_logits(runner: ModelRunner) -> list[Any]:
    """Record the logits the sampler sees (one [B, V] tensor per step)."""
    seen: list[Any] = []
    original = runner._sample

    def spy(logits: Any, rows: Any, slots: Any) -> Any:
        seen.append(logits.clone())
        return original(logits, rows, slots)

    runner._sample = spy  # type: ignore[method-assign]
    return seen


def run_greedy(
    runner: ModelRunner,
    prompts: list[list[int]],
    steps: int,
    slots: list[int] | None = None,
    chunk: int | None = None,
) -> list[list[int]]:
    """Drive the runner like the scheduler would: prefill (optionally chunked), then decode."""
    slots = slots or list(range(len(prompts)))
    outputs: list[list[int]] = [[] for _ in prompts]
    pending = [0] * len(prompts)
    first = [True] * len(prompts)
    while any(pending[i] < len(p) for i, p in enumerate(prompts)):
        seqs = []
        for i, p in enumerate(prompts):
            if pending[i] >= len(p):
                continue
            n = len(p) - pending[i] if chunk is None else min(chunk, len(p) - pending[i])
            end = pending[i] + n
            seqs.append(
                ScheduledSeq(
                    str(i),
                    slots[i],
                    p[pending[i] : end],
                    pending[i],
                    end == len(p),
                    first[i],
                    GREEDY,
                    is_prefill=True,
                )
            )
            first[i] = False
            pending[i] = end
        out = execute(runner, SchedulerOutput(1, seqs, 0, []))
        it = iter(out.sampled_token_ids)
        for seq in seqs:
            if seq.sample:
                outputs[int(seq.request_id)].append(next(it))
    for _ in range(steps):
        seqs = [
            ScheduledSeq(
                str(i),
                slots[i],
                [outputs[i][-1]],
                len(p) + len(outputs[i]) - 1,
                True,
                False,
                GREEDY,
            )
            for i, p in enumerate(prompts)
        ]
        out = execute(runner, SchedulerOutput(2, seqs, len(seqs), []))
        for i, tok in enumerate(out.sampled_token_ids):
            outputs[i].append(tok)
    return outputs


@pytest.mark.parametrize("arch_fixture", ["tiny_model_dir", "tiny_llama_dir"])
def test_packed_prefill_and_decode_logits_match_hf_full_recompute(
    arch_fixture: str, request: pytest.FixtureRequest
) -> None:
    model_dir: Path = request.getfixturevalue(arch_fixture)
    runner = make_runner(model_dir)
    logits = capture_logits(runner)
    outputs = run_greedy(runner, PROMPTS, steps=4)
    reference = load(model_dir)
    with torch.no_grad():
        for step, step_logits in enumerate(logits):
            for i, prompt in enumerate(PROMPTS):
                ids = prompt + outputs[i][:step]
                expected = reference(torch.tensor([ids])).logits[0, -1]
                torch.testing.assert_close(step_logits[i], expected, atol=1e-4, rtol=1e-4)


def test_greedy_matches_hf_generate(tiny_model_dir: Path) -> None:
    runner = make_runner(tiny_model_dir)
    outputs = run_greedy(runner, PROMPTS[:3], steps=7)
    reference = load(tiny_model_dir)
    for prompt, got in zip(PROMPTS[:3], outputs, strict=True):
        expected = reference.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()
        assert got == expected


def test_batched_greedy_equals_each_request_alone(tiny_model_dir: Path) -> None:
    runner = make_runner(tiny_model_dir)
    # Non-consecutive slots exercise the gathered (index_select) decode path.
    batched = run_greedy(runner, PROMPTS, steps=12, slots=[6, 1, 3, 0, 4])
    for i, prompt in enumerate(PROMPTS):
        alone = run_greedy(runner, [prompt], steps=12, slots=[2])
        assert alone[0] == batched[i], f"prompt {i} differs when batched"


def test_chunked_prefill_gives_the_same_tokens(tiny_model_dir: Path) -> None:
    runner = make_runner(tiny_model_dir)
    whole = run_greedy(runner, PROMPTS, steps=5)
    chunked = run_greedy(runner, PROMPTS, steps=5, chunk=3)
    assert chunked == whole


def sample_run(
    runner: ModelRunner, params_list: list[SamplingParams], steps: int, slots: list[int]
) -> list[list[int]]:
    prompts = [PROMPTS[0]] * len(params_list)
    seqs = [
        ScheduledSeq(str(i), slots[i], prompts[i], 0, True, True, p, is_prefill=True)
        for i, p in enumerate(params_list)
    ]
    out: RunnerOutput = execute(runner, SchedulerOutput(1, seqs, 0, []))
    outputs = [[t] for t in out.sampled_token_ids]
    for _ in range(steps):
        seqs = [
            ScheduledSeq(
                str(i),
                slots[i],
                [outputs[i][-1]],
                len(prompts[i]) + len(outputs[i]) - 1,
                True,
                False,
                p,
            )
            for i, p in enumerate(params_list)
        ]
        out = execute(runner, SchedulerOutput(2, seqs, 0, []))
        for i, t in enumerate(out.sampled_token_ids):
            outputs[i].append(t)
    return outputs


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(tiny_model_dir: Path) -> None:
    runner = make_runner(tiny_model_dir)
    seeded = SamplingParams(temperature=1.5, top_p=0.95, top_k=50, seed=1234)
    other = SamplingParams(temperature=1.0, seed=99)
    first = sample_run(runner, [seeded], steps=15, slots=[0])[0]
    again = sample_run(runner, [seeded], steps=15, slots=[5])[0]
    in_batch = sample_run(runner, [other, seeded, SamplingParams(temperature=0.7)], 15, [3, 1, 2])
    assert first == again
    assert in_batch[1] == first
    different_seed = sample_run(
        runner, [SamplingParams(temperature=1.5, top_p=0.95, top_k=50, seed=4321)], 15, [0]
    )[0]
    assert different_seed != first  # 16 draws at temperature 1.5 from a random model


def test_top_k_one_is_greedy_and_greedy_rows_ignore_sampling(tiny_model_dir: Path) -> None:
    runner = make_runner(tiny_model_dir)
    greedy = sample_run(runner, [GREEDY], steps=8, slots=[0])[0]
    top1 = sample_run(runner, [SamplingParams(temperature=2.0, top_k=1)], steps=8, slots=[1])[0]
    tiny_p = sample_run(runner, [SamplingParams(temperature=2.0, top_p=1e-6)], steps=8, slots=[1])[
        0
    ]
    mixed = sample_run(runner, [SamplingParams(temperature=2.0), GREEDY], steps=8, slots=[2, 3])
    assert top1 == greedy
    assert tiny_p == greedy
    assert mixed[1] == greedy


def test_repetition_penalty_matches_hf_generate(tiny_model_dir: Path) -> None:
    runner = make_runner(tiny_model_dir)
    params = SamplingParams(temperature=0.0, repetition_penalty=3.0)
    got = sample_run(runner, [params, GREEDY], steps=11, slots=[4, 2])
    reference = load(tiny_model_dir)
    prompt = torch.tensor([PROMPTS[0]])
    expected = reference.generate(
        prompt, max_new_tokens=12, do_sample=False, repetition_penalty=3.0, eos_token_id=None
    )[0, len(PROMPTS[0]) :].tolist()
    assert got[0] == expected
    assert got[1] != expected  # the penalty made a difference, and only where asked


# Prompts whose unpenalised greedy continuation (tiny model) repeats a prompt
# token: after [201] the second token is 201 again, after [3, 5, 6] the fourth is 6.
@pytest.mark.parametrize(
    ("prompt", "budget"),
    [([201], 8), ([201], 1), ([3, 5, 6], 1), ([3, 5, 6], 2)],
    ids=["one-token-prompt", "one-token-budget", "one-token-chunks", "chunks-beside-a-decode"],
)
def test_repetition_penalty_sees_one_token_prompts_and_chunks(
    tiny_model_dir: Path, prompt: list[int], budget: int
) -> None:
    # Through the real scheduler: a token budget of 1 (or 2, with a decode
    # running alongside) makes prefill chunks of a single token, which look
    # like decodes by length.
    runner = make_runner(tiny_model_dir, num_slots=2)
    config = BatchingConfig(max_batch_size=min(budget, 2), max_batch_tokens=budget)
    sched = Scheduler(config, 128)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, repetition_penalty=10.0)
    if budget == 2:
        sched.add_request(GenerationRequest("other", [7], GREEDY))
        step = sched.schedule()
        sched.update(step, runner.execute(step))
    sched.add_request(GenerationRequest("r", prompt, params))
    got: list[int] = []
    while sched.get("r") is not None:
        step = sched.schedule()
        mine = [s for s in step.seqs if s.request_id == "r"]
        assert all(s.is_prefill == (s.start_pos < len(prompt)) for s in mine)
        for out in sched.update(step, runner.execute(step)):
            if out.request_id == "r":
                got += out.new_token_ids

    reference = load(tiny_model_dir)
    ids = torch.tensor([prompt])
    kwargs: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None}
    expected = reference.generate(ids, repetition_penalty=10.0, **kwargs)[0, len(prompt) :]
    assert got == expected.tolist()
    # The case is meaningful: without the penalty a prompt token comes back.
    unpenalised = reference.generate(ids, **kwargs)[0, len(prompt) :].tolist()
    assert set(prompt) & set(unpenalised)
    assert not set(prompt) & set(got)


def test_unsupported_attention_fails_with_a_clear_error(tiny_model_dir: Path) -> None:
    from autoglm_server.errors import ModelLoadError

    model = load(tiny_model_dir)
    model.config.sliding_window = 16
    with pytest.raises(ModelLoadError, match="sliding-window"):
        ModelRunner(model, num_slots=2, max_model_len=64, device=torch.device("cpu"))


def test_kv_cache_is_allocated_once(tiny_model_dir: Path) -> None:
    runner = make_runner(tiny_model_dir, num_slots=4, max_len=64)
    ptr = runner.k_cache.data_ptr()
    # 4 slots x 64 tokens in blocks of 16, and the scratch block.
    assert tuple(runner.k_cache.shape) == (2, (4 * 4 + 1) * 16, 2, 16)
    run_greedy(runner, PROMPTS[:3], steps=3)
    assert runner.k_cache.data_ptr() == ptr
