"""The one Prometheus module of the server.

Names and labels are the contract with the HPA and its metrics adapter (see
``docs/architecture.md``): every series carries ``model`` and ``version``;
``autoglm_requests_total`` adds ``code`` (a gRPC status name) and the GPU
gauges add ``gpu`` (the device index). Nothing is ever labelled by request,
and no prompt or output text passes through here.

A :class:`Metrics` object owns its own ``CollectorRegistry``, so tests (and a
process serving several engines) can create as many as they like without
"duplicated timeseries" errors. Gauges that the HPA scales on but that are not
simple counts — arrivals per second and TTFT p95 over the last 60 s — are
computed from sliding windows at scrape time. GPU gauges come from NVML when a
GPU and the library are present; otherwise they are simply absent.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

logger = logging.getLogger(__name__)

WINDOW_S = 60.0
# autoglm_requests_total codes exported at 0 from the start: OK and the
# server-side failures (HTTP 500/503/504 are counted under these).
ZERO_CODES = ("OK", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED")
_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
)  # fmt: skip
_TPOT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(slots=True)
class EngineStats:
    """A point-in-time view of the engine, read by the gauges at scrape time."""

    running: int  # requests in the running batch
    waiting: int  # requests in the queue
    kv_usage: float  # used KV cache blocks / capacity, 0..1
    prefix_hit_rate: float = 0.0  # prompt tokens found in the prefix cache / looked up


class _SlidingWindow:
    """Timestamps (and optional values) over the last ``window_s`` seconds. Thread-safe."""

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self._window_s = window_s
        self._clock = clock
        self._items: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def add(self, value: float = 0.0) -> None:
        now = self._clock()
        with self._lock:
            self._items.append((now, value))
            self._trim(now)

    def _trim(self, now: float) -> None:
        cutoff = now - self._window_s
        items = self._items
        while items and items[0][0] < cutoff:
            items.popleft()

    def values(self) -> list[float]:
        with self._lock:
            self._trim(self._clock())
            return [v for _, v in self._items]


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0 for no data (the HPA reads "no load")."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


class Metrics:
    """All server metrics for one served model, on a private registry."""

    def __init__(
        self,
        model: str,
        version: str,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        enable_gpu: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.model = model
        self.version = version
        labels = ("model", "version")
        lv = {"model": model, "version": version}
        r = self.registry

        self._requests = Counter(
            "autoglm_requests_total", "Finished requests by gRPC status code.",
            (*labels, "code"), registry=r,
        )  # fmt: skip
        # Outcomes an error rate divides start at 0, so the first scrape gives
        # increase() its baseline: a series born at N (a broken canary's first
        # failures) would hide those N from the canary analysis.
        for code in ZERO_CODES:
            self._requests.labels(model=model, version=version, code=code)
        self._ttft = Histogram(
            "autoglm_time_to_first_token_seconds", "Time to first token.",
            labels, registry=r, buckets=_LATENCY_BUCKETS,
        ).labels(**lv)  # fmt: skip
        self._tpot = Histogram(
            "autoglm_time_per_output_token_seconds", "Time per output token after the first.",
            labels, registry=r, buckets=_TPOT_BUCKETS,
        ).labels(**lv)  # fmt: skip
        self._e2e = Histogram(
            "autoglm_e2e_request_latency_seconds", "End-to-end request latency.",
            labels, registry=r, buckets=_E2E_BUCKETS,
        ).labels(**lv)  # fmt: skip
        self._prompt_tokens = Counter(
            "autoglm_prompt_tokens", "Prompt tokens processed.", labels, registry=r
        ).labels(**lv)
        self._generation_tokens = Counter(
            "autoglm_generation_tokens", "Tokens generated.", labels, registry=r
        ).labels(**lv)
        self._queue_depth = Gauge(
            "autoglm_queue_depth", "Waiting requests.", labels, registry=r
        ).labels(**lv)
        self._running = Gauge(
            "autoglm_running_requests", "Requests in the running batch.", labels, registry=r
        ).labels(**lv)
        self._rps = Gauge(
            "autoglm_requests_per_second", "Request arrivals per second over the last 60 s.",
            labels, registry=r,
        ).labels(**lv)  # fmt: skip
        self._ttft_p95 = Gauge(
            "autoglm_time_to_first_token_p95_seconds", "TTFT p95 over the last 60 s.",
            labels, registry=r,
        ).labels(**lv)  # fmt: skip
        self._kv_usage = Gauge(
            "autoglm_kv_cache_usage_ratio", "Used KV cache blocks / capacity.", labels, registry=r
        ).labels(**lv)
        self._prefix_hit = Gauge(
            "autoglm_prefix_cache_hit_ratio",
            "Prompt tokens found in the prefix cache / prompt tokens looked up, since start.",
            labels, registry=r,
        ).labels(**lv)  # fmt: skip
        self._preemptions = Counter(
            "autoglm_preemptions", "Requests preempted (recomputed later) for KV space.",
            labels, registry=r,
        ).labels(**lv)  # fmt: skip

        self._model_config = Gauge(
            "autoglm_model_config_info",
            "Always 1; the labels say how the model is served: quantization (none, fp8, int8, "
            "int4, checkpoint:<format>) and tensor_parallel_size.",
            (*labels, "quantization", "tensor_parallel_size"), registry=r,
        )  # fmt: skip
        self._lv = lv
        self._arrivals = _SlidingWindow(WINDOW_S, clock)
        self._ttfts = _SlidingWindow(WINDOW_S, clock)
        self._rps.set_function(lambda: len(self._arrivals.values()) / WINDOW_S)
        self._ttft_p95.set_function(lambda: _percentile(self._ttfts.values(), 0.95))
        self._stats_source: Callable[[], EngineStats] | None = None
        self._queue_depth.set_function(lambda: self._stat("waiting"))
        self._running.set_function(lambda: self._stat("running"))
        self._kv_usage.set_function(lambda: self._stat("kv_usage"))
        self._prefix_hit.set_function(lambda: self._stat("prefix_hit_rate"))
        self._nvml: _Nvml | None = _Nvml.try_create() if enable_gpu else None
        if self._nvml is not None:
            self._register_gpu_gauges(self._nvml, labels, lv)

    # -- engine hooks --------------------------------------------------------------------------

    def track_engine(self, source: Callable[[], EngineStats]) -> None:
        """Queue depth, running requests and KV usage are read from ``source`` at scrape time."""
        self._stats_source = source

    def set_model_config(self, quantization: str, tensor_parallel_size: int) -> None:
        """What ``--quantization`` (``auto``'s choice included) and TP came to, once loaded."""
        self._model_config.clear()
        self._model_config.labels(
            **self._lv, quantization=quantization, tensor_parallel_size=str(tensor_parallel_size)
        ).set(1)

    def on_arrival(self, prompt_tokens: int) -> None:
        """A request was admitted to the queue."""
        self._arrivals.add()
        self._prompt_tokens.inc(prompt_tokens)

    def on_first_token(self, ttft_s: float) -> None:
        self._ttft.observe(ttft_s)
        self._ttfts.add(ttft_s)

    def on_preemptions(self, n: int) -> None:
        self._preemptions.inc(n)

    def on_tokens(self, n: int) -> None:
        """Generated tokens (called once per step with the step's total)."""
        self._generation_tokens.inc(n)

    def on_finish(
        self,
        code: str,
        *,
        e2e_s: float | None = None,
        ttft_s: float | None = None,
        output_tokens: int = 0,
    ) -> None:
        """A request ended. ``code`` is a gRPC status name: OK, CANCELLED, INTERNAL, ..."""
        self._requests.labels(model=self.model, version=self.version, code=code).inc()
        if e2e_s is not None:
            self._e2e.observe(e2e_s)
            if ttft_s is not None and output_tokens > 1:
                self._tpot.observe((e2e_s - ttft_s) / (output_tokens - 1))

    def on_rejected(self, code: str) -> None:
        """A request refused at intake (RESOURCE_EXHAUSTED, INVALID_ARGUMENT, UNAVAILABLE)."""
        self._requests.labels(model=self.model, version=self.version, code=code).inc()

    # -- exposition ------------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text format for this registry."""
        return generate_latest(self.registry)

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.shutdown()
            self._nvml = None

    # -- internals -------------------------------------------------------------------------------

    def _stat(self, name: str) -> float:
        source = self._stats_source
        if source is None:
            return 0.0
        return float(getattr(source(), name))

    def _register_gpu_gauges(
        self, nvml: _Nvml, labels: tuple[str, str], lv: dict[str, str]
    ) -> None:
        util = Gauge(
            "autoglm_gpu_utilization_percent", "GPU utilisation from NVML, 0..100.",
            (*labels, "gpu"), registry=self.registry,
        )  # fmt: skip
        mem = Gauge(
            "autoglm_gpu_memory_used_bytes", "GPU memory used, from NVML.",
            (*labels, "gpu"), registry=self.registry,
        )  # fmt: skip
        for index in range(nvml.device_count):
            util.labels(**lv, gpu=str(index)).set_function(
                lambda i=index: nvml.utilization(i)  # type: ignore[misc]
            )
            mem.labels(**lv, gpu=str(index)).set_function(
                lambda i=index: nvml.memory_used(i)  # type: ignore[misc]
            )


class _Nvml:
    """A thin, failure-tolerant NVML wrapper: a broken driver reads as NaN, never as an exception."""

    def __init__(self, module: Any, count: int) -> None:
        self._nvml = module
        self.device_count = count
        self._handles = [module.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

    @classmethod
    def try_create(cls) -> _Nvml | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            count = int(pynvml.nvmlDeviceGetCount())
            if count == 0:
                pynvml.nvmlShutdown()
                return None
            return cls(pynvml, count)
        except Exception as exc:  # no library, no driver, no GPU: GPU gauges are absent
            logger.debug("NVML unavailable, no GPU metrics: %s", exc)
            return None

    def utilization(self, index: int) -> float:
        try:
            return float(self._nvml.nvmlDeviceGetUtilizationRates(self._handles[index]).gpu)
        except Exception:
            return math.nan

    def memory_used(self, index: int) -> float:
        try:
            return float(self._nvml.nvmlDeviceGetMemoryInfo(self._handles[index]).used)
        except Exception:
            return math.nan

    def shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:
            logger.debug("nvmlShutdown failed: %s", exc)
