#!/usr/bin/env python3
"""Tensor parallelism: a GLM-4-32B-shaped model at TP=1 and TP=2 (issue 13's GPU run).

Workload: 512 random prompt tokens + exactly 128 new tokens (EOS ignored), at
concurrency 1 (decode latency: TPOT p50 over a few requests one after another)
and 64 (output tok/s over the whole run, prefill included), through the engine
(``LLMEngine`` in this process as rank 0; at TP=2 rank 1 is its child process,
as in the server).

Each TP size runs in its own child process (a clean GPU), one after the other;
the parent compares them in the same run and writes one JSON line (device,
commit, config, both results and the ratios against the issue's targets:
TPOT TP=2 <= 0.6 x TP=1, throughput TP=2 >= 1.6 x TP=1) to ``--out``.

Weights are random bf16 built on each GPU from the config (nothing is
downloaded or written to disk): every rank builds the same full model from
seed 0 and keeps its shard (:func:`load_random`, passed to the engine as its
loader, which the other ranks use too).

One device command (2 GPUs; from the repository root, see bench/gpu_setup.sh):

    . bench/gpu_setup.sh && python3 bench/bench_tp.py --out bench/results

CPU dry run (tiny shape, gloo): ``python bench/bench_tp.py --shape tiny --device cpu``.
``--compile`` (the server's default, on): one decoder layer is compiled and
shared by all (glm9b warm-up 39 s cold on an H100); ``--no-compile`` runs
both sizes eagerly with CUDA graphs, if compiling with the all-reduce inside
fails on the device. Both sizes run without the pipelined launch/collect
path (TP does not use it), so the ratio is like for like; the TP=1 figure is
then a little below the server's own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu
import gpu_harness

# bench_gpu's shapes (tiny, glm9b, llama8b) plus the one issue 13 adds.
SHAPES: dict[str, dict[str, Any]] = {
    **bench_gpu.SHAPES,
    # GLM-4-32B (issue 13): 65 GB of bf16 weights
    "glm32b": {
        "arch": "Glm4ForCausalLM",
        "hidden_size": 6144,
        "num_hidden_layers": 61,
        "num_attention_heads": 48,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "intermediate_size": 23040,
        "vocab_size": 151552,
    },
}
EOS = 1
AGREEMENT_PROMPTS = 8  # greedy prompts of the quality proxy
LOAD_STATS: dict[str, float] = {}  # this process's load: weights on its device, seconds


def git_commit() -> str:
    """The commit, "-dirty" if tracked files changed; AUTOGLM_GIT_COMMIT names it where the
    tree is a `git archive` of it (the offline GPU machine has no .git)."""
    named = os.environ.get("AUTOGLM_GIT_COMMIT")
    if named:
        return named
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") or "unknown"
    except OSError:
        return "unknown"


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return "cpu"


def write_model_dir(shape: str, out: Path) -> Path:
    """config.json and a word-level tokenizer over the whole vocabulary; no weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Glm4Config, LlamaConfig, PreTrainedTokenizerFast

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    config_cls = Glm4Config if arch == "Glm4ForCausalLM" else LlamaConfig
    config = config_cls(
        **spec,
        max_position_embeddings=131072,
        eos_token_id=EOS,
        pad_token_id=0,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    config.architectures = [arch]
    config.save_pretrained(out)
    vocab = {"<pad>": 0, "<eos>": EOS, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, spec["vocab_size"])})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok: Any = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.save_pretrained(out)
    return out


def load_random(cfg: Any) -> Any:
    """The engine's loader here: random weights (seed 0) built on this rank's device,
    sharded for TP and quantised as ``cfg.quantization`` says. Every rank calls it."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from autoglm_server.engine.loader import LoadedModel, resolve_device
    from autoglm_server.engine.parallel import rank_device, shard_model
    from autoglm_server.engine.quant import quantize_model

    auto_model: Any = AutoModelForCausalLM
    hf = AutoConfig.from_pretrained(cfg.model)
    tp = cfg.tensor_parallel_size
    device = resolve_device(cfg.device)
    if tp > 1:
        device = rank_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = auto_model.from_config(hf, dtype=dtype)
    if tp > 1:
        shard_model(model, tp)
    method = cfg.quantization if cfg.quantization not in ("none", "auto") else "none"
    quantize_model(model, method, device)
    model.eval()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        LOAD_STATS["weights_gib"] = torch.cuda.memory_allocated(device) / 2**30
    LOAD_STATS["load_s"] = time.perf_counter() - t0
    return LoadedModel(
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(cfg.model),
        model_dir=Path(cfg.model),
        device=device,
        dtype=dtype,
        max_model_len=cfg.max_model_len,
        architecture=type(model).__name__,
        vocab_size=int(hf.vocab_size),
        eos_token_ids=frozenset({EOS}),
        quantization=method,
        tensor_parallel_size=tp,
    )


def engine_config(model: Path, device: str, **overrides: Any) -> Any:
    from autoglm_server.engine.config import BatchingConfig, EngineConfig

    known = {f.name for f in fields(EngineConfig)}
    args: dict[str, Any] = {
        "model": str(model),
        "device": device,
        "max_model_len": 1024,
        "batching": BatchingConfig(max_batch_size=64, max_batch_tokens=8192, max_queue_length=4096),
    }
    args.update({k: v for k, v in overrides.items() if k in known})
    return EngineConfig(**args)


async def run_batch(
    engine: Any, prompts: list[list[int]], new_tokens: int, tag: str
) -> dict[str, Any]:
    """All prompts at once: output tok/s, TTFT and TPOT p50, and the tokens."""
    from autoglm_server.engine.api import GenerationRequest, SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int, prompt: list[int]) -> tuple[list[int], float, float]:
        req = GenerationRequest(request_id=f"{tag}{i}", prompt_token_ids=prompt, params=params)
        start = time.perf_counter()
        first = 0.0
        tokens: list[int] = []
        async for delta in engine.generate(req):
            if delta.token_ids and not tokens:
                first = time.perf_counter() - start
            tokens.extend(delta.token_ids)
        total = time.perf_counter() - start
        return tokens, first, (total - first) / max(1, len(tokens) - 1)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    elapsed = time.perf_counter() - start
    n = sum(len(t) for t, _, _ in results)
    ttfts = sorted(r[1] for r in results)
    tpots = sorted(r[2] for r in results)
    return {
        "requests": len(prompts),
        "output_tokens": n,
        "duration_s": elapsed,
        "output_tok_per_s": n / elapsed,
        "ttft_p50_s": ttfts[len(ttfts) // 2],
        "tpot_p50_s": tpots[len(tpots) // 2],
        "tokens": [t for t, _, _ in results],
    }


async def serve_workload(
    engine: Any, *, prompt_len: int, new_tokens: int, concurrency: list[int], c1_requests: int
) -> dict[str, Any]:
    rng = random.Random(0)
    vocab = engine.model_info.vocab_size

    def prompt() -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(prompt_len)]

    await run_batch(engine, [prompt() for _ in range(4)], 8, "warm")
    out: dict[str, Any] = {}
    for c in concurrency:
        if c == 1:  # one request at a time: the decode latency
            runs = [
                await run_batch(engine, [prompt()], new_tokens, f"c1-{i}")
                for i in range(c1_requests)
            ]
            tpots = sorted(r["tpot_p50_s"] for r in runs)
            out["c1"] = {
                "requests": c1_requests,
                "tpot_p50_s": tpots[len(tpots) // 2],
                "ttft_p50_s": sorted(r["ttft_p50_s"] for r in runs)[len(runs) // 2],
                "output_tok_per_s": sum(r["output_tokens"] for r in runs)
                / sum(r["duration_s"] for r in runs),
            }
        else:
            result = await run_batch(engine, [prompt() for _ in range(c)], new_tokens, f"c{c}-")
            result.pop("tokens")
            out[f"c{c}"] = result
    return out


async def measure(
    args: argparse.Namespace, describe: Callable[[Any], dict[str, Any]], **overrides: Any
) -> dict[str, Any]:
    """A child's run: an engine (``overrides``: its ``EngineConfig`` fields) on the random
    model of ``args.shape``, the workload, then the greedy tokens of the quality proxy;
    ``describe(engine)`` adds what the benchmark reports of its engine."""
    from autoglm_server.engine.engine import LLMEngine

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(args.shape, Path(tmp))
        cfg = engine_config(model_dir, args.device, compile=args.compile, **overrides)
        engine = LLMEngine(cfg, loader=load_random)
        t0 = time.perf_counter()
        await engine.start()
        start_s = time.perf_counter() - t0
        try:
            result = await serve_workload(
                engine,
                prompt_len=args.prompt_len,
                new_tokens=args.new_tokens,
                concurrency=args.concurrency,
                c1_requests=args.c1_requests,
            )
            result["greedy_tokens"] = await greedy_tokens(
                engine, AGREEMENT_PROMPTS, args.prompt_len, args.agreement_steps
            )
            result["start_s"] = start_s
            result.update(describe(engine))
        finally:
            await engine.shutdown(grace_s=1)
    return result


async def child_run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    def describe(engine: Any) -> dict[str, Any]:
        out = {
            "rank0_load": dict(LOAD_STATS),
            "warmup_s": getattr(engine._runner, "warmup_s", None),
            "num_kv_blocks": engine._runner.num_blocks,
        }
        if torch.cuda.is_available() and args.device.startswith("cuda"):
            out["rank0_max_memory_gib"] = torch.cuda.max_memory_allocated(0) / 2**30
        return out

    # TP runs every step whole (no pipelined launch/collect); TP=1 alike, for a like-for-like ratio
    return await measure(args, describe, tensor_parallel_size=args.tp, pipeline=False)


def add_options(parser: argparse.ArgumentParser, *, shape: str, agreement_steps: int) -> None:
    """The options of a parent that runs each configuration in a child (this file and
    bench_quant.py); :func:`child_argv` passes the workload's on to the children."""
    parser.add_argument("--shape", default=shape, choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--c1-requests", type=int, default=5)
    parser.add_argument("--agreement-steps", type=int, default=agreement_steps)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--child-timeout-s", type=float, default=280.0)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--child-out", help=argparse.SUPPRESS)


def child_argv(args: argparse.Namespace) -> list[str]:
    """The workload's options, as every child of the parent gets them."""
    return [
        "--shape", args.shape, "--device", args.device, "--prompt-len", str(args.prompt_len),
        "--new-tokens", str(args.new_tokens), "--concurrency", ",".join(map(str, args.concurrency)),
        "--c1-requests", str(args.c1_requests), "--agreement-steps", str(args.agreement_steps),
        "--compile" if args.compile else "--no-compile",
    ]  # fmt: skip


def run_child(
    args: argparse.Namespace, run: Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]
) -> int:
    """The child's side of :func:`run_children`: ``run(args)`` into ``--child-out``."""
    logging_setup()
    result = asyncio.run(run(args))
    Path(args.child_out).write_text(json.dumps(result))
    return 0


def save_record(
    args: argparse.Namespace,
    bench: str,
    config: dict[str, Any],
    results: dict[str, Any],
    summary: dict[str, Any],
) -> None:
    """The parent's JSON line (device, commit, workload, config, each child's results and
    the summary): printed and written to ``--out``."""
    when = gpu_harness.stamp()
    record = {
        "bench": bench,
        "time": when,
        "device": device_name(args.device),
        "commit": git_commit(),
        "workload": f"{args.shape}-{args.prompt_len}-{args.new_tokens}",
        "config": {"shape": SHAPES[args.shape], **config},
        "results": results,
        "summary": summary,
    }
    print(
        gpu_harness.write_result(gpu_harness.result_path(args.out, bench, args.shape, when), record)
    )


def run_children(args: argparse.Namespace, script: str, extra: list[list[str]]) -> list[Any]:
    """Each configuration in its own process; results from the JSON file it writes."""
    results = []
    for argv in extra:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, script, "--child-out", out.name, *argv]
            env = dict(os.environ, PYTHONSAFEPATH="1", PYTHONUNBUFFERED="1")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, timeout=args.child_timeout_s)
            text = Path(out.name).read_text()
            if proc.returncode != 0 or not text:
                results.append(
                    {"error": f"exit {proc.returncode}", "wall_s": time.perf_counter() - t0}
                )
            else:
                results.append(json.loads(text))
    return results


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict[str, float]:
    """Greedy tokens against a reference: the mean share of steps before the first
    different token, and the share of equal tokens position by position."""
    prefix = []
    equal = 0
    total = 0
    for a, b in zip(ref, got, strict=True):
        n = min(len(a), len(b))
        first = next((i for i in range(n) if a[i] != b[i]), n)
        prefix.append(first / max(1, len(a)))
        equal += sum(x == y for x, y in zip(a, b, strict=False))
        total += len(a)
    return {
        "prefix_agreement": sum(prefix) / len(prefix),
        "token_agreement": equal / max(1, total),
    }


async def greedy_tokens(engine: Any, prompts: int, prompt_len: int, steps: int) -> list[list[int]]:
    """Fixed prompts (seed 42) decoded greedily: the quality proxy across configurations."""
    rng = random.Random(42)
    vocab = engine.model_info.vocab_size
    batch = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(prompts)]
    result = await run_batch(engine, batch, steps, "greedy")
    tokens: list[list[int]] = result["tokens"]
    return tokens


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, shape="glm32b", agreement_steps=128)
    parser.add_argument(
        "--tp", default="1,2", help="comma-separated TP sizes (the first is the baseline)"
    )
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]

    if args.child_out:
        args.tp = int(args.tp)
        return run_child(args, child_run)

    sizes = [int(t) for t in str(args.tp).split(",")]
    common = child_argv(args)
    runs = run_children(args, __file__, [[*common, "--tp", str(t)] for t in sizes])
    by_tp = dict(zip((f"tp{t}" for t in sizes), runs, strict=True))
    base, other = runs[0], runs[-1]
    summary: dict[str, Any] = {}
    ref_tokens = base.pop("greedy_tokens", None)
    for run in runs[1:]:
        tokens = run.pop("greedy_tokens", None)
        if ref_tokens and tokens:
            # bf16 all-reduces add in another order than one GPU does: near-ties can flip
            run["greedy_vs_first"] = agreement(ref_tokens, tokens)
    if len(runs) > 1 and "error" not in base and "error" not in other:
        if "c1" in base:
            summary["tpot_c1_ratio"] = ratio(other["c1"]["tpot_p50_s"], base["c1"]["tpot_p50_s"])
            summary["tpot_c1_target"] = "<= 0.6"
        top = f"c{max(args.concurrency)}"
        if top in base:
            summary[f"throughput_{top}_ratio"] = ratio(
                other[top]["output_tok_per_s"], base[top]["output_tok_per_s"]
            )
            summary[f"throughput_{top}_target"] = ">= 1.6"
    config = {
        "tp_sizes": sizes,
        "concurrency": args.concurrency,
        "compile": args.compile,
        "dtype": "bfloat16" if args.device.startswith("cuda") else "float32",
    }
    save_record(args, "bench_tp", config, by_tp, summary)
    return 0


def logging_setup() -> None:
    import logging

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


if __name__ == "__main__":
    sys.exit(main())
