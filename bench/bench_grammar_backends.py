"""xgrammar vs llguidance: per-token cost of a JSON-schema mask on the host, batch 1 and 64.

    .venv/bin/pip install llguidance==1.9.1      # not a project dependency
    .venv/bin/python bench/bench_grammar_backends.py [--vocab 32000] [--steps 200]

Both libraries get the same Hugging Face tokenizer, the same schema (the one
bench_grammar.py and the integration test use) and the same walk: at each step
every row's mask is filled, then one allowed token is drawn at random (seeded)
and accepted; a row whose grammar may end starts over with a fresh matcher.
Measured per library: compile time, and per step the mask fill (serial: one
call per row; batched: the library's own parallel API, xgrammar's
BatchGrammarMatcher and llguidance's fill_next_token_bitmask_par) and the
accept. Figures are per generated token (step time / batch).

No model tokenizer can be downloaded here, so ``--vocab`` trains a byte-level
BPE of that size on the repository's own text (the fill cost grows with the
vocabulary; GLM-4's is 151552, which a repository corpus can't reach).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
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


def build_tokenizer(vocab: int) -> Any:
    """A byte-level BPE trained on the repository's text, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for pattern in ("**/*.py", "**/*.md", "**/*.yaml", "**/*.json"):
        for path in ROOT.glob(pattern):
            if ".venv" in path.parts or ".cache" in path.parts or "results" in path.parts:
                continue
            try:
                texts.append(path.read_text(errors="ignore"))
            except OSError:
                continue
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=1,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _allowed(mask_row: torch.Tensor, vocab: int) -> list[int]:
    bits = ((mask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab]
    return bits.nonzero().flatten().tolist()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab: int, threads: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        t0 = time.perf_counter()
        compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.compiled = compiler.compile_json_schema(
            json.dumps(SCHEMA), any_whitespace=False, strict_mode=True
        )
        self.compile_s = time.perf_counter() - t0
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)
        self.version = _version("xgrammar")

    def matcher(self) -> Any:
        return self.xgr.GrammarMatcher(self.compiled)

    def allocate(self, rows: int, vocab: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(rows, vocab)

    def fill(self, m: Any, mask: torch.Tensor, i: int) -> None:
        m.fill_next_token_bitmask(mask, i)

    def fill_batch(self, ms: list[Any], mask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(ms, mask)

    def accept(self, m: Any, token: int) -> None:
        assert m.accept_token(token)

    def may_end(self, m: Any) -> bool:
        return bool(m.is_terminated())


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab: int, threads: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.lt = llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        t0 = time.perf_counter()
        self.grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(SCHEMA), defaults={"whitespace_flexible": False}
        )
        first = llguidance.LLMatcher(self.tok, self.grammar)  # compiles lazily: count one
        assert not first.is_error(), first.get_error()
        self.compile_s = time.perf_counter() - t0
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.version = _version("llguidance")

    def matcher(self) -> Any:
        return self.ll.LLMatcher(self.tok, self.grammar)

    def allocate(self, rows: int, vocab: int) -> torch.Tensor:
        return self.lt.allocate_token_bitmask(rows, vocab)

    def fill(self, m: Any, mask: torch.Tensor, i: int) -> None:
        self.lt.fill_next_token_bitmask(m, mask, i)

    def fill_batch(self, ms: list[Any], mask: torch.Tensor) -> None:
        self.lt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms)], mask)

    def accept(self, m: Any, token: int) -> None:
        assert m.consume_token(token), m.get_error()

    def may_end(self, m: Any) -> bool:
        return bool(m.is_accepting() or m.is_stopped())


def run(
    lib: Any, rows: int, steps: int, vocab: int, eos: int, batched: bool, seed: int
) -> dict[str, float]:
    rng = random.Random(seed)
    ms = [lib.matcher() for _ in range(rows)]
    mask = lib.allocate(rows, vocab)
    fill_s: list[float] = []
    accept_s: list[float] = []
    for _ in range(steps):
        t0 = time.perf_counter()
        if batched:
            lib.fill_batch(ms, mask)
        else:
            for i, m in enumerate(ms):
                lib.fill(m, mask, i)
        t1 = time.perf_counter()
        picks = []
        for i, m in enumerate(ms):
            if lib.may_end(m):
                ms[i] = lib.matcher()  # JSON complete: start over (steady state)
                picks.append(None)
                continue
            allowed = [t for t in _allowed(mask[i], vocab) if t != eos]
            picks.append(rng.choice(allowed) if allowed else None)
        t2 = time.perf_counter()
        for m, t in zip(ms, picks, strict=True):
            if t is not None:
                lib.accept(m, t)
        accept_s.append(time.perf_counter() - t2)
        fill_s.append(t1 - t0)
    fill = statistics.median(fill_s)
    accept = statistics.median(accept_s)
    return {
        "fill_step_ms": fill * 1e3,
        "accept_step_ms": accept * 1e3,
        "per_token_us": (fill + accept) / rows * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer(args.vocab)
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    results: dict[str, Any] = {}
    for cls in (XGrammar, LLGuidance):
        lib = cls(tokenizer, vocab, args.threads)
        entry: dict[str, Any] = {"version": lib.version, "compile_ms": lib.compile_s * 1e3}
        for rows in (int(b) for b in args.batches.split(",")):
            for batched in (False, True):
                key = f"batch{rows}_{'parallel' if batched else 'serial'}"
                entry[key] = run(lib, rows, args.steps, vocab, eos, batched, seed=rows)
                print(lib.name, key, json.dumps(entry[key]), flush=True)
        results[lib.name] = entry
    record = {
        "bench": "grammar_backends",
        "time": dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ"),
        "vocab": vocab,
        "steps": args.steps,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "schema": SCHEMA,
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_grammar_backends-cpu-{record['time']}.json"
    path.write_text(json.dumps(record, indent=1))
    print(path)


if __name__ == "__main__":
    main()
