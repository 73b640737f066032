"""The KV cache: allocated once, at start-up; nothing is reallocated per step."""

from __future__ import annotations

import logging

import torch

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)


class SlotKVCache:
    """One fixed region per slot: ``[layers, slots, kv_heads, max_model_len + 1, head_dim]``.

    The extra position per slot is a scratch column that CUDA-graph decode
    steps write idle rows into; it is never read.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        max_model_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.scratch_pos = max_model_len
        shape = (num_slots, num_kv_heads, max_model_len + 1, head_dim)
        cache_shape = (num_layers, *shape)
        try:
            self.k = torch.zeros(cache_shape, dtype=dtype, device=device)
            self.v = torch.zeros(cache_shape, dtype=dtype, device=device)
        except torch.OutOfMemoryError as exc:
            need = 2 * torch.Size(cache_shape).numel() * dtype.itemsize / 2**30
            raise ModelLoadError(
                f"the KV cache ({need:.1f} GiB for {num_slots} slots x {max_model_len} tokens) "
                "does not fit; lower max_batch_size or max_model_len"
            ) from exc
        logger.info(
            "KV cache: %d layers x %d slots x %d tokens (%.1f MiB)",
            num_layers,
            num_slots,
            max_model_len,
            self.memory_bytes() / 2**20,
        )

    def memory_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
