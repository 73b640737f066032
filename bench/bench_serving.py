#!/usr/bin/env python3
"""Serving benchmark: throughput, TTFT and TPOT over gRPC, and what dynamic batching buys.

One run does two things (see bench/README.md):

1. A concurrency sweep (1, 8, 64 by default) against a server: output tokens
   per second, TTFT p50/p95 and TPOT p50/p95, all measured on the client.
2. Dynamic batching against no batching: a server with the default policy and
   one started with ``--max-batch-size 1``, both at concurrency 64 on the same
   model and workload; the figure is the throughput ratio.

By default every server is started here (with a tiny random GLM-4 model if
``--model`` is not given). ``--target HOST:PORT`` runs the sweep against a
server you already run instead; the batching comparison still starts its own
two servers, so that both sides are identical except for the batch size.

Prints one JSON line and writes it to ``--out`` (default ``bench/results/``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from autoglm_server.client import AutoGLMClient, wait_until_serving
from autoglm_server.loadgen import LoadSpec, run_load

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(model: Path, args: list[str], log_dir: Path, name: str) -> Iterator[str]:
    """Start ``autoglm-server`` on loopback, wait for SERVING, yield its target, stop it."""
    grpc_port = _free_port()
    cmd = [
        sys.executable, "-m", "autoglm_server", "--model", str(model),
        "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
        "--http-port", str(_free_port()), "--metrics-port", "0", *args,
    ]  # fmt: skip
    log = (log_dir / f"{name}.log").open("wb")
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=log_dir, env=env)
    target = f"127.0.0.1:{grpc_port}"
    try:
        deadline = time.monotonic() + 300
        # A fresh channel per attempt (wait_until_serving): one reused channel
        # never connects on grpcio 1.68 to 1.72.1 once its first try was refused.
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} server exited; see {log.name}")
            try:
                wait_until_serving(target, timeout_s=1.0)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} server not ready; see {log.name}") from None
        yield target
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _model_info(target: str) -> dict[str, Any]:
    with AutoGLMClient(target, timeout=30) as client:
        return asdict(client.model_info())


async def _measure(target: str, spec: LoadSpec, warmup: int) -> dict[str, Any]:
    if warmup:
        await run_load(target, LoadSpec(concurrency=min(warmup, spec.concurrency), requests=warmup,
                                        prompt_len=spec.prompt_len, max_new_tokens=4))  # fmt: skip
    return await run_load(target, spec)


def _device() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        gpus = [g.strip() for g in out.stdout.splitlines() if g.strip()]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cpu_cores": cores, "gpus": gpus, "platform": platform.platform()}


def _git() -> dict[str, Any]:
    """The commit measured. Where the tree has no git metadata (a copy on a GPU
    machine), AUTOGLM_GIT_COMMIT names it instead."""

    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
            )
        except OSError:
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = run("rev-parse", "--verify", "HEAD")
    if commit is None:
        return {
            "commit": os.environ.get("AUTOGLM_GIT_COMMIT", "unknown"),
            "dirty": None,
            "source": "env",
        }
    return {"commit": commit, "dirty": bool(run("status", "--porcelain")), "source": "git"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, help="model directory (default: build a tiny random GLM-4)"
    )
    parser.add_argument("--target", help="run the sweep against this running server (host:port)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="results folder"
    )
    parser.add_argument("--concurrency", default="1,8,64", help="sweep levels, comma-separated")
    parser.add_argument("--requests-per-slot", type=int, default=4,
                        help="requests per level = max(16, concurrency x this)")  # fmt: skip
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--compare-concurrency", type=int, default=64)
    parser.add_argument("--compare-requests", type=int, default=128)
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra autoglm-server flag for the started servers (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)

    levels = [int(c) for c in args.concurrency.split(",") if c]
    workdir = Path(tempfile.mkdtemp(prefix="autoglm-bench-"))
    model = args.model
    if model is None:
        from autoglm_server.testing import build_tiny_model

        model = build_tiny_model(workdir / "tiny-glm4", max_position_embeddings=2048)
        model_desc = "tiny random Glm4ForCausalLM (autoglm_server.testing.build_tiny_model)"
    else:
        model_desc = str(model)

    def spec(concurrency: int, requests: int) -> LoadSpec:
        return LoadSpec(concurrency=concurrency, requests=requests,
                        prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens)  # fmt: skip

    sweep: dict[str, Any] = {}

    def run_sweep(target: str) -> None:
        for level in levels:
            n = max(16, level * args.requests_per_slot)
            sweep[str(level)] = asyncio.run(_measure(target, spec(level, n), warmup=8))

    compare_spec = spec(args.compare_concurrency, args.compare_requests)
    started_args = list(args.server_arg)
    if args.target:
        run_sweep(args.target)
        info = _model_info(args.target)
    with serving(model, started_args, workdir, "dynamic") as target:
        if not args.target:
            run_sweep(target)
            info = _model_info(target)
        dynamic = asyncio.run(_measure(target, compare_spec, warmup=8))
    with serving(model, [*started_args, "--max-batch-size", "1"], workdir, "batch1") as target:
        batch1 = asyncio.run(_measure(target, compare_spec, warmup=2))

    def brief(r: dict[str, Any]) -> dict[str, Any]:
        return {
            "output_tok_per_s": r["output_tok_per_s"],
            "requests_per_s": r["requests_per_s"],
            "ttft_s": r["ttft_s"],
            "tpot_s": r["tpot_s"],
            "requests_ok": r["requests_ok"],
            "errors": r["errors"],
            "duration_s": r["duration_s"],
        }

    ratio = (
        dynamic["output_tok_per_s"] / batch1["output_tok_per_s"]
        if batch1["output_tok_per_s"]
        else None
    )
    result = {
        "benchmark": "bench_serving",
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": _git(),
        "device": _device(),
        "model": {"source": model_desc, **info},
        "workload": {
            "prompt_tokens": args.prompt_len,
            "max_new_tokens": args.max_new_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "api": "autoglm.v1 GenerateStream (gRPC), closed loop",
            "requests_per_level": {str(c): max(16, c * args.requests_per_slot) for c in levels},
            "compare_requests": args.compare_requests,
        },
        "config": {
            "sweep_target": args.target or "self-started, default batching policy",
            "server_args": started_args,
            "compare": f"default policy vs --max-batch-size 1, concurrency {args.compare_concurrency}",
        },
        "sweep": {level: brief(r) for level, r in sweep.items()},
        "batching": {
            "concurrency": args.compare_concurrency,
            "dynamic": brief(dynamic),
            "batch_size_1": brief(batch1),
            "throughput_ratio": ratio,
            "target_ratio": 8.0,
        },
    }
    line = json.dumps(result)
    print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    (args.out / f"bench_serving-{stamp}.json").write_text(line + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
