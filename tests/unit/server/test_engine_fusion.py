"""Fused QKV / gate-up projections (engine/fusion.py): same logits, fewer GEMMs."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from autoglm_server.engine.fusion import fuse_projections  # noqa: E402
from autoglm_server.engine.runner import ModelRunner  # noqa: E402


def load(model_dir: Path) -> object:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize(("arch_fixture", "mlps"), [("tiny_model_dir", 0), ("tiny_llama_dir", 2)])
def test_projections_are_fused_once_and_weights_concatenated(
    arch_fixture: str, mlps: int, request: pytest.FixtureRequest
) -> None:
    model_dir: Path = request.getfixturevalue(arch_fixture)
    model = load(model_dir)
    attn = model.model.layers[0].self_attn  # type: ignore[attr-defined]
    q, k, v = attn.q_proj.weight.clone(), attn.k_proj.weight.clone(), attn.v_proj.weight.clone()
    runner = ModelRunner(model, num_slots=2, max_model_len=64, device=torch.device("cpu"))  # type: ignore[arg-type]
    assert runner.fused == {"attention": 2, "mlp": mlps}
    assert not hasattr(attn, "q_proj")
    assert torch.equal(attn.qkv_proj.weight, torch.cat([q, k, v]))
    # GLM-4 has a QKV bias: fused in the same order
    if arch_fixture == "tiny_model_dir":
        assert attn.qkv_proj.bias is not None
    assert fuse_projections(model) == {"attention": 0, "mlp": 0}  # idempotent  # type: ignore[arg-type]


def test_unfused_runner_keeps_the_original_modules(tiny_llama_dir: Path) -> None:
    model = load(tiny_llama_dir)
    runner = ModelRunner(
        model,
        num_slots=2,
        max_model_len=64,
        device=torch.device("cpu"),
        fuse=False,  # type: ignore[arg-type]
    )
    assert runner.fused == {"attention": 0, "mlp": 0}
    assert hasattr(model.model.layers[0].self_attn, "q_proj")  # type: ignore[attr-defined]
