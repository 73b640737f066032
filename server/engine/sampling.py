"""Batched sampling on the device, with per-slot sampling state.

The runner owns one :class:`Sampler`. When a request is admitted its settings
(temperature, top-p, top-k, penalties, logit bias, seed, grammar) are written
into per-slot state once; every later step only gathers them by slot, so a
step's sampling is a handful of batched kernels with no per-request host work
beyond the summary that decides which of them run.

One step, in order: repetition penalty (prompt and output tokens), presence
and frequency penalties (output tokens), logit bias, grammar masks; the
logprobs are taken there (what the model and the request's constraints make
of the next token, before temperature); then temperature, top-k, top-p and a
draw.

- Grammar masks (:mod:`.grammar`): each constrained row's matcher fills its row
  of one pinned host bitmask (host work proportional to the constrained rows);
  the bitmask goes to the device in one non-blocking copy and is applied to all
  rows in one kernel. Nothing waits on the device for it. A matcher learns the
  token it was given from the next step's decode input (the host has it then),
  so accepting costs no extra sync either.
- Top-k uses ``torch.topk`` (a partial selection, not a full-vocabulary sort);
  so does top-p: the threshold comes from the 1,024 most likely tokens, or for
  a flatter row from a one-pass histogram of the rest (no sort, no host sync).
- Draws use the exponential-race trick (argmax of p / E with E ~ Exp(1)),
  which samples from p exactly and lets every seeded request fill its own row
  of noise from its own generator, so a seeded request's output does not
  depend on what else is in the batch.
- :meth:`Sampler.pack` starts the copy of the step's tokens (and logprobs,
  packed into the same tensor) to pinned host memory, and :meth:`Sampler.unpack`
  waits for it: the one sync of the step, which the engine defers until the
  next step is launched.
- Non-finite logits (a broken model: NaN or inf) are found with one reduction
  per step on the device (a row sum is finite only if every logit is); a bad
  row's token is sent back as ``-1 - token`` in the same copy, so finding them
  costs no extra sync. ``to_host`` names the bad rows in ``non_finite_rows``;
  the engine fails those requests (INTERNAL) instead of emitting garbage.

Preemption by recompute: a request's generator and grammar matcher are
parked when its slot is freed and given back when it is admitted again;
its presence/frequency counts start afresh (a limitation).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from .api import TokenLogprob
from .grammar import new_matcher
from .scheduler import ScheduledSeq

# Grammar rows from which their masks are filled by a thread pool, and its size
# (bench/bench_grammar.py: below this, waking the threads costs more than it saves).
_PARALLEL_FILL_ROWS = 16
_FILL_THREADS = max(1, min(4, os.cpu_count() or 1))  # xgrammar warns above the core count
_MAX_PARKED = 256  # freed requests whose generator / matcher are kept (preemption)
# Top-p without sorting the vocabulary (see Sampler._apply_top_p).
_TOP_P_CANDIDATES = 1024
_TOP_P_BUCKETS = 1024


@dataclass(slots=True)
class _SamplingRows:
    """Host-side summary of the rows sampled in one step (decides which ops run)."""

    slots: torch.Tensor  # [B] on device
    all_greedy: bool
    any_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_penalty: bool
    any_counts: bool  # presence or frequency penalty
    any_bias: bool
    seeded: list[tuple[int, int]]  # (row, slot) of rows with a per-request generator
    grammar_rows: list[int]  # rows with a grammar matcher
    logprob_k: list[int]  # per row: -1 no logprobs, else the number of alternatives
    max_top_k: int  # the largest top_k among sampled rows (host value: no sync)


@dataclass(slots=True)
class PackedStep:
    """A step's sampled tokens (or logprob table) on their way to the host."""

    data: torch.Tensor  # pinned host tensor being filled (CUDA), or the tensor itself
    ks: list[int] | None  # per row logprob alternatives (-1: none); None: tokens only
    event: Any  # torch.cuda.Event recorded after the copy, None off CUDA


class Sampler:
    """Per-slot sampling state and the batched sampling step."""

    def __init__(self, num_slots: int, vocab_size: int, device: torch.device) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self.num_slots = num_slots
        # Per-slot sampling state, written when a request is admitted.
        self._temperature = torch.ones(num_slots, dtype=torch.float32, device=device)
        self._top_p = torch.ones(num_slots, dtype=torch.float32, device=device)
        self._top_k = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self._penalty = torch.ones(num_slots, dtype=torch.float32, device=device)
        self._presence = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self._frequency = torch.zeros(num_slots, dtype=torch.float32, device=device)
        # Tokens seen per slot (prompt + output), for the repetition penalty.
        self._seen = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=device)
        # ``t[idx] = True`` with a Python value copies it from pageable host memory,
        # which waits for the whole stream (the step just launched): index_put_ with
        # this device scalar does not.
        self._true = torch.ones((), dtype=torch.bool, device=device)
        # Allocated on first use: output token counts and dense logit biases.
        self._counts: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None
        self._biased: set[int] = set()
        self._generators: dict[int, torch.Generator] = {}
        self._matchers: dict[int, Any] = {}  # slot -> xgrammar.GrammarMatcher
        self._slot_request: dict[int, str] = {}
        # request id -> (generator, matcher) of requests whose slot was freed (see free()).
        self._parked: OrderedDict[str, tuple[torch.Generator | None, Any]] = OrderedDict()
        self._bitmask: torch.Tensor | None = None  # pinned host [num_slots, words] int32
        self._batch_matcher: Any = None  # xgrammar.BatchGrammarMatcher (a thread pool)
        self._logprobs: tuple[torch.Tensor, list[int]] | None = None  # of the last sample()
        self._finite: torch.Tensor | None = None  # [B] bool of the last sample(): logits finite
        self.non_finite_rows: list[int] = []  # of the last to_host(): rows with NaN/inf logits

    def free(self, slots: list[int]) -> None:
        """Release the slots of requests that finished or were preempted.

        Their generator and grammar matcher are parked under the request id
        (a few hundred at most, oldest dropped first): a request preempted by
        recompute gets them back when it is admitted again, so its grammar
        continues where it was and its seeded draws go on from where they were.
        """
        for slot in slots:
            request_id = self._slot_request.pop(slot, None)
            generator = self._generators.pop(slot, None)
            matcher = self._matchers.pop(slot, None)
            if request_id is not None and (generator is not None or matcher is not None):
                self._parked[request_id] = (generator, matcher)
                while len(self._parked) > _MAX_PARKED:
                    self._parked.popitem(last=False)

    def admit(self, seqs: list[ScheduledSeq]) -> None:
        """Reset per-slot sampling state for freshly admitted requests."""
        new = [s for s in seqs if s.is_new]
        if not new:
            return
        slots = torch.tensor([s.slot for s in new], dtype=torch.int64)
        params = torch.tensor(
            [
                [
                    s.params.temperature,
                    s.params.top_p,
                    s.params.repetition_penalty,
                    s.params.top_k,
                    s.params.presence_penalty,
                    s.params.frequency_penalty,
                ]
                for s in new
            ],
            dtype=torch.float32,
        )
        # Pinned and non-blocking: a pageable copy would wait for the step in flight.
        slots_d = _to_device(slots, self.device)
        params_d = _to_device(params, self.device)
        self._temperature[slots_d] = params_d[:, 0]
        self._top_p[slots_d] = params_d[:, 1]
        self._penalty[slots_d] = params_d[:, 2]
        self._top_k[slots_d] = params_d[:, 3].to(torch.int64)
        self._presence[slots_d] = params_d[:, 4]
        self._frequency[slots_d] = params_d[:, 5]
        self._seen.index_fill_(0, slots_d, False)
        wants_counts = any(s.params.presence_penalty or s.params.frequency_penalty for s in new)
        if wants_counts and self._counts is None:
            self._counts = torch.zeros(
                self.num_slots, self.vocab_size, dtype=torch.int32, device=self.device
            )
        if self._counts is not None:
            self._counts.index_fill_(0, slots_d, 0)
            # A request re-admitted after a preemption counts what it generated before.
            for s in new:
                if s.output_token_ids and (s.params.presence_penalty or s.params.frequency_penalty):
                    ids = _to_device(
                        torch.tensor(s.output_token_ids, dtype=torch.int64), self.device
                    )
                    ones = torch.ones(
                        len(s.output_token_ids), dtype=torch.int32, device=self.device
                    )
                    self._counts[s.slot].index_put_((ids,), ones, accumulate=True)
        for s in new:
            self._admit_bias(s)
            self._slot_request[s.slot] = s.request_id
            parked_gen, parked_matcher = self._parked.pop(s.request_id, (None, None))
            if s.params.seed is not None:
                gen = parked_gen
                if gen is None:
                    gen = torch.Generator(device=self.device)
                    gen.manual_seed(s.params.seed)
                self._generators[s.slot] = gen
            else:
                self._generators.pop(s.slot, None)
            if s.params.grammar is not None:
                matcher = parked_matcher
                self._matchers[s.slot] = (
                    matcher if matcher is not None else new_matcher(s.params.grammar)
                )
            else:
                self._matchers.pop(s.slot, None)

    def _admit_bias(self, seq: ScheduledSeq) -> None:
        pairs = seq.params.logit_bias
        if seq.slot in self._biased:
            assert self._bias is not None
            self._bias[seq.slot].zero_()
            self._biased.discard(seq.slot)
        if not pairs:
            return
        if self._bias is None:
            self._bias = torch.zeros(
                self.num_slots, self.vocab_size, dtype=torch.float32, device=self.device
            )
        ids = _to_device(torch.tensor([t for t, _ in pairs], dtype=torch.int64), self.device)
        values = _to_device(torch.tensor([b for _, b in pairs], dtype=torch.float32), self.device)
        self._bias[seq.slot, ids] = values
        self._biased.add(seq.slot)

    def mark_seen(self, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Record prompt tokens (device tensors, aligned) for the repetition penalty."""
        self._seen.index_put_((slots, token_ids), self._true)

    def sample(
        self, logits: torch.Tensor, rows: list[ScheduledSeq], slots: torch.Tensor
    ) -> torch.Tensor:
        """Batched sampling on the device; returns the token ids (still on the device)."""
        # Before any masking (which writes -inf on purpose): one reduction per row.
        self._finite = logits.sum(dim=-1).isfinite()
        info = self._summarise(rows, slots)
        if info.any_penalty:
            penalty = self._penalty[slots].unsqueeze(1)
            seen = self._seen[slots]
            penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(seen, penalised, logits)
        if info.any_counts:
            assert self._counts is not None
            counts = self._counts[slots].float()
            logits = (
                logits
                - self._frequency[slots].unsqueeze(1) * counts
                - self._presence[slots].unsqueeze(1) * (counts > 0).float()
            )
        if info.any_bias:
            assert self._bias is not None
            logits = logits + self._bias[slots]
        if info.grammar_rows:
            logits = self._apply_grammar(logits, rows, info)

        if info.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            temperature = self._temperature[slots]
            greedy_rows = temperature <= 0
            scaled = logits / torch.where(greedy_rows, 1.0, temperature).unsqueeze(1)
            if info.any_top_k:
                scaled = self._apply_top_k(scaled, slots, info.max_top_k)
            if info.any_top_p:
                scaled = self._apply_top_p(scaled, slots)
            probs = scaled.softmax(dim=-1)
            noise = torch.empty_like(probs).exponential_()
            for row, slot in info.seeded:
                noise[row].exponential_(generator=self._generators[slot])
            sampled = (probs / noise).argmax(dim=-1)
            tokens = (
                torch.where(greedy_rows, logits.argmax(dim=-1), sampled)
                if info.any_greedy
                else sampled
            )
        self._seen.index_put_((slots, tokens), self._true)
        if info.any_counts:
            assert self._counts is not None
            self._counts[slots, tokens] += 1
        self._logprobs = self._gather_logprobs(logits, tokens, info)
        return tokens

    def to_host(self, tokens: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None] | None]:
        """The step's token ids, and logprobs per row where asked: one device->host copy."""
        return self.unpack(self.pack(tokens))

    def pack(self, tokens: torch.Tensor) -> PackedStep:
        """Start the step's one device->host copy (tokens, or the logprob table); no sync.

        Call right after :meth:`sample`; :meth:`unpack` waits for the copy. Between
        the two the next step can already be launched (the engine's pipeline).
        """
        packed = self._logprobs
        self._logprobs = None
        finite, self._finite = self._finite, None
        ks: list[int] | None = None
        if packed is None:
            data = tokens if finite is None else torch.where(finite, tokens, -1 - tokens)
        else:
            data, ks = packed
            if finite is not None:
                data[:, 0] = torch.where(finite, data[:, 0], -1 - data[:, 0])
        if data.device.type != "cuda":
            return PackedStep(data, ks, None)
        host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
        host.copy_(data, non_blocking=True)
        event: Any = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        return PackedStep(host, ks, event)

    def unpack(self, step: PackedStep) -> tuple[list[int], list[TokenLogprob | None] | None]:
        """Wait for :meth:`pack`'s copy and decode it (sets ``non_finite_rows``)."""
        if step.event is not None:
            step.event.synchronize()  # the step's one wait (the GIL is released)
        self.non_finite_rows = []
        if step.ks is None:
            ids = [int(t) for t in step.data.tolist()]
            if min(ids, default=0) < 0:
                self.non_finite_rows = [i for i, t in enumerate(ids) if t < 0]
                ids = [t if t >= 0 else -1 - t for t in ids]
            return ids, None
        host = step.data.tolist()  # [B, 2 + 2 * kmax]: token, logprob, top ids, top logprobs
        ids = []
        out: list[TokenLogprob | None] = []
        for i, (row, k) in enumerate(zip(host, step.ks, strict=True)):
            token = int(row[0])
            if token < 0:
                self.non_finite_rows.append(i)
                token = -1 - token
            ids.append(token)
            if k < 0:
                out.append(None)
                continue
            kmax = (len(row) - 2) // 2
            top = tuple((int(row[2 + j]), float(row[2 + kmax + j])) for j in range(k))
            out.append(TokenLogprob(token_id=token, logprob=float(row[1]), top=top))
        return ids, out

    def _gather_logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, info: _SamplingRows
    ) -> tuple[torch.Tensor, list[int]] | None:
        if max(info.logprob_k, default=-1) < 0:
            return None
        lp = logits.float().log_softmax(dim=-1)
        chosen = lp.gather(1, tokens.unsqueeze(1))
        columns = [tokens.unsqueeze(1).double(), chosen.double()]
        kmax = max(info.logprob_k)
        if kmax > 0:
            top = lp.topk(kmax, dim=-1)
            columns += [top.indices.double(), top.values.double()]
        return torch.cat(columns, dim=1), info.logprob_k

    def _apply_grammar(
        self, logits: torch.Tensor, rows: list[ScheduledSeq], info: _SamplingRows
    ) -> torch.Tensor:
        import xgrammar as xgr

        if self._bitmask is None:
            mask = xgr.allocate_token_bitmask(self.num_slots, self.vocab_size)
            self._bitmask = mask.pin_memory() if self.device.type == "cuda" else mask
        bitmask = self._bitmask
        if self._batch_matcher is None:
            self._batch_matcher = xgr.BatchGrammarMatcher(max_threads=_FILL_THREADS)
        active: list[Any] = []
        active_rows: list[int] = []
        fed: list[tuple[Any, int]] = []
        for row in info.grammar_rows:
            seq = rows[row]
            matcher = self._matchers[seq.slot]
            if not seq.is_prefill and not matcher.is_terminated():
                # The token fed now is the one sampled for this request last step.
                fed.append((matcher, seq.token_ids[0]))
        if fed:
            xgr.BatchGrammarMatcher.batch_accept_token([m for m, _ in fed], [t for _, t in fed])
        for row in info.grammar_rows:
            matcher = self._matchers[rows[row].slot]
            if matcher.is_terminated():
                # Complete, but the engine did not stop (its stop token is not an EOS
                # of the model): only the grammar's stop tokens stay allowed.
                _allow_only(bitmask, row, matcher.stop_token_ids)
            else:
                active.append(matcher)
                active_rows.append(row)
        if len(active) >= _PARALLEL_FILL_ROWS:
            # Threads fill the rows' masks in parallel (host work scales with constrained rows).
            self._batch_matcher.batch_fill_next_token_bitmask(active, bitmask, indices=active_rows)
        else:  # waking threads costs more than a few rows' fill
            for matcher, row in zip(active, active_rows, strict=True):
                matcher.fill_next_token_bitmask(bitmask, row)
        n = len(rows)
        device_mask = bitmask[:n].to(self.device, non_blocking=True)
        logits = logits.contiguous()
        xgr.apply_token_bitmask_inplace(logits, device_mask, indices=info.grammar_rows)
        return logits

    def _summarise(self, rows: list[ScheduledSeq], slots: torch.Tensor) -> _SamplingRows:
        all_greedy = True
        any_greedy = any_top_k = any_top_p = any_penalty = any_counts = any_bias = False
        seeded: list[tuple[int, int]] = []
        grammar_rows: list[int] = []
        logprob_k: list[int] = []
        max_top_k = 0
        for i, seq in enumerate(rows):
            p = seq.params
            if p.temperature > 0:
                all_greedy = False
                if p.top_k > 0:
                    any_top_k = True
                    max_top_k = max(max_top_k, p.top_k)
                if p.top_p < 1.0:
                    any_top_p = True
                if p.seed is not None:
                    seeded.append((i, seq.slot))
            else:
                any_greedy = True
            if p.repetition_penalty != 1.0:
                any_penalty = True
            if p.presence_penalty or p.frequency_penalty:
                any_counts = True
            if p.logit_bias:
                any_bias = True
            if seq.slot in self._matchers:
                grammar_rows.append(i)
            logprob_k.append(-1 if p.logprobs is None else p.logprobs)
        return _SamplingRows(
            slots,
            all_greedy,
            any_greedy,
            any_top_k,
            any_top_p,
            any_penalty,
            any_counts,
            any_bias,
            seeded,
            grammar_rows,
            logprob_k,
            max_top_k,
        )

    def _apply_top_k(self, logits: torch.Tensor, slots: torch.Tensor, max_k: int) -> torch.Tensor:
        """Keep each row's k largest logits: a partial selection, not a full sort.

        ``max_k`` (the largest k of the step) comes from the host-side summary,
        so nothing waits on the device.
        """
        top_k = self._top_k[slots]
        kmax = min(logits.shape[1], max(1, max_k))
        values = logits.topk(kmax, dim=-1).values  # [B, kmax], descending
        k = torch.where(top_k > 0, top_k.clamp(max=kmax), kmax)
        threshold = values.gather(1, (k - 1).unsqueeze(1))
        keep = (logits >= threshold) | (top_k <= 0).unsqueeze(1)
        return logits.masked_fill(~keep, float("-inf"))

    def _apply_top_p(self, logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Keep each row's smallest set of most likely tokens whose mass reaches top_p.

        No sort of the vocabulary: the nucleus is ``probs >= threshold``, and the
        threshold comes from the row's ``_TOP_P_CANDIDATES`` most likely tokens
        (``topk``, a partial selection) when their mass reaches top_p (exact;
        tokens tied with the last one kept are kept too). A flatter row, whose
        nucleus is larger than that, also gets the mass of the rest in
        ``_TOP_P_BUCKETS`` equal buckets between the row's least likely token and
        the last candidate (one pass, ``scatter_add``), and keeps the buckets from
        the top down to the one where the mass reaches top_p: at most that one
        bucket's tokens more than the exact nucleus. Branch-free: no
        host sync, whatever the rows are.
        """
        top_p = self._top_p[slots].unsqueeze(1)
        probs = logits.softmax(dim=-1)
        k = min(probs.shape[1], _TOP_P_CANDIDATES)
        cand = probs.topk(k, dim=-1).values  # [B, k], descending
        mass_before = cand.cumsum(dim=-1) - cand
        inside = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)
        threshold = cand.gather(1, inside - 1)
        if k < probs.shape[1]:
            last = cand[:, -1:]  # the least likely candidate
            need = top_p - (mass_before[:, -1:] + last)  # > 0: the nucleus goes past it
            nb = _TOP_P_BUCKETS
            low = probs.amin(dim=-1, keepdim=True)
            width = ((last - low) / nb).clamp(min=1e-30)
            bucket = ((probs - low) / width).clamp(max=nb - 1).long()
            bucket = torch.where(probs < last, bucket, nb)  # candidates: out of the way
            hist = torch.zeros(probs.shape[0], nb + 1, device=probs.device, dtype=probs.dtype)
            hist.scatter_add_(1, bucket, probs)
            from_top = hist[:, :nb].flip(-1).cumsum(dim=-1)  # mass of the j+1 highest buckets
            j = (from_top < need).sum(dim=-1, keepdim=True).clamp(max=nb - 1)
            edge = low + (nb - 1 - j).to(probs.dtype) * width
            threshold = torch.where(need > 0, edge, threshold)
        return logits.masked_fill(probs < threshold, float("-inf"))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _allow_only(bitmask: torch.Tensor, row: int, token_ids: list[int]) -> None:
    """Set ``bitmask[row]`` (32 tokens per int32 word) to allow only ``token_ids``."""
    bitmask[row] = 0
    for token in token_ids:
        word, bit = divmod(int(token), 32)
        if word >= bitmask.shape[1]:
            continue
        value = int(bitmask[row, word]) & 0xFFFFFFFF | (1 << bit)
        bitmask[row, word] = value - (1 << 32) if value >= 1 << 31 else value
