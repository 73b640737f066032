#!/usr/bin/env python3
"""Quantised weights: glm9b at fp8, int8 (and int4) against bf16 (issue 13's GPU run).

For each method, in its own child process on one GPU (a clean device):

- weight memory: ``torch.cuda.memory_allocated`` once the model is built and
  quantised (before the KV cache);
- the 512+128 workload (512 random prompt tokens, exactly 128 new) at
  concurrency 64 (output tok/s, prefill included) and 1 (TPOT p50);
- quality proxy: 8 prompts decoded greedily for 256 steps; the parent compares
  each method's tokens with bf16's: ``prefix_agreement`` is the mean share of
  the 256 steps before the first differing token, ``token_agreement`` the share
  of equal tokens position by position. The weights are random, so the logits
  are flat and greedy decoding is fragile: this is a lower bound on what real
  weights would give, reported as measured.

The parent writes one JSON line (device, commit, config, each method's results,
and the ratios against the issue's targets: fp8 >= 1.3 x bf16's throughput at
c=64; int4 about half of int8's weight memory) to ``--out``.

One device command (from the repository root; torchao travels as a wheel, see
bench/README.md):

    . bench/gpu_setup.sh && python3 bench/bench_quant.py --out bench/results

CPU dry run: ``python bench/bench_quant.py --shape tiny --device cpu``.
``--compile`` is on by default (torchao's int8/int4 kernels rely on it); each
method compiles cold, so a run of bf16, fp8 and int8 takes about as long as
three glm9b warm-ups. ``--methods`` picks a subset (bf16 is the reference for
the agreement and should come first).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_tp

AGREEMENT_PROMPTS = 8
AGREEMENT_STEPS = 256


async def child_run(args: argparse.Namespace) -> dict[str, Any]:

    from autoglm_server.engine.engine import LLMEngine

    method = "none" if args.method == "bf16" else args.method
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bench_tp.write_model_dir(args.shape, Path(tmp))
        cfg = bench_tp.engine_config(
            model_dir, args.device, quantization=method, compile=args.compile
        )
        engine = LLMEngine(cfg, loader=bench_tp.load_random)
        t0 = time.perf_counter()
        await engine.start()
        start_s = time.perf_counter() - t0
        try:
            result = await bench_tp.serve_workload(
                engine,
                prompt_len=args.prompt_len,
                new_tokens=args.new_tokens,
                concurrency=args.concurrency,
                c1_requests=args.c1_requests,
            )
            result["greedy_tokens"] = await bench_tp.greedy_tokens(
                engine, AGREEMENT_PROMPTS, args.prompt_len, args.agreement_steps
            )
            result["start_s"] = start_s
            result["quantization"] = engine.model_info.quantization
            result.update(bench_tp.LOAD_STATS)
        finally:
            await engine.shutdown(grace_s=1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="glm9b", choices=sorted(bench_tp.SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default="bf16,fp8,int8,int4")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--c1-requests", type=int, default=5)
    parser.add_argument("--agreement-steps", type=int, default=AGREEMENT_STEPS)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--child-timeout-s", type=float, default=280.0)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]

    if args.child_out:
        bench_tp.logging_setup()
        result = asyncio.run(child_run(args))
        Path(args.child_out).write_text(json.dumps(result))
        return 0

    methods = str(args.methods).split(",")
    common = [
        "--shape", args.shape, "--device", args.device, "--prompt-len", str(args.prompt_len),
        "--new-tokens", str(args.new_tokens), "--concurrency", ",".join(map(str, args.concurrency)),
        "--c1-requests", str(args.c1_requests), "--agreement-steps", str(args.agreement_steps),
        "--compile" if args.compile else "--no-compile",
    ]  # fmt: skip
    runs = bench_tp.run_children(args, __file__, [[*common, "--method", m] for m in methods])
    results = dict(zip(methods, runs, strict=True))
    ref = results.get("bf16", {}).get("greedy_tokens")
    summary: dict[str, Any] = {}
    top = f"c{max(args.concurrency)}"
    for method, result in results.items():
        tokens = result.pop("greedy_tokens", None)
        if method == "bf16" or "error" in result:
            continue
        if ref and tokens:
            result["vs_bf16"] = bench_tp.agreement(ref, tokens)
        base = results.get("bf16", {})
        if top in result and top in base:
            summary[f"{method}_throughput_{top}_vs_bf16"] = bench_tp.ratio(
                result[top]["output_tok_per_s"], base[top]["output_tok_per_s"]
            )
        if "weights_gib" in result and "weights_gib" in base:
            summary[f"{method}_weight_memory_vs_bf16"] = result["weights_gib"] / base["weights_gib"]
    if "weights_gib" in results.get("int4", {}) and "weights_gib" in results.get("int8", {}):
        summary["int4_weight_memory_vs_int8"] = (
            results["int4"]["weights_gib"] / results["int8"]["weights_gib"]
        )
    summary["targets"] = {
        "fp8_throughput_vs_bf16": ">= 1.3",
        "int4_weight_memory_vs_int8": "about 0.5",
    }
    record = {
        "bench": "bench_quant",
        "time": dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ"),
        "device": bench_tp.device_name(args.device),
        "commit": bench_tp.git_commit(),
        "workload": f"{args.shape}-{args.prompt_len}-{args.new_tokens}",
        "config": {
            "shape": bench_tp.SHAPES[args.shape],
            "methods": methods,
            "concurrency": args.concurrency,
            "compile": args.compile,
            "agreement": {"prompts": AGREEMENT_PROMPTS, "steps": args.agreement_steps},
        },
        "results": results,
        "summary": summary,
    }
    line = json.dumps(record)
    print(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_quant-{args.shape}-{record['time']}.json").write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
