"""ATEN_CPU_CAPABILITY=avx2 holds fitserve's kernels to AVX2 as it holds torch: on an AVX-512
machine the kernels report no AVX-512, the quantized layers pick their AVX2 kernels, and their
outputs match the AVX-512 kernels'. This is what a user on a VM that
mishandles AVX-512 sets, and how benchmarks measure the AVX2 paths on an AVX-512 machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fitserve.kernels import cpu

kernels = cpu.get()
pytestmark = pytest.mark.skipif(kernels is None or not kernels.has_avx512_vnni(),
                                reason="needs the CPU kernels on a CPU with AVX-512 (the limit has nothing to hold)")

PROBE = textwrap.dedent("""
    import json, torch
    from fitserve.kernels import cpu
    from fitserve.quant import packing
    kernels = cpu.get()
    torch.manual_seed(0)
    weight = torch.randn(40, 256)
    qweight, scales, zeros = packing.quantize_w4(weight, 128)
    layer = cpu.quant_linear(256, 40)
    layer.add_w4(qweight, scales, zeros, 128)
    x = torch.randn(20, 256)
    print(json.dumps({
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_vnni": kernels.has_avx512_vnni(), "avx512_bf16": kernels.has_avx512_bf16(),
        "amx_int8": kernels.has_amx_int8(),
        "native_bf16": cpu.cpu_has_native_bf16(), "isa": layer.isa, "part_isas": layer.part_isas(),
        "out": layer.forward(x[:2]).tolist(),
        "out_20_rows": layer.forward(x).tolist(),  # AMX tiles where the CPU has them
    }))
""")


def probe(capability: str | None, onednn_isa: str | None = None) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    if onednn_isa is not None:
        env["ONEDNN_MAX_CPU_ISA"] = onednn_isa
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_avx2_capability_keeps_every_kernel_choice_to_avx2() -> None:
    limited = probe("avx2")
    assert limited["capability"] == "AVX2"
    assert not limited["avx512_vnni"] and not limited["avx512_bf16"] and not limited["native_bf16"]
    assert not limited["amx_int8"]
    assert limited["isa"] == "avx2" and limited["part_isas"] == ["avx2"]
    full = probe(None)
    assert full["isa"] == ("amx" if full["amx_int8"] else "avx512_vnni") and full["avx512_vnni"]
    # Both kernels round x to int8 per group and sum exactly in int32: the same outputs, up to
    # the order of float32 sums.
    for row_limited, row_full in zip(limited["out"], full["out"], strict=True):
        assert row_limited == pytest.approx(row_full, rel=1e-5, abs=1e-5)


@pytest.mark.skipif(kernels is None or not kernels.has_amx_int8(), reason="needs a CPU (and kernel) with AMX-INT8")
def test_onednn_isa_limit_keeps_the_integer_kernels_off_amx() -> None:
    # ONEDNN_MAX_CPU_ISA without AMX keeps torch's matmuls off the tiles; fitserve's follow it.
    limited = probe(None, "AVX512_CORE_BF16")
    assert not limited["amx_int8"] and limited["avx512_vnni"]
    assert limited["isa"] == "avx512_vnni" and limited["part_isas"] == ["avx512_vnni"]
    full = probe(None, "AVX512_CORE_AMX")
    assert full["amx_int8"] and full["isa"] == "amx" and full["part_isas"] == ["amx"]
    # The same int8 sums; the tiles fold the zero point into them, where the VNNI kernel
    # subtracts it in float32 (outputs of ~20 lose ~1e-5 to that cancellation).
    for row_limited, row_full in zip(limited["out_20_rows"], full["out_20_rows"], strict=True):
        assert row_limited == pytest.approx(row_full, rel=1e-5, abs=1e-4)
