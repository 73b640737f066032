"""Per-token cost of grammar-constrained decoding (xgrammar) in the engine's sampler.

    .venv/bin/python bench/bench_grammar.py                         # CPU, tiny model's tokenizer
    .venv/bin/python bench/bench_grammar.py --device cuda --vocab 151552

What runs: :class:`autoglm_server.engine.sampling.Sampler` on random logits,
``--steps`` decode steps at each batch size (default 1 and 64), every row
sampling at temperature 1, once unconstrained and once with every row held
to a JSON schema (the same one the integration test uses). A row whose JSON
is complete (the grammar emitted its stop token) starts over with a fresh
matcher, so the measurement stays in steady state. The figure is the extra
time per decode step, and per generated token (step / batch), that the
grammar adds: matcher accept + bitmask fill on the host, one non-blocking
copy, one batched mask kernel.

``--vocab`` pads the logits (and the masks) to a model's vocabulary, e.g.
GLM-4-9B's 151552; the tokenizer stays the tiny one (nothing is downloaded),
so host-side fill cost is that of a small vocabulary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _provenance() -> tuple[Any, Any]:
    """(git, device) from bench_serving's helpers; minimal where the gRPC client is missing."""
    try:
        import bench_serving

        return bench_serving._git(), bench_serving._device()
    except ImportError:
        import platform

        return {"commit": None}, {"platform": platform.platform()}


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["Ann", "Bo", "Cy"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["x", "y"]}, "maxItems": 3},
    },
    "required": ["name", "age", "admin", "tags"],
    "additionalProperties": False,
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from autoglm_server.engine.api import SamplingParams
    from autoglm_server.engine.grammar import GrammarCompiler, GrammarSpec
    from autoglm_server.engine.sampling import Sampler
    from autoglm_server.engine.scheduler import ScheduledSeq
    from autoglm_server.testing import build_tiny_model

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model_dir = build_tiny_model(Path(tempfile.mkdtemp(prefix="bench-grammar-")))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = max(args.vocab or 0, len(tokenizer))
    t0 = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, vocab)
    grammar = compiler.compile(GrammarSpec.json(SCHEMA), "response_format")
    compile_s = time.perf_counter() - t0
    stop_ids = set(tokenizer.all_special_ids)

    results: dict[str, Any] = {}
    for batch in args.batches:
        per_mode: dict[str, float] = {}
        for mode in ("plain", "grammar"):
            params = SamplingParams(temperature=1.0, grammar=grammar if mode == "grammar" else None)
            sampler = Sampler(batch, vocab, device)
            slots = torch.arange(batch, device=device)
            gen = torch.Generator(device=device).manual_seed(0)
            last: list[int | None] = [None] * batch
            times = []
            for step in range(args.warmup + args.steps):
                seqs = []
                for row in range(batch):
                    restart = last[row] is None or last[row] in stop_ids
                    seqs.append(
                        ScheduledSeq(
                            f"r{row}",
                            row,
                            [1] if restart else [last[row]],
                            0,
                            True,
                            restart,
                            params,
                            is_prefill=restart,
                        )
                    )
                logits = torch.randn(batch, vocab, device=device, generator=gen)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                sampler.admit(seqs)
                tokens = sampler.sample(logits, seqs, slots)
                ids, _ = sampler.to_host(tokens)  # the step's sync, as in the runner
                elapsed = time.perf_counter() - start
                last = list(ids)
                if step >= args.warmup:
                    times.append(elapsed)
            per_mode[mode] = statistics.median(times)
        extra = per_mode["grammar"] - per_mode["plain"]
        results[str(batch)] = {
            "step_s_plain": per_mode["plain"],
            "step_s_grammar": per_mode["grammar"],
            "extra_per_step_s": extra,
            "extra_per_token_s": extra / batch,
        }
        print(
            f"batch {batch}: plain {per_mode['plain'] * 1e3:.3f} ms/step, grammar "
            f"{per_mode['grammar'] * 1e3:.3f} ms/step, +{extra / batch * 1e6:.1f} us/token",
            flush=True,
        )
    git, host = _provenance()
    if device.type == "cuda":
        host["gpu"] = torch.cuda.get_device_name(device)
    return {
        "benchmark": "bench_grammar",
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git,
        "device": {**host, "torch": torch.__version__, "run_on": str(device)},
        "config": {**vars(args), "vocab_used": vocab, "tokenizer_vocab": len(tokenizer)},
        "compile_s": compile_s,
        "batches": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=0, help="pad logits to this vocabulary")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    result = run(args)
    line = json.dumps(result)
    print(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"bench_grammar-{args.device.split(':')[0]}-{stamp}.json").write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
