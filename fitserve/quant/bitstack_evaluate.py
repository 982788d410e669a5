"""Held-out perplexity of a BitStack model directory at a weight-memory budget.

`evaluate_at_budget(model_dir, budget_bytes)` is the seam the quality tests and
benchmarks/bitstack_quality.py call. It reads the directory alone (no dense original needed):
the blocks the budget loads (bitstack_budget) are summed into a dense float32 stand-in model
(bitstack_standin) and scored by the model card's protocol (fitserve.quant.evaluate). Once the
runtime format loads a directory under `--weight-memory`, this function can load it that way
instead; the numbers must agree, since both multiply by the same partial sums.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fitserve.models.loader import load_model
from fitserve.quant import bitstack_budget, bitstack_packing, packing
from fitserve.quant.bitstack_standin import StandIn, read_stacks
from fitserve.quant.evaluate import heldout_windows, perplexity


class BitStackModel:
    """A BitStack directory's block order and sizes, and a stand-in that loads any budget."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        raw = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
        settings = raw.get("quantization_config", {})
        if settings.get("method") != "bitstack":
            raise ValueError(f"{self.model_dir} is not a BitStack model (make one with "
                             "`fitserve quantize MODEL --method bitstack --out DIR`)")
        self.order: list[str] = settings["block_order"]
        self.prefixes = list(settings["ranks"])
        self.stacks = read_stacks(self.model_dir, self.prefixes)
        self.block_sizes = {prefix: stack.block_bytes() for prefix, stack in self.stacks.items()}
        self.fixed_bytes, dense = self._dense_tensors()
        self.stand_in = self._load_stand_in(raw, dense)

    def _dense_tensors(self) -> tuple[int, dict[str, torch.Tensor]]:
        """Bytes of the non-block tensors as stored, and a dense float32 checkpoint of the model
        with zero projections (the stand-in fills them per budget)."""
        fixed = 0
        dense: dict[str, torch.Tensor] = {}
        with safe_open(str(self.model_dir / "model.safetensors"), framework="pt") as file:
            for name in file.keys():
                prefix, suffix = name.rsplit(".", 1)
                if suffix in bitstack_packing.TENSOR_SUFFIXES:
                    if suffix == bitstack_packing.U:
                        stack = self.stacks[prefix]
                        dense[f"{prefix}.weight"] = torch.zeros(stack.signs.shape[1], stack.in_features)
                    continue
                tensor = file.get_tensor(name)
                fixed += tensor.numel() * tensor.element_size()
                if suffix == "qweight":
                    dense[f"{prefix}.weight"] = packing.dequantize_w8(tensor, file.get_tensor(f"{prefix}.scales"))
                elif suffix != "scales":
                    dense[name] = tensor.float()
        return fixed, dense

    def _load_stand_in(self, raw_config: dict, dense: dict[str, torch.Tensor]) -> StandIn:
        raw_config = {key: value for key, value in raw_config.items() if key != "quantization_config"}
        with tempfile.TemporaryDirectory() as work:
            (Path(work) / "config.json").write_text(json.dumps(raw_config), encoding="utf-8")
            save_file(dense, str(Path(work) / "model.safetensors"))
            model, _ = load_model(work, torch.float32, torch.device("cpu"), "torch", huge_pages=False)
        return StandIn(model, self.stacks)

    def budget_range(self) -> tuple[int, int]:
        """(smallest loadable, full stack) weight bytes."""
        return bitstack_budget.budget_range(self.fixed_bytes, self.block_sizes,
                                            {prefix: stack.num_blocks for prefix, stack in self.stacks.items()})

    def load_budget(self, budget_bytes: int) -> int:
        """Put the blocks `budget_bytes` loads into the stand-in; the weight bytes they hold."""
        count = bitstack_budget.loaded_blocks(self.order, self.block_sizes, self.fixed_bytes, budget_bytes)
        self.stand_in.set_depths(bitstack_budget.depths_for(self.order, count, self.prefixes))
        return bitstack_budget.loaded_bytes(self.order, self.block_sizes, self.fixed_bytes, count)

    def perplexity(self, budget_bytes: int, windows: list[list[int]]) -> float:
        """Held-out perplexity (card protocol) with the blocks `budget_bytes` loads."""
        self.load_budget(budget_bytes)
        return perplexity(self.stand_in.model, windows)


def model_windows(model_dir: Path) -> list[list[int]]:
    """All 512-token windows of the model's heldout.txt (the card's protocol)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = (model_dir / "heldout.txt").read_text(encoding="utf-8")
    return heldout_windows(tokenizer.encode(text, add_special_tokens=False).ids)


def evaluate_at_budget(model_dir: str | Path, budget_bytes: int, windows: list[list[int]] | None = None) -> float:
    """Held-out perplexity of the BitStack model in `model_dir` loaded under `budget_bytes` of
    weight memory; `windows` default to every window of the directory's heldout.txt."""
    model = BitStackModel(model_dir)
    return model.perplexity(budget_bytes, windows if windows is not None else model_windows(Path(model_dir)))
