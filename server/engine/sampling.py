"""Batched sampling on the device, with per-slot sampling state.

The runner owns one :class:`Sampler`. When a request is admitted its settings
(temperature, top-p, top-k, repetition penalty, seed) are written into per-slot
device tensors once; every later step only gathers them by slot, so a step's
sampling is a handful of batched kernels with no per-request host work beyond
the summary that decides which of them run.

Draws use the exponential-race trick (argmax of p / E with E ~ Exp(1)), which
samples from p exactly and lets every seeded request fill its own row of noise
from its own generator, so a seeded request's output does not depend on what
else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scheduler import ScheduledSeq


@dataclass(slots=True)
class _SamplingRows:
    """Host-side summary of the rows sampled in one step (decides which ops run)."""

    slots: torch.Tensor  # [B] on device
    all_greedy: bool
    any_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_penalty: bool
    seeded: list[tuple[int, int]]  # (row, slot) of rows with a per-request generator


class Sampler:
    """Per-slot sampling state and the batched sampling step."""

    def __init__(self, num_slots: int, vocab_size: int, device: torch.device) -> None:
        self.device = device
        self.vocab_size = vocab_size
        # Per-slot sampling state, written when a request is admitted.
        self._temperature = torch.ones(num_slots, dtype=torch.float32, device=device)
        self._top_p = torch.ones(num_slots, dtype=torch.float32, device=device)
        self._top_k = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self._penalty = torch.ones(num_slots, dtype=torch.float32, device=device)
        # Tokens seen per slot (prompt + output), for the repetition penalty.
        self._seen = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=device)
        self._generators: dict[int, torch.Generator] = {}

    def free(self, slots: list[int]) -> None:
        """Drop the state of slots whose requests are gone."""
        for slot in slots:
            self._generators.pop(slot, None)

    def admit(self, seqs: list[ScheduledSeq]) -> None:
        """Reset per-slot sampling state for freshly admitted requests."""
        new = [s for s in seqs if s.is_new]
        if not new:
            return
        slots = torch.tensor([s.slot for s in new], dtype=torch.int64)
        params = torch.tensor(
            [
                [s.params.temperature, s.params.top_p, s.params.repetition_penalty, s.params.top_k]
                for s in new
            ],
            dtype=torch.float32,
        )
        slots_d = slots.to(self.device)
        params_d = params.to(self.device)
        self._temperature[slots_d] = params_d[:, 0]
        self._top_p[slots_d] = params_d[:, 1]
        self._penalty[slots_d] = params_d[:, 2]
        self._top_k[slots_d] = params_d[:, 3].to(torch.int64)
        self._seen[slots_d] = False
        for s in new:
            if s.params.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(s.params.seed)
                self._generators[s.slot] = gen
            else:
                self._generators.pop(s.slot, None)

    def mark_seen(self, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Record prompt tokens (device tensors, aligned) for the repetition penalty."""
        self._seen[slots, token_ids] = True

    def sample(
        self, logits: torch.Tensor, rows: list[ScheduledSeq], slots: torch.Tensor
    ) -> torch.Tensor:
        """Batched sampling on the device: penalty, temperature, top-k, top-p, then a draw."""
        info = self._summarise(rows, slots)
        if info.any_penalty:
            penalty = self._penalty[slots].unsqueeze(1)
            seen = self._seen[slots]
            penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(seen, penalised, logits)

        if info.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            temperature = self._temperature[slots]
            greedy_rows = temperature <= 0
            scaled = logits / torch.where(greedy_rows, 1.0, temperature).unsqueeze(1)
            if info.any_top_k or info.any_top_p:
                scaled = self._apply_top_k_top_p(scaled, slots, info)
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
        self._seen[slots, tokens] = True
        return tokens

    def _summarise(self, rows: list[ScheduledSeq], slots: torch.Tensor) -> _SamplingRows:
        all_greedy = True
        any_greedy = any_top_k = any_top_p = any_penalty = False
        seeded: list[tuple[int, int]] = []
        for i, seq in enumerate(rows):
            p = seq.params
            if p.temperature > 0:
                all_greedy = False
                if p.top_k > 0:
                    any_top_k = True
                if p.top_p < 1.0:
                    any_top_p = True
                if p.seed is not None:
                    seeded.append((i, seq.slot))
            else:
                any_greedy = True
            if p.repetition_penalty != 1.0:
                any_penalty = True
        return _SamplingRows(
            slots, all_greedy, any_greedy, any_top_k, any_top_p, any_penalty, seeded
        )

    def _apply_top_k_top_p(
        self, logits: torch.Tensor, slots: torch.Tensor, info: _SamplingRows
    ) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if info.any_top_k:
            top_k = self._top_k[slots]
            k = torch.where(top_k > 0, top_k, logits.shape[1]).unsqueeze(1)
            drop |= rank >= k
        if info.any_top_p:
            top_p = self._top_p[slots].unsqueeze(1)
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            mass_before = probs.cumsum(dim=-1) - probs
            drop |= mass_before >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)
