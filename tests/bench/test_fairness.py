"""Multi-tenant benchmarking: the workload's clients, the fairness formulas, and a run end to end."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fitserve.bench.cli import main
from fitserve.bench.fairness import jain_index, summarize_fairness
from fitserve.bench.workload import LengthSpec, PromptMaker, WorkloadConfig, build_workload


def row(client: str, sent_s: float, chunk_times_s: list[float], input_tokens: int = 10,
        success: bool = True) -> dict:
    return {"client": client, "sent_s": sent_s, "chunk_times_s": chunk_times_s, "input_tokens": input_tokens,
            "output_tokens": len(chunk_times_s), "success": success}


def test_jain_index() -> None:
    assert jain_index([3.0, 3.0, 3.0, 3.0]) == pytest.approx(1.0)
    assert jain_index([5.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert jain_index([4.0, 1.0, 1.0, 1.0]) == pytest.approx(49 / 76)
    assert jain_index([]) is None


def test_service_gap_counts_only_stretches_when_both_clients_wait() -> None:
    """a is backlogged during [0, 4) (its second request waits) and receives 16 units in that
    time (10 prompt + 3 tokens x 2); b waits during [0, 5) and gets nothing until 5. The gap is
    measured from the start of the common stretch, so b's later catch-up does not hide it."""
    rows = [row("a", 0.0, [1.0, 2.0, 3.0]), row("a", 0.0, [4.0]), row("b", 0.0, [5.0]),
            row("b", 6.0, [7.0], success=False)]
    fairness = summarize_fairness(rows, duration_s=8.0)
    assert fairness is not None
    assert fairness["largest_gap_pair"] == "a / b"
    assert fairness["largest_backlogged_service_gap"] == pytest.approx(16.0)
    a, b = fairness["per_client"]["a"], fairness["per_client"]["b"]
    assert a["service"] == pytest.approx(16.0 + 12.0) and b["service"] == pytest.approx(12.0)
    assert (a["requests"], a["completed"], b["requests"], b["completed"]) == (2, 2, 2, 1)
    assert a["ttft_ms"]["max"] == pytest.approx(4000.0) and b["ttft_ms"]["median"] == pytest.approx(5000.0)
    assert a["active_s"] == pytest.approx(4.0, abs=0.02) and b["active_s"] == pytest.approx(5.0, abs=0.02)
    assert fairness["largest_request_cost"] == pytest.approx(16.0)
    assert fairness["timeline"]["service"]["a"][-1] == pytest.approx(28.0)


def test_no_clients_no_fairness() -> None:
    assert summarize_fairness([row(None, 0.0, [1.0])], 2.0) is None  # type: ignore[arg-type]


def test_multi_tenant_workload_splits_requests_by_client_rate() -> None:
    config = WorkloadConfig(kind="multi-tenant", num_requests=2100, num_clients=4, client_rates=[4, 1, 1, 1],
                            input_len=LengthSpec(4), output_len=LengthSpec(2), seed=3)
    conversations = build_workload(config, PromptMaker())
    counts = Counter(conversation.client for conversation in conversations)
    assert set(counts) == {"client-0", "client-1", "client-2", "client-3"}
    assert counts["client-0"] == pytest.approx(1200, rel=0.1)
    assert counts["client-3"] == pytest.approx(300, rel=0.2)
    again = build_workload(config, PromptMaker())
    assert [c.client for c in again] == [c.client for c in conversations]
    for rates, message in (([1, 1], "gives 2 rates for 4 clients"), ([1, 1, 0, 1], "must all be positive")):
        with pytest.raises(ValueError, match=message):
            build_workload(WorkloadConfig(kind="multi-tenant", num_requests=4, client_rates=rates), PromptMaker())


def test_multi_tenant_bench_sends_users_and_reports_fairness(scripted_server, tmp_path) -> None:
    base_url, handle = scripted_server
    out = tmp_path / "tenants"
    code = main(["--url", base_url, "--workload", "multi-tenant", "--clients", "3", "--client-rates", "2,1,1",
                 "--num-requests", "12", "--input-len", "8", "--output-len", "4", "--rate", "40",
                 "--no-progress", "--no-hardware", "--out", str(out)])
    assert code == 0
    users = [body.get("user") for body in handle.stats()["bodies"] if body.get("max_tokens") == 4]
    assert len(users) == 12 and set(users) <= {"client-0", "client-1", "client-2"}
    run = json.loads((out / "bench.json").read_text())["runs"][0]
    fairness = run["fairness"]
    assert sum(c["requests"] for c in fairness["per_client"].values()) == 12
    assert 0 < fairness["jain_index"] <= 1
    assert Counter(r["client"] for r in run["requests"]) == Counter(users)
    page = (out / "report.html").read_text()
    assert "Jain" in page and "Service and TTFT per client" in page
    assert main(["--workload", "multi-tenant", "--clients", "2", "--client-rates", "1,2,3", "--url", base_url]) == 2
