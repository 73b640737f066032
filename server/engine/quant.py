"""Weight quantisation: ``--quantization none | fp8 | int8 | int4 | auto``, through torchao.

torchao (PyTorch's own quantisation library, the ``quant`` extra) swaps the
weight of each ``nn.Linear`` of the decoder layers for a quantised tensor
subclass; the module, its forward, ``torch.compile`` and CUDA graphs stay as
they are. The embeddings and the LM head keep the model's dtype (they are a
small share of the weights, and the head is where quantisation error costs
most).

What each method is, by device:

| method | CUDA, compute capability >= 8.9 (H100) | other CUDA / CPU |
|---|---|---|
| ``fp8`` | e4m3 weights per row, activations quantised per row at run time, ``torch._scaled_mm`` (W8A8) | e4m3 weights, dequantised in the matmul (W8A16) |
| ``int8`` | int8 weights per output channel (W8A16) | same |
| ``int4`` | int4 weights in groups of 128, tinygemm (bfloat16 only) | int4 values in groups, stored unpacked in int8 (correctness only: no memory saved) |

``auto`` is :func:`choose_quantization`, a pure function of the model's
parameter counts, the KV budget that must fit beside it and the device's
memory: the highest precision whose weights plus the minimum KV cache fit.

Pre-quantised checkpoints (``quantization_config`` in ``config.json``) are
loaded by transformers when the format is one we serve (:data:`CHECKPOINT_FORMATS`);
any other format is refused with a :class:`~autoglm_server.errors.ModelLoadError`
that names it.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "fp8", "int8", "int4", "auto")
# Highest precision first: what ``auto`` tries, in order. Among the two 8-bit
# formats, fp8 is taken where the GPU multiplies in fp8 natively (it is then
# also the faster one); int8 elsewhere.
_PRECISION_ORDER = ("none", "fp8", "int8", "int4")
INT4_GROUP_SIZES = (128, 64, 32)
# Pre-quantised checkpoint formats (config.json quantization_config.quant_method)
# that load: torchao's own safetensors, served as stored; and fine-grained FP8
# (block-scaled e4m3, as DeepSeek/GLM FP8 releases ship): transformers
# dequantises it while loading (needs accelerate), then it is quantised again as
# ``fp8`` here, per row, so it runs through the same torchao path as any fp8 model.
CHECKPOINT_FORMATS = ("torchao", "fp8")


def weight_bytes_per_param(method: str, dtype_bytes: int, *, int4_group_size: int = 128) -> float:
    """Bytes per quantised weight, scales included (pure)."""
    if method == "none":
        return float(dtype_bytes)
    if method in ("fp8", "int8"):
        return 1.0  # one scale per row: negligible
    if method == "int4":
        return 0.5 + 2 * 2 / int4_group_size  # a bfloat16 scale and zero point per group
    raise ValueError(f"quantization: unknown method {method!r}")


@dataclass(frozen=True, slots=True)
class ModelFootprint:
    """What the memory plan needs to know about a model (from its config alone)."""

    linear_params: int  # weights of the decoder layers' Linear modules (quantisable)
    other_params: int  # embeddings, LM head, norms, biases: stay in the model dtype
    kv_bytes_per_token: int  # K and V of every layer for one token, in the model dtype


@dataclass(frozen=True, slots=True)
class QuantChoice:
    """What ``auto`` chose, and why; logged and reported."""

    method: str  # none | fp8 | int8 | int4
    weight_bytes: int  # per rank
    budget_bytes: int  # per rank: device memory x fraction - reserve - minimum KV
    reason: str


def choose_quantization(
    footprint: ModelFootprint,
    *,
    dtype_bytes: int,
    device_bytes: int,
    memory_fraction: float = 0.9,
    min_kv_tokens: int,
    reserve_bytes: int = 2 << 30,
    tensor_parallel_size: int = 1,
    fp8_native: bool = True,
    int4_supported: bool = True,
) -> QuantChoice:
    """The highest precision whose weights plus the minimum KV budget fit one device. Pure.

    Per rank, with tensor parallelism: the decoder's Linear weights and the KV
    cache are split ``tensor_parallel_size`` ways (KV heads are replicated when
    there are fewer of them than ranks, which ``kv_bytes_per_token`` of a rank
    already reflects if the caller passes it so); the embeddings and the LM head
    are replicated. ``min_kv_tokens`` is what must fit beside the weights (one
    ``max_model_len`` request at least); ``reserve_bytes`` covers activations,
    CUDA graphs and the allocator's slack. Raises ValueError if not even int4 fits.
    """
    tp = max(1, tensor_parallel_size)
    usable = int(device_bytes * memory_fraction) - reserve_bytes
    kv = footprint.kv_bytes_per_token * min_kv_tokens // tp
    budget = usable - kv
    tried: list[str] = []
    for method in _PRECISION_ORDER:
        if method == "fp8" and not fp8_native:
            continue
        if method == "int4" and not int4_supported:
            continue
        per_param = weight_bytes_per_param(method, dtype_bytes)
        weights = (
            int(footprint.linear_params / tp * per_param) + footprint.other_params * dtype_bytes
        )
        gib = weights / 2**30
        tried.append(f"{method} {gib:.1f} GiB")
        if weights <= budget:
            reason = (
                f"weights {gib:.1f} GiB + KV for {min_kv_tokens} tokens {kv / 2**30:.1f} GiB "
                f"fit {usable / 2**30:.1f} GiB usable per device"
                + (f" (tried {', '.join(tried[:-1])})" if len(tried) > 1 else "")
            )
            return QuantChoice(method, weights, budget, reason)
    raise ValueError(
        f"quantization: not even int4 fits: weights {', '.join(tried)} vs "
        f"{budget / 2**30:.1f} GiB left per device after {kv / 2**30:.1f} GiB of KV cache "
        f"(min {min_kv_tokens} tokens); use more GPUs (tensor_parallel_size) or a shorter max_model_len"
    )


def measure_footprint(
    hf_config: Any, dtype: Any, *, tensor_parallel_size: int = 1
) -> ModelFootprint:
    """Count parameters by building the model on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    auto_model: Any = AutoModelForCausalLM
    with torch.device("meta"):
        model = auto_model.from_config(hf_config, dtype=dtype)
    linear = 0
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _is_decoder_linear(name):
            linear += module.weight.numel()
    for param in model.parameters():
        total += param.numel()
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads)
    tp = max(1, tensor_parallel_size)
    kv_local = max(1, kv_heads // tp)  # replicated KV heads when tp > kv_heads
    itemsize = torch.empty(0, dtype=dtype).element_size()
    kv_per_token = 2 * int(hf_config.num_hidden_layers) * kv_local * head_dim * itemsize * tp
    return ModelFootprint(linear, total - linear, kv_per_token)


def _is_decoder_linear(name: str) -> bool:
    """Linear modules inside the decoder layers (not the LM head)."""
    return ".layers." in f".{name}"


def checkpoint_quantization(hf_config: Any) -> str | None:
    """The ``quant_method`` of a pre-quantised checkpoint, or None."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown")


def check_checkpoint_quantization(method: str, requested: str) -> None:
    """Refuse formats we don't load, and a flag that asks for a different quantisation."""
    if method not in CHECKPOINT_FORMATS:
        raise ModelLoadError(
            f"quantization: the checkpoint is pre-quantised as {method!r}, which this server "
            f"does not load (supported: {', '.join(CHECKPOINT_FORMATS)}); use a bf16 checkpoint "
            "with --quantization, or convert it"
        )
    if requested not in ("none", "auto", method):
        raise ModelLoadError(
            f"quantization: the checkpoint is already quantised ({method}); "
            f"--quantization {requested} cannot be applied on top (use auto or none)"
        )
    _require_torchao()
    if method == "fp8" and importlib.util.find_spec("accelerate") is None:
        # transformers' loader of FP8 checkpoints needs it
        raise ModelLoadError(
            "quantization: an fp8 checkpoint needs accelerate (pip install 'autoglm[quant]')"
        )


def prepare_checkpoint_config(hf_config: Any) -> None:
    """Ask transformers to dequantise a fine-grained FP8 checkpoint while loading it."""
    qc = getattr(hf_config, "quantization_config", None)
    if checkpoint_quantization(hf_config) != "fp8" or qc is None:
        return
    if isinstance(qc, dict):
        qc["dequantize"] = True
    else:
        qc.dequantize = True


def _require_torchao() -> Any:
    try:
        import torchao
    except ImportError as exc:
        raise ModelLoadError(
            "quantization: needs torchao (pip install 'autoglm[quant]'): " + str(exc)
        ) from exc
    return torchao


def fp8_native(device: Any) -> bool:
    """Whether ``device`` multiplies fp8 natively (CUDA compute capability >= 8.9)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 9)


def int4_group_size(model: Any) -> int:
    """The largest group size in :data:`INT4_GROUP_SIZES` dividing every quantised in-feature count."""
    import torch

    sizes = {
        m.in_features
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and _is_decoder_linear(n)
    }
    for group in INT4_GROUP_SIZES:
        if all(size % group == 0 for size in sizes):
            return group
    raise ModelLoadError(
        f"quantization: int4 needs every Linear's input size to be a multiple of 32, got {sorted(sizes)}"
    )


def torchao_config(method: str, device: Any, dtype: Any, *, group_size: int = 128) -> Any:
    """The torchao config object for ``method`` on ``device`` (see the module's table)."""
    import torch

    _require_torchao()
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerRow,
    )
    from torchao.quantization.granularity import PerGroup

    on_cuda = getattr(device, "type", str(device)) == "cuda"
    if method == "fp8":
        if on_cuda and fp8_native(device):
            return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        return Float8WeightOnlyConfig()
    if method == "int8":
        return Int8WeightOnlyConfig()
    if method == "int4":
        if on_cuda:
            if dtype != torch.bfloat16:
                raise ModelLoadError("quantization: int4 on CUDA needs dtype bfloat16")
            return Int4WeightOnlyConfig(
                group_size=group_size, int4_packing_format="tile_packed_to_4d"
            )
        int4: Any = getattr(torch, "int4")  # noqa: B009 - missing from torch's stubs
        return IntxWeightOnlyConfig(weight_dtype=int4, granularity=PerGroup(group_size))
    raise ValueError(f"quantization: no torchao config for {method!r}")


def quantize_model(model: Any, method: str, device: Any, *, fuse: bool = True) -> None:
    """Quantise the decoder layers' Linear weights in place, moving each to ``device`` first.

    Moving module by module means the bfloat16 model never has to fit the device
    whole: only its quantised form does. With ``fuse`` the Q/K/V and gate/up
    projections are first fused as the runner would (``fusion.py``, which leaves
    quantised layers alone), so the quantised model runs the same few GEMMs;
    every scale is per output row or per group of a row, so fusing does not
    change the numbers. A fused model's attention is the runner's: it then runs
    only inside :class:`~autoglm_server.engine.runner.ModelRunner`.
    """
    if method == "none":
        return
    import torch

    _require_torchao()
    from torchao.quantization import quantize_

    if fuse:
        from .fusion import fuse_projections

        fuse_projections(model)

    dtype = next(model.parameters()).dtype
    group = int4_group_size(model) if method == "int4" else 128
    config = torchao_config(method, device, dtype, group_size=group)

    def wanted(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and _is_decoder_linear(name)

    try:
        quantize_(model, config, filter_fn=wanted, device=device)
    except (AssertionError, RuntimeError, ImportError, ValueError) as exc:
        raise ModelLoadError(
            f"quantization: {method} ({type(config).__name__}) failed on {device}: {exc}"
        ) from exc
    logger.info("quantised the decoder's Linear weights: %s (%s)", method, type(config).__name__)


@dataclass(frozen=True, slots=True)
class QuantPlan:
    """What the loader does: the method (or the checkpoint's own format) and why."""

    method: str  # none | fp8 | int8 | int4: applied after loading; "none" for checkpoints
    reported: str  # what ModelInfo and the metric say: the method, or "checkpoint:<format>"
    reason: str


def plan_quantization(
    requested: str,
    hf_config: Any,
    *,
    device: Any,
    dtype: Any,
    max_model_len: int,
    memory_fraction: float,
    tensor_parallel_size: int = 1,
) -> QuantPlan:
    """Resolve ``--quantization`` against the checkpoint and the device (``auto`` here)."""
    stored = checkpoint_quantization(hf_config)
    if stored is not None:
        check_checkpoint_quantization(stored, requested)
        if stored == "fp8":
            reason = "fp8 checkpoint: dequantised on load, then fp8 per row"
            return QuantPlan("fp8", f"checkpoint:{stored}", reason)
        return QuantPlan("none", f"checkpoint:{stored}", "pre-quantised checkpoint")
    if requested != "auto":
        if requested != "none":
            _require_torchao()
        return QuantPlan(requested, requested, "requested")
    if getattr(device, "type", str(device)) != "cuda":
        return QuantPlan("none", "none", "auto: not on a GPU, nothing to fit")
    import torch

    footprint = measure_footprint(hf_config, dtype, tensor_parallel_size=tensor_parallel_size)
    try:
        choice = choose_quantization(
            footprint,
            dtype_bytes=torch.empty(0, dtype=dtype).element_size(),
            device_bytes=torch.cuda.get_device_properties(device).total_memory,
            memory_fraction=memory_fraction,
            min_kv_tokens=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            fp8_native=fp8_native(device),
            int4_supported=dtype == torch.bfloat16,
        )
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    if choice.method != "none":
        _require_torchao()
    return QuantPlan(choice.method, choice.method, f"auto: {choice.reason}")
