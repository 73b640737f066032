#!/usr/bin/env python3
"""The host's share of a decode step: the engine around a runner that costs nothing.

A GPU decode step of a 9B model takes ~9 ms at batch 64 (bench_profile.py);
everything the process does in Python per step (scheduling, the runner's
packing, the hand-off to the detokenizer, detokenizing, waking the streams,
the gRPC writes) shares one GIL and adds to it unless it overlaps the GPU.
This benchmark replaces the runner by one that returns a token per sampled row
at once, so the wall time per step IS the host's work per step.

    PYTHONSAFEPATH=1 .venv/bin/python bench/bench_host.py [--batch 64] [--steps 128] [--server]

``--server`` also drives the gRPC server in this process (the same null
engine) from a client process, as bench_profile does with the real model.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu


class NullRunner:
    """The runner interface the engine uses, with no model: token ``7`` for every row."""

    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.warmup_s = 0.0
        self.steps = 0

    def warmup(self) -> None:
        pass

    def execute(self, sched: Any) -> Any:
        from autoglm_server.engine.scheduler import RunnerOutput

        self.steps += 1
        return RunnerOutput(sampled_token_ids=[7 for s in sched.seqs if s.sample])


def make_engine(batch: int, max_len: int, vocab: int) -> tuple[Any, NullRunner]:
    from autoglm_server.engine.config import BatchingConfig, EngineConfig
    from autoglm_server.engine.engine import LLMEngine
    from autoglm_server.engine.loader import LoadedModel

    runner = NullRunner(num_blocks=batch * (max_len // 16 + 2) + 1)
    loaded = LoadedModel(
        model=None,  # type: ignore[arg-type]
        tokenizer=bench_gpu.make_tokenizer(vocab),
        model_dir=Path("."),
        device=None,  # type: ignore[arg-type]
        dtype=None,  # type: ignore[arg-type]
        max_model_len=max_len,
        architecture="null",
        vocab_size=vocab,
        eos_token_ids=frozenset({1}),
    )
    config = EngineConfig(
        model="null",
        max_model_len=max_len,
        batching=BatchingConfig(max_batch_size=batch, max_batch_tokens=8192, max_queue_length=4096),
    )
    engine = LLMEngine(config, loader=lambda _c: loaded)
    engine._build_runner = lambda _loaded: runner  # type: ignore[method-assign]
    return engine, runner


async def engine_only(args: argparse.Namespace) -> dict[str, Any]:
    engine, runner = make_engine(args.batch, args.prompt_len + args.steps + 16, 151552)
    await engine.start()
    rng = random.Random(0)
    try:
        prompts = [[rng.randrange(3, 151552) for _ in range(args.prompt_len)] for _ in range(args.batch)]  # fmt: skip
        await bench_gpu._run_batch(engine, prompts, 8, "w")
        runner.steps = 0
        start = time.perf_counter()
        res = await bench_gpu._run_batch(engine, prompts, args.steps, "m")
        wall = time.perf_counter() - start
        res["steps"] = runner.steps
        res["host_ms_per_step"] = wall * 1e3 / runner.steps
    finally:
        await engine.shutdown(grace_s=1)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--profile", default=None, help="write a cProfile of the run here")
    args = parser.parse_args(argv)
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    result = asyncio.run(engine_only(args))
    if args.profile:
        prof.disable()
        prof.dump_stats(args.profile)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
