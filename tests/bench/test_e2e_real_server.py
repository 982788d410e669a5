"""`fitserve bench --model DIR` against a real fitserve server it starts itself: JSON, CSV and
an HTML report whose embedded plots decode and show their lines.

The page is checked with what pip installs (Python's HTML parser and matplotlib's PNG reader),
so the README's test command passes on a fresh machine; `.ci/run` also renders the page this
test writes in headless Chromium (`.ci/render_report.py`)."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.bench.report_pixels import count_plot_pixels, embedded_images

REPORT_COPY_ENV = "FITSERVE_REPORT_COPY"
"""When set, the report written here is copied to that path (for `.ci/render_report.py`)."""


@pytest.mark.slow
def test_bench_starts_a_server_and_writes_a_report_with_its_plots(tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "fitserve.cli", "bench", "--model", str(tiny_model_dir),
               "--server-args", "--dtype float32 --device cpu --kv-cache-memory 8MiB --num-threads 1",
               "--num-requests", "6", "--input-len", "16", "--output-len", "8", "--concurrency", "2",
               "--slo", "mlperf-server", "--idle-seconds", "1", "--roofline-seconds", "0.1",
               "--sample-interval", "0.2", "--no-progress", "--out", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=420)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]

    report = json.loads((out / "bench.json").read_text())
    assert report["server"]["launched_by_bench"] is True
    run = report["runs"][0]
    summary = run["summary"]
    assert summary["completed"] == 6 and summary["failed"] == 0
    # ignore_eos + max_tokens: exactly 8 tokens each, counted by the server's usage.
    assert {row["output_tokens"] for row in run["requests"]} == {8}
    assert {row["output_tokens_source"] for row in run["requests"]} == {"usage"}
    # Exact prompts: 16 tokens of text plus the BOS the tokenizer adds, as the server reports.
    assert {row["input_tokens"] for row in run["requests"]} == {17}
    assert report["workload"]["prompt_lengths"] == "exact, in the model's tokens"
    assert summary["ttft_ms"]["p99"] > 0 and summary["tpot_ms"]["median"] > 0
    assert summary["goodput"] is not None
    assert report["model"]["num_layers"] == 2 and report["model"]["dtype_name"] == "float32"
    assert report["hardware_limit"]["memory_bandwidth_bytes_per_s"] > 0
    assert 0 < run["roofline"]["decode"]["fraction_of_limit"] and run["roofline"]["prefill"] is not None
    assert run["hardware"]["summary"]["server_rss_peak_bytes"] > 50 * 2**20
    assert (out / "server.log").is_file()
    # The server's own counters over the run: 6 requests of 8 generated tokens each.
    counters = run["server_counters"]
    assert counters["fitserve_generation_tokens_total"] == 48
    assert counters["fitserve_request_finished_total"] == 6

    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert len(rows) == 6 and all(row["success"] == "True" for row in rows)

    page = out / "report.html"
    images = embedded_images(page.read_text())
    assert len(images) >= 2
    # The plots' first line colour must be in the decoded images: real plots, not blank PNGs.
    blue_pixels = sum(count_plot_pixels(image) for image in images)
    assert blue_pixels > 500, f"only {blue_pixels} plot-coloured pixels in the report's images"
    if os.environ.get(REPORT_COPY_ENV):
        shutil.copy(page, os.environ[REPORT_COPY_ENV])


@pytest.mark.slow
def test_url_mode_multi_turn_and_shared_prefix_against_a_running_server(tiny_model_dir, tmp_path):
    from fitserve.bench.cli import main
    from fitserve.bench.server_process import ServerProcess

    server = ServerProcess(tiny_model_dir, tmp_path / "server.log",
                           "--dtype float32 --device cpu --kv-cache-memory 8MiB --num-threads 1")
    server.start(timeout_s=300)
    try:
        common = ["--url", server.base_url, "--model-info", str(tiny_model_dir), "--no-progress",
                  "--idle-seconds", "0.5", "--no-roofline", "--output-len", "4", "--concurrency", "2"]
        assert main([*common, "--workload", "multi-turn", "--num-requests", "6", "--num-turns", "3",
                     "--input-len", "6", "--out", str(tmp_path / "chat")]) == 0
        report = json.loads((tmp_path / "chat" / "bench.json").read_text())
        assert report["server"]["endpoint"] == "chat" and report["server"]["launched_by_bench"] is False
        assert report["server"]["pid_sampled"] == server.pid  # found through its loopback port
        requests = report["runs"][0]["requests"]
        assert len(requests) == 6 and all(row["success"] for row in requests)
        by_conversation = {}
        for row in requests:
            by_conversation.setdefault(row["conversation_id"], []).append(row)
        for turns in by_conversation.values():
            turns.sort(key=lambda row: row["turn_index"])
            # Each turn re-sends the history: prompts grow by at least the previous answer.
            for earlier, later in zip(turns, turns[1:]):
                assert later["input_tokens"] >= earlier["input_tokens"] + earlier["output_tokens"] + 6
                assert later["sent_s"] >= earlier["sent_s"] + earlier["end_s"]

        assert main([*common, "--workload", "shared-prefix", "--num-requests", "4", "--prefix-len", "24",
                     "--num-prefixes", "2", "--input-len", "4", "--out", str(tmp_path / "prefix")]) == 0
        prefix_runs = json.loads((tmp_path / "prefix" / "bench.json").read_text())["runs"]
        assert prefix_runs[0]["summary"]["completed"] == 4
        # 24 prefix + 4 own tokens of whole words, plus BOS.
        assert {row["input_tokens"] for row in prefix_runs[0]["requests"]} == {29}
        assert prefix_runs[0]["hardware"]["summary"]["system_cpu_mean_pct"] is not None
    finally:
        server.stop()
    assert server.process.poll() is not None  # stopped
