"""Presence/frequency penalties keep their token counts across a preemption by recompute.

The sampler's counts live in the request's slot, which a preemption frees; the
re-admitted request must count the tokens it generated before (the scheduler
hands them over on its first chunk), or the penalties restart from zero.
"""

from __future__ import annotations

import torch

from autoglm_server.engine.api import GenerationRequest, SamplingParams
from autoglm_server.engine.block_manager import BlockManager
from autoglm_server.engine.config import BatchingConfig
from autoglm_server.engine.sampling import Sampler
from autoglm_server.engine.scheduler import RunnerOutput, ScheduledSeq, Scheduler

V = 50


def _logits() -> torch.Tensor:
    logits = torch.zeros(1, V)
    logits[0, 10] = 5.0
    logits[0, 11] = 4.0
    return logits


def _sample(s: Sampler, seq: ScheduledSeq) -> int:
    s.admit([seq])
    ids, _ = s.to_host(s.sample(_logits(), [seq], torch.tensor([seq.slot])))
    return ids[0]


def test_the_sampler_counts_the_tokens_of_a_readmitted_request() -> None:
    params = SamplingParams(temperature=0.0, frequency_penalty=0.6)
    s = Sampler(2, V, torch.device("cpu"))
    first = ScheduledSeq("r", 0, [1], 0, True, True, params, is_prefill=True)
    assert _sample(s, first) == 10
    assert _sample(s, ScheduledSeq("r", 0, [10], 1, True, False, params)) == 10
    # Preempted with two tokens out; re-admitted in another slot, recomputing them.
    s.free([0])
    again = ScheduledSeq(
        "r", 1, [1, 10], 0, False, True, params, is_prefill=True, output_token_ids=[10, 10]
    )
    s.admit([again])
    # 5 - 2 * 0.6 < 4: the third token is 11, as without the preemption.
    assert _sample(s, ScheduledSeq("r", 1, [10], 2, True, False, params)) == 11


def test_the_scheduler_hands_the_output_tokens_to_the_readmitted_request() -> None:
    blocks = BlockManager(7, 4, prefix_caching=False)
    sched = Scheduler(BatchingConfig(max_batch_size=4, priority_levels=2), 64, blocks=blocks)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, frequency_penalty=1.0)
    sched.add_request(GenerationRequest("old", [1, 2, 3], params, priority=1, arrival_time=1.0))
    sched.add_request(GenerationRequest("urgent", [4, 5, 6], params, priority=0, arrival_time=2.0))
    sched.add_request(GenerationRequest("new", [7, 8, 9], params, priority=1, arrival_time=3.0))
    readmitted: list[ScheduledSeq] = []
    token = 20
    while sched.has_unfinished():
        step = sched.schedule()
        readmitted += [s for s in step.seqs if s.is_new and len(s.token_ids) > 3]
        sampled = [token + i for i, s in enumerate(step.seqs) if s.sample]
        token += 1
        sched.update(step, RunnerOutput(sampled))
    assert sched.num_preemptions >= 1 and readmitted
    for seq in readmitted:
        # The recomputed chunk is the prompt plus every output token but the last.
        assert seq.output_token_ids and seq.token_ids[3:] == seq.output_token_ids[:-1]
