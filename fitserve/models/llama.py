"""One decoder for Llama 2/3, Mistral, Qwen2 and Qwen3, over a flat stream of tokens.

The four architectures differ only in switches that `ModelConfig` carries: q/k/v bias
(Qwen2), per-head RMSNorm of q and k (Qwen3), rope scaling (Llama 3.1+) and tied embeddings.
There is no batch dimension: a step's tokens from all sequences are concatenated, and the
paged attention backend uses `AttentionMetadata` to keep each sequence to its own context.

Numerics follow transformers so float32 greedy decoding gives the same tokens: RMSNorm in
float32 then cast back before the weight multiply, rope angles in float32, residual adds in
the model dtype. q/k/v and gate/up are each one fused matmul (fewer, larger GEMMs on the
decode hot path); the loader fills the fused weights from the separate checkpoint tensors.

On CPUs with AVX2, the projections, RMSNorm (+ residual add), rotary and SiLU·up take the
compiled kernels of fitserve.kernels.cpu, which keep the rounding of the torch code below
(every intermediate the torch code stores in the model dtype is rounded to it there too);
without them, the plain torch code runs. A model built with the Triton attention backend
(the GPU path) runs RMSNorm (+ residual add), rotary with the KV-cache write, and SiLU·up as
the Triton kernels of fitserve.kernels.triton_ops, with the same rounding: four launches per
layer where the torch code takes ~30.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fitserve.attention import AttentionBackend, get_attention_backend, is_triton_backend
from fitserve.attention.cache_layout import LayerKVCache
from fitserve.attention.metadata import AttentionMetadata
from fitserve.kernels import cpu as cpu_kernels
from fitserve.layers.embedding import Int8Embedding
from fitserve.layers.linear import Linear
from fitserve.layers.weight_formats import FormatPlan
from fitserve.models.config import ModelConfig
from fitserve.models.cpu_decode import FusedCpuDecode
from fitserve.models.rope import RotaryEmbedding, apply_rotary

if TYPE_CHECKING:
    from fitserve.models.elastic_weights import ElasticWeights


def _fused_kernels(x: torch.Tensor):
    """The fused CPU kernels (fitserve.kernels.cpu) when they apply to x, else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    return cpu_kernels.get()


def triton_ops_for(backend: AttentionBackend) -> ModuleType | None:
    """The fused Triton per-layer ops when the model runs the Triton attention kernels (the
    GPU path, or Triton's interpreter in tests); None on the torch and CPU paths."""
    if not is_triton_backend(backend):
        return None
    from fitserve.kernels import triton_ops

    return triton_ops


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, triton_ops: ModuleType | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.triton_ops = triton_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.triton_ops is not None:
            return self.triton_ops.rms_norm(x, self.weight, self.eps)
        kernels = _fused_kernels(x)
        if kernels is not None and x.is_contiguous() and self.weight.dtype == x.dtype:
            return kernels.rms_norm(x, self.weight, self.eps, None)[0]
        # Statistics in float32 (bf16 squares overflow precision); the weight multiplies the
        # value already cast back, as transformers does, so rounding matches.
        x_float = x.float()
        x_float = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_float.to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x), the sum rounded to the dtype first as `+` does.
        The fused kernels write the sum into `residual`, so callers must not reuse it."""
        if self.triton_ops is not None and residual.is_contiguous():
            return self.triton_ops.add_rms_norm(x, residual, self.weight, self.eps)
        kernels = _fused_kernels(x)
        if (kernels is not None and x.is_contiguous() and residual.is_contiguous()
                and self.weight.dtype == x.dtype == residual.dtype):
            normed, summed = kernels.rms_norm(x, self.weight, self.eps, residual)
            return normed, summed
        summed = residual + x
        return self.forward(summed), summed


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, scratch: cpu_kernels.MatmulScratch,
                 triton_ops: ModuleType | None = None, plan: FormatPlan | None = None) -> None:
        super().__init__()
        self.triton_ops = triton_ops
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.scale = config.head_dim**-0.5
        self.backend = backend
        # Rows: [q | k | v], filled from q_proj, k_proj, v_proj by the loader.
        plan = plan or FormatPlan()
        use_triton = triton_ops is not None
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, config.attention_bias, scratch,
                               plan.linear_format(), use_triton)
        self.o_proj = Linear(self.q_size, config.hidden_size, config.attention_output_bias, scratch,
                             plan.linear_format(), use_triton)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, triton_ops) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, triton_ops) if config.qk_norm else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: LayerKVCache,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        qkv = self.qkv_proj(hidden_states)
        kernels = None if self.triton_ops is not None else _fused_kernels(qkv)
        # q and k are adjacent heads of each qkv row: one in-place rotation covers both.
        rotate_in_place = kernels is not None and self.q_norm is None and cos.dtype == qkv.dtype
        if rotate_in_place:
            kernels.rotary_(qkv, cos, sin, self.num_heads + self.num_kv_heads, self.head_dim)
        query, key, value = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            query = self.q_norm(query)
            key = self.k_norm(key)
        if self.triton_ops is not None:
            # Rotates q in place and stores rotated k and v in the cache: one launch.
            self.triton_ops.rotary_and_write_kv(
                query, key, value, cos, sin, kv_cache.key, kv_cache.value, attn_metadata.slot_mapping,
                kv_cache.key_scales, kv_cache.value_scales,
            )
        else:
            if not rotate_in_place:
                query = apply_rotary(query, cos, sin)
                key = apply_rotary(key, cos, sin)
            self.backend.write_kv(key, value, kv_cache.key, kv_cache.value, attn_metadata.slot_mapping,
                                  kv_cache.key_scales, kv_cache.value_scales)
        output = self.backend.paged_attention(query, kv_cache.key, kv_cache.value, attn_metadata, self.scale,
                                              kv_cache.key_scales, kv_cache.value_scales)
        return self.o_proj(output.reshape(num_tokens, self.q_size))


FUSED_SILU_MAX_ROWS = 1
"""Token rows up to which float32 SiLU·up runs in the fused CPU kernel (see MLP.forward)."""


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, scratch: cpu_kernels.MatmulScratch,
                 triton_ops: ModuleType | None = None, plan: FormatPlan | None = None) -> None:
        super().__init__()
        self.triton_ops = triton_ops
        self.intermediate_size = config.intermediate_size
        self.scratch = scratch
        # Rows: [gate | up], filled from gate_proj and up_proj by the loader.
        plan = plan or FormatPlan()
        use_triton = triton_ops is not None
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, config.mlp_bias, scratch,
                                   plan.linear_format(), use_triton)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, config.mlp_bias, scratch,
                                plan.linear_format(), use_triton)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.triton_ops is not None:
            return self.down_proj(self.triton_ops.silu_mul(self.gate_up_proj(x)))
        # bf16: the fused kernel rounds in registers exactly as torch does and is 4x faster
        # for a prefill (1024 rows). float32: only for a single decode row, where it saves
        # torch's per-op overhead; longer inputs keep torch's own silu, bit-equal to transformers.
        use_kernel = x.dtype == torch.bfloat16 or x.numel() // x.shape[-1] <= FUSED_SILU_MAX_ROWS
        kernels = _fused_kernels(x) if use_kernel else None
        if kernels is not None:
            return self.down_proj(kernels.silu_mul(self.gate_up_proj(x)))
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.gate_up_proj.is_dense
                and self.gate_up_proj.weight.dtype == torch.float32):
            # Many float32 rows: gate/up product and activation live in the shared scratch
            # (a prefill's are tens of MB, page-faulted in afresh on every layer otherwise).
            gate_up = self.gate_up_proj(x, result_in_scratch=True)
            gate, up = gate_up.split(self.intermediate_size, dim=-1)
            activated = self.scratch.buffer("activation", tuple(gate.shape), x.device)
            torch.ops.aten.silu.out(gate, out=activated)
            return self.down_proj(activated.mul_(up))
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, scratch: cpu_kernels.MatmulScratch,
                 triton_ops: ModuleType | None = None, plan: FormatPlan | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, triton_ops)
        self.self_attn = Attention(config, backend, scratch, triton_ops, plan)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, triton_ops)
        self.mlp = MLP(config, scratch, triton_ops, plan)

    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: LayerKVCache,
        attn_metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual stream): the layer's last residual add is left to the next
        norm (`add_and_norm`), which rounds the sum exactly as `residual + mlp_out` would and
        saves a pass over the hidden states (and, on a GPU, a kernel launch) per layer.
        `residual` is None for the first layer, whose input is the residual stream itself."""
        if residual is None:
            residual = hidden_states
            normed = self.input_layernorm(hidden_states)
        else:
            normed, residual = self.input_layernorm.add_and_norm(hidden_states, residual)
        attention_out = self.self_attn(normed, cos, sin, kv_cache, attn_metadata)
        normed, residual = self.post_attention_layernorm.add_and_norm(attention_out, residual)
        return self.mlp(normed), residual


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm (named as in HF checkpoints: `model.*`)."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend, scratch: cpu_kernels.MatmulScratch,
                 plan: FormatPlan) -> None:
        super().__init__()
        triton_ops = triton_ops_for(backend)
        # A tied model whose LM head is w8 keeps the shared matrix in int8 (see Int8Embedding).
        self.embed_tokens: nn.Module = (
            Int8Embedding(config.vocab_size, config.hidden_size, torch.float32)
            if config.tie_word_embeddings and not plan.head_format().is_dense
            else nn.Embedding(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(
            [DecoderLayer(config, backend, scratch, triton_ops, plan) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, triton_ops)


class LlamaForCausalLM(nn.Module):
    """The whole decoder plus the output projection; serves all four supported architectures."""

    def __init__(self, config: ModelConfig, attention_backend: AttentionBackend | None = None,
                 plan: FormatPlan | None = None) -> None:
        super().__init__()
        self.config = config
        self.plan = plan or FormatPlan()
        """The weight format of every projection (dense unless the model is quantized)."""
        backend = attention_backend or get_attention_backend("torch", torch.device("cpu"))
        # One float32 scratch shared by every projection (see fitserve.kernels.cpu.MatmulScratch).
        scratch = cpu_kernels.MatmulScratch()
        self.model = LlamaModel(config, backend, scratch, self.plan)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, scratch, self.plan.head_format(),
                              triton_ops_for(backend) is not None)
        if config.tie_word_embeddings:
            self.tie_weights()
        # Decode-only CPU steps run the decoder layers in one C++ call (see cpu_decode.py);
        # `fused_cpu_decode.enabled = False` keeps every step on the Python path.
        self.fused_cpu_decode = FusedCpuDecode(self)
        self.elastic_weights: ElasticWeights | None = None
        """BitStack models: the loaded blocks and the budget they fit (set by the loader)."""

    def tie_weights(self) -> None:
        """Share one matrix between input embedding and output projection (re-run after
        anything that re-creates parameters, e.g. `to_empty`). An int8 embedding shares its
        int8 matrix and scales with the w8 LM head."""
        embedding = self.model.embed_tokens
        if isinstance(embedding, Int8Embedding):
            if hasattr(embedding, "qweight"):
                self.lm_head.set_tensor("qweight", embedding.qweight)
                self.lm_head.set_tensor("scales", embedding.scales)
                if embedding.layout != "rows":  # already repacked by an earlier LM-head kernel
                    self.lm_head.held_layouts["qweight"] = embedding.layout
            # The LM head's CPU kernel may repack the matrix: the embedding then holds its copy.
            self.lm_head.tensor_sharers = [embedding]
            return
        self.lm_head.weight = embedding.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[LayerKVCache],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden_size] of the flat token stream.

        Writes every new token's K/V into `kv_caches` (one `LayerKVCache` per layer) at
        `attn_metadata.slot_mapping`. Callers usually project only the last token of each
        sequence through `compute_logits`, which is why the two are separate.
        """
        if self.fused_cpu_decode.applies(input_ids, kv_caches, attn_metadata):
            return self.fused_cpu_decode.forward(input_ids, positions, attn_metadata)
        hidden_states = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, hidden_states.dtype)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            hidden_states, residual = layer(hidden_states, residual, cos, sin, LayerKVCache(*kv_cache), attn_metadata)
        if residual is None:  # no layers
            return self.model.norm(hidden_states)
        return self.model.norm.add_and_norm(hidden_states, residual)[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, vocab_size] logits in the model's dtype. The sampler widens them to float32 where
        it computes with them (penalties, temperature, log-probs); greedy decoding takes the
        argmax as they are, which saves a float32 copy of every row at every step."""
        return self.lm_head(hidden_states)
