"""benchmarks/cpu_decode.py's phase-matched single-stream summary: on a machine that reads
memory at two rates, systems are compared within the same rate, step by step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import cpu_decode  # noqa: E402

SLOW, FAST = 33e9, 60e9


def run(system: str, dtype: str, seconds_by_rate: dict[float, float], pattern: list[float]) -> dict:
    return {"system": system, "dtype": dtype, "step_seconds": [seconds_by_rate[rate] for rate in pattern],
            "step_read_bytes_per_s": list(pattern)}


def test_one_phase_gives_no_split():
    assert cpu_decode.phase_split([SLOW * (1 + 0.01 * (i % 5)) for i in range(100)]) is None


def test_split_lies_between_the_two_rates():
    split = cpu_decode.phase_split([SLOW] * 60 + [FAST] * 40)
    assert SLOW < split < FAST


def test_ratios_compare_systems_within_each_phase():
    # w4 drew mostly fast steps, Q4_0 mostly slow ones: a median over all steps would favour
    # w4 by the phase lottery; within each phase the ratio is the engines' alone.
    w4 = run("fitserve", "w4", {SLOW: 0.0120, FAST: 0.0080}, [FAST] * 30 + [SLOW] * 10)
    q4 = run("llama.cpp", "Q4_0", {SLOW: 0.0150, FAST: 0.0144}, [FAST] * 10 + [SLOW] * 30)
    result = cpu_decode.summarize_by_phase([w4, q4], {"fitserve w4": 326e6, "llama.cpp Q4_0": 348e6})
    ratio = result["ratios"]["fitserve w4 / llama.cpp Q4_0"]
    assert ratio["slow"] == pytest.approx(0.0150 / 0.0120)
    assert ratio["fast"] == pytest.approx(0.0144 / 0.0080)
    slow_w4 = result["systems"]["fitserve w4"]["slow"]
    assert slow_w4["steps"] == 10
    assert slow_w4["paired_fraction"] == pytest.approx(326e6 / 0.0120 / SLOW)


def test_a_phase_with_too_few_steps_is_left_out():
    w4 = run("fitserve", "w4", {SLOW: 0.012, FAST: 0.008}, [FAST] * 40 + [SLOW] * 3)
    q4 = run("llama.cpp", "Q4_0", {SLOW: 0.015, FAST: 0.0144}, [FAST] * 20 + [SLOW] * 20)
    result = cpu_decode.summarize_by_phase([w4, q4], {"fitserve w4": 326e6, "llama.cpp Q4_0": 348e6})
    assert set(result["systems"]["fitserve w4"]) == {"fast"}
    assert set(result["ratios"]["fitserve w4 / llama.cpp Q4_0"]) == {"fast"}
