"""Hardware counters: RAPL wrap-around, energy above idle, "not measured" instead of zero."""

import os
import time

import pytest

from fitserve.bench.hardware import (HardwareSample, HardwareSampler, RaplReader, counter_delta,
                                     summarize_hardware)


def write_zone(root, name, energy_uj, max_range_uj=1000):
    zone = root / name
    zone.mkdir(exist_ok=True)
    (zone / "energy_uj").write_text(str(energy_uj))
    (zone / "max_energy_range_uj").write_text(str(max_range_uj))


def test_counter_delta_handles_wrap_around():
    assert counter_delta(100, 250, 1000) == 150
    assert counter_delta(900, 50, 1000) == 150  # wrapped past 1000 back to 0


def test_rapl_sums_packages_across_wraps_and_ignores_subzones(tmp_path):
    write_zone(tmp_path, "intel-rapl:0", 900)
    write_zone(tmp_path, "intel-rapl:1", 100)
    write_zone(tmp_path, "intel-rapl:0:0", 5)  # the core sub-zone: part of package 0
    reader = RaplReader(tmp_path)
    assert reader.available and len(reader.zones) == 2
    assert reader.sample() == 0.0
    write_zone(tmp_path, "intel-rapl:0", 100)   # +200 µJ through a wrap
    write_zone(tmp_path, "intel-rapl:1", 400)   # +300 µJ
    write_zone(tmp_path, "intel-rapl:0:0", 999)
    assert reader.sample() == pytest.approx(500e-6)
    write_zone(tmp_path, "intel-rapl:0", 600)   # +500 µJ: a second wrap-free step
    assert reader.sample() == pytest.approx(1000e-6)


def test_missing_rapl_is_absent_not_zero(tmp_path):
    reader = RaplReader(tmp_path / "no-powercap")
    assert not reader.available and reader.sample() is None


def sample(time_s, energy_j=None, rss=None, cpu=50.0, gpu_power=None):
    gpus = [{"power_w": gpu_power, "energy_j": None, "memory_used_bytes": 2**30,
             "temperature_c": 60.0, "utilization_pct": 80.0}] if gpu_power is not None else None
    return HardwareSample(time_s=time_s, server_rss_bytes=rss, server_cpu_pct=cpu, system_cpu_pct=cpu,
                          cpu_energy_j=energy_j, gpus=gpus, temperatures_c=None)


def test_energy_above_idle_by_hand():
    idle = [sample(0.0, 0.0, cpu=5.0), sample(1.0, 10.0, cpu=5.0), sample(2.0, 20.0, cpu=5.0)]  # 10 W idle
    run = [sample(0.0, 100.0, 2**20), sample(2.0, 150.0, 3 * 2**20), sample(4.0, 200.0, 2 * 2**20)]
    summary = summarize_hardware(run, idle, output_tokens=20)
    cpu_energy = summary["cpu_energy"]
    assert cpu_energy["energy_j"] == pytest.approx(100.0)
    assert cpu_energy["mean_power_w"] == pytest.approx(25.0)
    assert cpu_energy["idle_power_w"] == pytest.approx(10.0)
    assert cpu_energy["energy_above_idle_j"] == pytest.approx(100.0 - 10.0 * 4.0)
    assert cpu_energy["energy_per_output_token_j"] == pytest.approx(60.0 / 20)
    assert summary["server_rss_peak_bytes"] == 3 * 2**20
    assert summary["system_cpu_idle_pct"] == pytest.approx(5.0)


def test_gpu_energy_integrates_power_when_the_counter_is_missing():
    idle = [sample(0.0, gpu_power=50.0), sample(1.0, gpu_power=50.0)]
    run = [sample(0.0, gpu_power=100.0), sample(1.0, gpu_power=200.0), sample(2.0, gpu_power=200.0)]
    gpu = summarize_hardware(run, idle, output_tokens=10)["gpus"][0]
    assert gpu["energy_j"] == pytest.approx(150.0 + 200.0)  # trapezoids
    assert gpu["energy_above_idle_j"] == pytest.approx(350.0 - 50.0 * 2.0)
    assert gpu["memory_peak_bytes"] == 2**30 and gpu["temperature_max_c"] == 60.0


def test_counters_the_machine_lacks_are_none():
    summary = summarize_hardware([sample(0.0), sample(1.0)], [], output_tokens=5)
    assert summary["cpu_energy"] is None and summary["gpus"] is None
    assert summary["server_rss_peak_bytes"] is None and summary["max_temperature_c"] is None


def test_sampler_follows_a_live_process():
    sampler = HardwareSampler(server_pid=os.getpid(), interval_s=0.05)
    sampler.start()
    burn_until = time.perf_counter() + 0.3
    while time.perf_counter() < burn_until:
        sum(range(1000))
    samples = sampler.stop()
    assert len(samples) >= 3 and samples[0].time_s < samples[-1].time_s
    assert all(s.server_rss_bytes and s.server_rss_bytes > 10 * 2**20 for s in samples)
    assert all(s.system_cpu_pct is None or 0 <= s.system_cpu_pct <= 100 for s in samples)
    if not sampler.nvml.available:
        assert all(s.gpus is None for s in samples)
    sources = sampler.describe_sources()
    assert sources["server_process"] is True
    remote = HardwareSampler(server_pid=None, interval_s=0.05)
    assert remote.sample_once(time.perf_counter()).server_rss_bytes is None


class FakeNvml:
    """Stands in for pynvml: one GPU whose energy counter is unsupported (older GPUs)."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return f"gpu{index}"

    def nvmlDeviceGetName(self, handle):
        return b"Fake GPU 80GB"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return type("Memory", (), {"used": 5 * 2**30})()

    def nvmlDeviceGetPowerUsage(self, handle):
        return 250_000  # milliwatts

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 64

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        raise self.NVMLError("Not Supported")

    def nvmlDeviceGetUtilizationRates(self, handle):
        return type("Utilization", (), {"gpu": 87})()


def test_nvml_readings_convert_units_and_mark_unsupported_counters(monkeypatch):
    import sys

    from fitserve.bench.hardware import NvmlReader

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    reader = NvmlReader()
    assert reader.available and reader.names == ["Fake GPU 80GB"]
    (reading,) = reader.sample()
    assert reading == {"memory_used_bytes": 5 * 2**30, "power_w": 250.0, "temperature_c": 64.0,
                       "energy_j": None, "utilization_pct": 87.0}


def test_no_nvml_library_means_no_gpu_readings(monkeypatch):
    import sys

    from fitserve.bench.hardware import NvmlReader

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if not installed
    reader = NvmlReader()
    assert not reader.available and reader.sample() is None
