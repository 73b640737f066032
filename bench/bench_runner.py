"""The model runner stepped directly on the GPU: warm-up, prefill and decode step times.

No scheduler threads, no server: what one forward pass costs. For a shape of
``bench_gpu.SHAPES`` (random bf16 weights built on the GPU), it measures

- the runner's warm-up (compile + CUDA-graph capture); run twice with the same
  ``--compile-cache-dir`` to see it cold and warm;
- the prefill of ``--prefill-batch`` x ``--prompt-len`` tokens, in steps of
  ``--max-batch-tokens`` (the performance.md figure is 64 x 512 for glm9b);
- the decode step (greedy, sampling and the host sync included) at each batch
  size of ``--batches``, context ``--prompt-len`` + a few tokens;
- with ``--compare-eager``: the relative difference of the fast path's logits
  against the portable eager path's on the same prompt.

    python3 bench/bench_runner.py --shape glm9b --out DIR [--compile-cache-dir DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu
import bench_serving


def build(shape: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, Glm4Config, LlamaConfig

    spec = dict(bench_gpu.SHAPES[shape])
    arch = spec.pop("arch")
    cls = Glm4Config if arch == "Glm4ForCausalLM" else LlamaConfig
    config = cls(**spec, max_position_embeddings=131072, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


class Driver:
    """Feeds the runner ScheduledSeqs with blocks from a BlockManager (no prefix cache)."""

    def __init__(self, runner: Any) -> None:
        from autoglm_server.engine.block_manager import BlockManager

        self.runner = runner
        self.blocks = BlockManager(runner.num_blocks, runner.block_size, prefix_caching=False)
        self.tables: dict[int, list[int]] = {}

    def step(self, seqs: list[Any]) -> list[int]:
        from autoglm_server.engine.scheduler import SchedulerOutput

        for seq in seqs:
            table = self.tables.setdefault(seq.slot, [])
            if seq.is_new:
                self.blocks.free(table)
            before = len(table)
            assert self.blocks.allocate(table, seq.start_pos + len(seq.token_ids))
            seq.new_blocks = table[before:]
        out: list[int] = self.runner.execute(
            SchedulerOutput(1, seqs, sum(len(s.token_ids) for s in seqs), [])
        ).sampled_token_ids
        return out


def prefill(
    driver: Driver, prompts: list[list[int]], budget: int, params: Any
) -> tuple[float, list[int]]:
    import torch

    from autoglm_server.engine.scheduler import ScheduledSeq

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    firsts: list[int] = []
    i = 0
    while i < len(prompts):
        seqs = []
        used = 0
        while i < len(prompts) and used + len(prompts[i]) <= budget:
            seqs.append(ScheduledSeq(str(i), i, prompts[i], 0, True, True, params, is_prefill=True))
            used += len(prompts[i])
            i += 1
        firsts += driver.step(seqs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, firsts


def decode_steps(
    driver: Driver, prompts: list[list[int]], firsts: list[int], steps: int, params: Any
) -> float:
    from autoglm_server.engine.scheduler import ScheduledSeq

    last = list(firsts)
    times = []
    for k in range(steps):
        seqs = [
            ScheduledSeq(str(i), i, [last[i]], len(p) + k, True, False, params)
            for i, p in enumerate(prompts)
        ]
        t0 = time.perf_counter()
        last = driver.step(seqs)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(bench_gpu.SHAPES), default="glm9b")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--prefill-batch", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--decode-steps", type=int, default=40)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-cache-dir", default=None)
    parser.add_argument(
        "--compile-scope", default="decoder", choices=("decoder", "layers"),
        help="compile the whole decoder (default) or one decoder layer shared by all",
    )  # fmt: skip
    parser.add_argument("--compare-eager", action="store_true")
    parser.add_argument("--out", default=str(bench_serving.ROOT / "bench" / "results"))
    args = parser.parse_args(argv)

    import random

    import torch

    from autoglm_server.engine.api import SamplingParams
    from autoglm_server.engine.runner import ModelRunner

    t0 = time.perf_counter()
    model = build(args.shape)
    build_s = time.perf_counter() - t0
    batches = [int(b) for b in args.batches.split(",")]
    slots = max([*batches, args.prefill_batch])
    max_len = args.prompt_len + args.decode_steps + 64
    t0 = time.perf_counter()
    runner = ModelRunner(
        model,
        num_slots=slots,
        max_model_len=max_len,
        device=torch.device("cuda"),
        max_batch_tokens=args.max_batch_tokens,
        attention_backend=args.attention_backend,
        compile=not args.no_compile,
        compile_cache_dir=args.compile_cache_dir,
        compile_scope=args.compile_scope,
    )
    init_s = time.perf_counter() - t0
    runner.warmup()
    print(f"runner init {init_s:.1f}s, warm-up {runner.warmup_s:.1f}s", flush=True)

    rng = random.Random(0)
    vocab = runner.vocab_size
    params = SamplingParams(max_new_tokens=10**6, temperature=0.0, ignore_eos=True)

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(n)]

    driver = Driver(runner)
    warm = prompts(args.prefill_batch)
    prefill(driver, warm, args.max_batch_tokens, params)  # the first prefill pays allocations
    prefill_s, _ = prefill(driver, prompts(args.prefill_batch), args.max_batch_tokens, params)
    print(
        f"prefill {args.prefill_batch}x{args.prompt_len}: {prefill_s:.3f}s "
        f"({args.prefill_batch * args.prompt_len / prefill_s:.0f} tok/s)",
        flush=True,
    )
    decode: dict[str, float] = {}
    for b in batches:
        ps = prompts(b)
        _, firsts = prefill(driver, ps, args.max_batch_tokens, params)
        decode[str(b)] = decode_steps(driver, ps, firsts, args.decode_steps, params)
        print(f"decode step at batch {b}: {decode[str(b)] * 1e3:.2f} ms", flush=True)

    compare: dict[str, float] | None = None
    if args.compare_eager:
        compare = compare_with_eager(runner, model, prompts(1)[0], params)
        print(f"fast vs eager logits: {compare}", flush=True)

    result = {
        "benchmark": "bench_runner",
        "workload": f"{args.shape}-prefill{args.prefill_batch}x{args.prompt_len}",
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": bench_serving._git(),
        "device": {**bench_serving._device(), "torch": torch.__version__},
        "config": vars(args) | {"num_blocks": runner.num_blocks, "compiled": runner.compiled},
        "model_build_s": build_s,
        "runner_init_s": init_s,
        "warmup_s": runner.warmup_s,
        "prefill_s": prefill_s,
        "decode_step_s": decode,
        "graphs": sorted(runner.graphs.graphs),
        "fast_vs_eager": compare,
    }
    line = json.dumps(result)
    print(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"bench_runner-{args.shape}-{stamp}.json").write_text(line + "\n")
    return 0


def compare_with_eager(runner: Any, model: Any, prompt: list[int], params: Any) -> dict[str, float]:
    """Last-token logits of the fast runner vs an eager portable runner on the same weights."""
    import torch

    from autoglm_server.engine.runner import ModelRunner
    from autoglm_server.engine.scheduler import ScheduledSeq

    def logits_of(r: Any) -> Any:
        seen: list[Any] = []
        original = r._sample

        def spy(logits: Any, rows: Any, slots: Any) -> Any:
            seen.append(logits.clone())
            return original(logits, rows, slots)

        r._sample = spy
        d = Driver(r)
        first = d.step([ScheduledSeq("c", 0, prompt, 0, True, True, params, is_prefill=True)])
        d.step([ScheduledSeq("c", 0, first, len(prompt), True, False, params)])
        r._sample = original
        return seen

    fast = logits_of(runner)
    del runner
    eager = ModelRunner(
        model,
        num_slots=1,
        max_model_len=len(prompt) + 8,
        device=torch.device("cuda"),
        num_blocks=-(-(len(prompt) + 8) // 16) + 2,
        attention_backend="portable",
        compile=False,
        cuda_graphs=False,
    )
    ref = logits_of(eager)
    out = {}
    for name, a, b in (("prefill", fast[0], ref[0]), ("decode", fast[1], ref[1])):
        out[f"{name}_rel_diff"] = float(((a - b).norm() / b.norm()).item())
        out[f"{name}_argmax_equal"] = float(bool((a.argmax(-1) == b.argmax(-1)).all().item()))
    return out


if __name__ == "__main__":
    sys.exit(main())
