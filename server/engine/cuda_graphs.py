"""CUDA-graph capture for decode steps.

Per-step CPU work (Python, kernel launches) is larger than the GPU work of a
9B model's decode step, so pure-decode steps replay a captured graph instead
of running the model eagerly. A graph covers the slots ``[0, rows)`` and kv
lengths up to ``kv_len``, bucketed to powers of two, so a few dozen graphs
(captured during warm-up) serve every decode step. If capture fails for some
architecture, :class:`DecodeGraphs` logs it once and disables itself; the
runner then decodes eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

MIN_KV_BUCKET = 256

# forward(inputs [3, rows] int64, rows, kv_len) -> logits [rows, vocab] float32
GraphForward = Callable[[torch.Tensor, int, int], torch.Tensor]


@dataclass(slots=True)
class DecodeGraph:
    """A captured decode step over slots [0, rows) attending to at most kv_len positions."""

    graph: Any  # torch.cuda.CUDAGraph
    rows: int
    kv_len: int
    inputs: torch.Tensor  # [3, rows] int64: token ids, positions, KV write positions
    logits: torch.Tensor  # [rows, vocab] float32, overwritten by every replay


class DecodeGraphs:
    """The captured decode graphs, keyed by (rows, kv_len) bucket."""

    def __init__(
        self,
        forward: GraphForward,
        *,
        num_slots: int,
        max_model_len: int,
        scratch_pos: int,
        device: torch.device,
        enabled: bool,
    ) -> None:
        self._forward = forward
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self.scratch_pos = scratch_pos
        self.device = device
        self.enabled = enabled
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}
        self._pool: Any = torch.cuda.graph_pool_handle() if enabled else None

    def bucket(self, max_slot: int, longest: int) -> tuple[int, int]:
        """(rows, kv_len) for a step whose highest slot is max_slot and longest kv is longest."""
        rows = pow2_at_least(max_slot + 1, self.num_slots)
        kv_len = min(pow2_at_least(longest, None, MIN_KV_BUCKET), self.max_model_len)
        return rows, kv_len

    def get(self, rows: int, kv_len: int) -> DecodeGraph | None:
        """The graph for this bucket, capturing it once; None once capture has failed."""
        graph = self.graphs.get((rows, kv_len))
        return graph if graph is not None else self._capture_or_disable(rows, kv_len)

    def _capture_or_disable(self, rows: int, kv_len: int) -> DecodeGraph | None:
        try:
            graph = self._capture(rows, kv_len)
        except Exception as exc:  # e.g. a model with data-dependent control flow
            logger.warning("CUDA graph capture failed, decoding eagerly from now on: %s", exc)
            self.enabled = False
            self.graphs.clear()
            return None
        self.graphs[(rows, kv_len)] = graph
        logger.debug("captured decode graph: %d rows, kv length %d", rows, kv_len)
        return graph

    def _capture(self, rows: int, kv_len: int) -> DecodeGraph:
        inputs = torch.zeros(3, rows, dtype=torch.int64, device=self.device)
        inputs[2].fill_(self.scratch_pos)  # all rows idle while warming up and capturing
        stream_cls: Any = torch.cuda.Stream  # untyped in torch's stubs
        stream = stream_cls(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(inputs, rows, kv_len)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(inputs, rows, kv_len)
        return DecodeGraph(graph, rows, kv_len, inputs, logits)

    def capture_all(self) -> None:
        """Capture a decode graph for every (rows, kv length) bucket."""
        rows_buckets = sorted(
            {pow2_at_least(n, self.num_slots) for n in range(1, self.num_slots + 1)}
        )
        # Every kv length the lazy path can ask for: powers of two from the floor, then the cap.
        top = self.max_model_len.bit_length() + 1
        kv_buckets = sorted(
            {min(pow2_at_least(2**k, None, MIN_KV_BUCKET), self.max_model_len) for k in range(top)}
        )
        for rows in rows_buckets:
            for kv_len in kv_buckets:
                if not self.enabled:
                    return
                if (rows, kv_len) not in self.graphs:
                    self._capture_or_disable(rows, kv_len)
        logger.info("captured %d CUDA graphs for decode", len(self.graphs))


def pow2_at_least(n: int, cap: int | None, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor), capped at ``cap``."""
    size = floor
    while size < n:
        size *= 2
    return size if cap is None else min(size, cap)
