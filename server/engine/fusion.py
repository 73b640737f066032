"""Fused projections, applied to the loaded model once, before it is compiled.

A decode step is a chain of matrix-vector products over the weights. Three
small GEMMs for Q, K and V (the K/V ones, with few KV heads, are too small to
reach the memory bandwidth) and two for gate/up cost more than one GEMM over
the concatenated weights. :func:`fuse_projections` concatenates them in place:

- attention: ``q_proj``, ``k_proj``, ``v_proj`` -> one ``qkv_proj`` (bias too,
  as GLM-4 has one); the module's class is swapped for a subclass whose
  ``forward`` splits the fused output and otherwise does what the original
  does (the model's own rotary function, then the ``autoglm`` attention);
- MLP (Llama): ``gate_proj``, ``up_proj`` -> one ``gate_up_proj``. GLM-4's MLP
  is already fused.

Only the families whose forward is known (Llama, GLM-4) are fused, and only
when every projection is a plain ``nn.Linear`` (a quantized or sharded layer
from another loader is left alone). The originals are freed as each layer is
fused, so the peak memory grows by one layer's projections at most.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from torch import nn

from .attention import autoglm_attention

logger = logging.getLogger(__name__)

# Attention / MLP classes whose forward this module reproduces exactly.
_ATTENTION_CLASSES = frozenset({"LlamaAttention", "Glm4Attention"})
_MLP_CLASSES = frozenset({"LlamaMLP"})

_fused_classes: dict[type, type] = {}


def _concat_linear(parts: list[nn.Linear]) -> nn.Linear:
    first = parts[0]
    weight = torch.cat([p.weight.data for p in parts], dim=0)
    has_bias = first.bias is not None
    fused = nn.Linear(
        first.in_features, weight.shape[0], bias=has_bias, device="meta", dtype=weight.dtype
    )
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(
            torch.cat([p.bias.data for p in parts], dim=0),
            requires_grad=False,
        )
    return fused


def _plain(*mods: Any) -> bool:
    if not all(type(m) is nn.Linear and type(m.weight.data) is torch.Tensor for m in mods):
        return False  # quantized (a tensor subclass) or otherwise special: left alone
    first = mods[0]
    return all(
        m.in_features == first.in_features
        and m.weight.dtype == first.weight.dtype
        and m.weight.device == first.weight.device
        and (m.bias is None) == (first.bias is None)
        for m in mods
    )


def _attention_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = self.qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1)
    query = q.view(hidden_shape).transpose(1, 2)
    key = k.view(hidden_shape).transpose(1, 2)
    value = v.view(hidden_shape).transpose(1, 2)
    assert position_embeddings is not None
    cos, sin = position_embeddings
    query, key = self.rotary_fn(query, key, cos, sin)
    out, _ = autoglm_attention(self, query, key, value, attention_mask, scaling=self.scaling)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), None


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    out: torch.Tensor = self.down_proj(self.act_fn(gate) * up)
    return out


def _fused_class(cls: type, forward: Any, extra: dict[str, Any]) -> type:
    fused = _fused_classes.get(cls)
    if fused is None:
        fused = type(f"Fused{cls.__name__}", (cls,), {"forward": forward, **extra})
        _fused_classes[cls] = fused
    return fused


def fuse_projections(model: nn.Module) -> dict[str, int]:
    """Fuse QKV and gate/up projections in place; returns how many modules were fused."""
    counts = {"attention": 0, "mlp": 0}
    for module in model.modules():
        name = type(module).__name__
        if name in _ATTENTION_CLASSES:
            m: Any = module
            if not hasattr(m, "q_proj") or not _plain(m.q_proj, m.k_proj, m.v_proj):
                continue
            rotary = getattr(sys.modules[type(m).__module__], "apply_rotary_pos_emb", None)
            if rotary is None:
                continue
            sizes = [m.q_proj.out_features, m.k_proj.out_features, m.v_proj.out_features]
            m.qkv_proj = _concat_linear([m.q_proj, m.k_proj, m.v_proj])
            del m.q_proj, m.k_proj, m.v_proj
            m.qkv_sizes = sizes
            m.__class__ = _fused_class(
                type(m), _attention_forward, {"rotary_fn": staticmethod(rotary)}
            )
            counts["attention"] += 1
        elif name in _MLP_CLASSES:
            m = module
            if not hasattr(m, "gate_proj") or not _plain(m.gate_proj, m.up_proj):
                continue
            if m.gate_proj.out_features != m.up_proj.out_features:
                continue
            m.gate_up_proj = _concat_linear([m.gate_proj, m.up_proj])
            del m.gate_proj, m.up_proj
            m.__class__ = _fused_class(type(m), _mlp_forward, {})
            counts["mlp"] += 1
    if counts["attention"] or counts["mlp"]:
        logger.info(
            "fused projections: %d attention (QKV), %d MLP (gate/up)",
            counts["attention"],
            counts["mlp"],
        )
    return counts
