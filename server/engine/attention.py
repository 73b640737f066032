"""Attention over the paged KV cache, registered with transformers as ``"autoglm"``.

The runner packs every scheduled token of a step into ONE sequence and calls
the unmodified Hugging Face decoder on it; attention is the only place where
sequences must not see each other, and it is also where the KV cache lives.
:func:`autoglm_attention` is registered with transformers' ``AttentionInterface``
and calls the custom op ``autoglm::paged_attention``, which

1. writes this step's K/V into the cache at the step's flat ``slot_mapping``;
2. runs the *decode* rows (the first ``num_decode`` packed tokens, one per
   sequence) through the backend's paged decode kernel, which reads each
   sequence's blocks up to its real length;
3. runs the *prefill* chunks (the rest) through the backend's varlen prefill.

The op is opaque to ``torch.compile``: the model around it compiles into a
few fused kernels per layer, with no graph break, and the KV write is never
functionalized into copies of the cache, because the cache and the step's
metadata are not arguments of the op: they are read from the step context
(:func:`set_step`), which the runner sets before each forward pass and which a
captured CUDA graph keeps pointing at its own static buffers.

Backends (:class:`AttentionBackend`) share one interface:

- :class:`PortableBackend`: plain torch (SDPA over gathered blocks); runs on
  CPU, so CI tests the engine end to end; exact for float32.
- :class:`TritonBackend` (CUDA): decode through our Triton paged kernel
  (``triton_attention.py``); prefill through PyTorch's flash kernel in varlen
  form (``aten._flash_attention_forward`` with ``cu_seqlens``), over the new
  tokens themselves or, when a chunk continues a cached prefix, over a
  gathered copy of its context.

A FlashInfer backend would implement the same two methods.
``bench/bench_attention.py`` compares the candidates side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "autoglm"


@dataclass(slots=True)
class PrefillChunk:
    tok_start: int  # first index of this chunk in the packed batch
    tok_end: int  # one past the last
    slot: int  # block-table row
    start_pos: int  # tokens of this sequence already in the cache before this step


@dataclass(slots=True)
class StepAttention:
    """Everything attention needs for one step; built once, used by every layer."""

    slot_mapping: torch.Tensor  # [T] int64: flat cache row of every packed token
    num_decode: int  # the first num_decode packed tokens are one-token sequences
    decode_row_slots: torch.Tensor  # [num_decode] int64: block-table row of each
    decode_seq_lens: torch.Tensor  # [num_decode] int32: tokens each attends to (0: idle row)
    decode_max_len: int  # host: max of decode_seq_lens (portable path); 0 in CUDA graphs
    num_splits: int  # split-K factor of the Triton decode kernel
    prefills: list[PrefillChunk] = field(default_factory=list)
    cu_seqlens_q: torch.Tensor | None = None  # [P + 1] int32 over the prefill tokens
    cu_seqlens_k: torch.Tensor | None = None  # [P + 1] int32 over the contexts
    max_q: int = 0
    max_k: int = 0
    # Flat cache rows of every chunk's whole context (prefix + chunk), concatenated;
    # None when no chunk has a cached prefix (then the context is the chunk itself).
    ctx_index: torch.Tensor | None = None


class AttentionBackend(Protocol):
    name: str
    supports_cuda_graphs: bool

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        ctx: StepContext,
        scale: float,
    ) -> torch.Tensor:
        """``q`` ``[num_decode, H, d]`` -> ``[num_decode, H, d]`` over each row's blocks."""
        ...

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        ctx: StepContext,
        scale: float,
    ) -> torch.Tensor:
        """Causal attention of the prefill tokens ``[Tp, H, d]`` (K/V already written)."""
        ...


@dataclass(slots=True)
class StepContext:
    """The cache, the block tables, the backend and the current step."""

    k_cache: torch.Tensor  # [layers, tokens, kv_heads, d]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [slots, max_blocks] int32
    block_size: int
    backend: AttentionBackend
    step: StepAttention | None = None


_context: StepContext | None = None


def set_context(ctx: StepContext | None) -> None:
    """Install the runner's context (the cache etc.); the runner sets ``ctx.step`` per step."""
    global _context
    _context = ctx


def current_context() -> StepContext:
    if _context is None or _context.step is None:
        raise RuntimeError(
            "the autoglm attention implementation needs the runner's step context; "
            "call the model through ModelRunner"
        )
    return _context


@torch.library.custom_op("autoglm::paged_attention", mutates_args=())
def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float
) -> torch.Tensor:
    """``q`` ``[T, H, d]``, ``k``/``v`` ``[T, kv_heads, d]`` -> ``[T, H, d]``."""
    ctx = current_context()
    step = ctx.step
    assert step is not None
    k_cache = ctx.k_cache[layer]
    v_cache = ctx.v_cache[layer]
    k_cache.index_copy_(0, step.slot_mapping, k)
    v_cache.index_copy_(0, step.slot_mapping, v)
    nd = step.num_decode
    if not step.prefills:
        out = ctx.backend.decode(q, k_cache, v_cache, ctx, scale)
    elif not nd:
        out = ctx.backend.prefill(q, k, v, k_cache, v_cache, ctx, scale)
    else:
        pre = ctx.backend.prefill(q[nd:], k[nd:], v[nd:], k_cache, v_cache, ctx, scale)
        dec = ctx.backend.decode(q[:nd], k_cache, v_cache, ctx, scale)
        out = torch.cat([dec, pre], dim=0)
    return out.contiguous()


@paged_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous, like every real output


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
    """transformers' attention signature: ``query`` ``[1, H, T, d]``, ``key``/``value``
    ``[1, kv_heads, T, d]``; returns ``[1, T, H, d]``."""
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    scale = float(scaling) if scaling is not None else q.shape[-1] ** -0.5
    out = paged_attention(q, k, v, int(module.layer_idx), scale)  # type: ignore[arg-type]
    return out.unsqueeze(0), None


def register_attention() -> None:
    """Register ``"autoglm"`` with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, autoglm_attention)


# -- backends ------------------------------------------------------------------------------------


def _flat_rows(ctx: StepContext, slots: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Flat cache rows of positions ``pos`` of block-table rows ``slots`` (broadcast)."""
    bs = ctx.block_size
    blocks = ctx.block_tables[slots, pos // bs].to(torch.int64)
    return blocks * bs + pos % bs


class PortableBackend:
    """Plain torch: SDPA over gathered blocks. Any device; graphs not supported."""

    name = "portable"
    supports_cuda_graphs = False

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        ctx: StepContext,
        scale: float,
    ) -> torch.Tensor:
        step = ctx.step
        assert step is not None
        n, heads, d = q.shape
        kv_heads = k_cache.shape[1]
        length = max(step.decode_max_len, 1)
        pos = torch.arange(length, device=q.device)
        valid = pos[None, :] < step.decode_seq_lens[:, None].to(torch.int64)  # [n, L]
        rows = _flat_rows(ctx, step.decode_row_slots[:, None], pos[None, :])
        rows = torch.where(valid, rows, 0)
        k = k_cache[rows].transpose(1, 2)  # [n, kvh, L, d]
        v = v_cache[rows].transpose(1, 2)
        # A decode query is one token, so the heads of a group stand in for the
        # query-length axis: no K/V is repeated.
        qf = q.reshape(n, kv_heads, heads // kv_heads, d)
        out = F.scaled_dot_product_attention(
            qf, k, v, attn_mask=valid[:, None, None, :], scale=scale
        )
        return out.reshape(n, heads, d)

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        ctx: StepContext,
        scale: float,
    ) -> torch.Tensor:
        step = ctx.step
        assert step is not None
        heads, d = q.shape[1], q.shape[2]
        kv_heads = k.shape[1]
        group = heads // kv_heads
        base = step.num_decode
        pieces: list[torch.Tensor] = []
        for chunk in step.prefills:
            a, b = chunk.tok_start - base, chunk.tok_end - base
            n = b - a
            qc = q[a:b].transpose(0, 1)  # [H, n, d]
            if chunk.start_pos == 0:
                kc = k[a:b].transpose(0, 1)
                vc = v[a:b].transpose(0, 1)
                out = F.scaled_dot_product_attention(
                    qc[None], kc[None], vc[None], is_causal=True, scale=scale, enable_gqa=group > 1
                )[0]
                pieces.append(out.transpose(0, 1))
                continue
            end = chunk.start_pos + n
            pos = torch.arange(end, device=q.device)
            slot = torch.full_like(pos, chunk.slot)
            rows = _flat_rows(ctx, slot, pos)
            kc = k_cache[rows].transpose(0, 1)  # [kvh, end, d]
            vc = v_cache[rows].transpose(0, 1)
            q_pos = torch.arange(chunk.start_pos, end, device=q.device)
            mask = pos[None, :] <= q_pos[:, None]  # [n, end]
            if group > 1:
                mask = mask.repeat(group, 1)
            qf = qc.reshape(kv_heads, group * n, d)
            out = F.scaled_dot_product_attention(qf, kc, vc, attn_mask=mask, scale=scale)
            pieces.append(out.reshape(heads, n, d).transpose(0, 1))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


class TritonBackend:
    """CUDA: Triton paged decode, flash varlen prefill (float16/bfloat16)."""

    name = "triton"
    supports_cuda_graphs = True

    def __init__(self) -> None:
        from . import triton_attention

        self._kernels = triton_attention
        self._portable = PortableBackend()

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        ctx: StepContext,
        scale: float,
    ) -> torch.Tensor:
        step = ctx.step
        assert step is not None
        out: torch.Tensor = self._kernels.paged_decode(
            q,
            k_cache,
            v_cache,
            ctx.block_tables,
            step.decode_row_slots,
            step.decode_seq_lens,
            block_size=ctx.block_size,
            scale=scale,
            num_splits=step.num_splits,
        )
        return out

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        ctx: StepContext,
        scale: float,
    ) -> torch.Tensor:
        step = ctx.step
        assert step is not None
        if q.dtype not in (torch.float16, torch.bfloat16):
            return self._portable.prefill(q, k, v, k_cache, v_cache, ctx, scale)
        if step.ctx_index is not None:
            k = k_cache.index_select(0, step.ctx_index)
            v = v_cache.index_select(0, step.ctx_index)
        out = torch.ops.aten._flash_attention_forward(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            step.cu_seqlens_q,
            step.cu_seqlens_k,
            step.max_q,
            step.max_k,
            0.0,
            True,
            False,
            scale=scale,
        )[0]
        result: torch.Tensor = out
        return result


def make_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto``: Triton on CUDA, portable elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "portable"
    if name == "portable":
        return PortableBackend()
    if name == "triton":
        if device.type != "cuda":
            raise ValueError("attention_backend: triton needs a CUDA device")
        return TritonBackend()
    raise ValueError(f"attention_backend: must be auto, portable or triton, got {name!r}")
