"""The runner on a CUDA device: CUDA-graph decode equals eager decode and HF's generate.

Run on the GPU machine only: ``pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from transformers import AutoModelForCausalLM  # noqa: E402

from autoglm_server.engine.api import SamplingParams  # noqa: E402
from autoglm_server.engine.runner import ModelRunner  # noqa: E402
from autoglm_server.engine.scheduler import ScheduledSeq, SchedulerOutput  # noqa: E402
from autoglm_server.testing import build_tiny_model  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], list(range(20, 45)), [40]]
SLOTS = [6, 1, 3, 0]  # sparse on purpose: idle graph rows in between


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def load(model_dir: Path, dtype: Any) -> Any:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda").eval()


def greedy(runner: ModelRunner, steps: int) -> list[list[int]]:
    seqs = [ScheduledSeq(str(i), SLOTS[i], p, 0, True, True, GREEDY) for i, p in enumerate(PROMPTS)]
    first = runner.execute(SchedulerOutput(1, seqs, 0, [])).sampled_token_ids
    toks = [[*p, t] for p, t in zip(PROMPTS, first, strict=True)]
    for _ in range(steps):
        seqs = [
            ScheduledSeq(str(i), SLOTS[i], [toks[i][-1]], len(toks[i]) - 1, True, False, GREEDY)
            for i in range(len(PROMPTS))
        ]
        for i, t in enumerate(runner.execute(SchedulerOutput(2, seqs, 0, [])).sampled_token_ids):
            toks[i].append(t)
    return toks


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_decode_matches_hf_generate(model_dir: Path, dtype: str) -> None:
    torch_dtype = getattr(torch, dtype)
    runner = ModelRunner(
        load(model_dir, torch_dtype), num_slots=8, max_model_len=300, device=torch.device("cuda")
    )
    runner.warmup()
    got = greedy(runner, steps=12)
    assert runner._graphs, "decode steps did not use a CUDA graph"
    reference = load(model_dir, torch_dtype)
    for i, prompt in enumerate(PROMPTS):
        expected = reference.generate(
            torch.tensor([prompt], device="cuda"),
            max_new_tokens=13,
            do_sample=False,
            eos_token_id=None,
        )[0].tolist()
        assert got[i] == expected


def test_graph_and_eager_decode_agree(model_dir: Path) -> None:
    graphs = ModelRunner(
        load(model_dir, torch.float32), num_slots=8, max_model_len=300, device=torch.device("cuda")
    )
    eager = ModelRunner(
        load(model_dir, torch.float32),
        num_slots=8,
        max_model_len=300,
        device=torch.device("cuda"),
        cuda_graphs=False,
    )
    # 280 steps crosses the 256-token kv bucket boundary.
    assert greedy(graphs, steps=260) == greedy(eager, steps=260)
    assert {kv for _, kv in graphs._graphs} == {256, 300}


def test_engine_on_cuda_end_to_end(model_dir: Path) -> None:
    """Loader (dtype auto -> bf16 on GPU), warm-up with graph capture, concurrent streams."""
    import asyncio

    from autoglm_server.engine.api import GenerationRequest
    from autoglm_server.engine.config import BatchingConfig, EngineConfig
    from autoglm_server.engine.engine import build_engine

    async def main() -> list[list[int]]:
        cfg = EngineConfig(
            model=str(model_dir),
            device="cuda",
            max_model_len=256,
            batching=BatchingConfig(max_batch_size=8),
        )
        engine = build_engine(cfg)
        await engine.start()
        assert engine.model_info.dtype == "bfloat16"
        params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)

        async def one(i: int) -> list[int]:
            req = GenerationRequest(f"r{i}", PROMPTS[i], params)
            return [t async for d in engine.generate(req) for t in d.token_ids]

        outs = await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))
        await engine.shutdown(grace_s=1)
        return list(outs)

    outs = asyncio.run(main())
    reference = load(model_dir, torch.bfloat16)
    for prompt, got in zip(PROMPTS, outs, strict=True):
        expected = reference.generate(
            torch.tensor([prompt], device="cuda"),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
        )[0, len(prompt) :].tolist()
        assert got == expected
