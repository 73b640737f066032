"""Tensor parallelism on CPU: ranks over gloo, one process each, equal TP=1 token for token.

Each engine here starts real rank processes (``python -m autoglm_server.engine.parallel``)
that join a gloo process group with the test process as rank 0.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from autoglm_server.engine.api import GenerationRequest, SamplingParams  # noqa: E402
from autoglm_server.engine.config import BatchingConfig, EngineConfig  # noqa: E402
from autoglm_server.engine.engine import LLMEngine, build_engine  # noqa: E402
from autoglm_server.engine.parallel import check_shardable, kv_head_range  # noqa: E402
from autoglm_server.errors import ModelLoadError  # noqa: E402

pytestmark = pytest.mark.slow

# Lengths that mix one-block prompts, chunked prefill (budget 24 tokens a step) and
# a shared prefix (the prefix cache), all running together.
SHARED = list(range(10, 42))
PROMPTS = (
    [5, 6, 7],
    list(range(100, 150)),
    [*SHARED, 200, 201],
    [*SHARED, 300],
    [7],
)


def cfg(model_dir: Path, tp: int, **kw: object) -> EngineConfig:
    return EngineConfig(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        max_model_len=256,
        tensor_parallel_size=tp,
        batching=BatchingConfig(max_batch_size=4, max_batch_tokens=24),
        **kw,  # type: ignore[arg-type]
    )


async def run(engine: LLMEngine) -> list[list[int]]:
    async def one(i: int, prompt: list[int]) -> list[int]:
        params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
        if i == 1:  # one sampled request with a seed: the same draws on every rank count
            params = SamplingParams(max_new_tokens=16, temperature=0.8, seed=7, ignore_eos=True)
        req = GenerationRequest(f"r{i}", prompt, params)
        return [t async for d in engine.generate(req) for t in d.token_ids]

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS))))


async def generate(model_dir: Path, tp: int, **kw: object) -> tuple[list[list[int]], LLMEngine]:
    engine = build_engine(cfg(model_dir, tp, **kw))
    await engine.start()
    try:
        return await run(engine), engine
    finally:
        await engine.shutdown(grace_s=0)


@pytest.mark.parametrize("arch", ["glm4", "llama"])
async def test_tp2_equals_tp1_token_for_token(
    arch: str, tiny_model_dir: Path, tiny_llama_dir: Path
) -> None:
    model_dir = tiny_model_dir if arch == "glm4" else tiny_llama_dir
    want, _ = await generate(model_dir, 1)
    got, engine = await generate(model_dir, 2)
    assert got == want
    assert all(len(t) == 16 for t in got)
    info = engine.model_info
    assert info.tensor_parallel_size == 2
    # every step reaches the other ranks through execute(): no pipelined launch/collect
    assert not hasattr(engine._runner, "launch") and not hasattr(engine._runner, "collect")
    labels = {
        "model": engine.served_model_name,
        "version": "local",
        "quantization": "none",
        "tensor_parallel_size": "2",
    }
    assert engine.metrics.registry.get_sample_value("autoglm_model_config_info", labels) == 1
    # every rank process has exited
    assert engine._tp is not None
    assert [p.returncode for p in engine._tp.procs] == [0]


async def test_tp4_replicates_the_two_kv_heads(tiny_llama_dir: Path) -> None:
    """4 query heads, 2 KV heads: at TP=4 each KV head lives on two ranks."""
    want, _ = await generate(tiny_llama_dir, 1)
    got, engine = await generate(tiny_llama_dir, 4)
    assert got == want
    assert engine._tp is not None and [p.returncode for p in engine._tp.procs] == [0, 0, 0]


async def test_tp2_with_int8_weights_equals_tp1_with_int8(tiny_model_dir: Path) -> None:
    pytest.importorskip("torchao")
    want, _ = await generate(tiny_model_dir, 1, quantization="int8")
    got, engine = await generate(tiny_model_dir, 2, quantization="int8")
    assert got == want
    assert engine.model_info.quantization == "int8"


def test_kv_heads_per_rank() -> None:
    # GLM-4-32B: 48 query heads, 2 KV heads
    assert [kv_head_range(r, 2, 48, 2) for r in range(2)] == [(0, 1), (1, 1)]
    assert [kv_head_range(r, 4, 48, 2) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [kv_head_range(r, 8, 48, 2)[0] for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    # Llama-3-8B: 32 query heads, 8 KV heads
    assert [kv_head_range(r, 4, 32, 8) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]


def test_unshardable_models_are_refused_naming_the_setting() -> None:
    from transformers import LlamaConfig

    def config(heads: int, kv_heads: int, inter: int = 64) -> object:
        return LlamaConfig(
            hidden_size=96,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=inter,
        )

    check_shardable(config(12, 4), 4)
    check_shardable(config(12, 2), 4)  # KV heads replicated
    with pytest.raises(ModelLoadError, match="8 does not divide num_attention_heads 12"):
        check_shardable(config(12, 4), 8)
    with pytest.raises(ModelLoadError, match="must divide one another"):
        check_shardable(config(24, 3), 2)
    with pytest.raises(ModelLoadError, match="4 does not divide intermediate_size 66"):
        check_shardable(config(8, 8, 66), 4)


def test_the_config_refuses_other_sizes(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size: must be 1, 2, 4 or 8"):
        cfg(tiny_model_dir, 3)


def failing_on_rank_1(config: EngineConfig) -> object:
    """A loader that fails on rank 1 only (the ranks find it by this file)."""
    import torch.distributed as dist

    from autoglm_server.engine.loader import load_model

    if dist.get_rank() == 1:
        raise ModelLoadError("rank 1 cannot load (test)")
    return load_model(config)


async def test_a_rank_that_fails_to_load_fails_the_start_without_a_hang(
    tiny_model_dir: Path,
) -> None:
    engine = LLMEngine(cfg(tiny_model_dir, 2), loader=failing_on_rank_1)
    fatal: list[BaseException] = []
    engine.on_fatal = fatal.append
    async with asyncio.timeout(300):  # a hang would wait on rank 1's collective for ever
        with pytest.raises(Exception) as err:
            await engine.start()
    assert engine._tp is not None
    # no rank is left running (rank 1 exited with 1, or was killed on the way out)
    assert all(p.returncode not in (None, 0) for p in engine._tp.procs)
    assert not engine.is_ready()
    # whichever came first: rank 0's collective failing, or the watcher of rank 1
    assert "Connection closed" in str(err.value) or "rank 1" in str(err.value) or fatal
