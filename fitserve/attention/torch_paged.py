"""Portable paged attention in plain PyTorch: the reference path, and the path for CPUs.

It handles any mix of prefills, chunked prefills and decodes in one batch. Decode rows (the
latency-critical case) run together: on CPUs with the AVX2 kernels (fitserve.kernels.cpu)
they attend over the cache blocks in place, elsewhere over a padded gather of the block
tables. Sequences with several new tokens (prefill chunks) loop one by one, which is fine
because a prefill's matmuls dwarf the loop.

An int8 cache (fitserve.attention.cache_layout) comes with `key_scales`/`value_scales`; its
torch path (`_int8_attention`) is the reference the int8 kernels are tested against: the
integers widened as they are, the key scale on each score, the value scale on each
probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fitserve.attention.cache_layout import quantize_int8
from fitserve.attention.metadata import AttentionMetadata
from fitserve.kernels import cpu as cpu_kernels


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
) -> None:
    """Store the new tokens' K and V ([num_tokens, num_kv_heads, head_dim]) into their slots;
    into an int8 cache quantized per token and head, with their scales beside them."""
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    num_slots = num_blocks * block_size
    if key_scales is not None and value_scales is not None:
        for source, cache, scales in ((key, key_cache, key_scales), (value, value_cache, value_scales)):
            values, token_scales = quantize_int8(source)
            cache.view(num_slots, num_kv_heads, head_dim).index_copy_(0, slot_mapping, values)
            scales.view(num_slots, num_kv_heads).index_copy_(0, slot_mapping, token_scales)
        return
    key_cache.view(num_slots, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    value_cache.view(num_slots, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def gather_context(
    cache: torch.Tensor, block_table: torch.Tensor, context_len: int
) -> torch.Tensor:
    """The first `context_len` tokens of one sequence from a paged cache: [context_len, H, D]."""
    block_size = cache.shape[1]
    num_blocks = (context_len + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.flatten(0, 1)[:context_len]


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens over their sequences' cached context.

    `query` is [num_tokens, num_heads, head_dim]; K/V of the new tokens must already be in
    the cache (see `write_kv`). Returns [num_tokens, num_heads, head_dim].
    """
    if metadata.is_decode_only:
        return _decode_attention(query, key_cache, value_cache, metadata, scale, key_scales, value_scales)
    output = torch.empty_like(query)
    kernels = _cpu_kernels_for(query, key_cache)
    query_lens = metadata.query_lens_cpu
    decode_seqs = [index for index, length in enumerate(query_lens) if length == 1] if kernels else []
    if decode_seqs:
        # Mixed step (chunked prefill beside running decodes): all decodes in one kernel call.
        starts = metadata.query_start_loc
        seq_index = torch.tensor(decode_seqs, dtype=torch.long, device=query.device)
        kernels.paged_decode_attention(
            query.contiguous(), key_cache, value_cache,
            metadata.block_tables.index_select(0, seq_index).to(torch.int32),
            metadata.seq_lens.index_select(0, seq_index).to(torch.int32),
            starts.index_select(0, seq_index).long(), output, scale, key_scales, value_scales,
        )
    if key_scales is not None and value_scales is not None:
        _prefill_int8(query, key_cache, value_cache, key_scales, value_scales, metadata, scale, output,
                      skip_decodes=bool(decode_seqs))
        return output
    num_heads = query.shape[1]
    num_kv_heads = key_cache.shape[2]
    widen = cpu_kernels.widen_for_matmul(query.dtype, query.device)
    # Grouped-query heads read their shared K/V head in place (no repeat_interleave copies).
    gqa = num_kv_heads != num_heads
    prefill_kernel = cpu_kernels.prefill_attention_kernel(query.dtype, query.shape[-1], query.device)
    if key_cache.dtype != query.dtype:
        prefill_kernel = None
    start = 0
    for seq_index, (query_len, seq_len) in enumerate(zip(query_lens, metadata.seq_lens_cpu)):
        if query_len == 1 and kernels:
            start += 1
            continue
        block_table = metadata.block_tables[seq_index]
        keys = gather_context(key_cache, block_table, seq_len)
        values = gather_context(value_cache, block_table, seq_len)
        if prefill_kernel is not None:  # bf16 on CPUs without AMX
            prefill_kernel(query[start : start + query_len], keys.contiguous(), values.contiguous(),
                           output[start : start + query_len], scale)
            start += query_len
            continue
        q = query[start : start + query_len].transpose(0, 1)  # [H, q, D]
        k = keys.transpose(0, 1)  # [Hkv, s, D]
        v = values.transpose(0, 1)
        if widen:  # torch's bf16 attention on a CPU without native bf16 is several times slower
            q, k, v = q.float(), k.float(), v.float()
        # 4-D inputs: torch's fused (flash) CPU kernel takes only those; 3-D ones fall back to
        # the unfused math path, 4-12x slower on a 1024-token prompt.
        if query_len == seq_len:  # the whole context is new: plain causal attention
            out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale,
                                                 enable_gqa=gqa)
        else:
            # Query row r sits at position (seq_len - query_len + r) and sees keys 0..that position.
            positions = torch.arange(seq_len - query_len, seq_len, device=query.device)
            mask = torch.arange(seq_len, device=query.device)[None, :] <= positions[:, None]
            out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale,
                                                 enable_gqa=gqa)
        output[start : start + query_len] = out[0].transpose(0, 1)
        start += query_len
    return output


def _cpu_kernels_for(query: torch.Tensor, key_cache: torch.Tensor):
    """The compiled CPU kernels when they apply to these tensors, else None."""
    if (query.device.type != "cpu" or query.dtype not in (torch.float32, torch.bfloat16)
            or key_cache.dtype not in (query.dtype, torch.int8) or not key_cache.is_contiguous()):
        return None
    return cpu_kernels.get()


def _decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    key_scales: torch.Tensor | None,
    value_scales: torch.Tensor | None,
) -> torch.Tensor:
    """One query token per sequence: the in-place CPU kernel, or else gather every sequence's
    blocks at once and mask the tail."""
    kernels = _cpu_kernels_for(query, key_cache)
    if kernels is not None:
        output = torch.empty_like(query)
        rows = torch.arange(query.shape[0], device=query.device)
        kernels.paged_decode_attention(
            query.contiguous(), key_cache, value_cache, metadata.block_tables.to(torch.int32),
            metadata.seq_lens.to(torch.int32), rows, output, scale, key_scales, value_scales,
        )
        return output
    if key_scales is not None and value_scales is not None:
        block_size = key_cache.shape[1]
        max_blocks = (metadata.max_seq_len + block_size - 1) // block_size
        table = metadata.block_tables[:, :max_blocks].long()
        positions = torch.arange(max_blocks * block_size, device=query.device)
        visible = (positions[None, :] < metadata.seq_lens.to(query.device)[:, None])[:, None, :]
        return _int8_attention(
            query[:, None], key_cache[table].flatten(1, 2), key_scales[table].flatten(1, 2),
            value_cache[table].flatten(1, 2), value_scales[table].flatten(1, 2), visible, scale,
        )[:, 0]
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    max_seq_len = metadata.max_seq_len
    max_blocks = (max_seq_len + block_size - 1) // block_size
    table = metadata.block_tables[:, :max_blocks].long()
    # [num_seqs, max_blocks * block_size, Hkv, D]
    keys = key_cache[table].flatten(1, 2)
    values = value_cache[table].flatten(1, 2)
    group = num_heads // num_kv_heads
    # Grouped-query attention without materialising repeated K/V: fold the group into the query.
    q = query.view(num_seqs, num_kv_heads, group, head_dim)
    k = keys.permute(0, 2, 1, 3)  # [S, Hkv, L, D]
    v = values.permute(0, 2, 1, 3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [S, Hkv, group, L]
    positions = torch.arange(keys.shape[1], device=query.device)
    valid = positions[None, :] < metadata.seq_lens.to(query.device)[:, None]  # [S, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    out = torch.matmul(probs, v)  # [S, Hkv, group, D]
    return out.reshape(num_seqs, num_heads, head_dim)


def _prefill_int8(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_scales: torch.Tensor,
    value_scales: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    output: torch.Tensor,
    skip_decodes: bool,
    use_kernel: bool = True,
) -> None:
    """The prefill chunks of a step over an int8 cache, one sequence at a time, into `output`
    (decode rows too unless `skip_decodes`: the decode kernel has done them): each sequence's
    int8 blocks and scales gathered as stored, then the CPU kernel or the torch reference."""
    kernel = cpu_kernels.prefill_attention_int8_kernel(query.dtype, query.shape[-1], query.device)
    if not use_kernel:
        kernel = None
    start = 0
    for seq_index, (query_len, seq_len) in enumerate(zip(metadata.query_lens_cpu, metadata.seq_lens_cpu)):
        rows = slice(start, start + query_len)
        start += query_len
        if query_len == 1 and skip_decodes:
            continue
        block_table = metadata.block_tables[seq_index]
        context = [gather_context(tensor, block_table, seq_len)
                   for tensor in (key_cache, key_scales, value_cache, value_scales)]
        if kernel is not None:
            keys, key_scale_rows, values, value_scale_rows = context
            kernel(query[rows], keys, values, key_scale_rows, value_scale_rows, output[rows], scale)
        else:
            output[rows] = _sequence_int8_attention(query[rows], context, seq_len, scale)


def int8_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_scales: torch.Tensor,
    value_scales: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of any batch over an int8 cache in plain torch (float32): the reference the
    CPU and Triton int8 kernels are tested against."""
    output = torch.empty_like(query)
    _prefill_int8(query, key_cache, value_cache, key_scales, value_scales, metadata, scale, output,
                  skip_decodes=False, use_kernel=False)
    return output


def _sequence_int8_attention(query: torch.Tensor, context: list[torch.Tensor], seq_len: int,
                             scale: float) -> torch.Tensor:
    """One sequence's new rows [q, H, D] over its gathered (keys, key scales, values, value
    scales); query row r sits at position seq_len - q + r and sees keys 0..that position."""
    query_len = query.shape[0]
    positions = torch.arange(seq_len - query_len, seq_len, device=query.device)
    visible = torch.arange(seq_len, device=query.device)[None, :] <= positions[:, None]
    return _int8_attention(query[None], *(tensor[None] for tensor in context), visible[None], scale)[0]


def _int8_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    key_scales: torch.Tensor,
    values: torch.Tensor,
    value_scales: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention in float32 of query [S, Lq, H, D] over int8 keys/values [S, L, Hkv, D] with
    their scales [S, L, Hkv]; visible [S, Lq, L] says which keys each query row sees."""
    num_seqs, query_len, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[2]
    group = num_heads // num_kv_heads
    # Grouped-query heads folded into the query rows: [S, Hkv, group * Lq, D].
    q = query.float().view(num_seqs, query_len, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(num_seqs, num_kv_heads, group * query_len, head_dim)
    k = keys.permute(0, 2, 1, 3).float()  # [S, Hkv, L, D], the integers as they are
    v = values.permute(0, 2, 1, 3).float()
    scores = torch.matmul(q, k.transpose(-1, -2)) * (key_scales.permute(0, 2, 1)[:, :, None, :] * scale)
    scores = scores.view(num_seqs, num_kv_heads, group, query_len, -1)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1) * value_scales.permute(0, 2, 1)[:, :, None, None, :]
    out = torch.matmul(probs.flatten(2, 3), v)  # [S, Hkv, group * Lq, D]
    out = out.view(num_seqs, num_kv_heads, group, query_len, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(num_seqs, query_len, num_heads, head_dim).to(query.dtype)
