"""`fitserve bench --url` end to end against the scripted server: sweeps, SLO search, files,
and `bench compare`."""

import csv
import json
import math

import pytest

from fitserve.bench.cli import main
from fitserve.bench.compare import comparison_rows, load_report

COMMON = ["--num-requests", "6", "--input-len", "8", "--output-len", "4", "--no-progress", "--idle-seconds", "0.5"]


def test_rate_sweep_writes_json_csv_and_html(scripted_server, tmp_path):
    base_url, _ = scripted_server
    out = tmp_path / "sweep"
    code = main(["--url", base_url, *COMMON, "--rate", "10,40", "--burstiness", "0.5",
                 "--slo", "ttft=2s,tpot=1s", "--sample-interval", "0.1", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert [run["rate"] for run in report["runs"]] == [10.0, 40.0]
    for run in report["runs"]:
        summary = run["summary"]
        assert summary["completed"] == 6 and summary["failed"] == 0
        assert summary["total_output_tokens"] == 24  # usage.completion_tokens, 4 per request
        assert summary["goodput"] == pytest.approx(summary["request_throughput"])
        assert len(run["requests"]) == 6 and run["roofline"] is None  # no model config given
        assert run["hardware"]["summary"]["server_rss_peak_bytes"] > 0  # the local server's process
    assert report["load"]["arrivals"] == "gamma, burstiness 0.5"
    assert report["workload"]["prompt_lengths"].startswith("approximate")
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert len(rows) == 12 and {row["run"] for row in rows} == {"10 req/s", "40 req/s"}
    assert all(float(row["ttft_ms"]) > 0 for row in rows)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3  # CDFs, rate sweep, hardware timelines
    assert "not measured on this machine" in page  # this VM has no RAPL: said, not zero


def test_slo_search_brackets_the_highest_passing_rate(scripted_server, tmp_path):
    base_url, _ = scripted_server
    out = tmp_path / "search"
    # The scripted server adds 25 ms to the first token per request in flight: high rates fail.
    code = main(["--url", base_url, *COMMON, "--num-requests", "8", "--rate", "4", "--slo-search",
                 "--slo", "ttft=70ms,p=90", "--search-steps", "2", "--no-hardware", "--out", str(out)])
    assert code == 0
    search = json.loads((out / "bench.json").read_text())["slo_search"]
    passing, failing = search["max_rate_meeting_slo"], search["lowest_rate_failing_slo"]
    assert passing is not None and failing is not None and passing < failing
    outcomes = {probe["rate"]: probe["meets_slo"] for probe in search["probes"]}
    assert outcomes[passing] is True and outcomes[failing] is False
    # Bisection ran: the bracket is at most a quarter of the doubling step that found it.
    assert failing - passing <= passing


def test_failures_are_counted_and_compare_puts_runs_side_by_side(scripted_server, tmp_path):
    base_url, _ = scripted_server
    good, bad = tmp_path / "good", tmp_path / "bad"
    assert main(["--url", base_url, *COMMON, "--concurrency", "2", "--no-hardware", "--out", str(good)]) == 0
    # A model name the server does not know still streams here, so force failures by timeout:
    # the fastest scripted answer takes 40 ms (10 ms to the first token, 3 gaps of 10 ms).
    assert main(["--url", base_url, *COMMON, "--concurrency", "6", "--request-timeout", "0.02",
                 "--no-hardware", "--out", str(bad)]) == 1
    bad_summary = json.loads((bad / "bench.json").read_text())["runs"][0]["summary"]
    assert bad_summary["failed"] == 6 and bad_summary["failure_reasons"] == {"timeout": 6}
    rows = comparison_rows(load_report(good / "bench.json"), load_report(bad / "bench.json"))
    by_name = {row[0]: row for row in rows}
    assert by_name["[concurrency 2 | concurrency 6] completed / failed"][1:3] == ("6 / 0", "0 / 6")
    throughput = by_name["[concurrency 2 | concurrency 6] request throughput (req/s)"]
    assert float(throughput[2]) == 0.0 and throughput[3] == "0.000×"
    with pytest.raises(ValueError, match="not a fitserve bench JSON"):
        (tmp_path / "other.json").write_text("{}")
        load_report(tmp_path / "other.json")
    assert not math.isnan(float(throughput[1]))
    assert main(["compare", str(good / "bench.json"), str(bad / "bench.json")]) == 0


def test_a_refused_warm_up_stops_the_bench_with_the_servers_reason(scripted_server, tmp_path, capsys):
    base_url, handle = scripted_server
    code = main(["--url", base_url, *COMMON, "--served-model-name", "no-such-model", "--no-hardware",
                 "--out", str(tmp_path / "refused")])
    assert code == 2
    error = capsys.readouterr().err
    assert "HTTP 404" in error and "does not exist" in error and "--served-model-name" in error
    assert len(handle.stats()["bodies"]) == 1  # only the warm-up was sent, not the 6 requests


@pytest.mark.parametrize("flags, message", [
    (["--num-requests", "0"], "--num-requests"),
    (["--concurrency", "0"], "--concurrency"),
    (["--slo-search"], "--slo-search needs --slo"),
    (["--input-len", "0"], "length must be >= 1"),
    (["--url", "http://127.0.0.1:9", "--model", "somewhere"], "not both"),
])
def test_invalid_flags_are_refused_before_anything_starts(tmp_path, capsys, flags, message):
    assert main([*flags, "--out", str(tmp_path / "never")]) == 2
    assert message in capsys.readouterr().err


def test_unreadable_rate_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        main(["--rate", "fast"])
    assert "--rate" in capsys.readouterr().err


def test_url_with_no_server_is_one_line_and_writes_nothing(tmp_path, capsys):
    import socket

    from fitserve.cli import main as fitserve_main

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "results"
    code = fitserve_main(["bench", "--url", f"http://127.0.0.1:{port}", *COMMON, "--out", str(out)])
    assert code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1, errors
    assert f"could not connect to http://127.0.0.1:{port}" in errors[0] and "is the server running?" in errors[0]
    assert not out.exists()
