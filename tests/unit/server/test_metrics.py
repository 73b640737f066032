"""The Prometheus contract: names and labels exactly as docs/architecture.md lists them."""

from __future__ import annotations

import pytest

from autoglm_server.metrics import EngineStats, Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


EXPECTED = {
    "autoglm_requests_total": "counter",
    "autoglm_time_to_first_token_seconds": "histogram",
    "autoglm_time_per_output_token_seconds": "histogram",
    "autoglm_e2e_request_latency_seconds": "histogram",
    "autoglm_prompt_tokens_total": "counter",
    "autoglm_generation_tokens_total": "counter",
    "autoglm_queue_depth": "gauge",
    "autoglm_running_requests": "gauge",
    "autoglm_requests_per_second": "gauge",
    "autoglm_time_to_first_token_p95_seconds": "gauge",
    "autoglm_kv_cache_usage_ratio": "gauge",
    "autoglm_prefix_cache_hit_ratio": "gauge",
    "autoglm_preemptions_total": "counter",
    "autoglm_model_config_info": "gauge",
}


def families(m: Metrics) -> dict[str, tuple[str, list[dict[str, str]]]]:
    out = {}
    for fam in m.registry.collect():
        samples = [s for s in fam.samples if not s.name.endswith("_created")]
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out[name] = (fam.type, [dict(s.labels) for s in samples])
    return out


def test_names_types_and_labels_match_the_contract() -> None:
    m = Metrics("glm-4-9b", "abc123", enable_gpu=False)
    m.on_arrival(10)
    m.on_first_token(0.1)
    m.on_tokens(3)
    m.on_finish("OK", e2e_s=1.0, ttft_s=0.1, output_tokens=3)
    m.set_model_config("fp8", 2)
    fams = families(m)
    assert {n: t for n, (t, _) in fams.items()} == EXPECTED
    for name, (_, samples) in fams.items():
        for labels in samples:
            extra = set(labels) - {"model", "version", "le"}
            assert labels["model"] == "glm-4-9b" and labels["version"] == "abc123"
            expected = {
                "autoglm_requests_total": {"code"},
                "autoglm_model_config_info": {"quantization", "tensor_parallel_size"},
            }
            assert extra == expected.get(name, set()), name


def test_counters_histograms_and_engine_gauges() -> None:
    m = Metrics("m", "v", enable_gpu=False)
    m.track_engine(lambda: EngineStats(running=3, waiting=5, kv_usage=0.375, prefix_hit_rate=0.5))
    m.on_preemptions(2)
    m.on_arrival(7)
    m.on_tokens(4)
    m.on_first_token(0.2)
    m.on_finish("OK", e2e_s=1.2, ttft_s=0.2, output_tokens=5)
    m.on_finish("CANCELLED")
    m.on_rejected("RESOURCE_EXHAUSTED")
    get = m.registry.get_sample_value
    lv = {"model": "m", "version": "v"}
    assert get("autoglm_requests_total", {**lv, "code": "OK"}) == 1
    assert get("autoglm_requests_total", {**lv, "code": "CANCELLED"}) == 1
    assert get("autoglm_requests_total", {**lv, "code": "RESOURCE_EXHAUSTED"}) == 1
    assert get("autoglm_prompt_tokens_total", lv) == 7
    assert get("autoglm_generation_tokens_total", lv) == 4
    assert get("autoglm_time_per_output_token_seconds_sum", lv) == pytest.approx(0.25)
    assert get("autoglm_e2e_request_latency_seconds_count", lv) == 1
    assert get("autoglm_running_requests", lv) == 3
    assert get("autoglm_queue_depth", lv) == 5
    assert get("autoglm_kv_cache_usage_ratio", lv) == 0.375
    assert get("autoglm_prefix_cache_hit_ratio", lv) == 0.5
    assert get("autoglm_preemptions_total", lv) == 2


def test_sliding_windows_for_rps_and_ttft_p95() -> None:
    clock = Clock()
    m = Metrics("m", "v", clock=clock, enable_gpu=False)
    lv = {"model": "m", "version": "v"}
    for i in range(120):
        clock.now = i * 0.5  # two arrivals per second for 60 s
        m.on_arrival(1)
        m.on_first_token(0.01 * (i % 20 + 1))  # 0.01 .. 0.20
    assert m.registry.get_sample_value("autoglm_requests_per_second", lv) == pytest.approx(2.0)
    assert m.registry.get_sample_value(
        "autoglm_time_to_first_token_p95_seconds", lv
    ) == pytest.approx(0.19)
    clock.now += 61  # everything ages out
    assert m.registry.get_sample_value("autoglm_requests_per_second", lv) == 0.0
    assert m.registry.get_sample_value("autoglm_time_to_first_token_p95_seconds", lv) == 0.0


def test_several_instances_do_not_collide() -> None:
    a = Metrics("a", "1", enable_gpu=False)
    b = Metrics("b", "1", enable_gpu=False)
    a.on_arrival(1)
    assert b"autoglm_prompt_tokens_total" in b.render()
    assert b'model="a"' not in b.render()


def test_gpu_gauges_degrade_silently_without_a_gpu() -> None:
    m = Metrics("m", "v")  # NVML may or may not exist here; neither may raise
    text = m.render().decode()
    if "autoglm_gpu_utilization_percent" in text:
        assert 'gpu="0"' in text
    m.close()
