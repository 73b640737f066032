"""The model runner: the only module that runs the model on a torch device.

How a step runs
---------------
The scheduler hands over a :class:`SchedulerOutput`: some requests decode one
token, some feed a chunk of their prompt. The runner packs all of those tokens
into ONE sequence with explicit positions and calls the unmodified Hugging
Face decoder on it with ``use_cache=False``. Everything that is not attention
(embeddings, RoPE, MLPs, norms) is position-wise, so it is correct on a packed
batch as it is. Attention is ours (``attention.py``): the runner builds the
step's :class:`StepAttention` once and installs it in the step context that
the ``autoglm::paged_attention`` op reads in every layer.

The pieces, one module each:

- ``kv_cache.py``: the paged cache, allocated once (sized from free memory on CUDA);
- ``attention.py``: the attention op and its backends (portable torch, Triton + flash);
- ``cuda_graphs.py``: captured decode steps, bucketed by row count;
- ``sampling.py``: per-slot sampling state and batched sampling on the device.

Block tables: the scheduler sends each request's newly taken blocks; the runner
keeps every slot's table on the host and in a device tensor
``[slots, max_blocks]`` that the kernels read, updating only the new entries.

Fusion: on CUDA the decoder (everything but attention, which is an opaque
custom op) is compiled with ``torch.compile(dynamic=True)``: one graph for
every token count above 1, one for 1, no recompiles per step; decode steps
then run it inside our own CUDA graphs. The LM head runs on the rows that are
sampled only.

The only host/device sync per step is reading back the sampled token ids.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from ..errors import ModelLoadError
from .api import SamplingParams
from .attention import (
    ATTN_IMPLEMENTATION,
    PrefillChunk,
    StepAttention,
    StepContext,
    make_backend,
    register_attention,
    set_context,
)
from .block_manager import SCRATCH_BLOCK
from .cuda_graphs import (
    IDS,
    POSITIONS,
    ROW_SLOTS,
    SEQ_LENS,
    SLOT_MAPPING,
    DecodeGraph,
    DecodeGraphs,
)
from .fusion import fuse_projections
from .kv_cache import PagedKVCache, blocks_for_memory, bytes_per_block
from .sampling import PackedStep, Sampler
from .scheduler import PENDING_TOKEN, RunnerOutput, ScheduledSeq, SchedulerOutput

logger = logging.getLogger(__name__)

# Architectures whose CausalLM forward is exactly ``lm_head(decoder(...))``: for
# these the runner calls the decoder (compiled) and the head itself. Others run
# through the full model, eagerly.
_SPLIT_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "Glm4ForCausalLM",
        "GlmForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    }
)


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
        block_size: int = 16,
        num_blocks: int | None = None,
        memory_fraction: float = 0.9,
        max_batch_tokens: int = 8192,
        attention_backend: str = "auto",
        compile: bool | None = None,
        compile_cache_dir: str | None = None,
        compile_scope: str = "layers",
        fuse: bool = True,
    ) -> None:
        config: Any = model.config
        self.model = model
        self.device = device
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self.block_size = block_size
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
        self.fused = fuse_projections(model) if fuse else {"attention": 0, "mlp": 0}
        self.dtype = next(model.parameters()).dtype
        self.backend = make_backend(attention_backend, device)
        self._split = type(model).__name__ in _SPLIT_ARCHITECTURES
        self._decoder: Any = model.get_decoder() if self._split else None  # type: ignore[operator]
        self._lm_head: Any = model.get_output_embeddings() if self._split else None  # type: ignore[operator]
        self._num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 1
        )

        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.block_tables = torch.zeros(
            num_slots, self.max_blocks_per_seq, dtype=torch.int32, device=device
        )
        self._tables: list[list[int]] = [[] for _ in range(num_slots)]
        self._hidden_fn: Any = self._hidden

        if num_blocks is None:
            if device.type == "cuda":
                self._profile_peak(max_batch_tokens)
                per_block = bytes_per_block(
                    num_layers=self.num_layers,
                    num_kv_heads=self.num_kv_heads,
                    head_dim=self.head_dim,
                    block_size=block_size,
                    dtype=self.dtype,
                )
                num_blocks = blocks_for_memory(device, memory_fraction, per_block)
            else:
                num_blocks = num_slots * self.max_blocks_per_seq + 1
        if (num_blocks - 1) * block_size < max_model_len:
            raise ModelLoadError(
                f"the KV cache holds {(num_blocks - 1) * block_size} tokens, fewer than "
                f"max_model_len {max_model_len}; lower max_model_len or give it more memory "
                "(kv_cache_memory_fraction)"
            )
        self.num_blocks = num_blocks
        self.kv = PagedKVCache(
            num_layers=self.num_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=device,
        )
        self.k_cache = self.kv.k
        self.v_cache = self.kv.v
        self._ctx = StepContext(
            self.kv.k, self.kv.v, self.block_tables, block_size, self.backend, None
        )
        self.sampler = Sampler(num_slots, self.vocab_size, device)
        # Each slot's last sampled token, where a PENDING_TOKEN decode input is read.
        self._last_tokens = torch.zeros(num_slots, dtype=torch.int64, device=device)

        # torch.compile runs on CUDA only (on CPU it would only slow the start down).
        want_compile = device.type == "cuda" and (compile is None or compile)
        if want_compile and not self._split:
            logger.info("not compiling %s: only its eager path is supported", type(model).__name__)
        self.compiled = want_compile and self._split
        if self.compiled:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
            if compile_cache_dir:
                os.makedirs(compile_cache_dir, exist_ok=True)
                os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", compile_cache_dir)
                os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(compile_cache_dir, "triton"))
            if compile_scope == "layers":
                # Regional compilation: one graph for the decoder layer, shared by
                # every layer (the layer index must not be specialized, hence the
                # config). glm9b on an H100: warm-up 39 s cold, 13.5 s with a warm
                # --compile-cache-dir (the whole decoder: 184 s cold, the cache
                # barely helping), one recompile (the 1-row graph).
                torch._dynamo.config.allow_unspec_int_on_nn_module = True
                decoder: Any = self._decoder
                for layer in decoder.layers:
                    layer.compile(dynamic=True)
            elif compile_scope == "decoder":
                self._hidden_fn = torch.compile(self._hidden, dynamic=True)
            else:
                raise ValueError(f"compile_scope: must be decoder or layers, got {compile_scope!r}")

        graphs_enabled = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if graphs_enabled and device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        if graphs_enabled and not self.backend.supports_cuda_graphs:
            logger.info("attention backend %s: decoding without CUDA graphs", self.backend.name)
            graphs_enabled = False
        self.graphs = DecodeGraphs(
            self._graph_forward,
            max_rows=num_slots,
            scratch_row=SCRATCH_BLOCK * block_size,
            device=device,
            enabled=graphs_enabled,
        )
        self.warmup_s: float | None = None
        self.warmup_phases: dict[str, float] = {}

    @property
    def _graphs(self) -> dict[int, DecodeGraph]:
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

    @torch.inference_mode()
    def _profile_peak(self, max_tokens: int) -> None:
        """One prefill of ``max_tokens`` tokens over a scratch cache, for the peak activations."""
        n = max(2, min(max_tokens, self.max_model_len))
        blocks = -(-n // self.block_size) + 1
        scratch = PagedKVCache(
            num_layers=self.num_layers,
            num_blocks=blocks,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        table = torch.zeros(1, blocks, dtype=torch.int32, device=self.device)
        table[0, : blocks - 1] = torch.arange(1, blocks, device=self.device)
        ctx = StepContext(scratch.k, scratch.v, table, self.block_size, self.backend, None)
        pos = torch.arange(n, device=self.device)
        ctx.step = self._prefill_only_step(pos + self.block_size, n)
        set_context(ctx)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            self._logits(torch.zeros(n, dtype=torch.int64, device=self.device), pos, pos[-1:])
            torch.cuda.synchronize(self.device)
        finally:
            set_context(None)
            del scratch, ctx
        logger.info(
            "profiled a %d-token step: peak %.1f GiB allocated",
            n,
            torch.cuda.max_memory_allocated(self.device) / 2**30,
        )

    def _prefill_only_step(self, slot_mapping: torch.Tensor, n: int) -> StepAttention:
        cu = torch.tensor([0, n], dtype=torch.int32, device=self.device)
        empty = torch.zeros(0, dtype=torch.int64, device=self.device)
        return StepAttention(
            slot_mapping=slot_mapping,
            num_decode=0,
            decode_row_slots=empty,
            decode_seq_lens=empty.to(torch.int32),
            decode_max_len=0,
            num_splits=1,
            prefills=[PrefillChunk(0, n, 0, 0)],
            cu_seqlens_q=cu,
            cu_seqlens_k=cu,
            max_q=n,
            max_k=n,
        )

    # -- the forward pass ------------------------------------------------------------------------

    def _hidden(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self._decoder(input_ids=ids[None], position_ids=pos[None], use_cache=False)
        hidden: torch.Tensor = out[0][0]
        return hidden

    def _logits(
        self, ids: torch.Tensor, pos: torch.Tensor, sample_index: torch.Tensor | None
    ) -> torch.Tensor:
        """Float32 logits of the rows in ``sample_index`` (all rows when None)."""
        if self._split:
            hidden = self._hidden_fn(ids, pos)
            if sample_index is not None:
                hidden = hidden.index_select(0, sample_index)
            logits: torch.Tensor = self._lm_head(hidden).float()
            return logits
        kwargs: dict[str, Any] = {}
        if sample_index is not None:
            kwargs["logits_to_keep"] = sample_index
        out = self.model(input_ids=ids[None], position_ids=pos[None], use_cache=False, **kwargs)
        full: torch.Tensor = out.logits[0].float()
        return full

    # -- one step ------------------------------------------------------------------------------

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one forward pass over the scheduled tokens and sample where asked."""
        return self.collect(self.launch(sched))

    def collect(self, step: PackedStep | None) -> RunnerOutput:
        """Wait for a launched step's sampled tokens (the step's one host sync)."""
        if step is None:
            return RunnerOutput(sampled_token_ids=[])
        ids, logprobs = self.sampler.unpack(step)
        return RunnerOutput(
            sampled_token_ids=ids, logprobs=logprobs, non_finite_rows=self.sampler.non_finite_rows
        )

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> PackedStep | None:
        """Queue one forward pass and its sampling on the device; no host sync.

        Decode inputs that are :data:`PENDING_TOKEN` (sampled by the step before,
        whose result the host has not read yet) are taken from each slot's last
        sampled token on the device. :meth:`collect` returns the result.
        """
        self.sampler.free(sched.freed_slots)
        for slot in sched.freed_slots:
            self._tables[slot] = []
        seqs = sched.seqs
        if not seqs:
            return None
        self.sampler.admit(seqs)
        set_context(self._ctx)
        try:
            if self.graphs.enabled and all(len(s.token_ids) == 1 and not s.is_new for s in seqs):
                graph = self.graphs.get(len(seqs))
                if graph is not None:
                    return self._execute_graph(graph, seqs)
            return self._execute_eager(seqs)
        finally:
            self._ctx.step = None
            set_context(None)

    def _table_updates(self, seqs: list[ScheduledSeq]) -> list[int]:
        """Apply new blocks to the host tables; [slots..., cols..., blocks...] for the device."""
        slots: list[int] = []
        cols: list[int] = []
        blocks: list[int] = []
        for seq in seqs:
            table = self._tables[seq.slot]
            if seq.is_new:
                table.clear()
            if seq.new_blocks:
                first = len(table)
                table.extend(seq.new_blocks)
                slots.extend([seq.slot] * len(seq.new_blocks))
                cols.extend(range(first, len(table)))
                blocks.extend(seq.new_blocks)
        return slots + cols + blocks

    def _row(self, slot: int, pos: int) -> int:
        bs = self.block_size
        return self._tables[slot][pos // bs] * bs + pos % bs

    def _apply_table_updates(self, upd: torch.Tensor) -> None:
        n = upd.numel() // 3
        if n:
            self.block_tables[upd[:n], upd[n : 2 * n]] = upd[2 * n :].to(torch.int32)

    def _execute_eager(self, seqs: list[ScheduledSeq]) -> PackedStep | None:
        """Any mix of decodes and prefill chunks, one packed forward pass."""
        updates = self._table_updates(seqs)
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        sample_index: list[int] = []
        sample_slots: list[int] = []
        dec_slots: list[int] = []
        dec_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        cu_q = [0]
        cu_k = [0]
        any_prefix = False
        seen_slots: list[int] = []  # (slot, token) pairs for the repetition penalty
        seen_tokens: list[int] = []
        pending_index: list[int] = []  # packed rows whose input is PENDING_TOKEN, and slots
        pending_slots: list[int] = []
        counting_decodes = True
        for seq in seqs:
            n = len(seq.token_ids)
            start = len(input_ids)
            if seq.token_ids[0] == PENDING_TOKEN:
                pending_index.append(start)
                pending_slots.append(seq.slot)
            input_ids.extend(seq.token_ids)
            positions.extend(range(seq.start_pos, seq.start_pos + n))
            slot_mapping.extend(
                self._row(seq.slot, p) for p in range(seq.start_pos, seq.start_pos + n)
            )
            if seq.is_prefill:
                seen_slots.extend([seq.slot] * n)
                seen_tokens.extend(seq.token_ids)
            if seq.cached_token_ids:
                seen_slots.extend([seq.slot] * len(seq.cached_token_ids))
                seen_tokens.extend(seq.cached_token_ids)
            # Any single token attends like a decode (a one-token prefill chunk
            # included); only the penalty needs is_prefill.
            if n == 1 and counting_decodes:
                dec_slots.append(seq.slot)
                dec_lens.append(seq.start_pos + 1)
            else:
                counting_decodes = False
                prefills.append(PrefillChunk(start, start + n, seq.slot, seq.start_pos))
                cu_q.append(cu_q[-1] + n)
                cu_k.append(cu_k[-1] + seq.start_pos + n)
                any_prefix = any_prefix or seq.start_pos > 0
            if seq.sample:
                sample_index.append(start + n - 1)
                sample_slots.append(seq.slot)

        nd = len(dec_slots)
        ctx_rows: list[int] = []
        if any_prefix:
            for chunk in prefills:
                end = chunk.start_pos + chunk.tok_end - chunk.tok_start
                ctx_rows.extend(self._row(chunk.slot, p) for p in range(end))
        B, P = len(sample_index), len(prefills)
        # One host->device copy for all the integer metadata.
        parts = [
            input_ids,
            positions,
            slot_mapping,
            sample_index,
            sample_slots,
            dec_slots,
            dec_lens,
            cu_q if P else [],
            cu_k if P else [],
            ctx_rows,
            seen_slots,
            seen_tokens,
            updates,
            pending_index,
            pending_slots,
        ]
        packed = self._to_device(parts)
        offsets = [0]
        for part in parts:
            offsets.append(offsets[-1] + len(part))
        (
            ids_t,
            pos_t,
            slot_mapping_t,
            sample_index_t,
            sample_slots_t,
            dec_slots_t,
            dec_lens_t,
            cu_q_t,
            cu_k_t,
            ctx_rows_t,
            seen_slots_t,
            seen_tokens_t,
            updates_t,
            pending_index_t,
            pending_slots_t,
        ) = (packed[offsets[i] : offsets[i + 1]] for i in range(len(parts)))
        if pending_index:
            ids_t[pending_index_t] = self._last_tokens[pending_slots_t]
        self._apply_table_updates(updates_t)
        if seen_slots:
            self.sampler.mark_seen(seen_slots_t, seen_tokens_t)

        self._ctx.step = StepAttention(
            slot_mapping=slot_mapping_t,
            num_decode=nd,
            decode_row_slots=dec_slots_t,
            decode_seq_lens=dec_lens_t.to(torch.int32),
            decode_max_len=max(dec_lens, default=0),
            num_splits=self._num_splits(nd),
            prefills=prefills,
            cu_seqlens_q=cu_q_t.to(torch.int32) if P else None,
            cu_seqlens_k=cu_k_t.to(torch.int32) if P else None,
            max_q=max((c.tok_end - c.tok_start for c in prefills), default=0),
            max_k=max((c.start_pos + c.tok_end - c.tok_start for c in prefills), default=0),
            ctx_index=ctx_rows_t if any_prefix else None,
        )
        if not B:
            self._logits(ids_t, pos_t, sample_index_t)
            return None
        logits = self._logits(ids_t, pos_t, sample_index_t)
        rows = [s for s in seqs if s.sample]
        return self._sample(logits, rows, sample_slots_t)

    def _to_device(self, parts: list[list[int]]) -> torch.Tensor:
        flat: list[int] = []
        for part in parts:
            flat.extend(part)
        packed = torch.tensor(flat, dtype=torch.int64)
        if self.device.type != "cpu":
            packed = packed.pin_memory().to(self.device, non_blocking=True)
        return packed

    def _num_splits(self, rows: int) -> int:
        if self.device.type != "cuda" or not rows:
            return 1
        from .triton_attention import num_splits_for

        return num_splits_for(rows, self.num_kv_heads, self._num_sms)

    # -- CUDA-graph decode ------------------------------------------------------------------------

    def _graph_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        rows = inputs.shape[1]
        self._ctx.step = StepAttention(
            slot_mapping=inputs[SLOT_MAPPING],
            num_decode=rows,
            decode_row_slots=inputs[ROW_SLOTS],
            decode_seq_lens=inputs[SEQ_LENS].to(torch.int32),
            decode_max_len=0,
            num_splits=self._num_splits(rows),
        )
        set_context(self._ctx)
        return self._logits(inputs[IDS], inputs[POSITIONS], None)

    def _execute_graph(self, graph: DecodeGraph, seqs: list[ScheduledSeq]) -> PackedStep | None:
        rows = graph.rows
        updates = self._table_updates(seqs)
        n = len(seqs)
        cols: list[list[int]] = [[], [], [], [], []]
        sample_slots: list[int] = []
        prompt_slots: list[int] = []  # one-token prefill chunks: their token is a prompt token
        prompt_tokens: list[int] = []
        for seq in seqs:
            pos = seq.start_pos
            cols[IDS].append(seq.token_ids[0])
            cols[POSITIONS].append(pos)
            cols[SLOT_MAPPING].append(self._row(seq.slot, pos))
            cols[ROW_SLOTS].append(seq.slot)
            cols[SEQ_LENS].append(pos + 1)
            if seq.sample:
                sample_slots.append(seq.slot)
            if seq.is_prefill:
                prompt_slots.append(seq.slot)
                prompt_tokens.append(seq.token_ids[0])
        pad = rows - n
        if pad:
            cols[IDS].extend([0] * pad)
            cols[POSITIONS].extend([0] * pad)
            cols[SLOT_MAPPING].extend([self.graphs.scratch_row] * pad)
            cols[ROW_SLOTS].extend([0] * pad)
            cols[SEQ_LENS].extend([0] * pad)
        packed = self._to_device([*cols, sample_slots, prompt_slots, prompt_tokens, updates])
        graph.inputs.copy_(packed[: 5 * rows].view(5, rows))
        if PENDING_TOKEN in cols[IDS]:
            ids = graph.inputs[IDS]
            ids.copy_(torch.where(ids < 0, self._last_tokens[graph.inputs[ROW_SLOTS]], ids))
        rest = packed[5 * rows :]
        n_sample, n_prompt = len(sample_slots), len(prompt_slots)
        slots_t = rest[:n_sample]
        if n_prompt:
            self.sampler.mark_seen(
                rest[n_sample : n_sample + n_prompt],
                rest[n_sample + n_prompt : n_sample + 2 * n_prompt],
            )
        self._apply_table_updates(rest[n_sample + 2 * n_prompt :])
        graph.graph.replay()
        if not sample_slots:
            return None
        every_row = n_sample == rows
        if every_row:
            logits = graph.logits
        else:
            sample_rows = [i for i, s in enumerate(seqs) if s.sample]
            logits = (
                graph.logits[:n_sample]
                if sample_rows == list(range(n_sample))
                else graph.logits[self._to_device([sample_rows])]
            )
        rows_seqs = [s for s in seqs if s.sample]
        return self._sample(logits, rows_seqs, slots_t)

    # -- sampling --------------------------------------------------------------------------------

    def _sample(
        self, logits: torch.Tensor, rows: list[ScheduledSeq], slots: torch.Tensor
    ) -> PackedStep:
        """Sample, remember each slot's token on the device, start the copy to the host."""
        tokens = self.sampler.sample(logits, rows, slots)
        self._last_tokens[slots] = tokens
        return self.sampler.pack(tokens)

    # -- helpers -----------------------------------------------------------------------------

    def warmup(self) -> None:
        """Compile (on CUDA), run a prefill and a decode, then capture every decode graph.

        Uses blocks 1.. of the cache directly (no request holds any yet) and
        hands nothing back to the scheduler. Capturing up front keeps the first
        requests of each batch size from paying a capture mid-stream.
        """
        t0 = time.perf_counter()
        params = SamplingParams(max_new_tokens=2, temperature=1.0, top_p=0.9, top_k=5, seed=0)
        n = min(8, self.max_model_len - 1)
        blocks = list(range(1, 1 + -(-(n + 1) // self.block_size)))
        prefill = ScheduledSeq(
            "warmup", 0, [0] * n, 0, True, True, params, is_prefill=True, new_blocks=blocks
        )
        out = self.execute(SchedulerOutput(0, [prefill], n, []))
        t1 = time.perf_counter()
        decode = ScheduledSeq(
            "warmup", 0, out.sampled_token_ids, n, True, False, params, is_prefill=False
        )
        self.execute(SchedulerOutput(0, [decode], 1, []))
        self.execute(SchedulerOutput(0, [], 0, [0]))
        t2 = time.perf_counter()
        if self.graphs.enabled:
            self.capture_all_graphs()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t3 = time.perf_counter()
        self.warmup_s = t3 - t0
        # first prefill (compiles the multi-token graph), first decode (the 1-row
        # graph), then the capture of every decode bucket (compiles the rest)
        self.warmup_phases = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "graphs_s": t3 - t2}
        logger.info(
            "warm-up took %.1f s (compile: %s; %s)",
            self.warmup_s,
            self.compiled,
            ", ".join(f"{k} {v:.1f}" for k, v in self.warmup_phases.items()),
        )

    @torch.inference_mode()
    def capture_all_graphs(self) -> None:
        """Capture a decode graph for every row bucket."""
        try:
            self.graphs.capture_all()
        finally:
            self._ctx.step = None
            set_context(None)

    def memory_bytes(self) -> int:
        return self.kv.memory_bytes()
