"""The Triton kernels (attention, the fused per-layer ops, the dequantizing matmuls) compile for
NVIDIA GPUs,
checked on a machine without one.

The interpreter tests (test_triton_paged.py) check the kernels' arithmetic, but the
interpreter runs them as Python and accepts code the GPU compiler rejects (loop-carried types,
dot shapes, constexpr branches, shared-memory size). Triton can compile to a cubin for a
chosen GPU architecture without a GPU, so this test does exactly that for the variants the
launchers use, in a subprocess because this test session runs Triton in interpreter mode.

Run this file directly (`python tests/attention/test_triton_compiles.py`) to print each
kernel's compile time and shared-memory use.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

SHARED_MEMORY_LIMIT = 99 * 1024
"""Bytes of shared memory per block on consumer GPUs (sm_86/sm_89), the smallest we target."""


def compile_for_gpu(kernel, pointer_types: dict[str, str], constexprs: dict, capability: int,
                    options: dict | None = None, aligned: frozenset[str] = frozenset()):
    """Compile `kernel` for compute capability `capability` (e.g. 90 for H100) to a cubin.

    `aligned` names the arguments to compile as multiples of 16, as a launch does for
    pointers from torch and for integers divisible by 16: without that, loads cannot be
    vectorized and Triton does not pipeline them through shared memory, so both the code and
    its shared-memory use would differ from what a GPU runs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("scale_log2", "eps"):
            signature[name] = "fp32"
        else:
            # Strides, counts: Triton passes Python ints that fit in 32 bits as i32.
            signature[name] = pointer_types.get(name, "i32")
    attrs = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(signature) if name in aligned}
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options or {"num_warps": 4})


def compile_all_kernels() -> list[str]:
    """Compile the launchers' kernel variants; returns one line of facts per kernel."""
    import torch

    from fitserve.attention import triton_decode, triton_paged, triton_prefill
    from fitserve.kernels import triton_ops

    reports: list[str] = []
    # The float caches in both dtypes, and the int8 cache (int8 values, float32 scales) under
    # bf16 queries, the GPU default.
    for element, precision, int8 in [("bf16", "tf32", False), ("fp32", "ieee", False), ("bf16", "tf32", True)]:
        pointers = {
            name: f"*{element}"
            for name in ("query_ptr", "key_cache_ptr", "value_cache_ptr", "output_ptr")
        }
        # A float cache's launchers pass the cache itself as the (unread) scales pointer.
        pointers |= {name: "*fp32" if int8 else f"*{element}" for name in ("key_scales_ptr", "value_scales_ptr")}
        if int8:
            pointers |= {"key_cache_ptr": "*i8", "value_cache_ptr": "*i8"}
        pointers |= {name: "*i32" for name in ("block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr")}
        pointers |= {name: "*fp32" for name in ("partial_max_ptr", "partial_sum_ptr", "partial_out_ptr")}
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[element]
        # Llama-3-8B attention: 32 query heads over 8 KV heads of width 128.
        block_m, prefill_tile_n = triton_prefill.default_prefill_tiles(dtype, 128, 4)
        variants = [
            (
                triton_decode._decode_partition_kernel,
                dict(
                    BLOCK_SIZE=16, GROUP_SIZE=4, GROUP_PAD=16, HEAD_DIM=128, HEAD_DIM_PAD=128,
                    TILE_N=triton_decode.default_decode_tile_n(dtype, 128),
                    PARTITION_SIZE=triton_decode.DEFAULT_PARTITION_SIZE,
                    SINGLE_PARTITION=element == "fp32", UPCAST_OPERANDS=False, INPUT_PRECISION=precision,
                    INT8_KV=int8,
                ),
            ),
            (
                triton_prefill._prefill_kernel,
                # Triton turns integer arguments equal to 1 into constants; a one-sequence batch
                # must still compile (the binary search's loop bound becomes a constant).
                dict(
                    **({"num_seqs": 1} if element == "bf16" else {}),
                    BLOCK_SIZE=16, GROUP_SIZE=4, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_M=block_m,
                    BLOCK_Q=block_m // 4, TILE_N=prefill_tile_n, UPCAST_OPERANDS=False,
                    INPUT_PRECISION=precision, INT8_KV=int8,
                ),
            ),
        ]
        for kernel, constexprs in variants:
            compiled = compile_for_gpu(kernel, pointers, constexprs, capability=90)
            cache = "int8 cache" if int8 else "cache"
            reports.append(f"{kernel.fn.__name__} {element} {cache}: shared={compiled.metadata.shared}")
    compiled = compile_for_gpu(
        triton_decode._decode_reduce_kernel,
        {"seq_lens_ptr": "*i32", "partial_max_ptr": "*fp32", "partial_sum_ptr": "*fp32",
         "partial_out_ptr": "*fp32", "output_ptr": "*bf16"},
        dict(HEAD_DIM=128, HEAD_DIM_PAD=128, PARTITION_SIZE=256, PARTITION_CHUNK=32),
        capability=90,
    )
    reports.append(f"_decode_reduce_kernel bf16: shared={compiled.metadata.shared}")
    for cache, scales in (("bf16", "bf16"), ("i8", "fp32")):
        compiled = compile_for_gpu(
            triton_paged._write_kv_kernel,
            {"key_ptr": "*bf16", "value_ptr": "*bf16", "key_cache_ptr": f"*{cache}", "value_cache_ptr": f"*{cache}",
             "key_scales_ptr": f"*{scales}", "value_scales_ptr": f"*{scales}", "slot_mapping_ptr": "*i64"},
            dict(BLOCK_SIZE=16, NUM_KV_HEADS=8, HEADS_PAD=8, HEAD_DIM=128, HEAD_DIM_PAD=128, INT8_KV=cache == "i8"),
            capability=80, options={"num_warps": 4, "enable_fp_fusion": False},
        )
        reports.append(f"_write_kv_kernel bf16 -> {cache}: shared={compiled.metadata.shared}")

    # The fused per-layer ops, at Llama-3-8B's widths (hidden 4096, 32 query and 8 KV heads of
    # 128, intermediate 14336), with the options their launchers pass.
    for kernel, pointer_types, constexprs, options in [
        (triton_ops._rms_norm_kernel,
         {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16", "eps": "fp32"},
         dict(HAS_RESIDUAL=True, BLOCK=4096), {"num_warps": 8}),
        *((triton_ops._rotary_write_kv_kernel,
           {"query_ptr": "*bf16", "key_ptr": "*bf16", "value_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16",
            "key_cache_ptr": f"*{cache}", "value_cache_ptr": f"*{cache}", "key_scales_ptr": f"*{scales}",
            "value_scales_ptr": f"*{scales}", "slot_mapping_ptr": "*i64"},
           dict(BLOCK_SIZE=16, HEAD_DIM=128, HALF_PAD=64, HEADS_PAD=32, KV_HEADS_PAD=8, INT8_KV=cache == "i8"),
           {"num_warps": 4, "enable_fp_fusion": False}) for cache, scales in (("bf16", "bf16"), ("i8", "fp32"))),
        (triton_ops._silu_mul_kernel,
         {"gate_up_ptr": "*bf16", "out_ptr": "*bf16"},
         dict(BLOCK=triton_ops.SILU_BLOCK), {"num_warps": 4}),
    ]:
        compiled = compile_for_gpu(kernel, pointer_types, constexprs, capability=90, options=options)
        cache = f" -> {pointer_types['key_cache_ptr'][1:]} cache" if "key_cache_ptr" in pointer_types else ""
        reports.append(f"{kernel.fn.__name__} bf16{cache}: shared={compiled.metadata.shared}")
    return reports + compile_quant_kernels()


def compile_quant_kernels() -> list[str]:
    """The dequantizing matmuls with the tiles `choose_config` picks for Llama-3-8B's
    4096 x 4096 projection, for decode (one token: split-K, the reduction kernel) and prefill
    (4096 tokens), w8 and w4 (G = 128, and G = 32 whose half-groups are the smallest dots),
    16-bit and float32 x, compiled with the alignment a launch from torch has."""
    import torch

    from fitserve.kernels import triton_quant

    aligned = frozenset({
        "x_ptr", "qweight_ptr", "scales_ptr", "zeros_ptr", "bias_ptr", "out_rows_ptr", "out_ptr", "partial_ptr",
        "stride_x_row", "stride_qweight", "stride_out_row", "in_features", "out_features",
    })
    element_types = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    reports = []
    for bits, group_size, dtype, rows in [
        (8, None, torch.bfloat16, 1), (8, None, torch.bfloat16, 4096), (8, None, torch.float32, 1),
        (4, 128, torch.bfloat16, 1), (4, 128, torch.bfloat16, 4096), (4, 32, torch.float16, 4096),
        (4, 128, torch.float32, 4096),
    ]:
        config = triton_quant.choose_config(rows, 4096, 4096, dtype, torch.device("cpu"), group_size)
        element = element_types[dtype]
        pointer_types = {
            "x_ptr": f"*{element}", "bias_ptr": f"*{element}", "out_ptr": f"*{element}",
            "qweight_ptr": "*i8" if bits == 8 else "*u8", "scales_ptr": "*fp32" if bits == 8 else "*fp16",
            "zeros_ptr": "*u8", "out_rows_ptr": "*i64", "partial_ptr": "*fp32",
        }
        half = (group_size or 2) // 2
        constexprs = dict(
            BITS=bits, GROUP_HALF=half, GROUP_HALF_PAD=max(16, half), BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=True, SPLIT=config.split_k > 1,
            HAS_BIAS=True, SCATTER=rows > 1, UPCAST_OPERANDS=False,
            INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        )
        compiled = compile_for_gpu(
            triton_quant._quant_matmul_kernel, pointer_types, constexprs, capability=90,
            options={"num_warps": config.num_warps, "num_stages": config.num_stages}, aligned=aligned,
        )
        reports.append(f"_quant_matmul_kernel w{bits} G={group_size} {element} rows={rows} {config}: "
                       f"shared={compiled.metadata.shared}")
    compiled = compile_for_gpu(
        triton_quant._split_k_reduce_kernel,
        {"partial_ptr": "*fp32", "bias_ptr": "*bf16", "out_rows_ptr": "*i64", "out_ptr": "*bf16"},
        dict(BLOCK_M=16, BLOCK_N=triton_quant.REDUCE_BLOCK_N, HAS_BIAS=True, SCATTER=True),
        capability=90, aligned=aligned,
    )
    reports.append(f"_split_k_reduce_kernel bf16: shared={compiled.metadata.shared}")
    return reports


@pytest.mark.slow
def test_every_kernel_compiles_for_nvidia_gpus_within_consumer_shared_memory() -> None:
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, __file__],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if "shared=" in line]
    assert len(lines) == 21, result.stdout
    for line in lines:
        shared_bytes = int(line.rsplit("shared=", 1)[1])
        assert shared_bytes <= SHARED_MEMORY_LIMIT, line


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    for report in compile_all_kernels():
        print(report, flush=True)
