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
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_tp

AGREEMENT_STEPS = 256


async def child_run(args: argparse.Namespace) -> dict[str, Any]:
    def describe(engine: Any) -> dict[str, Any]:
        return {"quantization": engine.model_info.quantization, **bench_tp.LOAD_STATS}

    method = "none" if args.method == "bf16" else args.method
    return await bench_tp.measure(args, describe, quantization=method)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench_tp.add_options(parser, shape="glm9b", agreement_steps=AGREEMENT_STEPS)
    parser.add_argument("--methods", default="bf16,fp8,int8,int4")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]

    if args.child_out:
        return bench_tp.run_child(args, child_run)

    methods = str(args.methods).split(",")
    common = bench_tp.child_argv(args)
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
    config = {
        "methods": methods,
        "concurrency": args.concurrency,
        "compile": args.compile,
        "agreement": {"prompts": bench_tp.AGREEMENT_PROMPTS, "steps": args.agreement_steps},
    }
    bench_tp.save_record(args, "bench_quant", config, results, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
