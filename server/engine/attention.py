"""Attention over the slot KV cache, registered with transformers as ``"autoglm"``.

The runner packs every scheduled token of a step into ONE sequence and calls
the unmodified Hugging Face model on it; attention is the only place where
sequences must not see each other, and it is also where the KV cache lives.
:func:`autoglm_attention` is registered with transformers'
``AttentionInterface``; the step's :class:`AttentionMetadata` reaches it
through the model's ``**kwargs`` (under :data:`META_KWARG`), which transformers
forwards to every attention call. The function:

1. writes this step's K/V into the cache
   ``[layers, slots, kv_heads, max_model_len, head_dim]`` (by ``module.layer_idx``);
2. runs ONE batched SDPA for all single-token (decode) sequences over their
   slots, with a length mask, and one SDPA per multi-token prefill chunk
   (causal, against the chunk's cached prefix).

Grouped-query attention is handled by folding the query heads of a group into
the query-length axis (``[B, kv_heads, group, head_dim]``), so no K/V is ever
repeated or copied. Because ``"autoglm"`` has no mask function registered,
transformers skips causal-mask construction entirely (it returns ``None`` for
unknown implementations); the masks are built by the runner once per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

ATTN_IMPLEMENTATION = "autoglm"
META_KWARG = "autoglm_meta"
# cuDNN's SDPA builds (and caches) an execution plan per shape; decode shapes
# change every step, so it costs milliseconds of CPU per call. Flash and
# memory-efficient kernels need no plan.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(slots=True)
class PrefillChunk:
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
    prefills: list[PrefillChunk]
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
    meta: AttentionMetadata | None = kwargs.get(META_KWARG)
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
