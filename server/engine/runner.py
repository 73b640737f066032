"""The model runner: the only module that runs the model on a torch device.

How a step runs
---------------
The scheduler hands over a :class:`SchedulerOutput`: some requests decode one
token, some feed a chunk of their prompt. The runner packs all of those tokens
into ONE sequence (``input_ids`` of shape ``[1, T]``) with explicit
``position_ids`` and calls the unmodified Hugging Face model on it with
``use_cache=False``. Everything that is not attention (embeddings, RoPE, MLPs,
norms) is position-wise, so it is correct on a packed batch as it is.
Attention is ours (``attention.py``): the runner builds the step's
:class:`AttentionMetadata` once and hands it to every layer through the
model's ``**kwargs``.

The pieces, one module each:

- ``kv_cache.py``: the cache, allocated once at construction;
- ``attention.py``: the attention function registered with transformers;
- ``cuda_graphs.py``: captured decode steps (CUDA only);
- ``sampling.py``: per-slot sampling state and batched sampling on the device.

The only host/device sync per step is reading back the sampled token ids.
Pure-decode steps on CUDA replay a captured graph; steps with prefill chunks
run eagerly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.attention import sdpa_kernel

from ..errors import ModelLoadError
from .api import SamplingParams
from .attention import (
    ATTN_IMPLEMENTATION,
    META_KWARG,
    SDPA_BACKENDS,
    AttentionMetadata,
    PrefillChunk,
    register_attention,
)
from .cuda_graphs import DecodeGraph, DecodeGraphs
from .kv_cache import SlotKVCache
from .sampling import Sampler
from .scheduler import RunnerOutput, ScheduledSeq, SchedulerOutput


class ModelRunner:
    """Owns the model, the KV cache and the sampling state; executes scheduled steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        num_slots: int,
        max_model_len: int,
        device: torch.device,
        cuda_graphs: bool | None = None,
    ) -> None:
        config: Any = model.config
        self.model = model
        self.device = device
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self.num_layers = int(config.num_hidden_layers)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        )
        self.vocab_size = int(config.vocab_size)
        self.group = self.num_heads // self.num_kv_heads
        self._check_supported(config)

        register_attention()
        try:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)  # type: ignore[operator]
        except Exception as exc:
            raise ModelLoadError(
                f"{type(model).__name__} cannot use a custom attention implementation: {exc}"
            ) from exc
        if getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            raise ModelLoadError(
                f"{type(model).__name__} does not dispatch attention through "
                "transformers' AttentionInterface; it cannot be served by this engine"
            )

        dtype = next(model.parameters()).dtype
        self.dtype = dtype
        self.kv = SlotKVCache(
            num_layers=self.num_layers,
            num_slots=num_slots,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_model_len=max_model_len,
            dtype=dtype,
            device=device,
        )
        self.k_cache = self.kv.k
        self.v_cache = self.kv.v
        self._scratch_pos = self.kv.scratch_pos
        self.sampler = Sampler(num_slots, self.vocab_size, device)

        self._arange = torch.arange(max(num_slots, max_model_len + 1), device=device)
        graphs_enabled = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if graphs_enabled and device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        self.graphs = DecodeGraphs(
            self._graph_forward,
            num_slots=num_slots,
            max_model_len=max_model_len,
            scratch_pos=self._scratch_pos,
            device=device,
            enabled=graphs_enabled,
        )

    @property
    def _graphs(self) -> dict[tuple[int, int], DecodeGraph]:
        return self.graphs.graphs

    def _check_supported(self, config: Any) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError("num_attention_heads must be a multiple of num_key_value_heads")
        sliding = getattr(config, "sliding_window", None)
        if (
            sliding is not None
            and getattr(config, "use_sliding_window", True)
            and (int(sliding) < self.max_model_len)
        ):
            raise ModelLoadError(
                f"sliding-window attention ({sliding} < max_model_len {self.max_model_len}) "
                "is not supported; lower max_model_len to at most the window"
            )
        for attr in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, attr, None):
                raise ModelLoadError(f"{attr} is not supported by this engine")

    # -- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one forward pass over the scheduled tokens and sample where asked."""
        self.sampler.free(sched.freed_slots)
        seqs = sched.seqs
        if not seqs:
            return RunnerOutput(sampled_token_ids=[])
        self.sampler.admit(seqs)
        with sdpa_kernel(SDPA_BACKENDS):
            if self.graphs.enabled and all(len(s.token_ids) == 1 for s in seqs):
                graph = self._graph_for(seqs)
                if graph is not None:
                    return self._execute_graph(graph, seqs)
            return self._execute_eager(seqs)

    def _execute_eager(self, seqs: list[ScheduledSeq]) -> RunnerOutput:
        """Any mix of decodes and prefill chunks, one packed forward pass."""

        input_ids: list[int] = []
        positions: list[int] = []
        write_slots: list[int] = []
        sample_index: list[int] = []
        sample_slots: list[int] = []
        num_decode = 0
        decode_slots: list[int] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        prompt_index: list[int] = []  # packed positions of prompt tokens (repetition penalty)
        counting_decodes = True
        for seq in seqs:
            n = len(seq.token_ids)
            start = len(input_ids)
            input_ids.extend(seq.token_ids)
            positions.extend(range(seq.start_pos, seq.start_pos + n))
            write_slots.extend([seq.slot] * n)
            if seq.is_prefill:
                prompt_index.extend(range(start, start + n))
            # Attention: any single token attends like a decode (a one-token
            # prefill chunk included); only the penalty needs is_prefill.
            if n == 1 and counting_decodes:
                num_decode += 1
                decode_slots.append(seq.slot)
                decode_lens.append(seq.start_pos + 1)
            else:
                counting_decodes = False
                prefills.append(PrefillChunk(start, start + n, seq.slot, seq.start_pos, None))
            if seq.sample:
                sample_index.append(start + n - 1)
                sample_slots.append(seq.slot)

        dev = self.device
        # One host->device copy for all the integer metadata.
        T, B = len(input_ids), len(sample_index)
        packed = torch.tensor(
            input_ids
            + positions
            + write_slots
            + sample_index
            + sample_slots
            + decode_slots
            + prompt_index,
            dtype=torch.int64,
        )
        if dev.type != "cpu":
            packed = packed.pin_memory().to(dev, non_blocking=True)
        ids_t = packed[:T]
        pos_t = packed[T : 2 * T]
        write_t = packed[2 * T : 3 * T]
        sample_index_t = packed[3 * T : 3 * T + B]
        sample_slots_t = packed[3 * T + B : 3 * T + 2 * B]
        decode_slots_t = packed[3 * T + 2 * B : 3 * T + 2 * B + num_decode]
        prompt_index_t = packed[3 * T + 2 * B + num_decode :]

        decode_range: tuple[int, int] | None = None
        decode_mask: torch.Tensor | None = None
        decode_max = 0
        if num_decode:
            first = decode_slots[0]
            if decode_slots == list(range(first, first + num_decode)):
                decode_range = (first, first + num_decode)
            decode_max = max(decode_lens)
            lens_t = pos_t[:num_decode] + 1
            decode_mask = (torch.arange(decode_max, device=dev)[None, :] < lens_t[:, None]).view(
                num_decode, 1, 1, decode_max
            )
        for chunk in prefills:
            if chunk.start_pos > 0:
                chunk.mask = self._chunk_mask(chunk.start_pos, chunk.tok_end - chunk.tok_start)

        # The prompt tokens feed the repetition penalty of their slot.
        if prompt_index:
            self.sampler.mark_seen(write_t[prompt_index_t], ids_t[prompt_index_t])

        meta = AttentionMetadata(
            k_cache=self.k_cache,
            v_cache=self.v_cache,
            write_slots=write_t,
            write_pos=pos_t,
            num_decode=num_decode,
            decode_slots=None if decode_range is not None else decode_slots_t,
            decode_slot_range=decode_range,
            decode_max_len=decode_max,
            decode_mask=decode_mask,
            prefills=prefills,
            group=self.group,
        )
        out = self.model(
            input_ids=ids_t.unsqueeze(0),
            position_ids=pos_t.unsqueeze(0),
            use_cache=False,
            logits_to_keep=sample_index_t,
            **{META_KWARG: meta},
        )
        if not B:
            return RunnerOutput(sampled_token_ids=[])
        logits = out.logits[0].float()  # [B, V]
        rows = [s for s in seqs if s.sample]
        tokens = self._sample(logits, rows, sample_slots_t)
        return RunnerOutput(sampled_token_ids=tokens.tolist())  # the one sync of the step

    # -- CUDA-graph decode ------------------------------------------------------------------------

    def _graph_for(self, seqs: list[ScheduledSeq]) -> DecodeGraph | None:
        """The captured graph for this decode step's (slots, kv length) bucket, capturing it once.

        Rows are slots, not requests: a graph for ``rows`` covers slots
        [0, rows), so any subset of them can decode with the same graph. Idle
        rows feed token 0 at position 0 and write their K/V into the scratch
        column, which is never read.
        """
        rows, kv_len = self.graphs.bucket(
            max(s.slot for s in seqs), max(s.start_pos for s in seqs) + 1
        )
        return self.graphs.get(rows, kv_len)

    def _graph_forward(self, inputs: torch.Tensor, rows: int, kv_len: int) -> torch.Tensor:
        ids, pos, write_pos = inputs[0], inputs[1], inputs[2]
        mask = (self._arange[:kv_len][None, :] <= pos[:, None]).view(rows, 1, 1, kv_len)
        meta = AttentionMetadata(
            k_cache=self.k_cache,
            v_cache=self.v_cache,
            write_slots=self._arange[:rows],
            write_pos=write_pos,
            num_decode=rows,
            decode_slots=None,
            decode_slot_range=(0, rows),
            decode_max_len=kv_len,
            decode_mask=mask,
            prefills=[],
            group=self.group,
        )
        out = self.model(
            input_ids=ids.unsqueeze(0),
            position_ids=pos.unsqueeze(0),
            use_cache=False,
            **{META_KWARG: meta},
        )
        logits: torch.Tensor = out.logits[0].float()
        return logits

    def _execute_graph(self, graph: DecodeGraph, seqs: list[ScheduledSeq]) -> RunnerOutput:
        rows = graph.rows
        ids = [0] * rows
        pos = [0] * rows
        write_pos = [self._scratch_pos] * rows
        sample_slots: list[int] = []
        prompt_slots: list[int] = []  # one-token prefill chunks: their token is a prompt token
        for seq in seqs:
            ids[seq.slot] = seq.token_ids[0]
            pos[seq.slot] = write_pos[seq.slot] = seq.start_pos
            if seq.sample:
                sample_slots.append(seq.slot)
            if seq.is_prefill:
                prompt_slots.append(seq.slot)
        host = torch.tensor(
            ids + pos + write_pos + sample_slots + prompt_slots, dtype=torch.int64
        ).pin_memory()
        packed = host.to(self.device, non_blocking=True)
        graph.inputs.copy_(packed[: 3 * rows].view(3, rows))
        n_sample = len(sample_slots)
        slots_t = packed[3 * rows : 3 * rows + n_sample]
        if prompt_slots:
            prompt_slots_t = packed[3 * rows + n_sample :]
            self.sampler.mark_seen(prompt_slots_t, graph.inputs[0].index_select(0, prompt_slots_t))
        graph.graph.replay()
        if not sample_slots:
            return RunnerOutput(sampled_token_ids=[])
        every_row = sample_slots == list(range(rows))
        logits = graph.logits if every_row else graph.logits.index_select(0, slots_t)
        rows_seqs = [s for s in seqs if s.sample]
        tokens = self._sample(logits, rows_seqs, slots_t)
        return RunnerOutput(sampled_token_ids=tokens.tolist())

    def _chunk_mask(self, start_pos: int, n: int) -> torch.Tensor:
        """Causal mask for a chunk continuing a cached prefix, folded for GQA: [group*n, start+n]."""
        q_pos = torch.arange(start_pos, start_pos + n, device=self.device)
        k_pos = torch.arange(start_pos + n, device=self.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        return mask.repeat(self.group, 1) if self.group > 1 else mask

    # -- sampling --------------------------------------------------------------------------------

    def _sample(
        self, logits: torch.Tensor, rows: list[ScheduledSeq], slots: torch.Tensor
    ) -> torch.Tensor:
        return self.sampler.sample(logits, rows, slots)

    # -- helpers -----------------------------------------------------------------------------

    def warmup(self) -> None:
        """One prefill and one decode on slot 0, then (on CUDA) capture every decode graph.

        Capturing up front keeps the first requests of each batch size and
        context length from paying a capture (tens to hundreds of ms) mid-stream.
        """
        params = SamplingParams(max_new_tokens=2, temperature=1.0, top_p=0.9, top_k=5, seed=0)
        prompt = [0] * min(8, self.max_model_len - 1)
        prefill = ScheduledSeq("warmup", 0, prompt, 0, True, True, params, is_prefill=True)
        out = self.execute(SchedulerOutput(0, [prefill], len(prompt), []))
        decode = ScheduledSeq(
            "warmup", 0, out.sampled_token_ids, len(prompt), True, False, params, is_prefill=False
        )
        self.execute(SchedulerOutput(0, [decode], 1, []))
        self.execute(SchedulerOutput(0, [], 0, [0]))
        if self.graphs.enabled:
            self.capture_all_graphs()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def capture_all_graphs(self) -> None:
        """Capture a decode graph for every (rows, kv length) bucket."""
        with sdpa_kernel(SDPA_BACKENDS):
            self.graphs.capture_all()

    def memory_bytes(self) -> int:
        return self.kv.memory_bytes()
