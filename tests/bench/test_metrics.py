"""Metric math of BENCHMARKING.md against hand-computed cases."""

import math

import pytest

from fitserve.bench.metrics import (Slo, describe, inter_token_latencies, mean_concurrent_decodes,
                                    summarize, time_per_output_token)
from fitserve.bench.records import RequestResult
from fitserve.bench.slo import SLO_PRESETS, parse_duration_ms, parse_slo


def completed(request_id: int, chunk_times: list[float], output_tokens: int, sent: float = 0.0,
              input_tokens: int = 10) -> RequestResult:
    return RequestResult(request_id=request_id, conversation_id=request_id, turn_index=0,
                         scheduled_s=sent, sent_s=sent, input_tokens=input_tokens,
                         requested_output_tokens=output_tokens, output_tokens=output_tokens,
                         chunk_times_s=chunk_times, end_s=chunk_times[-1], success=True)


def failed(request_id: int, error: str) -> RequestResult:
    return RequestResult(request_id=request_id, conversation_id=request_id, turn_index=0,
                         scheduled_s=0.0, sent_s=0.0, input_tokens=10, requested_output_tokens=5,
                         error=error)


def test_tpot_is_decode_time_over_tokens_after_the_first():
    # 5 tokens, first at 0.2 s, last at 1.0 s: 4 gaps share 0.8 s.
    assert time_per_output_token(1.0, 0.2, 5) == pytest.approx(0.2)
    assert time_per_output_token(0.5, 0.5, 1) is None


def test_itl_are_gaps_between_consecutive_chunks():
    assert inter_token_latencies([0.1, 0.15, 0.35]) == pytest.approx([0.05, 0.2])
    assert inter_token_latencies([0.1]) == []


def test_describe_uses_linear_interpolation_percentiles():
    stats = describe([1.0, 2.0, 3.0, 4.0])
    assert stats == pytest.approx({"count": 4, "mean": 2.5, "median": 2.5, "p90": 3.7, "p99": 3.97,
                                   "min": 1.0, "max": 4.0})
    assert describe([])["mean"] is None  # nothing measured is not zero


def test_summary_of_a_small_run_matches_hand_computation():
    results = [
        completed(0, [0.1, 0.2, 0.3], output_tokens=3),            # ttft 100, tpot 100, e2e 300
        completed(1, [0.3, 0.4, 0.5, 0.6, 0.7], output_tokens=5),  # ttft 300, tpot 100, e2e 700
        completed(2, [0.2], output_tokens=1),                      # no TPOT, no ITL
        failed(3, "HTTP 500: boom"),
        failed(4, "timeout: no complete answer within 1 s"),
        failed(5, "HTTP 500: again"),
    ]
    summary = summarize(results, duration_s=2.0)
    assert summary["completed"] == 3 and summary["failed"] == 3
    assert summary["failure_reasons"] == {"HTTP 500": 2, "timeout": 1}
    assert summary["request_throughput"] == pytest.approx(1.5)
    assert summary["output_throughput"] == pytest.approx(9 / 2.0)
    assert summary["total_token_throughput"] == pytest.approx((30 + 9) / 2.0)
    assert summary["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert summary["ttft_ms"]["median"] == pytest.approx(200.0)
    assert summary["tpot_ms"]["count"] == 2 and summary["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert summary["itl_ms"]["count"] == 6 and summary["itl_ms"]["max"] == pytest.approx(100.0)
    assert summary["e2e_ms"]["max"] == pytest.approx(700.0)
    assert summary["goodput"] is None  # no SLO given: goodput is not claimed


def test_goodput_counts_requests_meeting_every_slo():
    results = [
        completed(0, [0.1, 0.2, 0.3], 3),        # meets ttft 150 / tpot 120
        completed(1, [0.3, 0.4, 0.5], 3),        # ttft 300 misses
        completed(2, [0.1, 0.3, 0.5], 3),        # tpot 200 misses
        completed(3, [0.05], 1),                  # one token: TPOT undefined, meets
        failed(4, "HTTP 503: busy"),             # a failure never meets an SLO
    ]
    slo = Slo(ttft_ms=150, tpot_ms=120, percentile=50)
    summary = summarize(results, duration_s=4.0, slo=slo)
    assert summary["goodput"] == pytest.approx(2 / 4.0)
    assert summary["slo_attainment"] == pytest.approx(2 / 5)
    assert summary["meets_slo_at_percentile"] is False  # a failed request fails the run


def test_slo_at_percentile_passes_when_the_percentile_is_under_the_limit():
    results = [completed(i, [0.1 + 0.01 * i, 0.2 + 0.01 * i], 2) for i in range(10)]
    assert summarize(results, 1.0, Slo(ttft_ms=200, percentile=99))["meets_slo_at_percentile"]
    assert not summarize(results, 1.0, Slo(ttft_ms=150, percentile=99))["meets_slo_at_percentile"]
    assert summarize(results, 1.0, Slo(ttft_ms=150, percentile=50))["meets_slo_at_percentile"]


def test_mean_concurrent_decodes_is_time_weighted():
    # Decoding intervals [0.1, 1.1] and [0.6, 1.1]: 0.5 s with one, 0.5 s with two -> 1.5.
    results = [completed(0, [0.1, 1.1], 2), completed(1, [0.1, 0.6], 2, sent=0.5)]
    assert mean_concurrent_decodes(results) == pytest.approx(1.5)
    assert mean_concurrent_decodes([completed(0, [0.1], 1)]) is None


def test_slo_parsing_presets_units_and_errors():
    assert parse_duration_ms("2s") == 2000 and parse_duration_ms("500ms") == 500
    assert parse_duration_ms("250") == 250 and parse_duration_ms("1500us") == pytest.approx(1.5)
    assert parse_slo("ttft=500ms,tpot=50ms,p=90") == Slo(ttft_ms=500, tpot_ms=50, percentile=90)
    assert parse_slo("mlperf-server") == Slo(ttft_ms=2000, tpot_ms=100, percentile=99)
    assert SLO_PRESETS["mlperf-interactive"] == Slo(ttft_ms=500, tpot_ms=30, percentile=99)
    assert parse_slo("mlperf-interactive,p=90").percentile == 90
    for bad in ("ttft", "speed=3", "p=0", "ttft=fast", "p=99"):
        with pytest.raises(ValueError):
            parse_slo(bad)
    assert not math.isnan(parse_slo("e2e=1.5s").e2e_ms)
