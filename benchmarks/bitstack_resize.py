"""How long resizing a BitStack model takes, and how long the reading stalls other Python
threads (the engine's steps), written to JSON.

Random BitStack tensors with Qwen2.5-0.5B's shapes (16 blocks of rank 16 per matrix; the
values do not matter for time or memory). The model loads at the budget w4 takes for the same
shape (w4 projections, w8 tied embedding, dense norms: what `fitserve quantize --method w4`
writes), then moves: shrink to the smallest loadable model, grow back to the w4 budget, grow to
the full stack, shrink back to the w4 budget. For each move: the time to read the added blocks
(what a background thread does while the engine keeps stepping), the time of the switch
itself (between two steps: detach and attach blocks), the time to free the detached blocks
and hand the memory back (another background thread in the engine), and the resident memory
after. While each read runs, the main thread times a loop of small torch operations; the
longest gap between two of its iterations, against the same loop with no read beside it, is
how long the read can hold up a step (the GIL and memory bandwidth are shared).

    python benchmarks/bitstack_resize.py [--num-blocks 16] [--rank 16]
"""

from __future__ import annotations

import argparse
import gc
import json
import threading
import time
from pathlib import Path

import psutil
import torch

from common import CHECKPOINT_CACHE, RESULTS_DIR, describe_machine

from fitserve.layers.weight_formats import W4Format
from fitserve.models.config import load_model_config
from fitserve.models.loader import linear_layouts, load_model
from fitserve.models.elastic_weights import release_blocks
from fitserve.models.random_checkpoint import write_random_bitstack_checkpoint

PRESET = "qwen2.5-0.5b"


def _bytes(specs: dict) -> int:
    """Bytes of a format's checkpoint tensors for one part."""
    total = 0
    for spec in specs.values():
        count = 1
        for size in spec.shape:
            count *= size
        total += count * (spec.dtype.itemsize if spec.dtype is not None else 4)
    return total


def max_gap_ms(stop: threading.Event) -> float:
    """Longest gap between iterations of a loop of small torch ops, until `stop` is set."""
    a = torch.randn(64, 64)
    longest, last = 0.0, time.perf_counter()
    while not stop.is_set():
        torch.mm(a, a)
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    return longest * 1e3


def move(elastic, budget: int) -> dict:
    count = elastic.check_budget(budget)
    stop = threading.Event()
    read: dict = {}

    def reader() -> None:
        started = time.perf_counter()
        read["blocks"] = elastic.read_blocks(count)
        read["seconds"] = time.perf_counter() - started
        stop.set()

    thread = threading.Thread(target=reader)
    thread.start()
    gap = max_gap_ms(stop)
    thread.join()
    started = time.perf_counter()
    dropped = elastic.apply(count, read["blocks"])
    elastic.budget_bytes = budget
    switch = time.perf_counter() - started
    read.pop("blocks")
    started = time.perf_counter()
    release_blocks(dropped)  # the engine does this in a background thread
    release = time.perf_counter() - started
    gc.collect()
    return {"budget_mib": budget / 2**20, "loaded_mib": elastic.current_bytes / 2**20,
            "blocks_loaded": elastic.blocks_loaded, "read_s": read["seconds"], "switch_s": switch,
            "release_s": release,
            "max_main_thread_gap_during_read_ms": gap, "rss_mib": psutil.Process().memory_info().rss / 2**20}


def baseline_gap_ms(seconds: float = 1.0) -> float:
    stop = threading.Event()
    threading.Timer(seconds, stop.set).start()
    return max_gap_ms(stop)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-blocks", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"bitstack_resize_{PRESET}.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model_dir = CHECKPOINT_CACHE / f"{PRESET}-bitstack-random-{args.num_blocks}x{args.rank}"
    if not (model_dir / "model.safetensors").is_file():
        write_random_bitstack_checkpoint(model_dir, PRESET, args.num_blocks, args.rank)
    config = load_model_config(model_dir)
    w4_projection_bytes = sum(_bytes(W4Format().part_tensors(part)) for layout in linear_layouts(config)
                              if layout.module_name != "lm_head" for part in layout.parts)

    started = time.perf_counter()
    model, _ = load_model(model_dir, torch.bfloat16, torch.device("cpu"), weight_memory=None)
    elastic = model.elastic_weights
    full_load_s = time.perf_counter() - started
    w4 = elastic.fixed_bytes + w4_projection_bytes
    elastic.set_budget(w4)
    del model  # keep only the layers through elastic
    rows = [{"move": "full -> w4 budget (at load: first resize)", "budget_mib": w4 / 2**20,
             "loaded_mib": elastic.current_bytes / 2**20, "blocks_loaded": elastic.blocks_loaded}]
    for label, budget in (("w4 budget -> smallest", elastic.min_bytes), ("smallest -> w4 budget", w4),
                          ("w4 budget -> full", elastic.max_bytes), ("full -> w4 budget", w4)):
        rows.append({"move": label, **move(elastic, budget)})
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "what": "BitStack resize times (read in a background thread, switch between steps) and the longest "
                "stall a read causes in another Python thread; random tensors, Qwen2.5-0.5B shapes",
        "machine": describe_machine(), "preset": PRESET, "num_blocks": args.num_blocks, "rank": args.rank,
        "min_mib": elastic.min_bytes / 2**20, "max_mib": elastic.max_bytes / 2**20, "w4_budget_mib": w4 / 2**20,
        "blocks_total": elastic.blocks_total, "full_load_s": full_load_s,
        "main_thread_gap_without_read_ms": baseline_gap_ms(), "moves": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
