"""Report writing without a server: GPU rows and plots from recorded samples, JSON round trip."""

import csv
import json
import math

from fitserve.bench.hardware import HardwareSample, summarize_hardware
from fitserve.bench.metrics import Slo, summarize
from fitserve.bench.records import RequestResult
from fitserve.bench.report import NOT_MEASURED, hardware_rows, write_all


def gpu_sample(time_s: float, power_w: float, energy_j: float) -> HardwareSample:
    return HardwareSample(time_s=time_s, server_rss_bytes=2**30, server_cpu_pct=90.0, system_cpu_pct=50.0,
                          cpu_energy_j=None, temperatures_c={"k10temp": 55.0 + time_s},
                          gpus=[{"memory_used_bytes": 40 * 2**30, "power_w": power_w, "energy_j": energy_j,
                                 "temperature_c": 70.0, "utilization_pct": 95.0}])


def make_run(label: str, rate: float, ttft: float) -> dict:
    results = [RequestResult(request_id=i, conversation_id=i, turn_index=0, scheduled_s=i * 0.1, sent_s=i * 0.1,
                             input_tokens=32, requested_output_tokens=4, output_tokens=4,
                             output_tokens_source="usage", chunk_times_s=[ttft, ttft + 0.01, ttft + 0.02, ttft + 0.03],
                             end_s=ttft + 0.03, success=True) for i in range(5)]
    summary = summarize(results, 1.0, Slo(ttft_ms=150))
    samples = [gpu_sample(0.0, 300.0, 1000.0), gpu_sample(0.5, 400.0, 1200.0), gpu_sample(1.0, 400.0, 1400.0)]
    idle = [gpu_sample(0.0, 100.0, 0.0), gpu_sample(1.0, 100.0, 100.0)]
    hardware = summarize_hardware(samples, idle, summary["total_output_tokens"])
    return {"label": label, "rate": rate, "max_concurrency": None, "summary": summary,
            "requests": [r.to_row() for r in results],
            "hardware": {"summary": hardware, "samples": [s.__dict__ for s in samples]}, "roofline": None}


def make_report(runs: list[dict]) -> dict:
    return {"format": "fitserve-bench/1", "created": "2026-01-01T00:00:00+00:00", "command": ["fitserve", "bench"],
            "environment": {"cpu": "test"}, "server": {"url": "http://127.0.0.1:1"}, "model": None,
            "workload": {"kind": "synthetic"}, "load": {"mode": "open loop"}, "slo": Slo(ttft_ms=150).to_dict(),
            "baseline_note": "idle subtracted", "idle_baseline": None, "hardware_limit": None,
            "runs": runs, "slo_search": None}


def test_gpu_energy_rows_and_plots_are_written(tmp_path):
    runs = [make_run("1 req/s", 1.0, 0.1), make_run("2 req/s", 2.0, 0.2), make_run("all at once", math.inf, 0.3)]
    rows = dict(hardware_rows(runs[0]))
    # Counter difference 400 J over 1 s, idle 100 W -> 300 J above idle for 20 tokens.
    assert rows["GPU 0 energy above idle (J) / per token (J)"] == "300.00 / 15.0000"
    assert rows["GPU 0 mean / idle power (W)"] == "400.0 / 100.0"
    assert rows["CPU energy (RAPL)"] == NOT_MEASURED
    assert rows["max temperatures (°C)"] == "k10temp: 56"
    paths = write_all(make_report(runs), tmp_path)
    page = paths["html"].read_text()
    # CDFs, the sweep (two finite rates) and one hardware timeline per run.
    assert page.count("data:image/png;base64,") == 1 + 1 + 3
    assert "goodput" in page and "1 req/s" in page and "all at once" in page
    stored = json.loads(paths["json"].read_text())
    assert stored["runs"][2]["rate"] == "inf"  # JSON has no infinity: written as a string
    assert stored["runs"][1]["summary"]["goodput"] == 0.0  # TTFT 200 ms misses the 150 ms SLO
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 15 and abs(float(rows[0]["tpot_ms"]) - 10.0) < 1e-6 and rows[0]["num_chunks"] == "4"


def test_hardware_limit_is_shown_in_units_people_read(tmp_path):
    from fitserve.bench.report import hardware_limit_rows

    limit = {"device": "cpu", "dtype": "bfloat16", "memory_bandwidth_bytes_per_s": 33.21e9,
             "matmul_flops_per_s": 1.712e12, "matmul_size": 1024, "matmul_arithmetic": "bfloat16",
             "method": "copies and matmuls", "threads": 2,
             "measurements": [{"memory_bandwidth_bytes_per_s": 33.21e9, "matmul_flops_per_s": 1.712e12},
                              {"memory_bandwidth_bytes_per_s": 30.0e9, "matmul_flops_per_s": 431e9}]}
    rows = dict(hardware_limit_rows(limit))
    assert rows["memory bandwidth"] == "33.2 GB/s"
    assert rows["matmul throughput"].startswith("1.71 TFLOP/s (bfloat16 on cpu")
    assert rows["measured before / after the runs (the higher is used)"] == \
        "33.2 GB/s, 1.71 TFLOP/s; 30 GB/s, 431 GFLOP/s"
    page = write_all(make_report([make_run("1 req/s", 1.0, 0.1)]) | {"hardware_limit": limit}, tmp_path)["html"]
    assert "33.2 GB/s" in page.read_text() and "memory_bandwidth_bytes_per_s" not in page.read_text()


def test_closed_loop_and_all_at_once_runs_do_not_claim_poisson_arrivals():
    from fitserve.bench.runner import LoadPlan

    def arrivals(rates, concurrency, burstiness=1.0):
        return LoadPlan(rates=rates, max_concurrency=concurrency, burstiness=burstiness, seed=0, slo=None).describe()["arrivals"]

    assert arrivals([math.inf], 4) == "none: a closed loop of 4 streams (a request starts when one ends)"
    assert arrivals([math.inf], None) == "none: every request at once"
    assert arrivals([1.0, 2.0], None) == "Poisson"
    assert arrivals([1.0, math.inf], None, 0.5).startswith("gamma, burstiness 0.5 at finite rates")


def test_hardware_timeline_axes_start_at_zero_and_caption_names_only_drawn_panels(monkeypatch):
    from fitserve.bench import plots

    figures = []
    monkeypatch.setattr(plots, "_to_base64", lambda figure: figures.append(figure) or "png")
    cpu_only = [HardwareSample(time_s=t, server_rss_bytes=1000 * 2**20 + int(t * 25 * 2**20), server_cpu_pct=90.0,
                               system_cpu_pct=50.0, cpu_energy_j=None, gpus=None, temperatures_c=None).__dict__
                for t in (0.0, 0.5, 1.0)]
    encoded, caption = plots.hardware_timeline({"label": "run", "hardware": {"samples": cpu_only}})
    assert caption == "Server memory (RSS) and CPU use over time (run)"  # no power plot, so none named
    memory_axis, cpu_axis = figures[0].axes
    assert memory_axis.get_ylim()[0] == 0 and memory_axis.get_ylim()[1] >= 1025  # a 25 MiB rise stays small
    assert cpu_axis.get_ylim() == (0, 100)
    with_gpu = [gpu_sample(t, 300.0, 10.0 * t).__dict__ for t in (0.0, 0.5)]
    _, caption = plots.hardware_timeline({"label": "gpu", "hardware": {"samples": with_gpu}})
    assert caption == "Server memory (RSS), CPU use, GPU power and GPU memory over time (gpu)"


def test_hardware_timeline_tolerates_samples_with_a_missing_counter():
    from fitserve.bench import plots

    samples = [HardwareSample(time_s=t, server_rss_bytes=2**30, server_cpu_pct=None if t == 0 else 80.0,
                              system_cpu_pct=None if t == 0 else 40.0, cpu_energy_j=None, gpus=None,
                              temperatures_c=None).__dict__ for t in (0.0, 0.5, 1.0)]
    assert plots.hardware_timeline({"label": "run", "hardware": {"samples": samples}}) is not None
