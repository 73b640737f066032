"""Attention kernels side by side, one layer, on the GPU: which one the engine uses.

Decode (one query token per sequence, glm9b and llama8b head shapes, context
640 and 4096 tokens, batch 1, 64 and 256):

- ``triton_paged``: our Triton kernel over the paged cache (block tables, the
  engine's fast path);
- ``sdpa_padded_mask``: the previous engine's path: SDPA (memory-efficient
  kernel) over a per-slot cache padded to a power of two, with a bool mask;
- ``flash_varlen_contig``: PyTorch's flash kernel in varlen form over a
  contiguous position-major cache with ``seqused_k`` (no paging: an upper
  bound for what flash can do here);
- ``flash_varlen_gathered``: the same after gathering each sequence's blocks
  into a contiguous buffer (flash on a paged cache without a block-table
  argument, which PyTorch's flash does not take).

Prefill (64 x 512 new tokens, causal): flash varlen over the packed batch
against SDPA per sequence and SDPA on a padded batch.

Times are medians of ``triton.testing.do_bench``. Prints a table and one JSON
line, written to ``--out``.

    python3 bench/bench_attention.py --out DIR
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving

SHAPES = {"glm9b": (32, 2, 128), "llama8b": (32, 8, 128)}  # heads, kv heads, head dim


def decode_case(
    heads: int, kvh: int, d: int, batch: int, ctx: int, bs: int = 16
) -> dict[str, float]:
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    from autoglm_server.engine.triton_attention import num_splits_for, paged_decode

    dev = torch.device("cuda")
    dt_ = torch.bfloat16
    scale = 1 / math.sqrt(d)
    nb = -(-ctx // bs)
    total_blocks = batch * nb + 1
    k_cache = torch.randn(total_blocks * bs, kvh, d, device=dev, dtype=dt_)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(total_blocks - 1, device=dev) + 1
    table = perm[: batch * nb].view(batch, nb).to(torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    rows = torch.arange(batch, device=dev)
    q = torch.randn(batch, heads, d, device=dev, dtype=dt_)
    splits = num_splits_for(batch, kvh, torch.cuda.get_device_properties(dev).multi_processor_count)
    res: dict[str, float] = {}
    res["triton_paged"] = do_bench(
        lambda: paged_decode(
            q,
            k_cache,
            v_cache,
            table,
            rows,
            lens,
            block_size=bs,
            scale=scale,
            num_splits=splits,
        ),
        return_mode="median",
    )
    # Previous engine: slot cache [B, kvh, L_pad, d], bool mask, memory-efficient SDPA.
    pad = 256
    while pad < ctx:
        pad *= 2
    k_slot = torch.randn(batch, kvh, pad, d, device=dev, dtype=dt_)
    v_slot = torch.randn_like(k_slot)
    mask = (torch.arange(pad, device=dev)[None, :] < lens[:, None]).view(batch, 1, 1, pad)
    qf = q.view(batch, kvh, heads // kvh, d)
    res["sdpa_padded_mask"] = do_bench(
        lambda: F.scaled_dot_product_attention(qf, k_slot, v_slot, attn_mask=mask, scale=scale),
        return_mode="median",
    )
    # Flash varlen over a contiguous position-major cache [B * ctx, kvh, d].
    k_contig = torch.randn(batch * ctx, kvh, d, device=dev, dtype=dt_)
    v_contig = torch.randn_like(k_contig)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    cu_k = torch.arange(batch + 1, dtype=torch.int32, device=dev) * ctx

    def flash(k: Any, v: Any) -> Any:
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, 1, ctx, 0.0, False, False, scale=scale, seqused_k=lens
        )[0]

    res["flash_varlen_contig"] = do_bench(lambda: flash(k_contig, v_contig), return_mode="median")
    pos = torch.arange(ctx, device=dev)
    gather_rows = (table[:, pos // bs].long() * bs + pos % bs).reshape(-1)

    def gathered() -> Any:
        return flash(k_cache.index_select(0, gather_rows), v_cache.index_select(0, gather_rows))

    res["flash_varlen_gathered"] = do_bench(gathered, return_mode="median")
    # Check: our kernel against flash on the same gathered data.
    ours = paged_decode(
        q, k_cache, v_cache, table, rows, lens, block_size=bs, scale=scale, num_splits=splits
    )
    ref = gathered()
    res["triton_vs_flash_rel_err"] = float(
        ((ours.float() - ref.float()).norm() / ref.float().norm()).item()
    )
    res["kv_bytes_gb"] = 2 * batch * ctx * kvh * d * 2 / 1e9
    res["triton_paged_tb_s"] = res["kv_bytes_gb"] / res["triton_paged"]  # GB / ms = TB/s
    res["num_splits"] = splits
    return res


def prefill_case(heads: int, kvh: int, d: int, batch: int, n: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    dev = torch.device("cuda")
    dt_ = torch.bfloat16
    scale = 1 / math.sqrt(d)
    q = torch.randn(batch * n, heads, d, device=dev, dtype=dt_)
    k = torch.randn(batch * n, kvh, d, device=dev, dtype=dt_)
    v = torch.randn_like(k)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=dev) * n
    res: dict[str, float] = {}
    res["flash_varlen"] = do_bench(
        lambda: torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, n, n, 0.0, True, False, scale=scale
        )[0],
        return_mode="median",
    )

    def per_seq() -> None:
        for i in range(batch):
            s = slice(i * n, (i + 1) * n)
            F.scaled_dot_product_attention(
                q[s].transpose(0, 1)[None],
                k[s].transpose(0, 1)[None],
                v[s].transpose(0, 1)[None],
                is_causal=True,
                scale=scale,
                enable_gqa=True,
            )

    res["sdpa_per_sequence"] = do_bench(per_seq, return_mode="median")
    qb = q.view(batch, n, heads, d).transpose(1, 2)
    kb = k.view(batch, n, kvh, d).transpose(1, 2)
    vb = v.view(batch, n, kvh, d).transpose(1, 2)
    res["sdpa_padded_batch"] = do_bench(
        lambda: F.scaled_dot_product_attention(
            qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True
        ),
        return_mode="median",
    )
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(bench_serving.ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    import torch

    decode: dict[str, Any] = {}
    for shape, (heads, kvh, d) in SHAPES.items():
        for batch in (1, 64, 256):
            for ctx in (640, 4096):
                key = f"{shape}-b{batch}-ctx{ctx}"
                decode[key] = decode_case(heads, kvh, d, batch, ctx)
                r = decode[key]
                print(
                    f"decode {key:22s} triton {r['triton_paged'] * 1e3:7.1f} us"
                    f"  sdpa+mask {r['sdpa_padded_mask'] * 1e3:7.1f}"
                    f"  flash contig {r['flash_varlen_contig'] * 1e3:7.1f}"
                    f"  flash gathered {r['flash_varlen_gathered'] * 1e3:7.1f}"
                    f"  ({r['triton_paged_tb_s']:.2f} TB/s, err {r['triton_vs_flash_rel_err']:.1e})",
                    flush=True,
                )
    prefill = {
        f"{shape}-64x512": prefill_case(heads, kvh, d, 64, 512)
        for shape, (heads, kvh, d) in SHAPES.items()
    }
    for key, r in prefill.items():
        print(
            f"prefill {key}: flash varlen {r['flash_varlen']:.2f} ms, "
            f"sdpa per sequence {r['sdpa_per_sequence']:.2f} ms, "
            f"sdpa padded batch {r['sdpa_padded_batch']:.2f} ms"
        )
    result = {
        "benchmark": "bench_attention",
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": bench_serving._git(),
        "device": {
            **bench_serving._device(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
        "units": "ms per layer call (median)",
        "decode": decode,
        "prefill": prefill,
    }
    line = json.dumps(result)
    print(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"bench_attention-{stamp}.json").write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
