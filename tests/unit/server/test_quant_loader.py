"""Quantised tiny models load through the real loader and generate through the engine (CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")

from autoglm_server.engine.api import GenerationRequest, SamplingParams  # noqa: E402
from autoglm_server.engine.config import BatchingConfig, EngineConfig  # noqa: E402
from autoglm_server.engine.engine import LLMEngine, build_engine  # noqa: E402
from autoglm_server.engine.loader import load_model  # noqa: E402
from autoglm_server.engine.quant import (  # noqa: E402
    measure_footprint,
    plan_quantization,
    quantize_model,
)
from autoglm_server.errors import ModelLoadError  # noqa: E402

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = ([5, 6, 7, 8], [40, 41], [100, 7, 300, 9, 11])
GLM9B_SHAPE = {
    "vocab_size": 151552,
    "hidden_size": 4096,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "intermediate_size": 13696,
    "attention_bias": True,
    "tie_word_embeddings": False,
}


def cfg(model_dir: Path, quantization: str, **kw: object) -> EngineConfig:
    return EngineConfig(
        model=str(model_dir),
        device="cpu",
        dtype="float32",
        max_model_len=128,
        quantization=quantization,
        batching=BatchingConfig(max_batch_size=4, max_batch_tokens=64),
        **kw,  # type: ignore[arg-type]
    )


def hf_model(model_dir: Path, method: str) -> Any:
    """transformers' own model with the same quantised weights, unfused (its own attention)."""
    from transformers import AutoModelForCausalLM

    auto_model: Any = AutoModelForCausalLM
    model = auto_model.from_pretrained(model_dir, dtype=torch.float32)
    quantize_model(model, method, torch.device("cpu"), fuse=False)
    return model.eval()


async def generate(engine: LLMEngine) -> list[list[int]]:
    out = []
    for i, prompt in enumerate(PROMPTS):
        req = GenerationRequest(f"r{i}", list(prompt), GREEDY)
        out.append([t async for d in engine.generate(req) for t in d.token_ids])
    return out


@pytest.mark.parametrize(
    ("method", "tensor_type"),
    [("int8", "Int8Tensor"), ("fp8", "Float8Tensor"), ("int4", "IntxUnpackedToInt8Tensor")],
)
def test_the_loader_quantises_the_decoder_linears_only(
    tiny_model_dir: Path, method: str, tensor_type: str
) -> None:
    loaded = load_model(cfg(tiny_model_dir, method))
    model = loaded.model
    assert loaded.quantization == method
    layer = model.model.layers[0]
    # fused first (Q/K/V in one GEMM, as the runner does for bf16), then quantised
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert type(linear.weight).__name__ == tensor_type
    # the embeddings and the LM head keep the model dtype
    assert type(model.lm_head.weight) is torch.nn.Parameter
    assert type(model.model.embed_tokens.weight) is torch.nn.Parameter
    assert model.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize(("method", "tolerance"), [("int8", 0.05), ("fp8", 0.2), ("int4", 0.7)])
def test_quantised_logits_stay_close_to_float32(
    tiny_model_dir: Path, method: str, tolerance: float
) -> None:
    ids = torch.tensor([list(range(3, 40))])
    with torch.inference_mode():
        want = hf_model(tiny_model_dir, "none")(ids).logits
        got = hf_model(tiny_model_dir, method)(ids).logits
    # relative error of the logits (measured: int8 0.03, fp8 0.11, int4 0.44; the toy
    # model's 0.2-std random weights amplify it through the layers)
    error = float((got - want).norm() / want.norm())
    assert 0 < error < tolerance


@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
async def test_quantised_models_generate_through_the_engine_as_transformers_does(
    tiny_model_dir: Path, method: str
) -> None:
    """Greedy tokens through the engine (paged KV, packed batches) equal transformers'
    own generate() on the same quantised weights."""
    reference = hf_model(tiny_model_dir, method)
    want = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            out = reference.generate(
                torch.tensor([prompt]),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            want.append(out[0, len(prompt) :].tolist())

    engine = build_engine(cfg(tiny_model_dir, method))
    await engine.start()
    try:
        got = await generate(engine)
        assert engine.model_info.quantization == method
        labels = {
            "model": engine.served_model_name,
            "version": "local",
            "quantization": method,
            "tensor_parallel_size": "1",
        }
        assert engine.metrics.registry.get_sample_value("autoglm_model_config_info", labels) == 1
    finally:
        await engine.shutdown(grace_s=0)
    assert got == want


def test_auto_on_cpu_keeps_the_dtype(tiny_model_dir: Path) -> None:
    loaded = load_model(cfg(tiny_model_dir, "auto"))
    assert loaded.quantization == "none"
    assert type(loaded.model.model.layers[0].mlp.down_proj.weight) is torch.nn.Parameter


def test_a_pre_quantised_torchao_checkpoint_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir,
        dtype=torch.float32,
        quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
    )
    out = tmp_path / "int8"
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    loaded = load_model(cfg(out, "auto"))
    assert loaded.quantization == "checkpoint:torchao"
    weight = loaded.model.model.layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ == "Int8Tensor"
    with pytest.raises(ModelLoadError, match="already quantised"):
        load_model(cfg(out, "int4"))


def write_fp8_checkpoint(src: Path, out: Path, block: int = 32) -> Path:
    """A fine-grained FP8 checkpoint as FP8 releases ship it: e4m3 weights with one
    float32 ``weight_scale_inv`` per ``block x block`` tile of each decoder Linear."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    tensors = {}
    for name, w in load_file(src / "model.safetensors").items():
        if ".layers." in name and name.endswith("proj.weight"):
            rows, cols = w.shape
            tiles = w.reshape(rows // block, block, cols // block, block)
            scale = tiles.abs().amax(dim=(1, 3)) / 448.0
            fp8 = (tiles / scale[:, None, :, None]).reshape(rows, cols)
            tensors[name] = fp8.to(torch.float8_e4m3fn)
            tensors[name.replace(".weight", ".weight_scale_inv")] = scale.float()
        else:
            tensors[name] = w
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [block, block],
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


async def test_a_fine_grained_fp8_checkpoint_loads_and_generates(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("accelerate")
    fp8_dir = write_fp8_checkpoint(tiny_model_dir, tmp_path / "fp8")
    loaded = load_model(cfg(fp8_dir, "auto"))
    assert loaded.quantization == "checkpoint:fp8"
    qkv = loaded.model.model.layers[0].self_attn.qkv_proj
    assert type(qkv.weight).__name__ == "Float8Tensor"  # served through torchao's fp8
    with pytest.raises(ModelLoadError, match="already quantised"):
        load_model(cfg(fp8_dir, "int8"))

    engine = build_engine(cfg(fp8_dir, "fp8"))
    await engine.start()
    try:
        got = await generate(engine)
        assert engine.model_info.quantization == "checkpoint:fp8"
    finally:
        await engine.shutdown(grace_s=0)
    assert [len(t) for t in got] == [12, 12, 12]


def test_an_unsupported_pre_quantised_format_is_refused_by_name(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    awq = tmp_path / "awq"
    shutil.copytree(tiny_model_dir, awq)
    config = json.loads((awq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (awq / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"pre-quantised as 'awq'.*supported: torchao, fp8"):
        load_model(cfg(awq, "none"))


def test_the_footprint_counts_a_glm9b_config_exactly() -> None:
    from transformers import Glm4Config

    config = Glm4Config(**GLM9B_SHAPE)
    fp = measure_footprint(config, torch.bfloat16)
    h, i, layers = 4096, 13696, 40
    assert fp.linear_params == layers * (h * (h + 2 * 256) + h * h + 3 * h * i)
    assert fp.kv_bytes_per_token == 2 * layers * 2 * 128 * 2
    # and auto, on the CPU, never quantises
    plan = plan_quantization(
        "auto",
        config,
        device=torch.device("cpu"),
        dtype=torch.bfloat16,
        max_model_len=8192,
        memory_fraction=0.9,
    )
    assert (plan.method, plan.reported) == ("none", "none")
