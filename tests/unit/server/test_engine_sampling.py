"""The sampler's request features on synthetic logits: penalties, logit_bias, logprobs,
top-k without a sort, grammar masks. Runs on CPU; on a CUDA machine also on the GPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from autoglm_server.engine.api import SamplingParams
from autoglm_server.engine.sampling import Sampler
from autoglm_server.engine.scheduler import ScheduledSeq

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
V = 50


def _seq(slot: int, params: SamplingParams, token: int | None = None) -> ScheduledSeq:
    new = token is None
    return ScheduledSeq(
        f"r{slot}", slot, [1 if new else token], 0, True, new, params, is_prefill=new
    )


def _step(s: Sampler, seqs: list[ScheduledSeq], logits: torch.Tensor) -> tuple[list[int], Any]:
    s.admit(seqs)
    slots = torch.tensor([q.slot for q in seqs], device=s.device)
    return s.to_host(s.sample(logits.to(s.device), seqs, slots))


def _peaked(rows: int, winner: int) -> torch.Tensor:
    logits = torch.zeros(rows, V)
    logits[:, winner] = 5.0
    logits[:, winner + 1] = 4.0
    return logits


@pytest.mark.parametrize("device", DEVICES)
def test_presence_and_frequency_penalties_count_output_tokens(device: str) -> None:
    s = Sampler(2, V, torch.device(device))
    greedy = SamplingParams(temperature=0.0)
    penalised = SamplingParams(temperature=0.0, frequency_penalty=0.6)
    ids, _ = _step(s, [_seq(0, greedy), _seq(1, penalised)], _peaked(2, 10))
    assert ids == [10, 10]  # no output yet: no penalty
    ids, _ = _step(s, [_seq(0, greedy, 10), _seq(1, penalised, 10)], _peaked(2, 10))
    assert ids == [10, 10]  # 5 - 0.6 still beats 4
    ids, _ = _step(s, [_seq(0, greedy, 10), _seq(1, penalised, 10)], _peaked(2, 10))
    assert ids == [10, 11]  # 5 - 1.2 < 4
    p = Sampler(1, V, torch.device(device))
    presence = SamplingParams(temperature=0.0, presence_penalty=1.5)
    assert _step(p, [_seq(0, presence)], _peaked(1, 10))[0] == [10]
    assert _step(p, [_seq(0, presence, 10)], _peaked(1, 10))[0] == [11]


@pytest.mark.parametrize("device", DEVICES)
def test_logit_bias_and_its_reset(device: str) -> None:
    s = Sampler(1, V, torch.device(device))
    biased = SamplingParams(temperature=0.0, logit_bias=((10, -100.0), (3, 2.0)))
    assert _step(s, [_seq(0, biased)], _peaked(1, 10))[0] == [11]
    # The slot's next request has no bias left over.
    assert _step(s, [_seq(0, SamplingParams(temperature=0.0))], _peaked(1, 10))[0] == [10]


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_of_the_sampled_token_and_the_top_k(device: str) -> None:
    s = Sampler(2, V, torch.device(device))
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(0))
    seqs = [_seq(0, SamplingParams(temperature=1.0, seed=3, logprobs=3)), _seq(1, SamplingParams())]
    ids, lps = _step(s, seqs, logits)
    assert lps is not None and lps[1] is None
    entry = lps[0]
    ref = logits[0].log_softmax(-1)
    assert entry.token_id == ids[0]
    assert entry.logprob == pytest.approx(float(ref[ids[0]]), abs=1e-5)
    top = ref.topk(3)
    assert [t for t, _ in entry.top] == top.indices.tolist()
    assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_keeps_exactly_k_tokens(device: str) -> None:
    s = Sampler(2, V, torch.device(device))
    logits = torch.arange(V, dtype=torch.float32).repeat(2, 1)
    seen: set[int] = set()
    for seed in range(200):
        seqs = [
            _seq(0, SamplingParams(temperature=5.0, top_k=3, seed=seed)),
            _seq(1, SamplingParams(temperature=5.0, seed=seed)),
        ]
        ids, _ = _step(s, seqs, logits)
        seen.add(ids[0])
    assert seen == {V - 1, V - 2, V - 3}


@pytest.fixture(scope="module")
def grammar(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    from autoglm_server.engine.grammar import GrammarCompiler, GrammarSpec

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    compiler = GrammarCompiler(tokenizer, len(tokenizer))
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    return tokenizer, compiler.compile(GrammarSpec.json(schema), "response_format")


@pytest.mark.parametrize("device", DEVICES)
def test_grammar_masks_make_random_logits_valid_json(device: str, grammar: Any) -> None:
    tokenizer, compiled = grammar
    vocab = len(tokenizer)
    for seed in range(5):
        s = Sampler(3, vocab, torch.device(device))
        gen = torch.Generator().manual_seed(seed)
        params = SamplingParams(temperature=1.0, seed=seed, grammar=compiled)
        plain = SamplingParams(temperature=1.0, seed=seed)
        outs: list[list[int]] = [[], []]
        last: list[int | None] = [None, None, None]
        for _ in range(60):
            seqs = [_seq(0, params, last[0]), _seq(1, plain, last[1]), _seq(2, params, last[2])]
            ids, _ = _step(s, seqs, torch.randn(3, vocab, generator=gen))
            # Rows keep going after their stop token (the engine would have
            # finished them): the sampler must keep allowing only stop tokens.
            for row in (0, 2):
                out = outs[row // 2]
                if not out or out[-1] not in tokenizer.all_special_ids:
                    out.append(ids[row])
            last = list(ids)
        for out in outs:
            assert out[-1] in tokenizer.all_special_ids, tokenizer.decode(out)
            text = tokenizer.decode(out[:-1])
            value = json.loads(text)
            assert set(value) == {"ok", "n"} and 0 <= value["n"] <= 9


def test_a_preempted_request_keeps_its_grammar_and_generator(grammar: Any) -> None:
    """Free the slot mid-JSON (preemption), re-admit on another slot: the JSON continues."""
    tokenizer, compiled = grammar
    vocab = len(tokenizer)
    s = Sampler(2, vocab, torch.device("cpu"))
    params = SamplingParams(temperature=1.0, seed=9, grammar=compiled)
    gen = torch.Generator().manual_seed(1)
    out: list[int] = []
    slot, last = 0, None
    for step in range(80):
        if step == 4:  # preempted: slot 0 freed, re-admitted later on slot 1
            s.free([0])
            slot, last = 1, None
            seq = ScheduledSeq("r", slot, [1, 2], 0, False, True, params, is_prefill=True)
            s.admit([seq])  # the recompute chunk samples nothing
            last = out[-1]
        seq = (
            _seq(slot, params)
            if last is None
            else ScheduledSeq("r", slot, [last], 0, True, False, params)
        )
        if last is None:
            seq.request_id = "r"
        ids, _ = _step(s, [seq], torch.randn(1, vocab, generator=gen))
        out.append(ids[0])
        last = ids[0]
        if ids[0] in tokenizer.all_special_ids:
            break
    assert out[-1] in tokenizer.all_special_ids
    json.loads(tokenizer.decode(out[:-1]))


@pytest.mark.parametrize("device", DEVICES)
def test_top_p_without_a_sort_keeps_the_nucleus(device: str) -> None:
    """The nucleus: the smallest set of most likely tokens whose mass reaches top_p."""
    s = Sampler(4, 1000, torch.device(device))
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 1000, generator=gen) * torch.tensor([[0.5], [2.0], [5.0], [20.0]])).to(
        device
    )
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.3], device=device)
    slots = torch.arange(4, device=device)
    s._top_p[slots] = top_p
    kept = s._apply_top_p(logits, slots) > float("-inf")
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs
    want = torch.zeros_like(kept).scatter_(1, order, before < top_p.unsqueeze(1))
    assert torch.equal(kept, want)
    assert kept.sum(-1).tolist()[3] >= 1


@pytest.mark.parametrize("device", DEVICES)
def test_top_p_beyond_the_candidates_keeps_the_nucleus_within_one_bucket(device: str) -> None:
    """Rows whose nucleus has more tokens than the topk candidates (flat rows of a large
    vocabulary): the kept set contains the exact nucleus and hardly more; peaked rows
    of the same vocabulary stay exact."""
    vocab = 20_000
    s = Sampler(4, vocab, torch.device(device))
    gen = torch.Generator().manual_seed(1)
    scale = torch.tensor([[0.3], [1.0], [6.0], [0.05]])
    logits = (torch.randn(4, vocab, generator=gen) * scale).to(device)
    top_p = torch.tensor([0.9, 0.95, 0.8, 0.5], device=device)
    slots = torch.arange(4, device=device)
    s._top_p[slots] = top_p
    kept = s._apply_top_p(logits, slots) > float("-inf")
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs
    want = torch.zeros_like(kept).scatter_(1, order, before < top_p.unsqueeze(1))
    n_want = want.sum(-1)
    assert n_want[0] > 1024 and n_want[1] > 1024 and n_want[3] > 1024  # past the candidates
    assert n_want[2] < 1024
    assert bool((kept | ~want).all())  # every token of the nucleus is kept
    extra_mass = (probs * (kept & ~want)).sum(-1)
    assert extra_mass.max().item() < 2e-3, extra_mass
    assert torch.equal(kept[2], want[2])
