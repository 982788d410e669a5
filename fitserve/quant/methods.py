"""The names of the weight formats, importable without torch (the CLI's fast `--help`)."""

QUANTIZATION_METHODS = ("w8", "w4", "mixllm", "bitstack")
"""Methods `fitserve quantize` writes; w8 and w4 can also be applied at load time (bitstack
needs calibration and a decomposition, so it is never applied at load)."""
DYNAMIC_METHODS = ("w8", "w4")
"""Methods `--quantization` applies to a dense checkpoint at load (round to nearest)."""
HEAD_FORMATS = ("w8", "dense")
"""How the LM head (for tied models, the embedding matrix) is stored in a quantized model."""
BITSTACK_ORDERINGS = ("calibrated", "measured", "residual")
"""How `--method bitstack` values its blocks (fitserve.quant.bitstack_order)."""
