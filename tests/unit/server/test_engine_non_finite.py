"""A broken model (NaN or inf logits) fails its requests with INTERNAL instead of
emitting garbage: the sampler flags the rows in its one copy back, the engine
fails only those requests, counts them, and stays ready."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from autoglm_server.engine.api import GenerationRequest, SamplingParams  # noqa: E402
from autoglm_server.engine.config import BatchingConfig, EngineConfig  # noqa: E402
from autoglm_server.engine.engine import (  # noqa: E402
    NON_FINITE_MESSAGE,
    EngineStepError,
    LLMEngine,
    build_engine,
)
from autoglm_server.engine.sampling import Sampler  # noqa: E402
from autoglm_server.engine.scheduler import ScheduledSeq  # noqa: E402
from autoglm_server.testing import break_model  # noqa: E402

V = 32
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _seqs(params: list[SamplingParams]) -> list[ScheduledSeq]:
    return [
        ScheduledSeq(f"r{i}", i, [1], 0, True, True, p, is_prefill=True)
        for i, p in enumerate(params)
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("logprobs", [None, 2])
def test_sampler_flags_rows_with_nan_or_inf_logits(device: str, logprobs: int | None) -> None:
    dev = torch.device(device)
    s = Sampler(4, V, dev)
    params = [SamplingParams(temperature=0.0, logprobs=logprobs) for _ in range(4)]
    seqs = _seqs(params)
    s.admit(seqs)
    logits = torch.zeros(4, V)
    logits[:, 7] = 3.0
    logits[1, 3] = float("nan")
    logits[3, 0] = float("inf")
    slots = torch.arange(4, device=dev)
    ids, lp = s.to_host(s.sample(logits.to(dev), seqs, slots))
    assert s.non_finite_rows == [1, 3]
    assert ids[0] == 7 and ids[2] == 7
    assert all(0 <= t < V for t in ids)  # the bad rows' ids are still ids, never negative
    if logprobs is not None:
        assert lp is not None and lp[0] is not None and lp[0].token_id == 7


@pytest.mark.parametrize("device", DEVICES)
def test_masks_that_write_minus_inf_are_not_flagged(device: str) -> None:
    dev = torch.device(device)
    s = Sampler(1, V, dev)
    seqs = _seqs([SamplingParams(temperature=1.0, top_k=2, logit_bias=((5, -100.0),))])
    s.admit(seqs)
    ids, _ = s.to_host(
        s.sample(torch.randn(1, V).to(dev), seqs, torch.zeros(1, dtype=torch.long, device=dev))
    )
    assert s.non_finite_rows == [] and 0 <= ids[0] < V
    # The flag is per step: a later healthy step clears it.
    s.sample(
        torch.full((1, V), float("nan")).to(dev), seqs, torch.zeros(1, dtype=torch.long, device=dev)
    )
    s.to_host(torch.zeros(1, dtype=torch.long, device=dev))
    assert s.non_finite_rows == [0]
    s.sample(torch.zeros(1, V).to(dev), seqs, torch.zeros(1, dtype=torch.long, device=dev))
    s.to_host(torch.zeros(1, dtype=torch.long, device=dev))
    assert s.non_finite_rows == []


@pytest.fixture
async def broken_engine(tiny_model_dir: Path, tmp_path: Path) -> AsyncIterator[LLMEngine]:
    model = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, model)
    break_model(model)
    cfg = EngineConfig(
        model=str(model),
        device="cpu",
        dtype="float32",
        max_model_len=256,
        batching=BatchingConfig(max_batch_size=4, max_batch_tokens=128),
    )
    engine = build_engine(cfg)
    await engine.start()  # a broken model still loads and warms up: it fails per request
    yield engine
    await engine.shutdown(grace_s=0)


async def test_broken_model_fails_requests_with_internal_and_stays_ready(
    broken_engine: LLMEngine,
) -> None:
    for i in range(3):
        req = GenerationRequest(f"r{i}", [5, 6, 7], SamplingParams(max_new_tokens=4))
        with pytest.raises(EngineStepError) as info:
            async for delta in broken_engine.generate(req):
                assert not delta.token_ids, "a token from NaN logits reached the client"
        assert str(info.value) == NON_FINITE_MESSAGE
        assert info.value.grpc_code == "INTERNAL" and info.value.http_status == 500
    labels = {"model": broken_engine.served_model_name, "version": "local", "code": "INTERNAL"}
    registry = broken_engine.metrics.registry
    assert registry.get_sample_value("autoglm_requests_total", labels) == 3
    assert broken_engine.is_ready()
    assert broken_engine.stats().running == 0
