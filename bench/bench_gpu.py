#!/usr/bin/env python3
"""GPU benchmark for the performance.md workloads ("glm9b-512-128", "llama8b-512-128").

One run, on one CUDA device:

1. builds the model from its config directly on the GPU (random bf16 weights,
   the same speed as real ones) with a word-level tokenizer covering the whole
   vocabulary, and saves it to a scratch directory so the server loads it
   through the real loader;
2. **engine**: the engine alone (``LLMEngine`` in this process, no gRPC):
   64 requests of 512 random prompt tokens and exactly 128 new tokens; its
   start-up is the *cold* warm-up (empty ``--compile-cache-dir``); then
   ``prefill``: 64 x 512-token prompts with one output token each (the
   prefill of 64 x 512 tokens, scheduling included); and with
   ``--prefix-workload`` the shared-prefix workload "prefix-256" (256
   requests sharing a 1,024-token system prompt + 64 random tokens, 128 new
   tokens, all at once) with prefix caching off, then on (the same engine,
   its block manager switched between runs);
3. **server**: ``autoglm-server`` as a process (the *warm* start: same compile
   cache), driven over gRPC streaming at concurrency 1, 8, 64 and 256 with the
   same prompt and output lengths (``bench_serving``'s load generator);
4. with ``--long-context``: an engine with ``max_model_len`` 131072 serving
   one 32K-token prompt (does it start, and how long the prompt takes);
5. prints one JSON line and writes it to ``--out`` with the device, commit,
   workload and configuration; ``server_over_engine`` is the fraction of the
   engine's own throughput the gRPC server delivers at concurrency 64.

Needs torch with CUDA, transformers, grpcio, pydantic and prometheus-client;
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving

SHAPES: dict[str, dict[str, Any]] = {
    # for checking this script on a CPU before spending GPU time
    "tiny": {
        "arch": "Glm4ForCausalLM",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "vocab_size": 1000,
    },
    "glm9b": {
        "arch": "Glm4ForCausalLM",
        "hidden_size": 4096,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "intermediate_size": 13696,
        "vocab_size": 151552,
    },
    "llama8b": {
        "arch": "LlamaForCausalLM",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "vocab_size": 128256,
    },
}


def build_model(shape: str, out: Path, device: str) -> Path:
    """Random bf16 weights built on the GPU, saved with a full-vocabulary tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Glm4Config, LlamaConfig

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    config_cls = Glm4Config if arch == "Glm4ForCausalLM" else LlamaConfig
    config = config_cls(
        **spec, max_position_embeddings=131072, eos_token_id=1, pad_token_id=0, bos_token_id=None
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    make_tokenizer(spec["vocab_size"]).save_pretrained(out)
    return out


def make_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer covering the whole vocabulary ("w<id>" per token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _engine_config(model: Path, device: str, max_len: int, slots: int, cache: str) -> Any:
    from autoglm_server.engine.config import BatchingConfig, EngineConfig

    return EngineConfig(
        model=str(model),
        dtype="bfloat16",
        device=device,
        max_model_len=max_len,
        batching=BatchingConfig(max_batch_size=slots, max_batch_tokens=8192, max_queue_length=4096),
        compile_cache_dir=cache,
    )


async def _run_batch(
    engine: Any, prompts: list[list[int]], new_tokens: int, tag: str
) -> dict[str, Any]:
    """All prompts at once; output tok/s, TTFT p50/p99, wall time."""
    from autoglm_server.engine.api import GenerationRequest, SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> tuple[int, float | None]:
        req = GenerationRequest(request_id=f"{tag}{i}", prompt_token_ids=prompt, params=params)
        start = time.perf_counter()
        first: float | None = None
        n = 0
        async for delta in engine.generate(req):
            if delta.token_ids and first is None:
                first = time.perf_counter() - start
            n += len(delta.token_ids)
        return n, first

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    elapsed = time.perf_counter() - start
    tokens = sum(n for n, _ in results)
    ttfts = sorted(t for _, t in results if t is not None)
    return {
        "requests": len(prompts),
        "output_tokens": tokens,
        "duration_s": elapsed,
        "output_tok_per_s": tokens / elapsed,
        "ttft_p50_s": ttfts[len(ttfts) // 2],
        "ttft_p99_s": ttfts[min(len(ttfts) - 1, (len(ttfts) * 99) // 100)],
    }


async def engine_throughput(
    model: Path,
    device: str,
    requests: int,
    prompt_len: int,
    new_tokens: int,
    *,
    slots: int,
    cache: str,
    prefix_workload: bool,
) -> dict[str, Any]:
    from autoglm_server.engine.engine import build_engine

    max_len = max(prompt_len, 1024 + 64) + new_tokens + 64
    engine = build_engine(_engine_config(model, device, max_len, slots, cache))
    t0 = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - t0
    rng = random.Random(0)
    vocab = engine.model_info.vocab_size

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    out: dict[str, Any] = {"start_s": start_s, "warmup_s": engine._runner.warmup_s}
    try:
        await _run_batch(engine, [prompt(prompt_len) for _ in range(8)], 8, "w")  # warm-up
        out.update(
            await _run_batch(engine, [prompt(prompt_len) for _ in range(requests)], new_tokens, "b")
        )
        prefill = await _run_batch(engine, [prompt(prompt_len) for _ in range(64)], 1, "p")
        out["prefill_64x512_s"] = prefill["duration_s"]
        if prefix_workload:
            system = prompt(1024)
            blocks = engine._scheduler.blocks
            for mode in ("off", "on"):
                blocks.reset_prefix_cache()
                blocks.prefix_caching = mode == "on"
                before = (blocks.stats.queried_tokens, blocks.stats.hit_tokens)
                prompts = [system + prompt(64) for _ in range(256)]
                result = await _run_batch(engine, prompts, new_tokens, f"x{mode}")
                queried = blocks.stats.queried_tokens - before[0]
                result["hit_rate"] = (blocks.stats.hit_tokens - before[1]) / max(1, queried)
                out[f"prefix_256_{mode}"] = result
            blocks.prefix_caching = True
        out["preemptions"] = engine._scheduler.num_preemptions
        out["num_kv_blocks"] = engine._runner.num_blocks
    finally:
        await engine.shutdown(grace_s=1)
    return out


async def long_context(model: Path, device: str, cache: str, prompt_len: int) -> dict[str, Any]:
    """GLM-4-9B shape with max_model_len 131072: starts on one GPU, serves a 32K prompt."""
    from autoglm_server.engine.engine import build_engine

    engine = build_engine(_engine_config(model, device, 131072, 64, cache))
    t0 = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - t0
    rng = random.Random(1)
    vocab = engine.model_info.vocab_size
    try:
        result = await _run_batch(
            engine, [[rng.randrange(3, vocab) for _ in range(prompt_len)]], 16, "long"
        )
        kv_tokens = engine._runner.num_blocks * engine._runner.block_size
    finally:
        await engine.shutdown(grace_s=1)
    return {"start_s": start_s, "prompt_len": prompt_len, "kv_cache_tokens": kv_tokens, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="glm9b")
    parser.add_argument("--concurrency", default="1,8,64,256")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--requests-per-slot", type=int, default=2)
    parser.add_argument(
        "--device", default="cuda", help="cuda; cpu only to check the script with --shape tiny"
    )
    parser.add_argument(
        "--scratch", default=None, help="where the model is written (default: a temp dir)"
    )
    parser.add_argument("--out", default=str(bench_serving.ROOT / "bench" / "results"))
    parser.add_argument(
        "--compile-cache-dir", default=None, help="torch.compile cache (default: a new temp dir)"
    )
    parser.add_argument("--prefix-workload", action="store_true", help="also run prefix-256")
    parser.add_argument("--long-context", action="store_true", help="also the 128K-context check")
    parser.add_argument("--engine-requests", type=int, default=64)
    parser.add_argument(
        "--no-engine", action="store_true", help="skip the in-process engine phase (and prefix-256)"
    )
    args = parser.parse_args(argv)

    import torch

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="autoglm-gpu-bench-"))
    t0 = time.perf_counter()
    model = build_model(args.shape, scratch / args.shape, args.device)
    build_s = time.perf_counter() - t0
    print(f"model built and saved in {build_s:.0f}s", flush=True)

    levels = [int(c) for c in args.concurrency.split(",")]
    top = max(levels)
    cache = args.compile_cache_dir or tempfile.mkdtemp(prefix="autoglm-compile-")
    engine: dict[str, Any] = {}
    if not args.no_engine:
        engine = asyncio.run(
            engine_throughput(
                model,
                args.device,
                args.engine_requests,
                args.prompt_len,
                args.max_new_tokens,
                slots=max(top, 256 if args.prefix_workload else top),
                cache=cache,
                prefix_workload=args.prefix_workload,
            )
        )
        print(f"engine: {json.dumps(engine)}", flush=True)
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()

    server_args = ["--device", args.device, "--dtype", "bfloat16", "--max-model-len", str(args.prompt_len + args.max_new_tokens + 64),
                   "--max-batch-size", str(top), "--compile-cache-dir", cache]  # fmt: skip
    sweep: dict[str, Any] = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The server's log goes next to the results, so a failed start can be read.
    t0 = time.perf_counter()
    with bench_serving.serving(model, server_args, out.resolve(), f"server-{args.shape}") as target:
        server_start_s = time.perf_counter() - t0
        print(f"server ready in {server_start_s:.1f}s", flush=True)
        for c in levels:
            spec = bench_serving.LoadSpec(
                concurrency=c,
                requests=c * args.requests_per_slot,
                prompt_len=args.prompt_len,
                max_new_tokens=args.max_new_tokens,
            )
            sweep[str(c)] = asyncio.run(bench_serving._measure(target, spec, warmup=min(c, 8)))
            print(f"server c={c}: {json.dumps(sweep[str(c)])}", flush=True)
        info = bench_serving._model_info(target)

    long: dict[str, Any] | None = None
    if args.long_context:
        gc.collect()
        long = asyncio.run(long_context(model, args.device, cache, 32768))
        print(f"long context: {json.dumps(long)}", flush=True)

    result = {
        "benchmark": "bench_gpu",
        "workload": f"{args.shape}-{args.prompt_len}-{args.max_new_tokens}",
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": bench_serving._git(),
        "device": {
            **bench_serving._device(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "ran_on": args.device,
        },
        "model": {"shape": SHAPES[args.shape], "dtype": "bfloat16", "info": info},
        "config": {"server_args": server_args, "requests_per_slot": args.requests_per_slot},
        "engine": engine,
        "sweep": sweep,
        "server_over_engine": sweep[str(args.engine_requests)]["output_tok_per_s"]
        / engine["output_tok_per_s"]
        if engine and str(args.engine_requests) in sweep
        else None,
        "warmup": {
            "engine_start_cold_s": engine.get("start_s"),
            "server_start_warm_s": server_start_s,
        },
        "long_context": long,
        "model_build_s": build_s,
    }
    line = json.dumps(result)
    print(line)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"bench_gpu-{args.shape}-{stamp}.json").write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
