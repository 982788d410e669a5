"""The AVX2 CPU kernels of `cpu_kernels.cpp`, compiled on first use, with a torch fallback.

Why they exist: decode on a CPU is bound by memory bandwidth, and two things in plain
PyTorch waste it. A bfloat16 matmul on a CPU without native bf16 arithmetic runs several
times slower than float32 (so bf16 weights, half the bytes, were slower to read than fp32
ones); and decode attention over a paged cache first gathered every sequence's padded
blocks into a new tensor. The kernels widen bf16 in registers while streaming the weights
once, and attend over the cache blocks in place. On CPUs with native bf16 (AMX), torch's
bf16 matmul is fast for many rows, but a single decode row still streams its weights faster
through the kernel (with 512-bit loads and software prefetch where AVX-512 exists).

The extension is built with the system C++ compiler through torch.utils.cpp_extension and
cached (~/.cache/torch_extensions). Where it cannot be built (no compiler, no AVX2, not
x86-64), `get()` returns None and callers keep their PyTorch path, so nothing depends on it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

logger = logging.getLogger("fitserve")

_SOURCE = Path(__file__).resolve().parent / "cpu_kernels.cpp"
# Every header beside the source is part of the build: editing any of them must change the
# digest, or a stale cached build would keep running.
_HEADERS = sorted(_SOURCE.parent.glob("*.h"))
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def cpu_supports_kernels() -> bool:
    """x86-64 with AVX2 and FMA (torch reports its vector ISA as AVX2 or AVX512)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


_BUILD_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-ffp-contract=off"]


def module_name(flags: list[str]) -> str:
    """The compiled module's name: a digest of the sources, the flags and the torch version.

    torch caches built extensions by name, so anything that changes the binary must change the
    name. The torch version is part of it because a module built against another libtorch (an
    upgrade in the same environment) would otherwise be found in the cache and loaded.
    """
    digest = hashlib.sha256()
    for path in [_SOURCE, *_HEADERS]:
        digest.update(path.read_bytes())
    digest.update(" ".join([torch.__version__, *flags]).encode())
    return f"fitserve_cpu_kernels_{digest.hexdigest()[:12]}"


def _build_dir(name: str) -> Path:
    from torch.utils import cpp_extension

    # torch's own choice of folder (TORCH_EXTENSIONS_DIR, else a per-Python folder in ~/.cache).
    return Path(cpp_extension._get_build_directory(name, verbose=False))


def is_cached() -> bool:
    """Whether this machine already has a build of the current kernel sources (no compile)."""
    name = module_name(_BUILD_FLAGS)
    return any(_build_dir(name).glob(f"{name}*.so"))


def _import_cached(name: str, build_dir: Path) -> ModuleType | None:
    """A cached build of these sources, flags and torch version (`name` is their digest),
    imported without torch's loader, or None where none imports.

    torch's loader also compares the build's recorded source path: with two checkouts or
    environments of fitserve on one machine (they share the cache) it recompiled, a minute
    each time the user switched between them, although the binary was the one it needed.
    """
    for library in sorted(build_dir.glob(f"{name}*.so"), reverse=True):  # a rebuild is name_v1.so
        try:
            spec = importlib.util.spec_from_file_location(library.stem, library)
            if spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        except ImportError:  # an unfinished or foreign file: let torch's loader build it again
            continue
    return None


def _build() -> ModuleType | None:
    if not cpu_supports_kernels():
        logger.info("CPU kernels: this CPU lacks AVX2/FMA; using the PyTorch paths")
        return None
    from torch.utils import cpp_extension

    name = module_name(_BUILD_FLAGS)
    build_dir = _build_dir(name)
    # A first build takes a minute or more with nothing else to show: say so before and after.
    compiling = not is_cached()
    module = None if compiling else _import_cached(name, build_dir)
    if compiling:
        logger.info("CPU kernels: compiling them for this machine, once (a minute or two on two cores; "
                    "cached in %s)...", build_dir)
    started = time.perf_counter()
    try:
        if module is None:
            module = cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=_BUILD_FLAGS, verbose=False)
    except Exception as error:  # no compiler, missing headers, ...: the torch path still works
        logger.warning("CPU kernels could not be built (%s); using the slower PyTorch paths", error)
        return None
    if compiling:
        logger.info("CPU kernels: compiled in %.0f s", time.perf_counter() - started)
    if not avx512_allowed() and _cpu_flag("avx512f"):
        logger.info("CPU kernels: ATEN_CPU_CAPABILITY=%s keeps them to AVX2 on this AVX-512 CPU",
                    os.environ.get("ATEN_CPU_CAPABILITY"))
    return module


def get() -> ModuleType | None:
    """The compiled kernels module, or None where they are not available (built once)."""
    if "module" not in _state:
        with _lock:
            if "module" not in _state:
                _state["module"] = _build()
    return _state["module"]


def _cpu_flag(flag: str) -> bool:
    """Whether /proc/cpuinfo lists `flag` (False where it cannot be read); read once per flag
    at import, into the module constants at the bottom."""
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): only there do
    torch's bf16 matmuls run at full speed."""
    return _AVX512_BF16 or _AMX


def streaming_rows_limit() -> int:
    """Rows up to which a bf16 projection streams its weights through the kernel (above it
    the matmul library runs): SMALL_BATCH_ROWS, or SMALL_BATCH_ROWS_NATIVE_BF16 on CPUs with
    native bf16. The Python path and the fused decode stack both follow it."""
    return SMALL_BATCH_ROWS_NATIVE_BF16 if _NATIVE_BF16 else SMALL_BATCH_ROWS


def bf16_dot_rows_limit() -> int:
    """Rows up to which a bf16 projection with more than one row of bf16 x runs the kernels'
    vdpbf16ps GEMM (`linear_bf16_dot`) instead of the matmul library: BF16_DOT_MAX_ROWS on
    CPUs with AVX512-BF16 but no AMX, 0 (never) elsewhere. The Python path and the fused
    decode stack both follow it."""
    return BF16_DOT_MAX_ROWS if _AVX512_BF16 and not _AMX else 0


BF16_DOT_MAX_ROWS = 64
"""Batched-decode projections (2-64 rows) on AVX512-BF16 CPUs without AMX. oneDNN's bf16
matmul reads a 9728x896 weight at 8-17 GB/s for 2-8 rows and reaches about half of the
machine's matmul peak at 32; the vdpbf16ps kernel streams each weight once (2-core Zen 4,
weights out of cache, `benchmarks/cpu_kernels.py --section dot`): 9728x896 1.9x faster than
oneDNN at 2 rows, 2.3x at 4, 1.6x at 32, 1.3x at 64; 896x4864 3.3x at 2 rows, 1.3x at 32,
1.2x at 64. On AMX CPUs oneDNN uses AMX tiles and is left in charge (not measured against
this kernel)."""

SMALL_BATCH_ROWS = 128
"""Up to this many rows bf16 weights stream through the kernel on CPUs without bf16
arithmetic; more rows (prefill) widen the weight to float32 for the matmul library. The
library needs the whole weight widened first (written to memory and read back), which a
batched decode step cannot amortize: `benchmarks/cpu_kernels.py --section dot` on a 2-core
Zen 3 (AVX2), weights out of cache, kernel vs library: 9728x896 2.1-3.6x faster at 2-64
rows, 1.6x at 128, 1.3x at 256; 896x4864 1.5-3.3x at 2-64, 1.1x at 128, 0.93x at 256; the
151936x896 LM head 5.8x at 32 rows. With the limit at 16, 32 running sequences decoded
2.3x more slowly than 16."""

SMALL_BATCH_ROWS_NATIVE_BF16 = 1
"""The same limit on CPUs with native bf16 (AMX / AVX512-BF16), where torch's bf16 matmul
needs no widening: there the kernel wins only for a single row (benchmarks/cpu_kernels.py
on a 2-core Xeon with AMX, 9728x896 weights: 0.63 ms vs 1.14 ms at 1 row, 1.31 vs 1.21 at 2,
3.1 vs 1.2 at 8)."""

FLOAT32_KERNEL_ROWS = 1
"""Rows up to which float32 weights also stream through the kernel: a decode row's GEMV. MKL's
float32 GEMV reads 13.6 GB/s on a 2-core AMD EPYC (Zen 4) where the kernel reads 30 (on a
Xeon the two are even); its float32 sums differ from MKL's only in rounding order, as MKL's
own GEMV and GEMM do. More rows keep MKL's GEMM, whose results prefill parity relies on."""

_WIDEN_LIMIT = 64 * 2**20
"""The most elements of a weight widened at once, and of its product: larger weights (a
large vocabulary's LM head) go through the scratch in slices of rows, so its buffers stay
near one layer's matrices in size."""


class MatmulScratch:
    """Reusable float32 buffers for the matmuls of many rows (prefill, large batches): a bf16
    weight widened to float32, the widened input, the product, and the float32 MLP's
    activation.

    One per model: layers run one after another, so each buffer, once as large as the
    largest tensor it held, serves every later call. Fresh tensors of those sizes are
    page-faulted in again on every call: a prefill's 1024 x 9728 gate/up product is 40 MB,
    above the size up to which the C allocator keeps freed memory for reuse, and a 1024-token
    Qwen2.5-0.5B prefill took ~470k page faults (0.8-1.8 s of kernel time over two threads,
    next to a 7-10 s prefill on a 2-core Zen 3). What a buffer holds is valid until the next
    call that asks for the same buffer.
    """

    def __init__(self) -> None:
        self._storage: dict[str, torch.Tensor] = {}

    def buffer(self, role: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """A float32 tensor of `shape` in the buffer named `role` (grown when too small)."""
        numel = math.prod(shape)
        storage = self._storage.get(role)
        if storage is None or storage.numel() < numel or storage.device != device:
            storage = self._storage[role] = torch.empty(numel, dtype=torch.float32, device=device)
        return storage[:numel].view(shape)

    def widen(self, tensor: torch.Tensor, role: str = "weight") -> torch.Tensor:
        """`tensor` widened to float32 in the buffer named `role`."""
        wide = self.buffer(role, tuple(tensor.shape), tensor.device)
        wide.copy_(tensor)
        return wide

    def held_elements(self, role: str) -> int:
        """How many float32 elements the buffer named `role` holds (0 if never used)."""
        storage = self._storage.get(role)
        return 0 if storage is None else storage.numel()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           scratch: MatmulScratch | None = None, result_in_scratch: bool = False) -> torch.Tensor:
    """`F.linear` with CPU fast paths for decode rows and bfloat16 weights.

    Few rows (decode): the streaming kernel, which reads the weights once (bf16 widened in
    registers; AVX-512 where the CPU has it); on AVX512-BF16 CPUs without AMX, 2-64 bf16 rows
    (a batched decode step) take the vdpbf16ps kernel. Many rows (prefill): torch's own bf16
    matmul on CPUs with native bf16 (AMX / AVX512-BF16); elsewhere a float32 matmul on the
    widened weight and input (in `scratch` when given), far faster there than torch's bf16
    matmul; widening is cheap next to the matmul it feeds. Either way products are
    accumulated in float32 and rounded once to x's dtype, as torch's bf16 matmul does.
    float32 weights take the kernel for a single row only (`FLOAT32_KERNEL_ROWS`), the
    library otherwise; with `result_in_scratch` their product is written into `scratch`'s
    "product" buffer instead of a new tensor, for a caller that consumes it before the next
    such call.
    """
    if x.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32):
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if weight.dtype == torch.float32:
        kernels = get() if rows <= FLOAT32_KERNEL_ROWS and x.dtype == torch.float32 else None
        if kernels is not None:
            out = kernels.linear_small_batch(x.reshape(rows, x.shape[-1]).contiguous(), weight, bias)
            return out.view(*x.shape[:-1], weight.shape[0])
        if scratch is None or not result_in_scratch or x.dtype != torch.float32:
            return F.linear(x, weight, bias)
        product = scratch.buffer("product", (rows, weight.shape[0]), x.device)
        _matmul_into(product, x.reshape(rows, x.shape[-1]), weight, bias)
        return product.view(*x.shape[:-1], weight.shape[0])
    kernels = get() if rows <= streaming_rows_limit() else None
    if kernels is not None and x.dtype in (torch.bfloat16, torch.float32):
        out = kernels.linear_small_batch(x.reshape(rows, x.shape[-1]).contiguous(), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    kernels = get() if rows <= bf16_dot_rows_limit() and x.dtype == torch.bfloat16 else None
    if kernels is not None:
        out = kernels.linear_bf16_dot(x.reshape(rows, x.shape[-1]).contiguous(), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    if _NATIVE_BF16:
        return F.linear(x, weight, bias)
    if scratch is None:
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    # A weight larger than the widening limit (a large vocabulary's LM head) goes through the
    # scratch in slices of rows, so that neither the widened weight nor the product of a
    # slice exceeds the limit.
    x_float = scratch.widen(x.reshape(rows, x.shape[-1]), "input")
    out = torch.empty(rows, weight.shape[0], dtype=x.dtype, device=x.device)
    rows_per_slice = max(1, min(_WIDEN_LIMIT // weight.shape[1], _WIDEN_LIMIT // rows))
    for first in range(0, weight.shape[0], rows_per_slice):
        rows_slice = slice(first, first + rows_per_slice)
        wide = scratch.widen(weight[rows_slice])
        product = scratch.buffer("product", (rows, wide.shape[0]), x.device)
        _matmul_into(product, x_float, wide, None if bias is None else bias[rows_slice].float())
        out[:, rows_slice].copy_(product)  # rounded once to x's dtype
    return out.view(*x.shape[:-1], weight.shape[0])


def _matmul_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """out = x @ weight.T (+ bias), the library calls F.linear makes for 2-D float32 inputs."""
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


PREFILL_ATTENTION_HEAD_DIMS = (32, 64, 128)


def prefill_attention_kernel(dtype: torch.dtype, head_dim: int, device: torch.device) -> Callable | None:
    """The compiled causal prefill attention for bf16 tensors on this CPU, else None (torch's
    fused attention runs).

    Both kernels take (query [Tq, H, D], keys [Tk, Hk, D], values, out, scale). AVX512-BF16
    CPUs without AMX: `prefill_attention`, vdpbf16ps products (2-core Zen 4: 11.2 ms vs
    torch's 22.3 ms for 1024 causal tokens, 14 query / 2 KV heads of 64 dims, same error
    against a float64 reference). CPUs without bf16 arithmetic: `prefill_attention_avx2`,
    float32 FMA on bf16 widened in registers, where torch needs float32 copies of q, k and v
    (2-core Zen 3, same shape: 1.6-1.7x faster than torch's float32 attention, 20 alternating
    rounds). AMX CPUs keep torch's fused attention (it uses AMX tiles), and float32 models
    keep it everywhere: its sums are the ones transformers' float32 outputs come from.
    """
    if dtype != torch.bfloat16 or device.type != "cpu" or head_dim not in PREFILL_ATTENTION_HEAD_DIMS or _AMX:
        return None
    kernels = get()
    if kernels is None:
        return None
    return kernels.prefill_attention if _AVX512_BF16 else kernels.prefill_attention_avx2


def prefill_attention_int8_kernel(dtype: torch.dtype, head_dim: int, device: torch.device) -> Callable | None:
    """The compiled causal prefill attention over an int8 context, else None (the torch
    reference runs). It takes (query [Tq, H, D], keys [Tk, Hk, D] int8, values, key_scales
    [Tk, Hk], value_scales, out, scale), bf16 or float32 queries; unlike the float caches'
    kernels it serves float32 models and AMX CPUs too, whose torch path would have to
    materialise the scores (torch's fused attention cannot take the scales)."""
    if (dtype not in (torch.bfloat16, torch.float32) or device.type != "cpu"
            or head_dim not in PREFILL_ATTENTION_HEAD_DIMS):
        return None
    kernels = get()
    return None if kernels is None else kernels.prefill_attention_int8


def widen_for_matmul(dtype: torch.dtype, device: torch.device) -> bool:
    """True where bf16 tensors should be computed on in float32 (CPU without native bf16)."""
    return dtype == torch.bfloat16 and device.type == "cpu" and not _NATIVE_BF16


def avx512_allowed() -> bool:
    """False where PyTorch's ATEN_CPU_CAPABILITY (avx2, default) holds torch below AVX-512: the
    kernels then keep to AVX2 as well (cpu_kernels.h, cpu_avx512_allowed), and so do the
    choices made here from the CPU's flags."""
    return torch.backends.cpu.get_cpu_capability() not in ("AVX2", "DEFAULT")


_AVX512_BF16 = _cpu_flag("avx512_bf16") and avx512_allowed()
_AMX = _cpu_flag("amx_bf16") and avx512_allowed()
_NATIVE_BF16 = cpu_has_native_bf16()


def quant_linear(in_features: int, out_features: int, bias: torch.Tensor | None = None, isa: str = "auto",
                 decode_max_rows: int | None = None, lanes: bool = True):
    """A compiled `QuantLinear` (fitserve/kernels/cpu_quant_linear.h) for a layer stored in the
    w8/w4 formats of fitserve.quant.packing, or None where the kernels cannot be built (callers
    then dequantize and run F.linear, the formats' reference).

    Add the layer's parts with `add_w8(qweight, scales, out_rows=None)` and
    `add_w4(qweight, scales, zeros, group_size, out_rows=None)` (both also take
    `layout="lanes"` for tensors an earlier call returned), then call `forward(x)` with a
    contiguous [M, in_features] float32 or bfloat16 x. Up to `decode_max_rows` rows of x
    (default: the kernels' own, measured by benchmarks/cpu_quant_kernels.py --section rows) run
    the integer kernels, more rows dequantize and multiply; the same object can be handed to the
    fused decode stack. Where the CPU lacks AVX2 and AVX-512 VNNI, or a part's group size does
    not fit the kernels' layout, that part runs the dequantizing path for every row count, and
    a log line says so.

    On AVX-512 VNNI, `add_w4` and `add_w8` repack a part into its lanes layout (16 output rows in
    the vector lanes; fitserve.quant.packing.pack_w4_lanes / pack_w8_lanes) and return the
    tensors they hold; `lanes=False` keeps the row-major layouts and their kernels (for
    comparisons).
    """
    return _compiled_layer("QuantLinear", in_features, out_features, bias, isa, decode_max_rows,
                           "quantized layers: this CPU has neither AVX-512 VNNI nor AVX2; decode rows dequantize "
                           "and run the matmul library", lanes=lanes)


def bitstack_linear(in_features: int, out_features: int, bias: torch.Tensor | None = None, isa: str = "auto",
                    decode_max_rows: int | None = None, small_rank_max: int | None = None):
    """A compiled `BitStackLinear` (fitserve/kernels/cpu_bitstack_linear.h) for a layer stored as
    BitStack blocks (fitserve.quant.bitstack_packing), or None where the kernels cannot be built
    (callers then rebuild W with dequantize_blocks and run F.linear, the layout's reference).

    Build: `part = layer.add_part(rows, rank)` once per projection of a fused layer (parts take
    consecutive output rows in the order added), then `layer.append_block(part, signs, u, v)`
    per loaded block (signs uint8 [rows, ceil(K/8)], u float16 [rows, rank], v float16 [rank, K];
    held by reference, not copied, when contiguous). Resize: `layer.set_active_blocks(part, d)`
    (a count; stored blocks stay), `layer.truncate(part, d)` (drops the tensors after the first
    d) and `append_block` again to grow. `forward(x)` takes a contiguous [M, in_features]
    float32 or bfloat16 x; up to `decode_max_rows` rows (default: the kernel's own) run the
    integer kernel straight from the bits, more rows rebuild W in slices and run the matmul
    library. On AVX-512 VNNI, parts of rank up to `small_rank_max` (default: the kernel's
    measured crossover) run the columns-in-lanes kernel, whose cost grows with the rank, higher
    ranks the lane-per-rank one, which costs rank 16 for any rank up to 16 (`part_kernels()` says
    which each part runs). The object is thread-safe: a resize waits for a running forward and
    vice versa.
    """
    extra = {} if small_rank_max is None else {"small_rank_max": small_rank_max}
    return _compiled_layer("BitStackLinear", in_features, out_features, bias, isa, decode_max_rows,
                           "BitStack layers: this CPU has neither AVX-512 VNNI nor AVX2/F16C; decode rows rebuild "
                           "the weights and run the matmul library", **extra)


def _compiled_layer(class_name: str, in_features: int, out_features: int, bias: torch.Tensor | None, isa: str,
                    decode_max_rows: int | None, no_kernel_message: str, **extra: int | bool):
    """The compiled layer class `class_name` (None without the kernels); logs `no_kernel_message`
    once where "auto" found no kernel ISA on this CPU. `extra`: the class's own keyword arguments."""
    kernels = get()
    if kernels is None:
        return None
    kwargs = {**extra} if decode_max_rows is None else {"decode_max_rows": decode_max_rows, **extra}
    layer = getattr(kernels, class_name)(in_features, out_features, bias, isa, **kwargs)
    if layer.isa == "reference" and isa == "auto":
        _log_once(no_kernel_message)
    elif isa == "auto":  # which integer kernels this CPU runs, said once per process
        _log_once(f"integer weights: {_ISA_DESCRIPTIONS.get(layer.isa, layer.isa)} kernels")
    return layer


_ISA_DESCRIPTIONS = {
    "amx": "AVX-512 VNNI (decode rows) and AMX-INT8 tile (16+ rows)",
    "avx512_vnni": "AVX-512 VNNI",
    "avx2": "AVX2",
}


def log_reference_parts(layer) -> None:
    """Log (once per process) when a part of `layer` has no integer kernel on this CPU."""
    if "reference" in layer.part_isas() and layer.isa != "reference":
        _log_once("quantized layers: a w4 group size the kernels' layouts do not fit (AVX-512 VNNI: not a "
                  "multiple of 8; AVX2: not a multiple of 32 dividing or divided by 64) runs the dequantizing "
                  "path for decode rows too")


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)
