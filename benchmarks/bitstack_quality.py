"""BitStack against fitserve's fixed formats on the bundled model: held-out perplexity against
weight memory, written to JSON and a PNG plot.

Every point is (weight bytes, perplexity): weight bytes = every weight the loaded model holds
(embedding, LM head, norms, projections; what fitserve.models.weight_memory counts), and
perplexity follows the model card's protocol (512-token windows of heldout.txt, float32
activations; all 159 windows, and the card's 16-window subset).

- fitserve's own formats: w8, w4 (group 128), mixllm (10% of channels in w8), made by
  `fitserve quantize` and loaded by fitserve.
- Round-to-nearest 3-bit and 2-bit, asymmetric, group 128: simulated (the dense model with
  fake-quantized projections and the w8 embedding every other format has), bytes counted as
  the w4 layout would store them: packed codes plus a float16 scale and a uint8 zero per group.
- BitStack (`fitserve quantize --method bitstack`), each variant at evenly spaced budgets from
  the smallest loadable model to the full stack, plus budgets equal to every baseline's
  memory (so "at 2-bit's memory" is measured, not interpolated). Variants: per-matrix rank
  (--rank auto) with the calibrated order (the default, the main curve), rank 16 everywhere,
  and the measured (BitStack's level-wise) and residual-proxy orders. With several
  --ordering-tokens, every variant is quantized once per token count (a robustness check of
  the order against the calibration sample).

The JSON says, for every baseline, BitStack's perplexity at its memory, and where the BitStack
curve crosses the curve of the fixed formats.

    python benchmarks/bitstack_quality.py                 # ~30 min on two busy cores
    python benchmarks/bitstack_quality.py --subset-only   # the 16-window subset only
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from fitserve.bench.environment import cpu_model
from fitserve.config import default_model_dir
from fitserve.models.loader import EMBEDDING, load_model
from fitserve.models.weight_memory import weight_memory_bytes
from fitserve.quant import packing
from fitserve.quant.bitstack_evaluate import BitStackModel, model_windows
from fitserve.quant.bitstack_quantize import ORDERING_TOKENS, BitStackOptions, projection_parts
from fitserve.quant.evaluate import perplexity
from fitserve.quant.quantize import quantize_model

RESULTS = Path(__file__).resolve().parent / "results"
GROUP = 128
VARIANTS = {
    "bitstack (rank auto, calibrated order)": {"rank": "auto", "ordering": "calibrated"},
    "bitstack (rank 16, calibrated order)": {"rank": 16, "ordering": "calibrated"},
    "bitstack (rank auto, measured order)": {"rank": "auto", "ordering": "measured"},
    "bitstack (rank auto, residual order)": {"rank": "auto", "ordering": "residual"},
}
MAIN = "bitstack (rank auto, calibrated order)"
"""The variant measured on all of heldout.txt; the others on the 16-window subset (time)."""


def fake_quantize(weight: torch.Tensor, bits: int, group: int = GROUP) -> torch.Tensor:
    """Asymmetric round-to-nearest with a min/max range per group of `group` input columns."""
    rows, columns = weight.shape
    grouped = weight.float().reshape(rows, columns // group, group)
    low = grouped.amin(dim=2, keepdim=True).clamp_max(0)
    high = grouped.amax(dim=2, keepdim=True).clamp_min(0)
    top = 2**bits - 1
    scales = ((high - low) / top).half().float().clamp_min(torch.finfo(torch.float16).tiny)
    zeros = torch.clamp(torch.round(-low / scales), 0, top)
    codes = torch.clamp(torch.round(grouped / scales) + zeros, 0, top)
    return ((codes - zeros) * scales).reshape(rows, columns)


def rtn_bytes(parts, bits: int, group: int = GROUP) -> int:
    """Projection bytes in the w4 layout's scheme: codes + float16 scale + uint8 zero per group."""
    return sum(part.rows * (part.in_features * bits // 8 + 3 * (part.in_features // group)) for part in parts)


def measure(model, subsets: dict[str, list[list[int]]]) -> dict[str, float]:
    return {f"perplexity_{name}": perplexity(model, windows) for name, windows in subsets.items()}


def baseline_rows(work: Path, subsets: dict) -> list[dict]:
    model_dir = default_model_dir()
    cpu = torch.device("cpu")
    rows = []
    original, _ = load_model(model_dir, torch.float32, cpu, "torch", huge_pages=False)
    rows.append({"method": "float32 (original)", "weight_bytes": weight_memory_bytes(original),
                 **measure(original, subsets)})
    print(json.dumps(rows[-1]), flush=True)
    for method in ("w8", "w4", "mixllm"):
        quantize_model(model_dir, work / method, method, force=True, progress=False)
        model, _ = load_model(work / method, torch.float32, cpu, "torch", huge_pages=False)
        rows.append({"method": f"fitserve {method}", "weight_bytes": weight_memory_bytes(model),
                     **measure(model, subsets)})
        print(json.dumps(rows[-1]), flush=True)
    # RTN 3/2-bit: the w4 model's non-projection bytes plus the packed projections.
    w4, config = load_model(work / "w4", torch.float32, cpu, "torch", huge_pages=False)
    parts = projection_parts(config)
    w4_projection_bytes = sum(w4.get_submodule(name).stored_bytes() for name in _projection_modules(w4))
    fixed = weight_memory_bytes(w4) - w4_projection_bytes
    embedding = w4.model.embed_tokens
    head_weight = packing.dequantize_w8(embedding.stored_codes(), embedding.scales)
    for bits in (3, 2):
        model, _ = load_model(model_dir, torch.float32, cpu, "torch", huge_pages=False)
        with torch.inference_mode():
            for name, parameter in model.named_parameters():
                if name.startswith("model.layers.") and name.endswith("_proj.weight"):
                    parameter.copy_(fake_quantize(parameter, bits))
            model.get_submodule(EMBEDDING).weight.copy_(head_weight)
        rows.append({"method": f"RTN {bits}-bit g{GROUP} (simulated)", "weight_bytes": fixed + rtn_bytes(parts, bits),
                     **measure(model, subsets)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _projection_modules(model) -> list[str]:
    return [name for name, module in model.named_modules()
            if name.startswith("model.layers.") and hasattr(module, "stored_bytes")]


def bitstack_rows(work: Path, name: str, options: dict, subsets: dict, extra_budgets: list[int],
                  points: int, num_blocks: int, ordering_tokens: int) -> tuple[list[dict], dict]:
    started = time.perf_counter()
    out = work / name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
    summary = quantize_model(default_model_dir(), out, "bitstack", force=True, progress=False,
                             bitstack=BitStackOptions(num_blocks=num_blocks, curve_points=0,
                                                      ordering_tokens=ordering_tokens, **options))
    stacked = BitStackModel(out)
    smallest, full = stacked.budget_range()
    # Evenly spaced up to a bit past the largest baseline (w8), where the comparison is; the
    # full stack (far beyond w8 on this 384-wide model) as the last point.
    top = min(full, int(1.25 * max(extra_budgets)))
    budgets = sorted({smallest + (top - smallest) * i // (points - 1) for i in range(points)} | {full}
                     | {b for b in extra_budgets if smallest <= b <= full})
    rows = []
    for budget in budgets:
        held = stacked.load_budget(budget)
        rows.append({"method": name, "budget_bytes": budget, "weight_bytes": held,
                     **measure(stacked.stand_in.model, subsets)})
        print(json.dumps(rows[-1]), flush=True)
    info = {"variant": name, **{key: str(value) for key, value in options.items()}, "num_blocks": num_blocks,
            "ordering_tokens": ordering_tokens,
            "smallest_bytes": smallest, "full_bytes": full, "ranks": summary.ranks,
            "quantize_seconds": summary.seconds, "total_seconds": time.perf_counter() - started}
    return rows, info


def curve_at(curve: list[tuple[float, float]], x: float) -> float:
    """Linear interpolation of a curve sorted by x (None outside its range)."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def crossings(bitstack: list[tuple[float, float]], fixed: list[tuple[float, float]]) -> list[dict]:
    """Weight bytes where the BitStack curve and the fixed formats' curve (linear in bytes,
    log perplexity) cross, with which side wins below the crossing."""
    import math

    xs = sorted({x for x, _ in bitstack + fixed})
    lo, hi = max(bitstack[0][0], fixed[0][0]), min(bitstack[-1][0], fixed[-1][0])
    xs = [x for x in xs if lo <= x <= hi]
    diffs = [(x, math.log(curve_at(bitstack, x)) - math.log(curve_at(fixed, x))) for x in xs]
    out = []
    for (x0, d0), (x1, d1) in zip(diffs, diffs[1:]):
        if d0 * d1 < 0:
            x = x0 + (x1 - x0) * d0 / (d0 - d1)
            out.append({"weight_bytes": round(x), "weight_mib": round(x / 2**20, 3),
                        "below": "bitstack" if d0 < 0 else "fixed formats"})
    return out


def rises(curve: list[tuple[float, float]]) -> list[dict]:
    """Every step of a curve sorted by bytes where perplexity goes up (empty: non-increasing)."""
    return [{"from_bytes": x0, "to_bytes": x1, "relative_rise": y1 / y0 - 1}
            for (x0, y0), (x1, y1) in zip(curve, curve[1:]) if y1 > y0]


def plot(rows: list[dict], path: Path, infos: list[dict]) -> None:
    """Left: all of heldout.txt (the main variant); right: the 16-window subset (all variants)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key for key in ("perplexity_heldout", "perplexity_subset16") if any(key in r for r in rows)]
    figure, panels = plt.subplots(1, len(keys), figsize=(7 * len(keys), 5), squeeze=False)
    for axes, key in zip(panels[0], keys):
        for info, style in zip(infos, ("o-", "s--", "^:", "v-.", "<-", ">--", "d:", "p-.")):
            points = sorted((r["weight_bytes"] / 2**20, r[key]) for r in rows
                            if r["method"] == info["variant"] and key in r)
            if points:
                axes.plot(*zip(*points), style, label=info["variant"], markersize=4)
        for row in rows:
            if row["method"].startswith("bitstack"):
                continue
            if row["method"] == "float32 (original)":
                axes.axhline(row[key], color="gray", linestyle=":", linewidth=1,
                             label=f"float32 original ({row['weight_bytes'] / 2**20:.1f} MiB)")
                continue
            axes.plot(row["weight_bytes"] / 2**20, row[key], "kx" if "RTN" in row["method"] else "rD")
            axes.annotate(row["method"].replace(" (simulated)", ""), (row["weight_bytes"] / 2**20, row[key]),
                          textcoords="offset points", xytext=(4, 4), fontsize=7)
        fixed = [r["weight_bytes"] for r in rows if not r["method"].startswith(("bitstack", "float32"))]
        axes.set_xlim(0, 1.3 * max(fixed) / 2**20)  # the full stacks lie far right (37 bits per weight)
        axes.set_yscale("log")
        axes.set_xlabel("weight memory (MiB)")
        axes.set_ylabel("held-out perplexity")
        axes.set_title("fitserve-tiny, " + ("all of heldout.txt" if key.endswith("heldout") else "16-window subset"))
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset-only", action="store_true", help="only the card's 16-window subset (faster)")
    parser.add_argument("--points", type=int, default=10, help="evenly spaced budgets per BitStack variant")
    parser.add_argument("--num-blocks", type=int, default=16)
    parser.add_argument("--ordering-tokens", type=int, nargs="+", default=[ORDERING_TOKENS],
                        help="calibration tokens per loss of the calibrated and measured orders (several: each "
                             "variant once per value)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is faster than 2 on the shared two-core machine)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bitstack_quality.json")
    parser.add_argument("--baselines", type=Path, default=None,
                        help="take the fixed formats' rows from this earlier JSON instead of measuring them again")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    args = parser.parse_args()
    if args.plot_only:
        saved = json.loads(args.out.read_text())
        plot(saved["rows"], args.out.with_suffix(".png"), saved["bitstack"])
        return 0
    torch.set_num_threads(args.threads)
    windows = model_windows(default_model_dir())
    subsets = {"subset16": windows[:16]} if args.subset_only else {"heldout": windows, "subset16": windows[:16]}
    result = {"machine": {"cpu": cpu_model(), "threads": args.threads, "python": platform.python_version(),
                          "torch": torch.__version__, "note": "2-core machine shared with other work"},
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "model": "fitserve-tiny (bundled)",
              "windows": {name: len(w) for name, w in subsets.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        if args.baselines:
            rows = [row for row in json.loads(args.baselines.read_text())["rows"]
                    if not row["method"].startswith("bitstack")]
        else:
            rows = baseline_rows(Path(work), subsets)
        extra = [row["weight_bytes"] for row in rows if row["method"] != "float32 (original)"]
        infos = []
        for name in args.variants:
            for tokens in args.ordering_tokens:
                variant_subsets = subsets if name == MAIN else {"subset16": subsets["subset16"]}
                label = name if len(args.ordering_tokens) == 1 else f"{name[:-1]}, {tokens} ordering tokens)"
                variant_rows, info = bitstack_rows(Path(work), label, VARIANTS[name], variant_subsets, extra,
                                                   args.points, args.num_blocks, tokens)
                rows.extend(variant_rows)
                infos.append(info)
            result.update(rows=rows, bitstack=infos)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    fixed_rows = sorted((r for r in rows if not r["method"].startswith(("float32", "bitstack"))),
                        key=lambda r: r["weight_bytes"])
    comparison = {}
    for info in infos:
        by_bytes = {r["budget_bytes"]: r for r in rows if r["method"] == info["variant"]}
        for subset_key in sorted({k for r in by_bytes.values() for k in r if k.startswith("perplexity_")}):
            fixed_curve = [(r["weight_bytes"], r[subset_key]) for r in fixed_rows]
            curve = sorted((r["weight_bytes"], r[subset_key]) for r in by_bytes.values())
            comparison[f"{info['variant']}, {subset_key}"] = {
                "at_baseline_memory": [
                    {"baseline": r["method"], "weight_bytes": r["weight_bytes"], "baseline_perplexity": r[subset_key],
                     "bitstack_perplexity": by_bytes[r["weight_bytes"]][subset_key]
                     if r["weight_bytes"] in by_bytes else None} for r in fixed_rows],
                "crossings": crossings(curve, fixed_curve),
                "rises": rises(curve),
            }
    result.update(rows=rows, bitstack=infos, comparison=comparison,
                  finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, args.out.with_suffix(".png"), infos)
    print(json.dumps(comparison, indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
