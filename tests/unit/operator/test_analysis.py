"""The pure parts of canary analysis: spec, PromQL, evaluate and fold; and the
client against a real HTTP server on 127.0.0.1 that answers like Prometheus
does (status codes and bodies), or not at all."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from autoglm_operator.analysis import (
    MIN_WINDOW_S,
    Q_CANARY_ERRORS,
    Q_CANARY_REQUESTS,
    Q_CANARY_TPOT,
    Q_CANARY_TTFT,
    Q_STABLE_TPOT,
    Q_STABLE_TTFT,
    SERVER_ERROR_CODES,
    Action,
    AnalysisSpec,
    AnalysisSpecError,
    AnalysisState,
    IntervalResult,
    MetricCheck,
    PrometheusClient,
    PrometheusError,
    Sample,
    StepVerdict,
    Verdict,
    build_queries,
    evaluate,
    fold,
    measure,
    parse_duration,
    pods_regex,
)

DEFAULT = AnalysisSpec()


def good(at: float = 0.0, **kw: float | None) -> Sample:
    values: dict[str, float | None] = {
        "canary_requests": 100.0,
        "canary_errors": 0.0,
        "canary_ttft_p95": 0.2,
        "canary_tpot_p95": 0.02,
        "stable_ttft_p95": 0.2,
        "stable_tpot_p95": 0.02,
    }
    values.update(kw)
    return Sample(at=at, **values)  # type: ignore[arg-type]


# ---- spec ------------------------------------------------------------------------------------


def test_defaults_follow_the_issue() -> None:
    spec = AnalysisSpec.from_spec(None, None)
    assert spec.max_error_rate == 0.05  # roll back at 5xx > 5 %
    assert spec.max_ttft_p95_s == 1.0 and spec.max_tpot_p95_s == 1.0  # pause at p95 > 1 s
    assert spec.latency_action is Action.PAUSE
    assert spec == DEFAULT


def test_from_spec_reads_camel_case_and_durations() -> None:
    spec = AnalysisSpec.from_spec(
        {
            "maxErrorRate": 0.1,
            "maxTTFTP95Seconds": 0.5,
            "maxTPOTRatio": 3,
            "latencyAction": "rollback",
            "metrics": [{"name": "q", "query": "sum(x{pod=~'{{pods}}'})", "max": 5}],
        },
        {
            "interval": "4s",
            "successfulIntervals": 2,
            "failedIntervals": 1,
            "timeout": "1m30s",
            "minRequests": 5,
        },
    )
    assert spec.interval_s == 4.0 and spec.timeout_s == 90.0
    assert spec.successful_intervals == 2 and spec.failed_intervals == 1
    assert spec.min_requests == 5 and spec.max_error_rate == 0.1
    assert spec.max_ttft_p95_s == 0.5 and spec.max_tpot_ratio == 3.0
    assert spec.latency_action is Action.ROLLBACK
    assert spec.metrics == (MetricCheck("q", "sum(x{pod=~'{{pods}}'})", max=5.0),)
    assert spec.window == f"{int(MIN_WINDOW_S)}s"  # a 4 s interval still queries 10 s


def test_from_spec_accepts_pydantic_like_objects() -> None:
    class Dumpable:
        def model_dump(self, by_alias: bool, exclude_none: bool) -> dict[str, object]:
            assert by_alias and exclude_none
            return {"interval": "20s"}

    assert AnalysisSpec.from_spec(None, Dumpable()).window == "20s"


@pytest.mark.parametrize(
    ("analysis", "step", "needle"),
    [
        ({"latencyAction": "ignore"}, None, "latencyAction"),
        (None, {"interval": "ten seconds"}, "interval"),
        (None, {"successfulIntervals": 0}, "successfulIntervals"),
        ({"maxErrorRate": 2}, None, "maxErrorRate"),
        ({"metrics": [{"name": "a", "query": "1"}]}, None, "metrics[a]"),
        (
            {
                "metrics": [
                    {"name": "a", "query": "1", "max": 1},
                    {"name": "a", "query": "2", "max": 1},
                ]
            },
            None,
            "unique",
        ),
    ],
)
def test_from_spec_refuses_what_it_cannot_use(
    analysis: dict[str, object] | None, step: dict[str, object] | None, needle: str
) -> None:
    with pytest.raises(AnalysisSpecError, match=needle.replace("[", r"\[")):
        AnalysisSpec.from_spec(analysis, step)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("500ms", 0.5), ("12", 12), ("1.5s", 1.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "5x", "1m 30s", "-1s", "5 m", "m5"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(AnalysisSpecError):
        parse_duration(text)


# ---- queries ---------------------------------------------------------------------------------


def test_queries_select_each_version_by_namespace_and_pod_regex() -> None:
    stable, canary = pods_regex("llm-abc12"), pods_regex("llm-def34")
    q = build_queries(DEFAULT, "ns1", stable, canary, "10s")
    assert q[Q_CANARY_REQUESTS] == (
        'sum(increase(autoglm_requests_total{namespace="ns1",'
        'pod=~"llm-def34-[a-z0-9]+-[a-z0-9]+"}[10s]))'
    )
    codes = "|".join(SERVER_ERROR_CODES)
    assert f'code=~"{codes}"' in q[Q_CANARY_ERRORS]
    assert q[Q_CANARY_ERRORS].endswith(" or vector(0)")
    assert q[Q_CANARY_TTFT] == (
        "histogram_quantile(0.95, sum by (le) (rate(autoglm_time_to_first_token_seconds_bucket"
        '{namespace="ns1",pod=~"llm-def34-[a-z0-9]+-[a-z0-9]+"}[10s])))'
    )
    assert "autoglm_time_per_output_token_seconds_bucket" in q[Q_CANARY_TPOT]
    assert stable in q[Q_STABLE_TTFT] and stable in q[Q_STABLE_TPOT]
    assert canary not in q[Q_STABLE_TTFT]
    assert build_queries(DEFAULT, "ns1", stable, canary, "10s") == q  # deterministic


def test_server_errors_are_server_side_codes_only() -> None:
    # HTTP 500/503/504 are counted as INTERNAL/UNAVAILABLE/DEADLINE_EXCEEDED by the server.
    for code in ("INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"):
        assert code in SERVER_ERROR_CODES
    for code in ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "CANCELLED"):
        assert code not in SERVER_ERROR_CODES


def test_pods_regex_escapes_dots_without_backslashes() -> None:
    assert pods_regex("a.b-x1") == "a[.]b-x1-[a-z0-9]+-[a-z0-9]+"


def test_user_queries_get_namespace_and_pods() -> None:
    spec = AnalysisSpec(
        metrics=(
            MetricCheck(
                "kv",
                'max(autoglm_kv_cache_usage_ratio{namespace="{{namespace}}",pod=~"{{pods}}"})'
                ' - max(autoglm_kv_cache_usage_ratio{pod=~"{{stablePods}}"})',
                max=0.9,
            ),
        )
    )
    q = build_queries(spec, "team", "s-.*", "c-.*", "10s")
    assert q["metric:kv"] == (
        'max(autoglm_kv_cache_usage_ratio{namespace="team",pod=~"c-.*"})'
        ' - max(autoglm_kv_cache_usage_ratio{pod=~"s-.*"})'
    )


def test_label_values_are_quoted() -> None:
    q = build_queries(DEFAULT, 'x"y', "s", "c\\", "10s")
    assert 'namespace="x\\"y"' in q[Q_CANARY_REQUESTS]
    assert 'pod=~"c\\\\"' in q[Q_CANARY_REQUESTS]


# ---- evaluate --------------------------------------------------------------------------------


def test_healthy_canary_passes() -> None:
    result = evaluate(DEFAULT, good())
    assert result.verdict is Verdict.PASS and result.action is None
    assert result.values["requests"] == 100 and result.values["errorRate"] == 0
    assert result.values["ttftRatio"] == 1.0


def test_server_errors_above_five_percent_roll_back() -> None:
    result = evaluate(DEFAULT, good(canary_errors=6.0))
    assert result.verdict is Verdict.FAIL and result.action is Action.ROLLBACK
    assert "server error rate 6.0% > 5.0%" in result.reason
    assert evaluate(DEFAULT, good(canary_errors=5.0)).verdict is Verdict.PASS  # not above


def test_error_rate_stays_within_one_after_extrapolation() -> None:
    sample = good(canary_requests=27.78, canary_errors=27.88)
    assert sample.error_rate == 1.0
    assert evaluate(DEFAULT, sample).reason.startswith("server error rate 100.0% > 5.0%")


def test_no_error_series_counts_as_none_failed() -> None:
    assert evaluate(DEFAULT, good(canary_errors=None)).verdict is Verdict.PASS


def test_latency_above_one_second_pauses() -> None:
    result = evaluate(DEFAULT, good(canary_ttft_p95=1.5, stable_ttft_p95=1.0))
    assert result.verdict is Verdict.FAIL and result.action is Action.PAUSE
    assert "TTFT p95 1.5s > 1s" in result.reason
    result = evaluate(DEFAULT, good(canary_tpot_p95=1.2, stable_tpot_p95=1.0))
    assert result.action is Action.PAUSE and "TPOT p95 1.2s > 1s" in result.reason


def test_latency_ratio_to_stable() -> None:
    result = evaluate(DEFAULT, good(canary_ttft_p95=0.5, stable_ttft_p95=0.2))
    assert result.verdict is Verdict.FAIL and result.action is Action.PAUSE
    assert "2.50x stable" in result.reason
    # No stable traffic: no ratio to judge, the absolute limit alone.
    assert evaluate(DEFAULT, good(canary_ttft_p95=0.5, stable_ttft_p95=None)).verdict is (
        Verdict.PASS
    )
    off = AnalysisSpec(max_ttft_ratio=None)
    assert evaluate(off, good(canary_ttft_p95=0.5, stable_ttft_p95=0.2)).verdict is Verdict.PASS


def test_latency_action_rollback_and_errors_win_over_pause() -> None:
    spec = AnalysisSpec(latency_action=Action.ROLLBACK)
    assert evaluate(spec, good(canary_ttft_p95=3.0)).action is Action.ROLLBACK
    both = evaluate(DEFAULT, good(canary_ttft_p95=3.0, canary_errors=50.0))
    assert both.action is Action.ROLLBACK
    assert "server error rate" in both.reason and "TTFT p95" in both.reason


def test_too_little_traffic_is_inconclusive() -> None:
    result = evaluate(DEFAULT, good(canary_requests=3.0, canary_errors=3.0))
    assert result.verdict is Verdict.INCONCLUSIVE
    assert "too little traffic: 3 canary requests" in result.reason
    assert evaluate(DEFAULT, good(canary_requests=None)).verdict is Verdict.INCONCLUSIVE
    zero = AnalysisSpec(min_requests=0)
    assert evaluate(zero, good(canary_requests=0.0)).verdict is Verdict.INCONCLUSIVE


def test_prometheus_error_is_inconclusive_with_the_reason() -> None:
    result = evaluate(DEFAULT, Sample(at=0.0, error="Prometheus at x is unreachable"))
    assert result.verdict is Verdict.INCONCLUSIVE
    assert result.reason == "no measurement: Prometheus at x is unreachable"


def test_user_metrics() -> None:
    spec = AnalysisSpec(metrics=(MetricCheck("m", "q", max=1.0, min=0.1),))
    assert evaluate(spec, good(user=(("m", 0.5),))).verdict is Verdict.PASS  # type: ignore[arg-type]
    high = evaluate(spec, good(user=(("m", 2.0),)))  # type: ignore[arg-type]
    assert high.verdict is Verdict.FAIL and high.action is Action.ROLLBACK
    assert high.reason == "m 2 > 1" and high.values["m"] == 2.0
    assert evaluate(spec, good(user=(("m", 0.0),))).reason == "m 0 < 0.1"  # type: ignore[arg-type]
    missing = evaluate(spec, good(user=(("m", None),)))  # type: ignore[arg-type]
    assert missing.verdict is Verdict.INCONCLUSIVE and "no data for metric m" in missing.reason


def test_infinite_p95_breaches_and_is_left_out_of_values() -> None:
    result = evaluate(DEFAULT, good(canary_ttft_p95=float("inf")))
    assert result.verdict is Verdict.FAIL
    assert "ttftP95" not in result.values
    json.dumps(dict(result.values))  # status-safe


# ---- fold ------------------------------------------------------------------------------------


def run(spec: AnalysisSpec, results: list[IntervalResult]) -> AnalysisState:
    state = AnalysisState()
    for r in results:
        state = fold(spec, state, r)
    return state


def P(at: float) -> IntervalResult:
    return IntervalResult(Verdict.PASS, "ok", at)


def F(at: float, action: Action = Action.ROLLBACK) -> IntervalResult:
    return IntervalResult(Verdict.FAIL, "bad", at, action)


def I(at: float) -> IntervalResult:  # noqa: E743
    return IntervalResult(Verdict.INCONCLUSIVE, "too little traffic", at)


def test_passes_after_n_consecutive_good_intervals() -> None:
    spec = AnalysisSpec(successful_intervals=3)
    assert run(spec, [P(0), P(1)]).verdict is StepVerdict.RUNNING
    state = run(spec, [P(0), P(1), P(2)])
    assert state.verdict is StepVerdict.PASS and state.good_intervals == 3
    assert state.reason.startswith("3 consecutive good intervals")


def test_a_bad_interval_resets_the_good_run() -> None:
    spec = AnalysisSpec(successful_intervals=3, failed_intervals=3)
    state = run(spec, [P(0), P(1), F(2), P(3), P(4)])
    assert state.verdict is StepVerdict.RUNNING
    assert (state.good_intervals, state.bad_intervals) == (2, 1)
    assert run(spec, [P(0), P(1), F(2), P(3), P(4), P(5)]).verdict is StepVerdict.PASS


def test_fails_after_m_bad_intervals_even_when_not_consecutive() -> None:
    spec = AnalysisSpec(successful_intervals=3, failed_intervals=2)
    assert run(spec, [F(0)]).verdict is StepVerdict.RUNNING
    state = run(spec, [F(0), P(1), P(2), F(3)])
    assert state.verdict is StepVerdict.FAIL and state.bad_intervals == 2
    assert state.action is Action.ROLLBACK and state.reason == "2 bad intervals: bad"


def test_worst_action_wins() -> None:
    spec = AnalysisSpec(failed_intervals=2)
    assert run(spec, [F(0, Action.PAUSE), F(1, Action.PAUSE)]).action is Action.PAUSE
    assert run(spec, [F(0, Action.ROLLBACK), F(1, Action.PAUSE)]).action is Action.ROLLBACK
    assert run(spec, [F(0, Action.PAUSE), F(1, Action.ROLLBACK)]).action is Action.ROLLBACK


def test_inconclusive_holds_then_times_out_with_a_reason() -> None:
    spec = AnalysisSpec(successful_intervals=2, timeout_s=30)
    state = run(spec, [P(100), I(110), I(120)])
    assert state.verdict is StepVerdict.RUNNING and state.good_intervals == 1
    assert state.started_at == 100
    state = fold(spec, state, I(130))
    assert state.verdict is StepVerdict.FAIL and state.action is Action.ROLLBACK
    assert state.reason == (
        "analysis timed out after 30s without a verdict (1 good, 0 bad intervals): "
        "too little traffic"
    )
    # An inconclusive interval does not break a run of good ones.
    assert run(spec, [P(100), I(110), P(120)]).verdict is StepVerdict.PASS


def test_a_finished_step_stays_finished() -> None:
    spec = AnalysisSpec(successful_intervals=1)
    done = run(spec, [P(0)])
    assert fold(spec, done, F(1)) is done


def test_state_round_trips_through_status() -> None:
    spec = AnalysisSpec(successful_intervals=5, failed_intervals=5)
    state = run(spec, [P(10.5), F(11, Action.PAUSE), P(12)])
    status = json.loads(json.dumps(state.to_status()))
    back = AnalysisState.from_status(status)
    assert back.to_status() == state.to_status()
    assert (back.good_intervals, back.bad_intervals, back.started_at) == (1, 1, 10.5)
    assert back.action is Action.PAUSE
    assert AnalysisState.from_status(None) == AnalysisState()


def test_evaluate_then_fold_is_deterministic() -> None:
    spec = AnalysisSpec(successful_intervals=2)
    samples = [good(0), good(10, canary_errors=20.0), good(20), good(30)]
    a = run(spec, [evaluate(spec, s) for s in samples])
    b = run(spec, [evaluate(spec, s) for s in samples])
    assert a == b and a.verdict is StepVerdict.PASS and a.bad_intervals == 1


# ---- the client, against real sockets --------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def fake_prometheus() -> AsyncIterator[tuple[str, dict[str, web.Response]]]:
    """An HTTP server on 127.0.0.1 answering /api/v1/query from a table (query -> response)."""
    answers: dict[str, web.Response] = {}
    times: list[str] = []  # the evaluation times asked for, in order
    answers_times[id(answers)] = times

    async def handle(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        query = str(form.get("query", ""))
        if "time" in form:
            times.append(str(form["time"]))
        if query == "slow":
            await asyncio.sleep(5)
        if query in answers:
            return answers[query]
        body = {"status": "success", "data": {"resultType": "vector", "result": []}}
        return web.json_response(body)

    app = web.Application()
    app.router.add_post("/api/v1/query", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", answers
    await runner.cleanup()


answers_times: dict[int, list[str]] = {}


def _vector(*values: str) -> web.Response:
    result = [{"metric": {}, "value": [1.0, v]} for v in values]
    return web.json_response(
        {"status": "success", "data": {"resultType": "vector", "result": result}}
    )


async def test_client_reads_vectors_scalars_nan_and_empty(
    fake_prometheus: tuple[str, dict[str, web.Response]],
) -> None:
    url, answers = fake_prometheus
    answers["one"] = _vector("1.5")
    answers["nan"] = _vector("NaN")
    answers["inf"] = _vector("+Inf")
    answers["scalar"] = web.json_response(
        {"status": "success", "data": {"resultType": "scalar", "result": [1.0, "7"]}}
    )
    async with PrometheusClient(url) as client:
        assert await client.query("one") == 1.5
        assert await client.query("nan") is None
        assert await client.query("inf") == float("inf")
        assert await client.query("scalar") == 7.0
        assert await client.query("empty") is None


async def test_client_errors_are_clear(
    fake_prometheus: tuple[str, dict[str, web.Response]],
) -> None:
    url, answers = fake_prometheus
    answers["two"] = _vector("1", "2")
    answers["bad"] = web.json_response(
        {"status": "error", "errorType": "bad_data", "error": "parse error at char 3"},
        status=400,
    )
    answers["html"] = web.Response(text="<html>proxy error</html>", status=502)
    async with PrometheusClient(url, timeout_s=0.5) as client:
        with pytest.raises(PrometheusError, match="returned 2 series"):
            await client.query("two")
        with pytest.raises(PrometheusError, match="HTTP 400 bad_data: parse error at char 3"):
            await client.query("bad")
        with pytest.raises(PrometheusError, match="HTTP 502 with no JSON"):
            await client.query("html")
        with pytest.raises(PrometheusError, match=r"did not answer within 0\.5s"):
            await client.query("slow")


async def test_prometheus_down_is_an_inconclusive_sample_not_a_crash() -> None:
    port = _free_port()  # nothing listens there
    async with PrometheusClient(f"http://127.0.0.1:{port}", timeout_s=2) as client:
        sample = await measure(client, DEFAULT, "ns", "s-.*", "c-.*", now=5.0)
    assert sample.at == 5.0 and sample.error is not None
    assert f"Prometheus at http://127.0.0.1:{port} is unreachable" in sample.error
    result = evaluate(DEFAULT, sample)
    assert result.verdict is Verdict.INCONCLUSIVE and "unreachable" in result.reason


async def test_measure_maps_each_query(
    fake_prometheus: tuple[str, dict[str, web.Response]],
) -> None:
    url, answers = fake_prometheus
    spec = AnalysisSpec(metrics=(MetricCheck("m", 'x{namespace="{{namespace}}"}', max=1),))
    q = build_queries(spec, "ns", "s-.*", "c-.*", spec.window)
    for name, value in [
        (Q_CANARY_REQUESTS, "40"),
        (Q_CANARY_ERRORS, "4"),
        (Q_CANARY_TTFT, "0.3"),
        (Q_STABLE_TTFT, "0.1"),
        ("metric:m", "0.5"),
    ]:
        answers[q[name]] = _vector(value)
    async with PrometheusClient(url) as client:
        sample = await measure(client, spec, "ns", "s-.*", "c-.*", now=1.0)
    # One evaluation instant for every query of the interval.
    assert answers_times[id(answers)] == ["1.000"] * len(q)
    assert sample == Sample(
        at=1.0,
        canary_requests=40.0,
        canary_errors=4.0,
        canary_ttft_p95=0.3,
        stable_ttft_p95=0.1,
        user=(("m", 0.5),),
    )
    result = evaluate(spec, sample)
    assert result.verdict is Verdict.FAIL
    assert result.reason == (
        "server error rate 10.0% > 5.0% (4 of 40 requests); "
        "TTFT p95 0.3s is 3.00x stable's 0.1s (> 2x)"
    )
