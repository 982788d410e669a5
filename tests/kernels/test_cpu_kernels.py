"""The AVX2 CPU kernels against plain PyTorch (skipped where they cannot be built)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fitserve.attention import torch_paged
from fitserve.attention.metadata import AttentionMetadata
from fitserve.kernels import cpu

kernels = cpu.get()
pytestmark = pytest.mark.skipif(kernels is None, reason="CPU kernels unavailable (no AVX2 or no compiler)")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 32])
@pytest.mark.parametrize(("x_dtype", "w_dtype"), [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("in_features", [100, 256, 1000])
def test_linear_small_batch_matches_float64(rows, x_dtype, w_dtype, with_bias, in_features):
    generator = torch.Generator().manual_seed(rows)
    # 37 output rows (not a multiple of the 4-row block). K = 100 is not a multiple of 8 or 16;
    # 256 is two of the single-row AVX-512 loop's 128-element blocks; 1000 is seven blocks (x
    # stored in scrambled block order) then three 32-element steps and 8 scalar elements.
    x = torch.randn(rows, in_features, generator=generator).to(x_dtype)
    weight = torch.randn(37, in_features, generator=generator).to(w_dtype)
    bias = torch.randn(37, generator=generator).to(w_dtype) if with_bias else None
    ours = kernels.linear_small_batch(x, weight, bias)
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert ours.dtype == x_dtype and ours.shape == (rows, 37)
    tolerance = 1e-4 if x_dtype == torch.float32 else 3e-2
    torch.testing.assert_close(ours.double(), expected, atol=tolerance * 10, rtol=tolerance)


@pytest.mark.parametrize("in_features", [100, 1000, 4864])
def test_bf16_decode_row_sums_exactly_as_its_float32_widening(in_features):
    # A bf16 row against bf16 weights keeps x in bf16 and widens it in registers (half the
    # bytes in L1 beside the weight stream); every product and sum must be those of the same
    # x passed as float32. 4864 is Qwen2.5-0.5B's down projection.
    generator = torch.Generator().manual_seed(in_features)
    x = torch.randn(1, in_features, generator=generator).to(torch.bfloat16)
    weight = torch.randn(37, in_features, generator=generator).to(torch.bfloat16)
    bias = torch.randn(37, generator=generator).to(torch.bfloat16)
    widened = kernels.linear_small_batch(x.float(), weight, bias)
    assert torch.equal(kernels.linear_small_batch(x, weight, bias), widened.to(torch.bfloat16))


def assert_same_on_any_thread_count(project, x, weight, repeats):
    """Threads that finish early take work from the others' shares, so which thread computes
    an output varies from call to call; the output must not."""
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = project(x, weight, None)
        for threads in (2, 3, 5):  # more threads than cores: some start late and lose work
            torch.set_num_threads(threads)
            for _ in range(repeats):
                assert torch.equal(project(x, weight, None), alone)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_small_batch_does_not_depend_on_threads(rows, dtype):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(rows, 1000, generator=generator).to(dtype)
    weight = torch.randn(1001, 1000, generator=generator).to(dtype)
    assert_same_on_any_thread_count(kernels.linear_small_batch, x, weight, repeats=5)


@pytest.mark.skipif(kernels is None or not kernels.has_avx512_bf16(), reason="needs AVX512-BF16")
@pytest.mark.parametrize("rows", [2, 5, 6, 7, 13, 64])
@pytest.mark.parametrize("in_features", [100, 256, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_bf16_dot_matches_float64(rows, in_features, with_bias):
    # 37 output rows: a partial last block of 4. K = 100 and 1000 end in a masked step.
    generator = torch.Generator().manual_seed(rows * 1000 + in_features)
    x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
    weight = torch.randn(37, in_features, generator=generator).to(torch.bfloat16)
    bias = torch.randn(37, generator=generator).to(torch.bfloat16) if with_bias else None
    ours = kernels.linear_bf16_dot(x, weight, bias)
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert ours.dtype == torch.bfloat16 and ours.shape == (rows, 37)
    # Exact products summed in float32, then one bf16 rounding: within a bf16 ulp of the value.
    assert torch.all((ours.double() - expected).abs() <= expected.abs() * 2 ** -8 + 1e-2)


@pytest.mark.skipif(kernels is None or not kernels.has_avx512_bf16(), reason="needs AVX512-BF16")
def test_linear_bf16_dot_does_not_depend_on_threads():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(20, 1000, generator=generator).to(torch.bfloat16)
    weight = torch.randn(1001, 1000, generator=generator).to(torch.bfloat16)
    assert_same_on_any_thread_count(kernels.linear_bf16_dot, x, weight, repeats=3)


def test_batched_bf16_projections_take_the_dot_kernel_only_where_it_runs():
    from fitserve.kernels import cpu

    limit = cpu.bf16_dot_rows_limit()
    if not kernels.has_avx512_bf16():
        assert limit == 0
        return
    x = torch.randn(8, 96).to(torch.bfloat16)
    weight = torch.randn(40, 96).to(torch.bfloat16)
    if limit == 0:  # AMX: batched rows stay with the matmul library
        assert torch.equal(cpu.linear(x, weight, None), F.linear(x, weight))
        return
    assert torch.equal(cpu.linear(x, weight, None), kernels.linear_bf16_dot(x, weight, None))
    rows = torch.randn(limit + 1, 96).to(torch.bfloat16)  # one row past the limit: the library
    assert torch.equal(cpu.linear(rows, weight, None), F.linear(rows, weight))


def test_batched_bf16_decode_without_bf16_arithmetic_streams_through_the_kernel(monkeypatch):
    # Without bf16 arithmetic the matmul library needs a float32 copy of the whole weight, which
    # a batched decode step cannot amortize: up to SMALL_BATCH_ROWS rows (every decode batch of
    # up to that many sequences) take the streaming kernel; more rows widen for the library.
    monkeypatch.setattr(cpu, "_NATIVE_BF16", False)
    monkeypatch.setattr(cpu, "_AVX512_BF16", False)
    assert cpu.streaming_rows_limit() == cpu.SMALL_BATCH_ROWS >= 64
    library_calls = []
    library_linear, library_mm = F.linear, torch.mm
    monkeypatch.setattr(F, "linear", lambda *args, **kwargs: library_calls.append(1) or library_linear(*args, **kwargs))
    monkeypatch.setattr(torch, "mm", lambda *args, **kwargs: library_calls.append(1) or library_mm(*args, **kwargs))
    generator = torch.Generator().manual_seed(13)
    weight = torch.randn(40, 96, generator=generator).to(torch.bfloat16)
    batch = torch.randn(cpu.SMALL_BATCH_ROWS, 96, generator=generator).to(torch.bfloat16)
    assert torch.equal(cpu.linear(batch, weight, None), kernels.linear_small_batch(batch, weight, None))
    assert not library_calls
    prefill = torch.randn(cpu.SMALL_BATCH_ROWS + 1, 96, generator=generator).to(torch.bfloat16)
    expected = library_linear(prefill.float(), weight.float()).to(torch.bfloat16)
    assert torch.equal(cpu.linear(prefill, weight, None, cpu.MatmulScratch()), expected)
    assert len(library_calls) == 1


def test_bf16_matmul_without_bf16_arithmetic_widens_large_weights_in_slices(monkeypatch):
    # A CPU without bf16 arithmetic computes many bf16 rows in float32 on a widened copy of
    # the weight. A weight above the widening limit (a large vocabulary's LM head) goes
    # through the shared scratch in slices of rows: the result is the same, and neither the
    # widened slice nor its product exceeds the limit.
    monkeypatch.setattr(cpu, "_NATIVE_BF16", False)
    monkeypatch.setattr(cpu, "_AVX512_BF16", False)
    monkeypatch.setattr(cpu, "SMALL_BATCH_ROWS", 2)
    monkeypatch.setattr(cpu, "_WIDEN_LIMIT", 10 * 64)
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(5, 64, generator=generator).to(torch.bfloat16)
    weight = torch.randn(37, 64, generator=generator).to(torch.bfloat16)  # 4 slices: 10, 10, 10, 7 rows
    bias = torch.randn(37, generator=generator).to(torch.bfloat16)
    scratch = cpu.MatmulScratch()
    ours = cpu.linear(x, weight, bias, scratch)
    expected = F.linear(x.float(), weight.float(), bias.float()).to(torch.bfloat16)
    assert ours.shape == (5, 37) and ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, expected, atol=0, rtol=2 ** -7)
    assert scratch.held_elements("weight") == 10 * 64
    assert scratch.held_elements("product") == 5 * 10
    # Many rows shrink the slices so that the product stays within the limit too.
    many = torch.randn(160, 64, generator=generator).to(torch.bfloat16)  # 640 // 160 = 4 rows a slice
    many_scratch = cpu.MatmulScratch()
    ours = cpu.linear(many, weight, bias, many_scratch)
    torch.testing.assert_close(ours, F.linear(many.float(), weight.float(), bias.float()).to(torch.bfloat16),
                               atol=0, rtol=2 ** -7)
    assert many_scratch.held_elements("weight") == 4 * 64
    assert many_scratch.held_elements("product") == 160 * 4


def test_many_row_matmuls_reuse_the_scratch_instead_of_fresh_memory(monkeypatch):
    # A prefill's float32 intermediates are tens of MB; fresh ones are page-faulted in on
    # every layer. The widened weight, input and product live in the model's scratch, which
    # the next call of the same size reuses in place. A bf16 result is still a new tensor
    # (rounded from the product), so a caller may keep it across calls; a float32 product is
    # left in the scratch only when the caller asks, and then equals the library's result.
    monkeypatch.setattr(cpu, "_NATIVE_BF16", False)
    monkeypatch.setattr(cpu, "_AVX512_BF16", False)
    monkeypatch.setattr(cpu, "SMALL_BATCH_ROWS", 2)
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(48, 32, generator=generator).to(torch.bfloat16)
    first_x, second_x = (torch.randn(9, 32, generator=generator).to(torch.bfloat16) for _ in range(2))
    scratch = cpu.MatmulScratch()
    first = cpu.linear(first_x, weight, None, scratch)
    held = {role: scratch.buffer(role, (1,), first_x.device).data_ptr() for role in ("weight", "input", "product")}
    second = cpu.linear(second_x, weight, None, scratch)
    assert {role: scratch.buffer(role, (1,), first_x.device).data_ptr() for role in held} == held
    assert torch.equal(first, F.linear(first_x.float(), weight.float()).to(torch.bfloat16))
    assert torch.equal(second, F.linear(second_x.float(), weight.float()).to(torch.bfloat16))

    weight32, bias32 = torch.randn(48, 32, generator=generator), torch.randn(48, generator=generator)
    x32 = torch.randn(9, 32, generator=generator)
    in_scratch = cpu.linear(x32, weight32, bias32, scratch, result_in_scratch=True)
    assert in_scratch.data_ptr() == held["product"]
    assert torch.equal(in_scratch, F.linear(x32, weight32, bias32))
    fresh = cpu.linear(x32, weight32, bias32, scratch)
    assert fresh.data_ptr() != held["product"] and torch.equal(fresh, in_scratch)


def _paged_case(dtype, seq_lens, num_heads=4, num_kv_heads=2, head_dim=24, block_size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    num_blocks = sum((n + block_size - 1) // block_size for n in seq_lens) + 3
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    # Blocks handed out in a shuffled order, so sequences are not contiguous in the cache.
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = []
    for length in seq_lens:
        needed = (length + block_size - 1) // block_size
        tables.append([order.pop() for _ in range(needed)])
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=generator).to(dtype)
    metadata = AttentionMetadata(
        query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=block_tables,
        slot_mapping=torch.zeros(len(seq_lens), dtype=torch.long),
        query_lens_cpu=[1] * len(seq_lens), seq_lens_cpu=list(seq_lens), block_size=block_size,
    )
    return query, key_cache, value_cache, metadata


def _reference(query, key_cache, value_cache, metadata, scale):
    outputs = []
    for index, length in enumerate(metadata.seq_lens_cpu):
        keys = torch_paged.gather_context(key_cache, metadata.block_tables[index], length).double()
        values = torch_paged.gather_context(value_cache, metadata.block_tables[index], length).double()
        group = query.shape[1] // key_cache.shape[2]
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)
        q = query[index].double().unsqueeze(1)  # [H, 1, D]
        probs = torch.softmax(q @ keys.transpose(-1, -2) * scale, dim=-1)
        outputs.append((probs @ values).squeeze(1))
    return torch.stack(outputs)


def assert_decode_attention_matches_reference(query, key_cache, value_cache, metadata, scale):
    """The kernel's output over every sequence of `metadata` against the float64 reference."""
    out = torch.empty_like(query)
    kernels.paged_decode_attention(query, key_cache, value_cache, metadata.block_tables, metadata.seq_lens,
                                   torch.arange(len(metadata.seq_lens_cpu)), out, scale)
    tolerance = 1e-5 if query.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), _reference(query, key_cache, value_cache, metadata, scale),
                               atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "num_heads"), [(24, 4), (64, 14), (128, 8), (80, 6)])
def test_paged_decode_attention_matches_reference(dtype, head_dim, num_heads):
    # head_dim 24 and 80 take the general loops; 64 and 128 keep the value sums in registers;
    # lengths below, at and past multiples of 8 exercise the eight-key score blocks and tails.
    seq_lens = [1, 5, 17, 64, 3, 8, 23]
    query, key_cache, value_cache, metadata = _paged_case(dtype, seq_lens, num_heads=num_heads, head_dim=head_dim)
    assert_decode_attention_matches_reference(query, key_cache, value_cache, metadata, head_dim**-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "num_heads", "num_kv_heads"), [(32, 2, 2), (64, 14, 2), (64, 24, 2), (128, 8, 2)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_decode_attention_ignores_stale_slots(dtype, head_dim, num_heads, num_kv_heads, block_size):
    # bf16 caches on AVX512-BF16 CPUs take the packed vdpbf16ps loop: 16-token groups that
    # straddle or split cache blocks, GQA groups of 1, 7 and 12 query heads (more than one pass
    # of score and of value accumulators), and the padding past each context. Every cache slot
    # outside a context holds NaN, as a reused block can hold anything: none may leak in.
    seq_lens = [1, 15, 16, 17, 47, 100, 257]
    query, key_cache, value_cache, metadata = _paged_case(dtype, seq_lens, num_heads=num_heads,
                                                          num_kv_heads=num_kv_heads, head_dim=head_dim,
                                                          block_size=block_size, seed=5)
    used = torch.zeros(key_cache.shape[0] * block_size, dtype=torch.bool)
    for index, length in enumerate(seq_lens):
        for position in range(length):
            used[int(metadata.block_tables[index, position // block_size]) * block_size + position % block_size] = True
    flat_keys, flat_values = key_cache.view(-1, num_kv_heads, head_dim), value_cache.view(-1, num_kv_heads, head_dim)
    flat_keys[~used] = float("nan")
    flat_values[~used] = float("nan")
    assert_decode_attention_matches_reference(query, key_cache, value_cache, metadata, head_dim**-0.5)


def test_softmax_exp_handles_large_score_ranges():
    # Scores spread over hundreds: the kernel's exp must underflow cleanly to 0, not NaN.
    query, key_cache, value_cache, metadata = _paged_case(torch.float32, [40], head_dim=16)
    query = query * 200
    out = torch.empty_like(query)
    kernels.paged_decode_attention(query, key_cache, value_cache, metadata.block_tables, metadata.seq_lens,
                                   torch.arange(1), out, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _reference(query, key_cache, value_cache, metadata, 1.0),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_torch_formula(dtype, with_residual):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 36, generator=generator).to(dtype)
    weight = (1 + 0.1 * torch.randn(36, generator=generator)).to(dtype)
    residual = torch.randn(5, 36, generator=generator).to(dtype) if with_residual else None
    summed = x + residual if with_residual else x
    x_float = summed.float()
    expected = weight * (x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    normed, new_residual = kernels.rms_norm(x, weight, 1e-6, residual.clone() if with_residual else None)
    torch.testing.assert_close(new_residual, summed, atol=0, rtol=0)
    # Only the order of the sum of squares differs: float32 to a few ulp, bf16 to one rounding step.
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(normed, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,tokens", [(16, 7), (20, 1), (64, 33), (128, 2)])
def test_rotary_in_place_matches_rotate_half(dtype, head_dim, tokens):
    # Half a head of 8, 10 (8 pairs in a vector, 2 left), 32 and 64 pairs; 33 tokens split between threads.
    from fitserve.models.rope import RotaryEmbedding, apply_rotary

    generator = torch.Generator().manual_seed(4)
    num_heads, num_kv_heads = 4, 2
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).to(dtype)
    cos, sin = RotaryEmbedding(head_dim, 10000.0, None)(torch.arange(3, 3 + tokens), dtype)
    q = qkv[:, : num_heads * head_dim].reshape(tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].reshape(tokens, num_kv_heads, head_dim)
    expected_q, expected_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    value_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    kernels.rotary_(qkv, cos, sin, num_heads + num_kv_heads, head_dim)
    torch.testing.assert_close(qkv[:, : num_heads * head_dim].reshape(tokens, num_heads, head_dim), expected_q,
                               atol=0, rtol=0)
    torch.testing.assert_close(
        qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].reshape(tokens, num_kv_heads, head_dim),
        expected_k, atol=0, rtol=0)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], value_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch(dtype):
    generator = torch.Generator().manual_seed(5)
    gate_up = (torch.randn(3, 2 * 45, generator=generator) * 30).to(dtype)  # large |gate| too
    gate, up = gate_up.split(45, dim=-1)
    expected = F.silu(gate) * up
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(kernels.silu_mul(gate_up), expected, atol=tolerance, rtol=tolerance)


def test_silu_mul_bfloat16_is_bit_equal_to_torch_for_a_prefill():
    # The bf16 path rounds in registers (round to nearest even, twice); a prefill-sized input
    # with a tail that is not a multiple of the vector width must equal torch bit for bit, and a
    # NaN gate gives NaN where torch gives NaN.
    generator = torch.Generator().manual_seed(6)
    inter = 1027
    gate_up = (torch.randn(96, 2 * inter, generator=generator) * 4).to(torch.bfloat16)
    gate_up[5, 17] = float("nan")
    gate, up = gate_up.split(inter, dim=-1)
    expected = F.silu(gate) * up
    produced = kernels.silu_mul(gate_up)
    assert torch.isnan(produced[5, 17]) and torch.isnan(expected[5, 17])
    produced[5, 17] = expected[5, 17] = 0
    assert torch.equal(produced, expected)


def _causal_reference(query, keys, values, scale):
    """float64 causal attention; query row r sits at position len(keys) - len(query) + r."""
    query_len, num_heads, _ = query.shape
    context_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    q = query.double().transpose(0, 1)
    k = keys.double().transpose(0, 1).repeat_interleave(group, 0)
    v = values.double().transpose(0, 1).repeat_interleave(group, 0)
    scores = q @ k.transpose(-1, -2) * scale
    positions = torch.arange(context_len - query_len, context_len)[:, None]
    scores.masked_fill_(torch.arange(context_len)[None, :] > positions, float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(0, 1)


PREFILL_ATTENTION_KERNELS = [
    pytest.param("prefill_attention", torch.bfloat16, marks=pytest.mark.skipif(
        kernels is None or not kernels.has_avx512_bf16(), reason="needs a CPU with AVX512-BF16")),
    pytest.param("prefill_attention_avx2", torch.bfloat16,
                 marks=pytest.mark.skipif(kernels is None, reason="needs the CPU kernels (x86-64 with AVX2)")),
    pytest.param("prefill_attention_avx2", torch.float32,
                 marks=pytest.mark.skipif(kernels is None, reason="needs the CPU kernels (x86-64 with AVX2)")),
]


@pytest.mark.parametrize(("kernel_name", "dtype"), PREFILL_ATTENTION_KERNELS)
@pytest.mark.parametrize(("query_len", "context_len", "num_heads", "num_kv_heads", "head_dim"), [
    (1, 1, 2, 1, 64),        # a one-token prompt
    (5, 5, 4, 2, 32),        # shorter than a key block
    (37, 37, 14, 2, 64),     # Qwen2.5's group of 7, a ragged last block
    (100, 100, 6, 2, 64),    # rows not a multiple of the 4-row tile
    (20, 53, 8, 8, 128),     # chunked prefill: 33 cached tokens before the chunk, no grouping
    (3, 40, 7, 1, 64),       # multi-query attention, chunk inside a block
    (300, 300, 4, 2, 64),    # several key groups and row tiles per task, a ragged last tile
    (50, 333, 2, 1, 32),     # a chunk after 283 cached tokens: its first key groups need no mask
])
def test_prefill_attention_is_as_accurate_as_torch(kernel_name, dtype, query_len, context_len, num_heads, num_kv_heads,
                                                   head_dim):
    generator = torch.Generator().manual_seed(query_len * 7 + context_len)
    # q as the first heads of wider rows (as split from fused qkv rows): strided, not copied.
    rows = torch.randn(query_len, num_heads * head_dim + 8, generator=generator).to(dtype)
    query = rows[:, : num_heads * head_dim].view(query_len, num_heads, head_dim)
    keys = torch.randn(context_len, num_kv_heads, head_dim, generator=generator).to(dtype)
    values = torch.randn(context_len, num_kv_heads, head_dim, generator=generator).to(dtype)
    scale = head_dim**-0.5
    out = torch.full((query_len, num_heads, head_dim), float("nan"), dtype=dtype)
    getattr(kernels, kernel_name)(query, keys, values, out, scale)

    exact = _causal_reference(query, keys, values, scale)
    positions = torch.arange(context_len - query_len, context_len)[:, None]
    mask = torch.arange(context_len)[None, :] <= positions
    torch_out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
        attn_mask=mask, scale=scale, enable_gqa=True)[0].transpose(0, 1)
    our_error = (out.double() - exact).abs().max().item()
    torch_error = (torch_out.double() - exact).abs().max().item()
    # bf16: the output's rounding (2^-9 of values ~1) dominates both errors; float32: sums.
    slack = 2e-3 if dtype == torch.bfloat16 else 1e-6
    assert our_error <= 1.5 * torch_error + slack, (our_error, torch_error)


def test_kernel_module_is_rebuilt_for_another_torch_or_other_flags(monkeypatch):
    """torch finds built extensions by name: a module compiled against one libtorch must never
    be loaded by another, nor one compiled with other flags."""
    name = cpu.module_name(["-O3"])
    assert cpu.module_name(["-O3"]) == name
    assert cpu.module_name(["-O2"]) != name
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    assert cpu.module_name(["-O3"]) != name
