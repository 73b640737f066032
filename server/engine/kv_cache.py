"""The paged KV cache: one pool of fixed-size blocks per layer, allocated once.

Layout, per layer: ``[num_blocks * block_size, kv_heads, head_dim]`` (token
major), so token ``i`` of a request lives at flat row
``table[i // block_size] * block_size + i % block_size``. Which blocks a
request holds is the scheduler's business (``block_manager.py``); the runner
keeps a copy of each slot's block table and turns it into flat indices.

How many blocks: on CUDA, from the memory left after the model and a profiled
forward pass of the largest step, times a configurable fraction of the whole
device; on CPU, enough for ``max_batch_size`` full-length requests unless told.
"""

from __future__ import annotations

import logging

import torch

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)


def bytes_per_block(
    *, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def blocks_for_memory(
    device: torch.device, fraction: float, per_block: int, *, reserve_bytes: int = 1 << 30
) -> int:
    """Blocks that fit in ``fraction`` of the device, after what is allocated or was at peak.

    Call after a profiling forward pass of the largest step, so its activations
    count through ``max_memory_allocated``; ``reserve_bytes`` covers CUDA
    graphs, sampling and the allocator's fragmentation.
    """
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    peak = torch.cuda.max_memory_allocated(device)
    budget = int(total * fraction) - used_by_others - peak - reserve_bytes
    return max(0, budget // per_block)


class PagedKVCache:
    """K and V pools: ``[layers, num_blocks * block_size, kv_heads, head_dim]`` each."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        try:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
        except torch.OutOfMemoryError as exc:
            need = 2 * torch.Size(shape).numel() * dtype.itemsize / 2**30
            raise ModelLoadError(
                f"the KV cache ({need:.1f} GiB for {num_blocks} blocks of {block_size} tokens) "
                "does not fit; lower kv_cache_memory_fraction or num_kv_blocks"
            ) from exc
        logger.info(
            "KV cache: %d layers x %d blocks x %d tokens = %d tokens (%.1f MiB)",
            num_layers,
            num_blocks,
            block_size,
            num_blocks * block_size,
            self.memory_bytes() / 2**20,
        )

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def memory_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
