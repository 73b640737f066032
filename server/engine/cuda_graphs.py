"""CUDA-graph capture for decode steps.

Per-step CPU work (Python, kernel launches) is larger than the GPU work of a
9B model's decode step, so pure-decode steps replay a captured graph instead
of running the model eagerly. A graph serves any decode step of up to ``rows``
sequences: its inputs are static buffers (token ids, positions, flat KV write
rows, block-table rows and context lengths, one column per row), which each
step overwrites before the replay. Context lengths are read on the device by
the paged decode kernel, so graphs are bucketed by row count only (a few
dozen, captured during warm-up), never by context length. Idle rows have
length 0 and write their K/V into the scratch block, which is never read.

If capture fails for some architecture, :class:`DecodeGraphs` logs it once and
disables itself; the runner then decodes eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

# forward(inputs [5, rows] int64) -> logits [rows, vocab] float32
GraphForward = Callable[[torch.Tensor], torch.Tensor]

# inputs rows
IDS, POSITIONS, SLOT_MAPPING, ROW_SLOTS, SEQ_LENS = range(5)


@dataclass(slots=True)
class DecodeGraph:
    """A captured decode step of ``rows`` rows."""

    graph: Any  # torch.cuda.CUDAGraph
    rows: int
    inputs: torch.Tensor  # [5, rows] int64: ids, positions, KV write rows, table rows, lengths
    logits: torch.Tensor  # [rows, vocab] float32, overwritten by every replay


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16; the last is ``max_rows``."""
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, max_rows + 16, 16)]
    out = sorted({min(s, max_rows) for s in sizes})
    return out


class DecodeGraphs:
    """The captured decode graphs, keyed by row bucket."""

    def __init__(
        self,
        forward: GraphForward,
        *,
        max_rows: int,
        scratch_row: int,
        device: torch.device,
        enabled: bool,
    ) -> None:
        self._forward = forward
        self.max_rows = max_rows
        self.scratch_row = scratch_row
        self.device = device
        self.enabled = enabled
        self.buckets = row_buckets(max_rows)
        self.graphs: dict[int, DecodeGraph] = {}
        self._pool: Any = torch.cuda.graph_pool_handle() if enabled else None

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def get(self, rows: int) -> DecodeGraph | None:
        """The graph for ``rows`` rows (bucketed), capturing it once; None once capture failed."""
        size = self.bucket(rows)
        graph = self.graphs.get(size)
        return graph if graph is not None else self._capture_or_disable(size)

    def idle_inputs(self, rows: int) -> torch.Tensor:
        inputs = torch.zeros(5, rows, dtype=torch.int64)
        inputs[SLOT_MAPPING].fill_(self.scratch_row)
        return inputs

    def _capture_or_disable(self, rows: int) -> DecodeGraph | None:
        try:
            graph = self._capture(rows)
        except Exception as exc:  # e.g. a model with data-dependent control flow
            logger.warning("CUDA graph capture failed, decoding eagerly from now on: %s", exc)
            self.enabled = False
            self.graphs.clear()
            return None
        self.graphs[rows] = graph
        logger.debug("captured decode graph: %d rows", rows)
        return graph

    def _capture(self, rows: int) -> DecodeGraph:
        inputs = self.idle_inputs(rows).to(self.device)  # all rows idle while capturing
        stream_cls: Any = torch.cuda.Stream  # untyped in torch's stubs
        stream = stream_cls(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(inputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(inputs)
        return DecodeGraph(graph, rows, inputs, logits)

    def capture_all(self) -> None:
        """Capture a decode graph for every row bucket, largest first (they share one pool)."""
        for rows in reversed(self.buckets):
            if not self.enabled:
                return
            if rows not in self.graphs:
                self._capture_or_disable(rows)
        logger.info("captured %d CUDA graphs for decode", len(self.graphs))
