#!/usr/bin/env python3
"""Where the time of a decode step goes, on the GPU and around it (engine, server).

One process, one model built on the device (random bf16 weights, ``bench_gpu.SHAPES``):

1. **ceilings**: a device-to-device copy (bytes read + written per second);
2. **runner**: warm-up (compile + CUDA graphs) by phase; the prefill of
   ``--prefill-batch`` x ``--prompt-len``; the decode step at each batch of
   ``--batches`` (sampling and the host sync included), and a ``torch.profiler``
   trace of a few such steps: GPU time by kernel category (GEMM, attention,
   Inductor's fused kernels, copies, other), the GPU's busy share of the step,
   the kernels per step and the HBM bandwidth they reach (weights + KV read);
3. **engine** (``LLMEngine`` in-process, the same runner): 64 x (512 + 128)
   all at once; per pure-decode step its period, the runner's host work and the
   wait for the sampled ids; run with Python's default GIL switch interval and
   with ``--switch-interval``;
4. **server** (``--concurrency``): the gRPC server in this process on the same
   engine (``ServerProcess`` with the engine handed in: no second load or
   warm-up), driven by a client in a separate process at each concurrency.

Prints a table and one JSON line (also written to ``--out``).

    python3 bench/bench_profile.py --shape glm9b --out DIR [--compile-scope layers]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu
import bench_runner
import bench_serving
import gpu_harness

_CATEGORIES = (
    ("attention", re.compile(r"paged_decode|flash|fmha|_combine", re.I)),
    ("gemm", re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas|splitk", re.I)),
    ("copy", re.compile(r"memcpy|memset", re.I)),
    ("fused (inductor)", re.compile(r"^triton_")),
)


def category(name: str) -> str:
    for cat, pattern in _CATEGORIES:
        if pattern.search(name):
            return cat
    return "other"


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    import torch
    import triton  # type: ignore[import-untyped]

    src = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return float(2 * (1 << 30) / (ms * 1e-3))


def decode(
    driver: Any, prompts: list[list[int]], last: list[int], start: int, steps: int, params: Any
) -> tuple[list[float], list[int]]:
    from autoglm_server.engine.scheduler import ScheduledSeq

    times = []
    for k in range(start, start + steps):
        seqs = [
            ScheduledSeq(str(i), i, [last[i]], len(p) + k, True, False, params)
            for i, p in enumerate(prompts)
        ]
        t0 = time.perf_counter()
        last = driver.step(seqs)
        times.append(time.perf_counter() - t0)
    return times, last


def analyse(prof: Any, steps: int, wall_s: float) -> dict[str, Any]:
    """GPU time per step by category, busy share, kernels per step, top kernels."""
    from torch.autograd import DeviceType

    spans: list[tuple[float, float, str]] = []
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            spans.append((e.time_range.start, e.time_range.end, e.name))
    if not spans:
        return {"kernels": 0}
    by_cat: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for a, b, name in spans:
        by_cat[category(name)] = by_cat.get(category(name), 0.0) + (b - a)
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += b - a
        entry[1] += 1
    spans.sort()
    busy = 0.0
    cur_a, cur_b = spans[0][0], spans[0][1]
    for a, b, _ in spans[1:]:
        if a > cur_b:
            busy += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    busy += cur_b - cur_a
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
    return {
        "step_wall_ms": wall_s * 1e3 / steps,
        "gpu_busy_ms": busy / 1e3 / steps,
        "kernel_ms_by_category": {k: v / 1e3 / steps for k, v in sorted(by_cat.items())},
        "kernels_per_step": len(spans) / steps,
        "top_kernels": [
            {"name": n[:90], "ms_per_step": t / 1e3 / steps, "calls_per_step": c / steps}
            for n, (t, c) in top
        ],
    }


def profile_steps(
    driver: Any, prompts: list[list[int]], last: list[int], start: int, steps: int, params: Any
) -> tuple[dict[str, Any], list[int]]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        _, last = decode(driver, prompts, last, start, steps, params)
        wall = time.perf_counter() - t0
    return analyse(prof, steps, wall), last


def runner_phase(args: argparse.Namespace, model: Any, out: dict[str, Any]) -> Any:
    import torch

    from autoglm_server.engine.api import SamplingParams
    from autoglm_server.engine.runner import ModelRunner

    batches = [int(b) for b in args.batches.split(",")]
    slots = max([*batches, args.prefill_batch, *args.levels, 64])
    t0 = time.perf_counter()
    runner = ModelRunner(
        model,
        num_slots=slots,
        max_model_len=args.max_len,
        device=torch.device(args.device),
        compile_scope=args.compile_scope,
        compile_cache_dir=args.compile_cache_dir,
        fuse=not args.no_fuse,
    )
    out["runner_init_s"] = time.perf_counter() - t0
    runner.warmup()
    out["warmup_s"] = runner.warmup_s
    out["warmup_phases"] = runner.warmup_phases
    out["fused"] = runner.fused
    out["num_kv_blocks"] = runner.num_blocks
    print(f"runner init {out['runner_init_s']:.1f}s, warm-up {runner.warmup_s:.1f}s "
          f"{runner.warmup_phases}", flush=True)  # fmt: skip
    if args.warmup_only:
        return runner

    rng = random.Random(0)
    params = SamplingParams(max_new_tokens=10**6, temperature=0.0, ignore_eos=True)

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(3, runner.vocab_size) for _ in range(args.prompt_len)] for _ in range(n)]  # fmt: skip

    driver = bench_runner.Driver(runner)
    bench_runner.prefill(driver, prompts(args.prefill_batch), 8192, params)
    prefill_s, _ = bench_runner.prefill(driver, prompts(args.prefill_batch), 8192, params)
    out["prefill_s"] = prefill_s
    print(f"prefill {args.prefill_batch}x{args.prompt_len}: {prefill_s:.3f}s", flush=True)

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_token_bytes = 2 * runner.num_layers * runner.num_kv_heads * runner.head_dim * 2
    out["weight_bytes"] = weight_bytes
    decode_out: dict[str, Any] = {}
    for b in batches:
        ps = prompts(b)
        _, firsts = bench_runner.prefill(driver, ps, 8192, params)
        times, last = decode(driver, ps, firsts, 0, args.decode_steps, params)
        times.sort()
        entry: dict[str, Any] = {"step_ms_median": times[len(times) // 2] * 1e3}
        prof, last = profile_steps(driver, ps, last, args.decode_steps, 8, params)
        entry["profile"] = prof
        if prof.get("gpu_busy_ms"):
            ctx = args.prompt_len + args.decode_steps
            moved = weight_bytes + b * ctx * kv_token_bytes
            entry["hbm_tb_per_s"] = moved / (prof["gpu_busy_ms"] * 1e-3) / 1e12
        decode_out[str(b)] = entry
        for i in range(b):
            driver.blocks.free(driver.tables.pop(i, []))
        print(f"decode batch {b}: {json.dumps(entry)}", flush=True)
    out["decode"] = decode_out
    return runner


async def engine_phase(args: argparse.Namespace, model: Any, runner: Any) -> dict[str, Any]:
    """64 x (prompt + new tokens) through LLMEngine; per-step host overhead."""
    engine = gpu_harness.make_engine(args.shape, args.device, model, runner, 64)
    await engine.start()
    # Per step: launch start, launch end, the wait in collect, rows, tokens. The engine
    # launches step N+1 before it collects step N (execute is launch then collect).
    log: list[list[float]] = []
    by_step: dict[int, list[float]] = {}
    orig_launch, orig_collect = runner.launch, runner.collect

    def timed_launch(sched: Any) -> Any:
        t0 = time.perf_counter()
        step = orig_launch(sched)
        row = [t0, time.perf_counter(), 0.0, len(sched.seqs), sched.num_tokens]
        log.append(row)
        by_step[id(step)] = row
        return step

    def timed_collect(step: Any) -> Any:
        t0 = time.perf_counter()
        result = orig_collect(step)
        row = by_step.pop(id(step), None)
        if row is not None:
            row[2] = time.perf_counter() - t0
        return result

    runner.launch, runner.collect = timed_launch, timed_collect
    rng = random.Random(1)
    vocab = bench_gpu.SHAPES[args.shape]["vocab_size"]
    results: dict[str, Any] = {}
    try:
        for label, interval in (("default", None), ("switch_interval", args.switch_interval)):
            old = sys.getswitchinterval()
            if interval:
                sys.setswitchinterval(interval)
            log.clear()
            prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(64)]
            res = await bench_gpu._run_batch(engine, prompts, args.max_new_tokens, label)
            sys.setswitchinterval(old)
            dec = [i for i in range(len(log) - 1) if log[i][3] == log[i][4] == 64]
            periods = sorted(log[i + 1][0] - log[i][0] for i in dec)
            execs = sorted(log[i][1] - log[i][0] + log[i][2] for i in dec)
            syncs = sorted(log[i][2] for i in dec)
            med = lambda xs: xs[len(xs) // 2] * 1e3 if xs else None  # noqa: E731
            res.update(
                switch_interval_s=interval or old,
                decode_steps=len(dec),
                step_period_ms=med(periods),
                execute_ms=med(execs),
                sync_wait_ms=med(syncs),
                outside_execute_ms=(med(periods) or 0) - (med(execs) or 0),
            )
            results[label] = res
            print(f"engine {label}: {json.dumps(res)}", flush=True)
        prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(64)]
        results["prefill_64"] = (await bench_gpu._run_batch(engine, prompts, 1, "p"))["duration_s"]
    finally:
        runner.launch, runner.collect = orig_launch, orig_collect
        await engine.shutdown(grace_s=1)
    return results


async def server_phase(args: argparse.Namespace, model: Any, runner: Any) -> dict[str, Any]:
    """The gRPC server in this process on the same runner; a client process per level."""
    engine = gpu_harness.make_engine(args.shape, args.device, model, runner, max(args.levels))
    sweep: dict[str, Any] = {}
    async with gpu_harness.grpc_server(engine) as target:
        for c in args.levels:
            sweep[str(c)] = await gpu_harness.run_client(
                __file__, target, "--level", str(c),
                "--requests", str(c * args.requests_per_slot), "--prompt-len", str(args.prompt_len),
                "--max-new-tokens", str(args.max_new_tokens),
            )  # fmt: skip
            print(f"server c={c}: {json.dumps(sweep[str(c)])}", flush=True)
    return sweep


def client_main(args: argparse.Namespace) -> int:
    from autoglm_server.loadgen import LoadSpec

    spec = LoadSpec(
        concurrency=args.level,
        requests=args.requests,
        prompt_len=args.prompt_len,
        max_new_tokens=args.max_new_tokens,
    )
    result = asyncio.run(bench_serving._measure(args.client, spec, warmup=min(args.level, 8)))
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(bench_gpu.SHAPES), default="glm9b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prefill-batch", type=int, default=64)
    parser.add_argument("--decode-steps", type=int, default=30)
    parser.add_argument("--compile-scope", default="decoder", choices=("decoder", "layers"))
    parser.add_argument("--compile-cache-dir", default=None)
    parser.add_argument("--no-fuse", action="store_true")
    parser.add_argument("--switch-interval", type=float, default=0.0005)
    parser.add_argument("--concurrency", default="1,8,64,256", help="'' skips the server phase")
    parser.add_argument("--requests-per-slot", type=int, default=2)
    parser.add_argument("--no-engine", action="store_true")
    parser.add_argument(
        "--warmup-only", action="store_true",
        help="build, warm up, stop (run twice on one --compile-cache-dir: cold, then warm)",
    )  # fmt: skip
    parser.add_argument("--out", default=str(bench_serving.ROOT / "bench" / "results"))
    # client mode (a separate process, so the load generator does not share our GIL)
    parser.add_argument("--client", default=None)
    parser.add_argument("--level", type=int, default=1)
    parser.add_argument("--requests", type=int, default=2)
    args = parser.parse_args(argv)
    if args.client:
        return client_main(args)
    args.levels = [int(c) for c in args.concurrency.split(",") if c]
    args.max_len = args.prompt_len + args.max_new_tokens + 64

    result: dict[str, Any] = {
        "benchmark": "bench_profile",
        "workload": f"{args.shape}-{args.prompt_len}-{args.max_new_tokens}",
        **gpu_harness.provenance(),
        "config": {k: v for k, v in vars(args).items() if k not in ("client",)},
    }
    if args.device == "cuda":
        result["copy_tb_per_s"] = copy_bandwidth() / 1e12
        print(f"copy bandwidth {result['copy_tb_per_s']:.2f} TB/s", flush=True)
    t0 = time.perf_counter()
    model = gpu_harness.build_model(args.shape, args.device)
    result["model_build_s"] = time.perf_counter() - t0
    runner_out: dict[str, Any] = {}
    result["runner"] = runner_out
    try:
        runner = runner_phase(args, model, runner_out)
        if args.warmup_only:
            return 0
        if not args.no_engine:
            result["engine"] = asyncio.run(engine_phase(args, model, runner))
        if args.levels:
            result["server"] = asyncio.run(server_phase(args, model, runner))
    finally:
        path = gpu_harness.result_path(args.out, "bench_profile", args.shape)
        print(gpu_harness.write_result(path, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
