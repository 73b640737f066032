"""The model runner: the only module that touches torch devices.

How a step runs
---------------
The scheduler hands over a :class:`SchedulerOutput`: some requests decode one
token, some feed a chunk of their prompt. The runner packs all of those tokens
into ONE sequence (``input_ids`` of shape ``[1, T]``) with explicit
``position_ids`` and calls the unmodified Hugging Face model on it with
``use_cache=False``. Everything that is not attention (embeddings, RoPE, MLPs,
norms) is position-wise, so it is correct on a packed batch as it is.

Attention is the only place where sequences must not see each other, and it is
also where the KV cache lives. The runner registers its own attention function
with transformers' ``AttentionInterface`` under the name ``"autoglm"`` and
switches the model to it. The step's metadata (:class:`AttentionMetadata`)
travels to it through the model's ``**kwargs``, which transformers forwards to
every attention call. The function:

1. writes this step's K/V into the preallocated slot cache
   ``[layers, slots, kv_heads, max_model_len, head_dim]`` (by ``module.layer_idx``);
2. runs ONE batched SDPA for all single-token (decode) sequences over their
   slots, with a length mask, and one SDPA per multi-token prefill chunk
   (causal, against the chunk's cached prefix).

Grouped-query attention is handled by folding the query heads of a group into
the query-length axis (``[B, kv_heads, group, head_dim]``), so no K/V is ever
repeated or copied. Because ``"autoglm"`` has no mask function registered,
transformers skips causal-mask construction entirely (it returns ``None`` for
unknown implementations); the masks are built here once per step.

The cache is allocated once, at construction; nothing is reallocated per step.
Sampling runs on the device, batched, and the only host/device sync per step
is reading back the sampled token ids.

On CUDA, pure-decode steps replay a captured CUDA graph instead of running the
model eagerly: per-step CPU work (Python, kernel launches) is otherwise larger
than the GPU work of a 9B model's decode step. A graph covers the slots
``[0, rows)`` and kv lengths up to ``kv_len``, bucketed to powers of two, so a
few dozen graphs (captured during warm-up) serve every decode step. Steps with
prefill chunks run eagerly. If capture fails for some architecture, the runner
logs it once and keeps decoding eagerly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import ModelLoadError
from .api import SamplingParams
from .scheduler import RunnerOutput, ScheduledSeq, SchedulerOutput

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "autoglm"
_META_KWARG = "autoglm_meta"
# cuDNN's SDPA builds (and caches) an execution plan per shape; decode shapes
# change every step, so it costs milliseconds of CPU per call. Flash and
# memory-efficient kernels need no plan.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_MIN_KV_BUCKET = 256


@dataclass(slots=True)
class _DecodeGraph:
    """A captured decode step over slots [0, rows) attending to at most kv_len positions."""

    graph: Any  # torch.cuda.CUDAGraph
    rows: int
    kv_len: int
    inputs: torch.Tensor  # [3, rows] int64: token ids, positions, KV write positions
    logits: torch.Tensor  # [rows, vocab] float32, overwritten by every replay


@dataclass(slots=True)
class _PrefillChunk:
    tok_start: int  # first index of this chunk in the packed batch
    tok_end: int  # one past the last
    slot: int
    start_pos: int  # tokens of this sequence already in the cache before this step
    mask: torch.Tensor | None  # [group * n, start_pos + n] bool; None: plain causal, no prefix


@dataclass(slots=True)
class AttentionMetadata:
    """Everything the attention function needs for one step; built once, used by every layer."""

    k_cache: torch.Tensor  # [layers, slots, kv_heads, max_len, head_dim]
    v_cache: torch.Tensor
    write_slots: torch.Tensor  # [T] slot of every packed token
    write_pos: torch.Tensor  # [T] position of every packed token
    num_decode: int  # the first num_decode packed tokens are single-token sequences
    decode_slots: torch.Tensor | None  # [num_decode] slot ids (None when the range below applies)
    decode_slot_range: tuple[int, int] | None  # (first, last + 1) when slots are consecutive
    decode_max_len: int  # longest kv length among decodes
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, decode_max_len] bool
    prefills: list[_PrefillChunk]
    group: int  # query heads per kv head


def autoglm_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Slot-cache attention over a packed batch (registered as ``"autoglm"``).

    ``query`` is ``[1, heads, T, head_dim]``, ``key``/``value`` are
    ``[1, kv_heads, T, head_dim]``; returns ``[1, T, heads, head_dim]`` like
    transformers' own SDPA function.
    """
    meta: AttentionMetadata | None = kwargs.get(_META_KWARG)
    if meta is None:
        raise RuntimeError(
            "the autoglm attention implementation needs the runner's metadata; "
            "call the model through ModelRunner"
        )
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    k_cache = meta.k_cache[layer]  # [slots, kvh, max_len, d]
    v_cache = meta.v_cache[layer]
    k_new = key[0].transpose(0, 1)  # [T, kvh, d]
    v_new = value[0].transpose(0, 1)
    k_cache[meta.write_slots, :, meta.write_pos] = k_new
    v_cache[meta.write_slots, :, meta.write_pos] = v_new

    heads, head_dim = query.shape[1], query.shape[3]
    kv_heads = key.shape[1]
    group = meta.group
    pieces: list[torch.Tensor] = []

    n_dec = meta.num_decode
    if n_dec:
        # [H, n, d] -> [n, kvh, group, d]: a decode query is one token, so the
        # heads of a group can stand in for the query-length axis.
        q = query[0, :, :n_dec].transpose(0, 1).reshape(n_dec, kv_heads, group, head_dim)
        if meta.decode_slot_range is not None:
            first, last = meta.decode_slot_range
            k = k_cache[first:last, :, : meta.decode_max_len]
            v = v_cache[first:last, :, : meta.decode_max_len]
        else:
            assert meta.decode_slots is not None
            k = k_cache.index_select(0, meta.decode_slots)[:, :, : meta.decode_max_len]
            v = v_cache.index_select(0, meta.decode_slots)[:, :, : meta.decode_max_len]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.decode_mask, scale=scaling)
        pieces.append(out.reshape(n_dec, heads, head_dim))

    for chunk in meta.prefills:
        n = chunk.tok_end - chunk.tok_start
        q = query[:, :, chunk.tok_start : chunk.tok_end]  # [1, H, n, d]
        if chunk.mask is None:
            # A whole prompt (or its first chunk): its own K/V are all it attends to.
            k = key[:, :, chunk.tok_start : chunk.tok_end]
            v = value[:, :, chunk.tok_start : chunk.tok_end]
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scaling, enable_gqa=group > 1
            )
            pieces.append(out[0].transpose(0, 1))  # [n, H, d]
        else:
            end = chunk.start_pos + n
            k = k_cache[chunk.slot : chunk.slot + 1, :, :end]
            v = v_cache[chunk.slot : chunk.slot + 1, :, :end]
            qf = q.reshape(1, kv_heads, group * n, head_dim)
            out = F.scaled_dot_product_attention(qf, k, v, attn_mask=chunk.mask, scale=scaling)
            pieces.append(out.reshape(heads, n, head_dim).transpose(0, 1))

    attn = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
    return attn.unsqueeze(0), None


def register_attention() -> None:
    """Register ``"autoglm"`` with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, autoglm_attention)


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
        # One extra position per slot: a scratch column that CUDA-graph decode
        # steps write idle rows into; it is never read.
        self._scratch_pos = max_model_len
        shape = (num_slots, self.num_kv_heads, max_model_len + 1, self.head_dim)
        cache_shape = (self.num_layers, *shape)
        try:
            self.k_cache = torch.zeros(cache_shape, dtype=dtype, device=device)
            self.v_cache = torch.zeros(cache_shape, dtype=dtype, device=device)
        except torch.OutOfMemoryError as exc:
            need = 2 * torch.Size(cache_shape).numel() * dtype.itemsize / 2**30
            raise ModelLoadError(
                f"the KV cache ({need:.1f} GiB for {num_slots} slots x {max_model_len} tokens) "
                "does not fit; lower max_batch_size or max_model_len"
            ) from exc
        logger.info(
            "KV cache: %d layers x %d slots x %d tokens (%.1f MiB)",
            self.num_layers,
            num_slots,
            max_model_len,
            2 * self.k_cache.numel() * self.k_cache.element_size() / 2**20,
        )

        # Per-slot sampling state, written when a request is admitted.
        self._temperature = torch.ones(num_slots, dtype=torch.float32, device=device)
        self._top_p = torch.ones(num_slots, dtype=torch.float32, device=device)
        self._top_k = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self._penalty = torch.ones(num_slots, dtype=torch.float32, device=device)
        # Tokens seen per slot (prompt + output), for the repetition penalty.
        self._seen = torch.zeros(num_slots, self.vocab_size, dtype=torch.bool, device=device)
        self._generators: dict[int, torch.Generator] = {}

        self._arange = torch.arange(max(num_slots, max_model_len + 1), device=device)
        self._graphs_enabled = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self._graphs_enabled and device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self._graph_pool: Any = torch.cuda.graph_pool_handle() if self._graphs_enabled else None

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
        for slot in sched.freed_slots:
            self._generators.pop(slot, None)
        seqs = sched.seqs
        if not seqs:
            return RunnerOutput(sampled_token_ids=[])
        self._admit_new(seqs)
        with sdpa_kernel(_SDPA_BACKENDS):
            if self._graphs_enabled and all(len(s.token_ids) == 1 for s in seqs):
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
        prefills: list[_PrefillChunk] = []
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
                prefills.append(_PrefillChunk(start, start + n, seq.slot, seq.start_pos, None))
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
            self._seen[write_t[prompt_index_t], ids_t[prompt_index_t]] = True

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
            **{_META_KWARG: meta},
        )
        if not B:
            return RunnerOutput(sampled_token_ids=[])
        logits = out.logits[0].float()  # [B, V]
        rows = [s for s in seqs if s.sample]
        tokens = self._sample(logits, rows, sample_slots_t)
        return RunnerOutput(sampled_token_ids=tokens.tolist())  # the one sync of the step

    # -- CUDA-graph decode ------------------------------------------------------------------------

    def _graph_for(self, seqs: list[ScheduledSeq]) -> _DecodeGraph | None:
        """The captured graph for this decode step's (slots, kv length) bucket, capturing it once.

        Rows are slots, not requests: a graph for ``rows`` covers slots
        [0, rows), so any subset of them can decode with the same graph. Idle
        rows feed token 0 at position 0 and write their K/V into the scratch
        column, which is never read.
        """
        rows = _pow2_at_least(max(s.slot for s in seqs) + 1, self.num_slots)
        longest = max(s.start_pos for s in seqs) + 1
        kv_len = min(_pow2_at_least(longest, None, _MIN_KV_BUCKET), self.max_model_len)
        graph = self._graphs.get((rows, kv_len))
        return graph if graph is not None else self._capture_or_disable(rows, kv_len)

    def _capture_or_disable(self, rows: int, kv_len: int) -> _DecodeGraph | None:
        try:
            graph = self._capture(rows, kv_len)
        except Exception as exc:  # e.g. a model with data-dependent control flow
            logger.warning("CUDA graph capture failed, decoding eagerly from now on: %s", exc)
            self._graphs_enabled = False
            self._graphs.clear()
            return None
        self._graphs[(rows, kv_len)] = graph
        logger.debug("captured decode graph: %d rows, kv length %d", rows, kv_len)
        return graph

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
            **{_META_KWARG: meta},
        )
        logits: torch.Tensor = out.logits[0].float()
        return logits

    def _capture(self, rows: int, kv_len: int) -> _DecodeGraph:
        inputs = torch.zeros(3, rows, dtype=torch.int64, device=self.device)
        inputs[2].fill_(self._scratch_pos)  # all rows idle while warming up and capturing
        stream_cls: Any = torch.cuda.Stream  # untyped in torch's stubs
        stream = stream_cls(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._graph_forward(inputs, rows, kv_len)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = self._graph_forward(inputs, rows, kv_len)
        return _DecodeGraph(graph, rows, kv_len, inputs, logits)

    def _execute_graph(self, graph: _DecodeGraph, seqs: list[ScheduledSeq]) -> RunnerOutput:
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
            self._seen[prompt_slots_t, graph.inputs[0].index_select(0, prompt_slots_t)] = True
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

    def _admit_new(self, seqs: list[ScheduledSeq]) -> None:
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

    # -- sampling --------------------------------------------------------------------------------

    def _sample(
        self, logits: torch.Tensor, rows: list[ScheduledSeq], slots: torch.Tensor
    ) -> torch.Tensor:
        """Batched sampling on the device: penalty, temperature, top-k, top-p, then a draw.

        Draws use the exponential-race trick (argmax of p / E with E ~ Exp(1)),
        which samples from p exactly and lets every seeded request fill its own
        row of noise from its own generator, so a seeded request's output does
        not depend on what else is in the batch.
        """
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
        if self._graphs_enabled:
            self.capture_all_graphs()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def capture_all_graphs(self) -> None:
        """Capture a decode graph for every (rows, kv length) bucket."""
        rows_buckets = sorted(
            {_pow2_at_least(n, self.num_slots) for n in range(1, self.num_slots + 1)}
        )
        # Every kv length the lazy path can ask for: powers of two from the floor, then the cap.
        top = self.max_model_len.bit_length() + 1
        kv_buckets = sorted(
            {
                min(_pow2_at_least(2**k, None, _MIN_KV_BUCKET), self.max_model_len)
                for k in range(top)
            }
        )
        with sdpa_kernel(_SDPA_BACKENDS):
            for rows in rows_buckets:
                for kv_len in kv_buckets:
                    if not self._graphs_enabled:
                        return
                    if (rows, kv_len) not in self._graphs:
                        self._capture_or_disable(rows, kv_len)
        logger.info("captured %d CUDA graphs for decode", len(self._graphs))

    def memory_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()


def _pow2_at_least(n: int, cap: int | None, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor), capped at ``cap``."""
    size = floor
    while size < n:
        size *= 2
    return size if cap is None else min(size, cap)
