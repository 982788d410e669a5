"""Reading `--slo` values: named presets or "ttft=500ms,tpot=50ms,e2e=10s,p=99"."""

from __future__ import annotations

import re

from fitserve.bench.metrics import Slo

SLO_PRESETS: dict[str, Slo] = {
    # MLPerf Inference server scenario limits for Llama-3.1-8B, checked at p99.
    "mlperf-server": Slo(ttft_ms=2000.0, tpot_ms=100.0, percentile=99.0),
    # MLPerf's interactive scenario: tighter first-token and per-token limits.
    "mlperf-interactive": Slo(ttft_ms=500.0, tpot_ms=30.0, percentile=99.0),
}

_UNIT_TO_MS = {"ms": 1.0, "s": 1000.0, "us": 1e-3, "": 1.0}


def parse_duration_ms(text: str) -> float:
    """Milliseconds from "500ms", "2s", "1500us" or a bare number (read as ms)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|us|)\s*", text.lower())
    if not match:
        raise ValueError(f"cannot read duration {text!r}: use e.g. 500ms, 2s or 1500us")
    return float(match.group(1)) * _UNIT_TO_MS[match.group(2)]


def parse_slo(text: str) -> Slo:
    """An `Slo` from a preset name or comma-separated key=value limits.

    Keys: ttft, tpot, e2e (durations) and p (the percentile they apply to, default 99).
    A preset can be tightened or relaxed: "mlperf-server,p=90".
    """
    limits: dict[str, float] = {}
    for part in (piece.strip() for piece in text.split(",")):
        if not part:
            continue
        if part in SLO_PRESETS:
            limits.update({key: value for key, value in SLO_PRESETS[part].to_dict().items()
                           if value is not None})
            continue
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise ValueError(
                f"cannot read SLO part {part!r}: use a preset ({', '.join(SLO_PRESETS)}) "
                "or key=value with keys ttft, tpot, e2e, p"
            )
        if key in ("ttft", "tpot", "e2e"):
            limits[f"{key}_ms"] = parse_duration_ms(value)
        elif key in ("p", "percentile"):
            pct = float(value.strip().lstrip("pP"))
            if not 0 < pct <= 100:
                raise ValueError(f"SLO percentile must be in (0, 100] (got {value!r})")
            limits["percentile"] = pct
        else:
            raise ValueError(f"unknown SLO key {key!r}: use ttft, tpot, e2e or p")
    slo = Slo(**limits)
    if slo.is_empty():
        raise ValueError(f"SLO {text!r} sets no limit: give at least one of ttft, tpot, e2e")
    return slo
