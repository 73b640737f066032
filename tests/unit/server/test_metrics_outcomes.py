"""autoglm_requests_total exports OK and the server-side failure codes at 0 from
the start, so Prometheus has a baseline before the first request and
increase() counts a broken revision's first failures (the canary analysis)."""

from __future__ import annotations

from autoglm_server.metrics import ZERO_CODES, Metrics


def test_outcome_series_exist_at_zero_before_any_request() -> None:
    m = Metrics("tiny", "v1", enable_gpu=False)
    text = m.render().decode()
    for code in ("OK", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"):
        assert code in ZERO_CODES
        line = f'autoglm_requests_total{{code="{code}",model="tiny",version="v1"}} 0.0'
        assert line in text, text
    m.on_finish("INTERNAL")
    assert (
        'autoglm_requests_total{code="INTERNAL",model="tiny",version="v1"} 1.0'
        in m.render().decode()
    )
