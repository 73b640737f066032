"""What the in-process GPU benchmarks share (not a benchmark itself).

``bench_profile.py`` and ``bench_suite.py`` build one random model of a
``bench_gpu.SHAPES`` shape, put engines on a runner they built and warmed up
once, serve that engine with the production gRPC front end in the same process
and drive it from a client process. ``bench_tp.py`` and ``bench_quant.py`` (and
those two) stamp and write their results here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu
import bench_serving


def build_model(shape: str, device: str) -> Any:
    """A ``bench_gpu.SHAPES`` model with random weights (seed 0) built on ``device``:
    bf16 on CUDA, float32 elsewhere; a 131072-token context."""
    import torch
    from transformers import AutoModelForCausalLM, Glm4Config, LlamaConfig

    spec = dict(bench_gpu.SHAPES[shape])
    arch = spec.pop("arch")
    cls = Glm4Config if arch == "Glm4ForCausalLM" else LlamaConfig
    config = cls(**spec, max_position_embeddings=131072, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def make_engine(shape: str, device: str, model: Any, runner: Any, slots: int, **cfg: Any) -> Any:
    """An ``LLMEngine`` (not started) on ``runner``, already built and warmed up: its
    start loads nothing and builds no runner. ``cfg``: more ``EngineConfig`` fields."""
    import torch

    from autoglm_server.engine.config import BatchingConfig, EngineConfig
    from autoglm_server.engine.engine import LLMEngine
    from autoglm_server.engine.loader import LoadedModel

    spec = bench_gpu.SHAPES[shape]
    loaded = LoadedModel(
        model=model,
        tokenizer=bench_gpu.make_tokenizer(spec["vocab_size"]),
        model_dir=Path("."),
        device=torch.device(device),
        dtype=runner.dtype,
        max_model_len=runner.max_model_len,
        architecture=spec["arch"],
        vocab_size=spec["vocab_size"],
        eos_token_ids=frozenset({1}),
    )
    config = EngineConfig(
        model=shape,
        device=device,
        max_model_len=runner.max_model_len,
        batching=BatchingConfig(max_batch_size=slots, max_batch_tokens=8192, max_queue_length=8192),
        **cfg,
    )
    engine = LLMEngine(config, loader=lambda _c: loaded)
    engine._build_runner = lambda _loaded: runner  # type: ignore[method-assign]
    return engine


@asynccontextmanager
async def grpc_server(engine: Any) -> AsyncIterator[str]:
    """The production front end (``ServerProcess``) in this process on ``engine`` (no
    second load or warm-up); yields its gRPC target once SERVING, drains on the way out."""
    from autoglm_server.app import ServeOptions, ServerProcess
    from autoglm_server.frontend import Phase

    port = bench_serving._free_port()
    options = ServeOptions(
        host="127.0.0.1", grpc_port=port, http_port=bench_serving._free_port(), metrics_port=0,
        shutdown_grace_s=1.0,
    )  # fmt: skip
    server = ServerProcess(engine.config, options, engine_factory=lambda _c, _f: engine)
    task = asyncio.create_task(server.run())
    while server.state.phase != Phase.SERVING:
        if task.done():
            raise RuntimeError(f"server exited: {task.result()}")
        await asyncio.sleep(0.1)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.request_stop("benchmark done")
        await task


async def run_client(script: str, *argv: str) -> dict[str, Any]:
    """``script --client ARGV...`` in a separate process (so the load generator does not
    share our GIL); the JSON object on its last line of output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, script, "--client", *argv, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await proc.communicate()
    result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return result


def provenance() -> dict[str, Any]:
    """When, which commit, on what: a result's ``time``, ``git`` and ``device``."""
    import torch

    return {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": bench_serving._git(),
        "device": {**bench_serving._device(), "torch": torch.__version__},
    }


def stamp() -> str:
    """UTC now as a result file's name has it: 20261128T093452Z."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def result_path(out: str | Path, bench: str, shape: str, when: str | None = None) -> Path:
    """``OUT/BENCH-SHAPE-STAMP.json`` (``when`` or now), the folder made if missing."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{bench}-{shape}-{when or stamp()}.json"


def write_result(path: Path, record: dict[str, Any]) -> str:
    """``record`` as one JSON line in ``path`` (rewritten); the line."""
    line = json.dumps(record)
    path.write_text(line + "\n")
    return line
