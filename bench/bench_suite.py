#!/usr/bin/env python3
"""The GPU benchmark set of the speed issue, in one process per model shape.

For one shape of ``bench_gpu.SHAPES`` (random bf16 weights built on the device,
a word-level tokenizer where ``w<id>`` is token ``id``), in this order:

1. **baselines** on the plain Hugging Face model, before the engine touches it:
   ``model.generate`` one request at a time, one static batch of 64, and
   transformers' continuous batching (``generate_batch``, paged sdpa, its CUDA
   graphs), all on 512-token prompts and ``--baseline-new-tokens`` outputs; our
   engine runs the same shape right after for the ratio;
2. **engine** (``LLMEngine`` in this process): 64 x (512 + 128) pipelined (the
   default) and not pipelined; the prefill of 64 x 512 (one output token each);
3. **prefix-256** (``--prefix``): 256 requests sharing a 1,024-token system
   prompt + 64 random tokens, 128 new tokens, all at once, prefix caching off
   then on (TTFT p50/p99, hit rate);
4. **server**: the gRPC server (``ServerProcess``, the production front end) in
   this process on the same engine, driven from a client process: closed-loop
   concurrency 1, 8, 64, 256 with distinct random 512-token prompts and exactly
   128 new tokens (``ignore_eos``);
5. **serve-1k** (``--serve``): prompts uniform in 128-2,048 tokens and outputs in
   64-512 from a fixed seed, all at once (``--serve-requests``) and as Poisson
   arrivals at ``--rates`` (``--poisson-requests`` each): throughput, TTFT and
   TPOT p50/p99 (client side);
6. **long context** (``--long-context``): an engine with ``max_model_len``
   131072 (the other engines freed first) serving one 32K-token prompt.

Every phase is written to ``--out`` as soon as it ends (one JSON file,
rewritten), so a run stopped by a time limit keeps what it measured.

    python3 bench/bench_suite.py --shape glm9b --out DIR --prefix --serve --long-context
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu
import bench_serving
import gpu_harness

SHORT = 512  # prompt tokens of the reference workloads
NEW = 128


def pct(values: list[float], q: float) -> float | None:
    from autoglm_server.loadgen import percentile

    return percentile(values, q)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# -- 1: baselines ---------------------------------------------------------------------------------


def baselines(args: argparse.Namespace, model: Any, vocab: int) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig

    rng = random.Random(5)
    dev = args.device
    n_new = args.baseline_new_tokens
    out: dict[str, Any] = {"prompt_len": SHORT, "new_tokens": n_new}

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(3, vocab) for _ in range(SHORT)] for _ in range(n)]

    gen = {"do_sample": False, "max_new_tokens": n_new, "min_new_tokens": n_new}
    with torch.inference_mode():
        # one at a time (the usual FastAPI pattern)
        ps = prompts(args.baseline_single)
        model.generate(torch.tensor([ps[0][:16]], device=dev), max_new_tokens=2)  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        for p in ps:
            model.generate(torch.tensor([p], device=dev), **gen)
        sync(dev)
        wall = time.perf_counter() - t0
        out["generate_one_at_a_time"] = {
            "requests": len(ps),
            "output_tok_per_s": len(ps) * n_new / wall,
            "ms_per_token": wall * 1e3 / (len(ps) * n_new),
        }
        print(f"baseline one at a time: {out['generate_one_at_a_time']}", flush=True)
        # one static batch of 64
        ids = torch.tensor(prompts(64), device=dev)
        sync(dev)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
        sync(dev)
        wall = time.perf_counter() - t0
        out["static_batch_64"] = {"requests": 64, "output_tok_per_s": 64 * n_new / wall}
        print(f"baseline static batch: {out['static_batch_64']}", flush=True)
    # transformers' continuous batching
    try:
        from transformers import ContinuousBatchingConfig

        cb = ContinuousBatchingConfig(use_cuda_graph=dev == "cuda")
        cfg = GenerationConfig(max_new_tokens=n_new, do_sample=False, eos_token_id=-1)
        ps = prompts(64)
        try:
            model.generate_batch(ps[:4], generation_config=cfg, continuous_batching_config=cb)
        except ValueError:  # its memory inference can fail (seen on CPU): size it ourselves
            cb = ContinuousBatchingConfig(
                use_cuda_graph=dev == "cuda", num_blocks=512, max_batch_tokens=8192
            )
            model.generate_batch(ps[:4], generation_config=cfg, continuous_batching_config=cb)
        sync(dev)
        t0 = time.perf_counter()
        res = model.generate_batch(ps, generation_config=cfg, continuous_batching_config=cb)
        sync(dev)
        wall = time.perf_counter() - t0
        tokens = sum(len(r.generated_tokens) for r in res.values())
        out["generate_batch_paged_sdpa"] = {
            "requests": 64,
            "output_tokens": tokens,
            "output_tok_per_s": tokens / wall,
            "config": f"paged|sdpa, {cb}",
        }
    except Exception as exc:  # report, do not lose the run
        out["generate_batch_paged_sdpa"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    print(f"baseline generate_batch: {out['generate_batch_paged_sdpa']}", flush=True)
    model.set_attn_implementation("sdpa")  # generate_batch may have switched it
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


# -- engines on one runner ------------------------------------------------------------------------


def make_engine(args: argparse.Namespace, model: Any, runner: Any, slots: int, **cfg: Any) -> Any:
    return gpu_harness.make_engine(args.shape, args.device, model, runner, slots, **cfg)


async def run_batch(engine: Any, prompts: list[list[int]], new: int, tag: str) -> dict[str, Any]:
    """All at once through the engine: output tok/s, TTFT and TPOT p50/p99."""
    from autoglm_server.engine.api import GenerationRequest, SamplingParams

    params = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> tuple[int, float | None, float | None]:
        req = GenerationRequest(request_id=f"{tag}{i}", prompt_token_ids=prompt, params=params)
        start = time.perf_counter()
        first = last = None
        n = 0
        async for delta in engine.generate(req):
            if delta.token_ids:
                last = time.perf_counter()
                first = first or last
                n += len(delta.token_ids)
        tpot = (last - first) / (n - 1) if first and last and n > 1 else None
        return n, (first - start) if first else None, tpot

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - start
    tokens = sum(n for n, _, _ in results)
    ttft = [t for _, t, _ in results if t is not None]
    tpot = [t for _, _, t in results if t is not None]
    return {
        "requests": len(prompts),
        "output_tokens": tokens,
        "duration_s": wall,
        "output_tok_per_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_s": pct(tpot, 50),
        "tpot_p99_s": pct(tpot, 99),
    }


def rand_prompts(rng: random.Random, vocab: int, n: int, length: int) -> list[list[int]]:
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


class _TimedGraph:
    """A captured graph whose replay records its host call time and its GPU time."""

    def __init__(self, graph: Any, timeline: Timeline) -> None:
        self.graph = graph
        self.timeline = timeline

    def replay(self) -> None:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        self.graph.replay()
        end.record()
        row = self.timeline.current
        row["replay_call_ms"] = (time.perf_counter() - t0) * 1e3
        row["events"] = (start, end)


class Timeline:
    """Per step of the engine: the runner's host time in launch (and in the graph's
    replay call), the wait in collect, the graph's GPU time, the launch-to-launch
    period; and the process's CPU time (all threads) over the run."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.rows: list[dict[str, Any]] = []
        self.current: dict[str, Any] = {}
        self._by_step: dict[int, dict[str, Any]] = {}
        self._launch, self._collect = runner.launch, runner.collect
        self._graphs = {rows: g.graph for rows, g in runner.graphs.graphs.items()}

    def __enter__(self) -> Timeline:
        import resource

        for g in self.runner.graphs.graphs.values():
            g.graph = _TimedGraph(g.graph, self)
        self.runner.launch, self.runner.collect = self.launch, self.collect
        self._ru = resource.getrusage(resource.RUSAGE_SELF)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.wall_s = time.perf_counter() - self._t0
        self.cpu_s = ru.ru_utime + ru.ru_stime - self._ru.ru_utime - self._ru.ru_stime
        for rows, g in self.runner.graphs.graphs.items():
            g.graph = self._graphs[rows]
        self.runner.launch, self.runner.collect = self._launch, self._collect

    def launch(self, sched: Any) -> Any:
        self.current = {
            "rows": len(sched.seqs),
            "decode": all(len(q.token_ids) == 1 for q in sched.seqs),
            "t": time.perf_counter(),
        }
        step = self._launch(sched)
        self.current["launch_ms"] = (time.perf_counter() - self.current["t"]) * 1e3
        self.rows.append(self.current)
        self._by_step[id(step)] = self.current
        return step

    def collect(self, step: Any) -> Any:
        t0 = time.perf_counter()
        out = self._collect(step)
        row = self._by_step.pop(id(step), None)
        if row is not None:
            row["collect_ms"] = (time.perf_counter() - t0) * 1e3
        return out

    def summary(self, rows: int) -> dict[str, Any]:
        dec = [r for r in self.rows if r["decode"] and r["rows"] == rows and "events" in r]
        for r in dec:
            start, end = r.pop("events")
            r["gpu_graph_ms"] = start.elapsed_time(end)
        periods = [b["t"] - a["t"] for a, b in zip(self.rows, self.rows[1:], strict=False)
                   if a in dec and b["decode"]]  # fmt: skip

        def med(key: str) -> float | None:
            return pct([r[key] for r in dec if key in r], 50)

        return {
            "decode_steps": len(dec),
            "period_ms": pct(periods, 50) * 1e3 if periods else None,
            "launch_ms": med("launch_ms"),
            "replay_call_ms": med("replay_call_ms"),
            "gpu_graph_ms": med("gpu_graph_ms"),
            "collect_wait_ms": med("collect_ms"),
            "process_cpu_s_per_wall_s": self.cpu_s / self.wall_s,
            "other_steps": len(self.rows) - len(dec),
            "other_launch_ms": pct([r["launch_ms"] for r in self.rows if r not in dec], 50),
            "other_collect_ms": pct(
                [r["collect_ms"] for r in self.rows if r not in dec and "collect_ms" in r], 50
            ),
        }


async def engine_phase(args: argparse.Namespace, model: Any, runner: Any) -> dict[str, Any]:
    vocab = bench_gpu.SHAPES[args.shape]["vocab_size"]
    rng = random.Random(1)
    out: dict[str, Any] = {}
    for label, pipeline in (("pipelined", True), ("not_pipelined", False)):
        engine = make_engine(args, model, runner, 64, pipeline=pipeline)
        await engine.start()
        try:
            # A full-size warm-up: the first large prefill of a process pays one-time
            # costs that would otherwise land on whichever mode is measured first.
            await run_batch(engine, rand_prompts(rng, vocab, 64, SHORT), 8, "w")
            prompts = rand_prompts(rng, vocab, 64, SHORT)
            if args.device == "cuda" and runner.graphs.graphs:
                with Timeline(runner) as timeline:
                    out[label] = await run_batch(engine, prompts, NEW, "m")
                out[label]["timeline"] = timeline.summary(64)
            else:
                out[label] = await run_batch(engine, prompts, NEW, "m")
            print(f"engine {label}: {json.dumps(out[label])}", flush=True)
            if pipeline:
                p = await run_batch(engine, rand_prompts(rng, vocab, 64, SHORT), 1, "p")
                out["prefill_64x512_s"] = p["duration_s"]
                b = await run_batch(
                    engine, rand_prompts(rng, vocab, 64, SHORT), args.baseline_new_tokens, "b"
                )
                out[f"same_as_baselines_64x{args.baseline_new_tokens}"] = b
                print(f"engine prefill {p['duration_s']:.3f}s; baseline shape {b}", flush=True)
        finally:
            await engine.shutdown(grace_s=1)
    return out


async def prefix_phase(args: argparse.Namespace, model: Any, runner: Any) -> dict[str, Any]:
    vocab = bench_gpu.SHAPES[args.shape]["vocab_size"]
    rng = random.Random(2)
    engine = make_engine(args, model, runner, 256)
    await engine.start()
    out: dict[str, Any] = {}
    try:
        system = rand_prompts(rng, vocab, 1, 1024)[0]
        blocks = engine._scheduler.blocks
        for mode in ("off", "on"):
            blocks.reset_prefix_cache()
            blocks.prefix_caching = mode == "on"
            before = (blocks.stats.queried_tokens, blocks.stats.hit_tokens)
            prompts = [system + p for p in rand_prompts(rng, vocab, 256, 64)]
            res = await run_batch(engine, prompts, NEW, f"x{mode}")
            queried = blocks.stats.queried_tokens - before[0]
            res["hit_rate"] = (blocks.stats.hit_tokens - before[1]) / max(1, queried)
            out[mode] = res
            print(f"prefix-256 caching {mode}: {json.dumps(res)}", flush=True)
        out["preemptions"] = engine._scheduler.num_preemptions
    finally:
        await engine.shutdown(grace_s=1)
    return out


# -- the gRPC server and its clients --------------------------------------------------------------


async def server_phase(
    args: argparse.Namespace,
    model: Any,
    runner: Any,
    result: dict[str, Any],
    save: Any,
    *,
    pipeline: bool = True,
) -> None:
    engine = make_engine(args, model, runner, 256, pipeline=pipeline)
    vocab = str(bench_gpu.SHAPES[args.shape]["vocab_size"])
    async with gpu_harness.grpc_server(engine) as target:
        sweep: dict[str, Any] = {}
        result["server_sweep" if pipeline else "server_sweep_not_pipelined"] = sweep
        for c in args.levels:
            n = max(4, c * args.requests_per_slot)
            sweep[str(c)] = await gpu_harness.run_client(
                __file__, target, "closed", str(c), str(n), vocab
            )
            print(f"server c={c}: {json.dumps(sweep[str(c)])}", flush=True)
            save()
        if args.serve:
            serve: dict[str, Any] = {}
            result["serve_1k"] = serve
            serve["all_at_once"] = await gpu_harness.run_client(
                __file__, target, "open", "0", str(args.serve_requests), vocab
            )
            print(f"serve-1k all at once: {json.dumps(serve['all_at_once'])}", flush=True)
            save()
            for rate in args.rates:
                serve[f"poisson_{rate:g}"] = await gpu_harness.run_client(
                    __file__, target, "open", str(rate), str(args.poisson_requests), vocab
                )
                print(f"serve-1k poisson {rate}: {json.dumps(serve[f'poisson_{rate:g}'])}", flush=True)  # fmt: skip
                save()
        result["server_preemptions"] = engine._scheduler.num_preemptions


async def client_main(argv: list[str]) -> dict[str, Any]:
    """``closed C N VOCAB``: N requests of 512+128, C at a time; ``open RATE N VOCAB``:
    serve-1k shapes, Poisson arrivals at RATE per second (0: all at once)."""
    from autoglm_server.client import AsyncAutoGLMClient
    from autoglm_server.loadgen import LoadSpec, _one

    target, mode, level, n_s, vocab_s = argv
    n, vocab = int(n_s), int(vocab_s)
    rng = random.Random(11 if mode == "closed" else 1000)

    def text(length: int) -> str:
        return " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(length))

    if mode == "closed":
        jobs = [(text(SHORT), NEW) for _ in range(n)]
    else:  # serve-1k: lengths first (the same for every rate), then the texts
        shapes = [(rng.randint(128, 2048), rng.randint(64, 512)) for _ in range(n)]
        jobs = [(text(p), o) for p, o in shapes]
    samples: list[Any] = []
    async with AsyncAutoGLMClient(target) as cl:
        await _one(cl, text(8), LoadSpec(max_new_tokens=4))  # connect
        t0 = time.perf_counter()
        if mode == "closed":
            queue = list(jobs)

            async def worker() -> None:
                while queue:
                    prompt, new = queue.pop()
                    samples.append(await _one(cl, prompt, LoadSpec(max_new_tokens=new, timeout_s=900)))  # fmt: skip

            await asyncio.gather(*(worker() for _ in range(min(int(level), n))))
        else:
            rate = float(level)
            arrivals = random.Random(7)

            async def fire(delay: float, prompt: str, new: int) -> None:
                await asyncio.sleep(delay)
                samples.append(await _one(cl, prompt, LoadSpec(max_new_tokens=new, timeout_s=900)))

            at = 0.0
            tasks = []
            for prompt, new in jobs:
                tasks.append(fire(at, prompt, new))
                if rate > 0:
                    at += arrivals.expovariate(rate)
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ok = [s for s in samples if s.ok]
    tokens = sum(s.output_tokens for s in ok)
    ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
    tpot = [s.tpot_s for s in ok if s.tpot_s is not None]
    errors: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            errors[s.code] = errors.get(s.code, 0) + 1
    return {
        "mode": mode,
        "level": float(level),
        "requests": n,
        "requests_ok": len(ok),
        "errors": errors,
        "duration_s": wall,
        "output_tokens": tokens,
        "output_tok_per_s": tokens / wall,
        "requests_per_s": len(ok) / wall,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_s": pct(tpot, 50),
        "tpot_p99_s": pct(tpot, 99),
    }


async def long_context(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    import torch

    from autoglm_server.engine.runner import ModelRunner

    t0 = time.perf_counter()
    runner = ModelRunner(
        model, num_slots=8, max_model_len=131072, device=torch.device(args.device),
        compile_cache_dir=args.compile_cache_dir,
    )  # fmt: skip
    runner.warmup()
    engine = make_engine(args, model, runner, 8)
    await engine.start()
    start_s = time.perf_counter() - t0
    vocab = bench_gpu.SHAPES[args.shape]["vocab_size"]
    try:
        prompt = rand_prompts(random.Random(3), vocab, 1, args.long_prompt)[0]
        res = await run_batch(engine, [prompt], 16, "long")
    finally:
        await engine.shutdown(grace_s=1)
    return {
        "max_model_len": 131072,
        "prompt_len": args.long_prompt,
        "start_s": start_s,
        "kv_cache_tokens": (runner.num_blocks - 1) * runner.block_size,
        **res,
    }


def top_p_microbench(device: str, vocab: int) -> dict[str, Any]:
    """Top-p at batch 64 over the vocabulary: the sampler's (no sort) vs a full sort."""
    import torch

    from autoglm_server.engine.sampling import Sampler

    if device != "cuda":
        return {}
    import triton  # type: ignore[import-untyped]

    s = Sampler(64, vocab, torch.device(device))
    slots = torch.arange(64, device=device)
    s._top_p[slots] = 0.9
    logits = torch.randn(64, vocab, device=device) * 3

    def sort_based() -> torch.Tensor:
        sl, order = logits.sort(dim=-1, descending=True)
        probs = sl.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= 0.9
        return torch.empty_like(logits).scatter_(1, order, sl.masked_fill(drop, float("-inf")))

    ours = triton.testing.do_bench(lambda: s._apply_top_p(logits, slots), return_mode="median")
    ref = triton.testing.do_bench(sort_based, return_mode="median")
    return {"batch": 64, "vocab": vocab, "sampler_ms": ours, "full_sort_ms": ref}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--client":
        print(json.dumps(asyncio.run(client_main(argv[1:]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(bench_gpu.SHAPES), default="glm9b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(bench_serving.ROOT / "bench" / "results"))
    parser.add_argument("--compile-cache-dir", default=None)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--baseline-new-tokens", type=int, default=64)
    parser.add_argument("--baseline-single", type=int, default=2)
    parser.add_argument("--concurrency", default="1,8,64,256")
    parser.add_argument("--requests-per-slot", type=int, default=2)
    parser.add_argument("--sync-debug", action="store_true", help="warn on host syncs (engine)")
    parser.add_argument(
        "--compare-not-pipelined", default="", help="levels to run again, engine not pipelined"
    )
    parser.add_argument("--prefix", action="store_true", help="prefix-256, caching off and on")
    parser.add_argument("--serve", action="store_true", help="serve-1k")
    parser.add_argument("--serve-requests", type=int, default=1000)
    parser.add_argument("--poisson-requests", type=int, default=1000)
    parser.add_argument("--rates", default="4,8,16")
    parser.add_argument("--long-context", action="store_true")
    parser.add_argument("--long-prompt", type=int, default=32768)
    parser.add_argument(
        "--long-only", action="store_true", help="only the long-context check (a fresh process)"
    )
    parser.add_argument("--max-model-len", type=int, default=2048 + 512 + 64)
    args = parser.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",") if c]
    args.rates = [float(r) for r in args.rates.split(",") if r]

    import torch

    from autoglm_server.engine.runner import ModelRunner

    path = gpu_harness.result_path(args.out, "bench_suite", args.shape)
    result: dict[str, Any] = {
        "benchmark": "bench_suite",
        "shape": args.shape,
        "model": bench_gpu.SHAPES[args.shape],
        **gpu_harness.provenance(),
        "config": {k: v for k, v in vars(args).items()},
    }

    def save() -> None:
        gpu_harness.write_result(path, result)

    t0 = time.perf_counter()
    model = gpu_harness.build_model(args.shape, args.device)
    result["model_build_s"] = time.perf_counter() - t0
    vocab = bench_gpu.SHAPES[args.shape]["vocab_size"]
    if args.long_only:
        result["long_context"] = asyncio.run(long_context(args, model))
        save()
        print(json.dumps(result))
        return 0
    if not args.no_baselines:
        result["baselines"] = baselines(args, model, vocab)
        save()
    result["top_p"] = top_p_microbench(args.device, vocab)
    t0 = time.perf_counter()
    runner = ModelRunner(
        model, num_slots=max(256, *args.levels), max_model_len=args.max_model_len,
        device=torch.device(args.device), compile_cache_dir=args.compile_cache_dir,
    )  # fmt: skip
    runner.warmup()
    result["runner"] = {
        "init_and_warmup_s": time.perf_counter() - t0,
        "warmup_s": runner.warmup_s,
        "warmup_phases": runner.warmup_phases,
        "num_kv_blocks": runner.num_blocks,
        "fused": runner.fused,
        "compiled": runner.compiled,
    }
    print(f"runner: {result['runner']}", flush=True)
    save()
    if args.sync_debug:
        # Any op that waits for the device outside collect() shows up in stderr.
        torch.cuda.set_sync_debug_mode("warn")
    result["engine"] = asyncio.run(engine_phase(args, model, runner))
    if args.sync_debug:
        torch.cuda.set_sync_debug_mode("default")
    save()
    if args.prefix:
        result["prefix_256"] = asyncio.run(prefix_phase(args, model, runner))
        save()
    if args.levels or args.serve:
        asyncio.run(server_phase(args, model, runner, result, save))
        save()
    if args.compare_not_pipelined:
        args.levels = [int(c) for c in args.compare_not_pipelined.split(",")]
        args.serve = False
        asyncio.run(server_phase(args, model, runner, result, save, pipeline=False))
        save()
    if args.long_context:
        del runner
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        try:
            result["long_context"] = asyncio.run(long_context(args, model))
        except Exception as exc:
            result["long_context"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"long context: {json.dumps(result['long_context'])}", flush=True)
    eng = result["engine"]["pipelined"]["output_tok_per_s"]
    c64 = result.get("server_sweep", {}).get("64", {}).get("output_tok_per_s")
    result["server_over_engine"] = c64 / eng if c64 else None
    save()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
