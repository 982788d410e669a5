"""`fitserve quantize MODEL_DIR --method {w8,w4,mixllm,bitstack} --out OUT_DIR`."""

from __future__ import annotations

import argparse
import json

from fitserve.cli_args import HelpFormatter
from fitserve.quant.methods import BITSTACK_ORDERINGS, HEAD_FORMATS, QUANTIZATION_METHODS


def add_quantize_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="write a quantized copy of a model (w8, w4, MixLLM mixed precision or BitStack elastic blocks)",
        description="Quantize a dense Hugging Face checkpoint into a directory every fitserve command loads.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model_dir", nargs="?", default=None, help="dense model directory (default: the bundled model)")
    parser.add_argument("--method", required=True, choices=QUANTIZATION_METHODS,
                        help="w8: int8 per output channel; w4: 4-bit, scale and zero per group; mixllm: w4 with "
                             "the most salient output channels (chosen across all layers) in w8; bitstack: stacks "
                             "of ~1-bit residual blocks in a global order, loaded up to --weight-memory")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    parser.add_argument("--group-size", type=int, default=128, help="input columns per 4-bit scale and zero")
    parser.add_argument("--high-precision-fraction", type=float, default=0.10,
                        help="mixllm: share of weights kept in 8 bits")
    parser.add_argument("--lm-head", choices=HEAD_FORMATS, default="w8",
                        help="format of the LM head (of the embedding too, when tied); dense keeps the model dtype")
    parser.add_argument("--calibration-data", default=None,
                        help="mixllm, bitstack: text or JSONL ('text' per line) file; default: Python's standard "
                             "library sources (for the bundled model, its training files only)")
    parser.add_argument("--num-calibration-tokens", type=int, default=8192, help="mixllm, bitstack: calibration tokens")
    parser.add_argument("--num-blocks", type=int, default=16, help="bitstack: residual blocks per matrix")
    parser.add_argument("--rank", type=_rank, default="auto",
                        help="bitstack: rank of each block's factors, or 'auto' (per matrix, the rank among 1, 2, 4, 8 "
                             "and 16 that removes the most activation-weighted error per byte; slower to quantize, "
                             "better per byte, and low ranks decode fastest)")
    parser.add_argument("--ordering", choices=BITSTACK_ORDERINGS, default="calibrated",
                        help="bitstack: global block order by value per byte. calibrated: residual reduction scaled "
                             "per matrix by its calibration-loss sensitivity measured at the first two levels "
                             "(2 x (matrices+1) forward passes); measured: calibration loss at every depth ((matrices+1) x blocks forward "
                             "passes, noisy at depth); residual: activation-weighted residual reduction (no forward "
                             "passes)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run_quantize)


def _rank(text: str) -> int | str:
    """argparse type of --rank: a positive integer or "auto"."""
    from fitserve.server.cli import positive_int

    return text if text == "auto" else positive_int(text)


def run_quantize(args: argparse.Namespace) -> int:
    from fitserve.config import default_model_dir
    from fitserve.quant.bitstack_quantize import BitStackOptions
    from fitserve.quant.quantize import quantize_model, summary_dict

    summary = quantize_model(
        args.model_dir or default_model_dir(), args.out, args.method, group_size=args.group_size,
        high_precision_fraction=args.high_precision_fraction, lm_head=args.lm_head,
        calibration_data=args.calibration_data, num_calibration_tokens=args.num_calibration_tokens,
        force=args.force, bitstack=BitStackOptions(num_blocks=args.num_blocks, rank=args.rank,
                                                   ordering=args.ordering),
    )
    print(json.dumps(summary_dict(summary), indent=1) if args.json else summary.describe())
    return 0
