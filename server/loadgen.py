"""A closed-loop gRPC load generator (``autoglm bench`` and ``bench/bench_serving.py``).

``concurrency`` workers each keep one streaming request in flight until
``requests`` have been sent. Every request uses ``ignore_eos`` so it produces
exactly ``max_new_tokens`` tokens, which makes runs comparable. Times are
taken on the client, as a user would see them:

- TTFT: request sent -> first chunk carrying a token;
- TPOT: (last token - first token) / (tokens - 1), per request;
- throughput: all generated tokens / wall time of the run.

Client-only: grpc and the generated stubs, no torch.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from autoglm_server.client import AsyncAutoGLMClient


@dataclass(frozen=True, slots=True)
class LoadSpec:
    concurrency: int = 8
    requests: int = 64
    prompt_len: int = 32  # tokens, approximately (the prompt is calibrated with Tokenize)
    max_new_tokens: int = 32
    timeout_s: float = 300.0  # per request


@dataclass(slots=True)
class _Sample:
    ok: bool
    code: str = "OK"
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile, ``q`` in [0, 100]; None without data."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _summary(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "mean": sum(values) / len(values) if values else None,
    }


async def make_prompt(client: AsyncAutoGLMClient, prompt_len: int) -> tuple[str, int]:
    """A prompt of about ``prompt_len`` tokens, measured with the server's tokenizer."""
    word = "the quick brown fox "
    per = max(1, len(await client.tokenize(word * 16))) / 16
    n = max(1, round(prompt_len / per))
    for _ in range(4):
        count = len(await client.tokenize(word * n))
        if count == prompt_len or n == 1:
            break
        n = max(1, round(n * prompt_len / count))
    text = word * n
    return text, len(await client.tokenize(text))


async def _one(client: AsyncAutoGLMClient, prompt: str, spec: LoadSpec) -> _Sample:
    t0 = time.perf_counter()
    first: float | None = None
    last = t0
    tokens = 0
    sample = _Sample(ok=False)
    try:
        async for chunk in client.generate_stream(
            prompt,
            max_new_tokens=spec.max_new_tokens,
            temperature=0.0,
            ignore_eos=True,
            deadline=spec.timeout_s,
        ):
            now = time.perf_counter()
            if chunk.token_ids:
                if first is None:
                    first = now
                last = now
                tokens += len(chunk.token_ids)
            if chunk.finish_reason is not None:
                sample.finish_reason = chunk.finish_reason
                sample.prompt_tokens = chunk.prompt_tokens or 0
    except grpc.aio.AioRpcError as exc:
        sample.code = exc.code().name
        sample.e2e_s = time.perf_counter() - t0
        return sample
    sample.ok = sample.finish_reason is not None
    sample.code = "OK" if sample.ok else "INCOMPLETE"
    sample.e2e_s = time.perf_counter() - t0
    sample.output_tokens = tokens
    if first is not None:
        sample.ttft_s = first - t0
        if tokens > 1:
            sample.tpot_s = (last - first) / (tokens - 1)
    return sample


async def run_load(target: str, spec: LoadSpec) -> dict[str, Any]:
    """Run one closed-loop load test; return its figures as a JSON-ready dict."""
    if spec.concurrency < 1 or spec.requests < 1:
        raise ValueError("concurrency and requests must be >= 1")
    async with AsyncAutoGLMClient(target) as client:
        prompt, prompt_tokens = await make_prompt(client, spec.prompt_len)
        remaining = spec.requests
        samples: list[_Sample] = []

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                samples.append(await _one(client, prompt, spec))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(spec.concurrency, spec.requests))))
        wall = time.perf_counter() - t0

    ok = [s for s in samples if s.ok]
    out_tokens = sum(s.output_tokens for s in ok)
    return {
        "spec": asdict(spec),
        "prompt_tokens": prompt_tokens,
        "requests_ok": len(ok),
        "errors": dict(Counter(s.code for s in samples if not s.ok)),
        "duration_s": wall,
        "output_tokens": out_tokens,
        "output_tok_per_s": out_tokens / wall if wall > 0 else 0.0,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "ttft_s": _summary([s.ttft_s for s in ok if s.ttft_s is not None]),
        "tpot_s": _summary([s.tpot_s for s in ok if s.tpot_s is not None]),
        "e2e_s": _summary([s.e2e_s for s in ok]),
    }
