"""Hardware counters sampled while a run goes on: memory, CPU, GPU, energy, temperature.

Each source is optional. A counter this machine does not have is None in every sample and
"not measured on this machine" in the report, never 0: a missing RAPL file must not read as
a machine that used no energy.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAPL_ROOT = Path("/sys/class/powercap")


def counter_delta(previous: int, current: int, max_range: int) -> int:
    """Increase of a counter that wraps to 0 after max_range (RAPL's energy_uj does)."""
    if current >= previous:
        return current - previous
    return max_range - previous + current


class RaplReader:
    """CPU package energy from the Linux powercap interface, summed over packages.

    Only top-level `intel-rapl:N` zones are read: their sub-zones (core, uncore, dram) are
    parts of the package and would be counted twice. Deltas are taken between consecutive
    samples, so the counter may wrap any number of times during a long run.
    """

    def __init__(self, root: Path = RAPL_ROOT) -> None:
        self.zones: list[tuple[Path, int]] = []
        if not root.is_dir():
            return
        for zone in sorted(root.glob("intel-rapl:*")):
            if zone.name.count(":") != 1:
                continue
            try:
                (zone / "energy_uj").read_text()
                max_range = int((zone / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue  # unreadable without root on many systems: treat as absent
            self.zones.append((zone / "energy_uj", max_range))
        self._last: list[int] | None = None
        self.total_joules = 0.0

    @property
    def available(self) -> bool:
        return bool(self.zones)

    def sample(self) -> float | None:
        """Joules accumulated since the first call (None without RAPL)."""
        if not self.zones:
            return None
        current = [int(path.read_text()) for path, _ in self.zones]
        if self._last is not None:
            for (_, max_range), before, now in zip(self.zones, self._last, current):
                self.total_joules += counter_delta(before, now, max_range) / 1e6
        self._last = current
        return self.total_joules


class NvmlReader:
    """GPU memory, power, temperature and the total-energy counter through NVML."""

    def __init__(self) -> None:
        self.handles: list = []
        self.names: list[str] = []
        try:
            import pynvml  # nvidia-ml-py; optional
            pynvml.nvmlInit()
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                self.handles.append(handle)
                name = pynvml.nvmlDeviceGetName(handle)
                self.names.append(name.decode() if isinstance(name, bytes) else str(name))
            self._nvml = pynvml
        except Exception:  # no library, no driver or no GPU: all mean "not measured"
            self.handles = []

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def sample(self) -> list[dict] | None:
        if not self.handles:
            return None
        nvml = self._nvml
        readings = []
        for handle in self.handles:
            reading: dict = {}
            for key, read in (
                ("memory_used_bytes", lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used),
                ("power_w", lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1e3),
                ("temperature_c", lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
                ("energy_j", lambda h: nvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1e3),
                ("utilization_pct", lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu),
            ):
                try:
                    reading[key] = float(read(handle))
                except Exception:
                    reading[key] = None  # this GPU lacks the counter
            readings.append(reading)
        return readings


def read_temperatures() -> dict[str, float] | None:
    """Highest current temperature per OS sensor group (None when the OS exposes none)."""
    reader = getattr(psutil, "sensors_temperatures", None)
    try:
        groups = reader() if reader else {}
    except Exception:
        groups = {}
    temperatures = {name: max(entry.current for entry in entries)
                    for name, entries in groups.items() if entries}
    return temperatures or None


@dataclass
class HardwareSample:
    time_s: float
    """Seconds since the sampler started."""
    server_rss_bytes: int | None
    """Resident memory of the server process and its children (None when not local)."""
    server_cpu_pct: float | None
    """CPU use of the server process tree, 100 = one core busy."""
    system_cpu_pct: float | None
    """CPU use of the whole machine, 100 = every core busy."""
    cpu_energy_j: float | None
    gpus: list[dict] | None
    temperatures_c: dict[str, float] | None


@dataclass
class HardwareSampler:
    """Samples in a background thread every `interval_s` until stopped."""

    server_pid: int | None = None
    interval_s: float = 0.5
    samples: list[HardwareSample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rapl = RaplReader()
        self.nvml = NvmlReader()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = self._find_process()
        self._last_cpu_times = psutil.cpu_times()

    def _system_cpu_pct(self) -> float | None:
        """Machine-wide CPU use since the previous sample, from /proc/stat deltas (psutil's own
        cpu_percent reads 0 or 100 for some intervals on virtual machines)."""
        current = psutil.cpu_times()
        previous, self._last_cpu_times = self._last_cpu_times, current
        total = sum(current) - sum(previous)
        idle = (current.idle - previous.idle) + (getattr(current, "iowait", 0.0) - getattr(previous, "iowait", 0.0))
        if total <= 0:
            return None  # no clock tick since the last sample: unknown, not idle
        return max(0.0, min(100.0, 100.0 * (total - idle) / total))

    def _find_process(self) -> psutil.Process | None:
        if self.server_pid is None:
            return None
        try:
            return psutil.Process(self.server_pid)
        except psutil.Error:
            return None

    def _process_tree(self) -> list[psutil.Process]:
        if self._process is None:
            return []
        try:
            return [self._process, *self._process.children(recursive=True)]
        except psutil.Error:
            return []

    def sample_once(self, start: float) -> HardwareSample:
        rss, cpu = None, None
        tree = self._process_tree()
        if tree:
            rss, cpu = 0, 0.0
            for process in tree:
                try:
                    rss += process.memory_info().rss
                    cpu += process.cpu_percent(None)
                except psutil.Error:
                    continue  # a child exited between listing and reading
        return HardwareSample(
            time_s=time.perf_counter() - start, server_rss_bytes=rss, server_cpu_pct=cpu,
            system_cpu_pct=self._system_cpu_pct(), cpu_energy_j=self.rapl.sample(),
            gpus=self.nvml.sample(), temperatures_c=read_temperatures(),
        )

    def start(self) -> None:
        start = time.perf_counter()
        self.samples = []
        self._stop.clear()
        # psutil's cpu_percent measures since its previous call: prime it so the first
        # real sample covers one interval, not the time since import.
        self._last_cpu_times = psutil.cpu_times()
        for process in self._process_tree():
            try:
                process.cpu_percent(None)
            except psutil.Error:
                pass
        self.rapl.sample()
        # A sample at t=0 is the starting point of the energy counters' differences.
        self.samples.append(self.sample_once(start))

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self.samples.append(self.sample_once(start))

        self._start = start
        self._thread = threading.Thread(target=loop, name="fitserve-bench-hardware", daemon=True)
        self._thread.start()

    def stop(self) -> list[HardwareSample]:
        """Stop sampling; a last sample marks the window's end, so even a run shorter than one
        interval has a start and an end for its energy and CPU figures."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self.samples.append(self.sample_once(self._start))
        return self.samples

    def measure_idle(self, seconds: float) -> list[HardwareSample]:
        """Samples over `seconds` with no load: the baseline the run's energy is reduced by."""
        self.start()
        time.sleep(seconds)
        return self.stop()

    def describe_sources(self) -> dict:
        return {
            "server_process": self._process is not None,
            "rapl": self.rapl.available,
            "nvml_gpus": self.nvml.names if self.nvml.available else None,
            "os_temperatures": read_temperatures() is not None,
        }


def _energy_over(times_s: list[float], counter_j: list[float | None],
                 power_w: list[float | None]) -> float | None:
    """Joules over the window: the energy counter's difference, or else integrated power."""
    if len(times_s) >= 2 and counter_j[0] is not None and counter_j[-1] is not None:
        return counter_j[-1] - counter_j[0]
    points = [(t, p) for t, p in zip(times_s, power_w) if p is not None]
    if len(points) < 2:
        return None
    return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(points, points[1:]))


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def _max(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return max(present) if present else None


def _window_energy(samples: list[HardwareSample], counter, power) -> tuple[float | None, float]:
    times = [sample.time_s for sample in samples]
    energy = _energy_over(times, [counter(s) for s in samples], [power(s) for s in samples])
    duration = times[-1] - times[0] if len(times) >= 2 else 0.0
    return energy, duration


def _net_energy(run: list[HardwareSample], idle: list[HardwareSample], counter, power,
                output_tokens: int) -> dict:
    """Energy of the run, the idle power, and the run's energy above idle (per token too)."""
    energy, duration = _window_energy(run, counter, power)
    idle_energy, idle_duration = _window_energy(idle, counter, power) if idle else (None, 0.0)
    idle_power = idle_energy / idle_duration if idle_energy is not None and idle_duration > 0 else None
    net = energy - idle_power * duration if energy is not None and idle_power is not None else None
    return {
        "energy_j": energy,
        "mean_power_w": energy / duration if energy is not None and duration > 0 else None,
        "idle_power_w": idle_power,
        "energy_above_idle_j": net,
        "energy_per_output_token_j": (net / output_tokens
                                      if net is not None and output_tokens > 0 else None),
    }


def summarize_hardware(run: list[HardwareSample], idle: list[HardwareSample],
                       output_tokens: int) -> dict:
    """Run-level hardware numbers; every counter the machine lacks is None."""
    if not run:
        return {"samples": 0}
    after_first = run[1:] or run  # the t=0 sample has no CPU-use interval behind it
    summary: dict = {
        "samples": len(run),
        "window_s": run[-1].time_s - run[0].time_s,
        "server_rss_peak_bytes": _max([s.server_rss_bytes for s in run]),
        "server_rss_mean_bytes": _mean([s.server_rss_bytes for s in run]),
        "server_rss_idle_bytes": _mean([s.server_rss_bytes for s in idle]),
        "server_cpu_mean_pct": _mean([s.server_cpu_pct for s in after_first]),
        "system_cpu_mean_pct": _mean([s.system_cpu_pct for s in after_first]),
        "system_cpu_idle_pct": _mean([s.system_cpu_pct for s in idle[1:]]),
        "cpu_energy": (_net_energy(run, idle, lambda s: s.cpu_energy_j, lambda s: None, output_tokens)
                       if run[0].cpu_energy_j is not None else None),
        "gpus": None,
        "max_temperature_c": None,
    }
    if run[0].gpus:
        gpus = []
        for index in range(len(run[0].gpus)):
            def reading(sample: HardwareSample, key: str, index: int = index) -> float | None:
                return sample.gpus[index].get(key) if sample.gpus else None
            gpu = _net_energy(run, idle, lambda s: reading(s, "energy_j"),
                              lambda s: reading(s, "power_w"), output_tokens)
            gpu.update(
                memory_peak_bytes=_max([reading(s, "memory_used_bytes") for s in run]),
                memory_idle_bytes=_mean([reading(s, "memory_used_bytes") for s in idle]),
                temperature_max_c=_max([reading(s, "temperature_c") for s in run]),
                utilization_mean_pct=_mean([reading(s, "utilization_pct") for s in after_first]),
            )
            gpus.append(gpu)
        summary["gpus"] = gpus
    temperatures: dict[str, float] = {}
    for sample in run:
        for name, value in (sample.temperatures_c or {}).items():
            temperatures[name] = max(value, temperatures.get(name, value))
    summary["max_temperature_c"] = temperatures or None
    return summary
