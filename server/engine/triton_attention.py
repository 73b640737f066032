"""Paged decode attention in Triton: each sequence reads only its own blocks.

One program per (row, kv head, split). A program loads the ``group`` query
heads that share its kv head (padded to 16 rows so that ``tl.dot`` runs on the
tensor cores), walks its share of the sequence's tokens in tiles of ``TILE``,
looking every token's flat cache row up in the block table, and keeps an
online softmax. Long contexts are split over several programs (flash-decoding)
whose partial results a second kernel merges by their log-sum-exp; the split
count is fixed per launch (so CUDA graphs can capture it) while the split
length follows each sequence's real length, read on the device. No padding to
a bucket length, no mask tensor, and no host sync.

Importing this module needs Triton; the runner imports it only on CUDA.
"""

from __future__ import annotations

from typing import Any

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

TILE = 64


@triton.jit  # type: ignore[untyped-decorator]
def _paged_decode_kernel(  # type: ignore[no-untyped-def]
    Q,
    K,
    V,
    BT,
    ROW_SLOT,
    SEQ_LENS,
    O_PART,
    LSE_PART,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_os,
    stride_lt,
    stride_lh,
    scale,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    IEEE: tl.constexpr,
):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + row)
    slot = tl.load(ROW_SLOT + row)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), TILE) * TILE
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D)
    gmask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(
        Q + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=gmask[:, None],
        other=0.0,
    )
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)
    for t0 in tl.range(start, end, TILE):
        offs_t = t0 + tl.arange(0, TILE)
        tmask = offs_t < end
        blk = tl.load(BT + slot * stride_bt + offs_t // BLOCK_SIZE, mask=tmask, other=0)
        rows = blk.to(tl.int64) * BLOCK_SIZE + offs_t % BLOCK_SIZE
        kv_off = rows[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
        k = tl.load(K + kv_off, mask=tmask[:, None], other=0.0)
        if IEEE:  # noqa: SIM108 (constexpr branches must be statements)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off, mask=tmask[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(
        O_PART + row * stride_ot + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
        out,
        mask=gmask[:, None],
    )
    tl.store(LSE_PART + row * stride_lt + heads * stride_lh + split, lse, mask=gmask)


@triton.jit  # type: ignore[untyped-decorator]
def _merge_kernel(  # type: ignore[no-untyped-def]
    O_PART,
    LSE_PART,
    OUT,
    stride_ot,
    stride_oh,
    stride_os,
    stride_lt,
    stride_lh,
    stride_outt,
    stride_outh,
    D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, D)
    lse = tl.load(LSE_PART + row * stride_lt + head * stride_lh + offs_s)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)  # exp(-inf) = 0 for empty splits
    o = tl.load(
        O_PART + row * stride_ot + head * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :]
    )
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(OUT + row * stride_outt + head * stride_outh + offs_d, out.to(OUT.dtype.element_ty))


def num_splits_for(rows: int, kv_heads: int, num_sms: int) -> int:
    """Splits per sequence so that a launch has about two programs per SM (power of 2, <= 64)."""
    splits = 1
    while rows * kv_heads * splits < 2 * num_sms and splits < 64:
        splits *= 2
    return splits


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    row_slots: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    block_size: int,
    scale: float,
    num_splits: int,
) -> torch.Tensor:
    """Attention of one query token per row over its paged context.

    ``q``: ``[rows, heads, d]``; ``k_cache``/``v_cache``: ``[tokens, kv_heads, d]``
    (one layer); ``block_tables``: ``[slots, max_blocks]`` int32; ``row_slots``:
    ``[rows]`` the slot (block-table row) of each row; ``seq_lens``: ``[rows]``
    int32 tokens to attend to (0: an idle row, its output is zeros).
    """
    rows, heads, d = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    if q.stride(-1) != 1:  # the kernel takes any row/head strides (a copy per layer otherwise)
        q = q.contiguous()
    o_part = torch.empty(rows, heads, num_splits, d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(rows, heads, num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(rows, heads, d, dtype=q.dtype, device=q.device)
    grid: Any = (rows, kv_heads, num_splits)
    _paged_decode_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        row_slots,
        seq_lens,
        o_part,
        lse_part,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        block_tables.stride(0),
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2),
        lse_part.stride(0),
        lse_part.stride(1),
        scale,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        D=d,
        BLOCK_SIZE=block_size,
        TILE=TILE,
        NUM_SPLITS=num_splits,
        IEEE=q.dtype == torch.float32,
        num_warps=4,
    )
    _merge_kernel[(rows, heads)](
        o_part,
        lse_part,
        out,
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2),
        lse_part.stride(0),
        lse_part.stride(1),
        out.stride(0),
        out.stride(1),
        D=d,
        NUM_SPLITS=num_splits,
        num_warps=4,
    )
    return out
