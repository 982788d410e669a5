"""Decode steps of a Llama-family model on the CPU in one C++ call (the kernels' DecodeStack).

A decode step of a small model is ~15 operations per layer. Run from Python, each costs a
dispatch, an allocation and interpreter time, ~7 ms of a 43 ms Qwen2.5-0.5B step on 2
cores, time in which no weights stream from memory. `FusedCpuDecode` hands the whole
decoder stack of a one-token-per-sequence step to `DecodeStack` (fitserve/kernels/
cpu_decode_stack.h), which runs the same kernels and ATen ops with the same rounding, so its
outputs are bit-identical to the Python path's; the Python path stays for prefill, mixed
steps, other devices and backends, and wherever the kernels cannot be built.

The stack holds references to the model's parameters and the KV caches, not copies. It is
built on first use and rebuilt when the caches or the parameters' storage change (a new KV
cache, a cast to another dtype); `invalidate()` forces that after other in-place surgery.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

import torch

from fitserve.attention.cache_layout import LayerKVCache
from fitserve.attention.metadata import AttentionMetadata
from fitserve.kernels import cpu as cpu_kernels

if TYPE_CHECKING:
    from fitserve.models.llama import LlamaForCausalLM

_TORCH_BACKEND = "fitserve.attention.torch_paged"
logger = logging.getLogger("fitserve")
_declined: set[str] = set()


def decline(reason: str) -> None:
    """Log once why the fused stack does not run a model (it would otherwise fall back silently)."""
    if reason not in _declined:
        _declined.add(reason)
        logger.info(reason)


class FusedCpuDecode:
    """Runs `LlamaForCausalLM`'s decoder layers for decode-only CPU steps through C++."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        # A weak reference: the model owns this object, and a cycle would keep a dropped
        # model's weights alive until the garbage collector's next full pass.
        self._model_ref = weakref.ref(model)
        self.enabled = True
        self._stack: Any = None
        self._weights_key: tuple | None = None
        self._caches_key: tuple | None = None
        self._caches_ok = False

    def invalidate(self) -> None:
        """Forget the built stack (call after replacing parameters in place)."""
        self._stack, self._weights_key, self._caches_key, self._caches_ok = None, None, None, False

    def applies(self, input_ids: torch.Tensor, kv_caches: list[LayerKVCache],
                metadata: AttentionMetadata) -> bool:
        """True when this step can take the fused path: a CPU decode-only step of a model whose
        tensors the kernels support."""
        if not self.enabled or input_ids.device.type != "cpu" or not metadata.is_decode_only:
            return False
        if self._current_weights_key() != self._weights_key:
            self._stack, self._caches_key = self._build(), None
            # Taken after building: choosing a layer's kernel may replace its stored tensors (a
            # CPU kernel that repacks a part into new tensors), which would otherwise rebuild again.
            self._weights_key = self._current_weights_key()
        if self._stack is None:
            return False
        caches_key = (id(kv_caches), len(kv_caches), kv_caches[0][0].data_ptr() if kv_caches else 0)
        if caches_key != self._caches_key:
            self._caches_key = caches_key
            self._caches_ok = self._attach_caches(kv_caches, self._weights_key[0])
        return self._caches_ok

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """The final-normed hidden states of a step `applies` accepted. The stack gathers the
        embedding rows and the rotary table rows itself (see `RotaryEmbedding.table`)."""
        model = self._model
        embed_tokens = model.model.embed_tokens
        dtype = model.model.norm.weight.dtype
        cos, sin = model.rotary_emb.table(dtype, metadata.max_seq_len)
        if not isinstance(embed_tokens, torch.nn.Embedding):  # int8 rows: dequantized in Python
            return self._stack.forward(embed_tokens(input_ids), cos[positions], sin[positions], metadata.slot_mapping,
                                       metadata.block_tables, metadata.seq_lens)
        return self._stack.forward_tokens(input_ids, positions, embed_tokens.weight, cos, sin, metadata.slot_mapping,
                                          metadata.block_tables, metadata.seq_lens)

    # ------------------------------------------------------------------ building

    @property
    def _model(self) -> LlamaForCausalLM:
        model = self._model_ref()
        assert model is not None, "FusedCpuDecode outlived its model"
        return model

    def _current_weights_key(self) -> tuple:
        """Cheap fingerprint of the parameters' storage: changes when they are re-created."""
        layers = self._model.model.layers
        first, last = layers[0], layers[-1]

        def storage(linear) -> int:
            return next(iter(linear.weight_format.tensors(linear).values())).data_ptr()

        return (self._model.model.norm.weight.dtype, storage(first.self_attn.qkv_proj), storage(last.mlp.down_proj),
                self._model.model.norm.weight.data_ptr())

    def _build(self) -> Any:
        model = self._model
        kernels = cpu_kernels.get()
        dtype = model.model.norm.weight.dtype
        if kernels is None:
            return None  # cpu_kernels.get() has logged why
        if dtype not in (torch.float32, torch.bfloat16):
            decline(f"the fused CPU decode stack runs float32 and bfloat16 models, not {dtype}; "
                     "decode steps run layer by layer in Python")
            return None
        quantized = not model.plan.is_dense
        if quantized:
            projections = [linear for layer in model.model.layers
                           for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                          layer.mlp.down_proj)]
            if any(linear.compiled_cpu_kernel() is None for linear in projections):
                decline(f"the fused CPU decode stack needs the compiled kernels for {model.plan.method} weights; "
                         "decode steps run layer by layer in Python")
                return None
            tensors = [p for layer in model.model.layers for name, p in layer.named_parameters() if "norm" in name]
        else:
            tensors = [*model.model.layers.parameters()]
        tensors.append(model.model.norm.weight)
        if any(t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
            decline("the fused CPU decode stack needs contiguous CPU weights of one dtype; "
                     "decode steps run layer by layer in Python")
            return None
        config = model.config
        first_attention = model.model.layers[0].self_attn
        if any(getattr(layer.self_attn.backend, "__name__", "") != _TORCH_BACKEND for layer in model.model.layers):
            return None
        from fitserve.models.llama import FUSED_SILU_MAX_ROWS

        stack = kernels.DecodeStack(
            num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim, eps=config.rms_norm_eps, scale=first_attention.scale,
            final_norm=model.model.norm.weight.detach(), small_batch_rows=cpu_kernels.streaming_rows_limit(),
            float32_kernel_rows=cpu_kernels.FLOAT32_KERNEL_ROWS,
            native_bf16=cpu_kernels.cpu_has_native_bf16(), fused_silu_max_rows=FUSED_SILU_MAX_ROWS,
            bf16_dot_rows=cpu_kernels.bf16_dot_rows_limit(),
        )

        def optional(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.detach()

        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            if quantized:
                stack.add_quantized_layer(
                    layer.input_layernorm.weight.detach(), attention.qkv_proj.compiled_cpu_kernel(),
                    optional(attention.q_norm.weight if attention.q_norm is not None else None),
                    optional(attention.k_norm.weight if attention.k_norm is not None else None),
                    attention.o_proj.compiled_cpu_kernel(), layer.post_attention_layernorm.weight.detach(),
                    mlp.gate_up_proj.compiled_cpu_kernel(), mlp.down_proj.compiled_cpu_kernel(),
                )
                continue
            stack.add_layer(
                layer.input_layernorm.weight.detach(), attention.qkv_proj.weight.detach(),
                optional(attention.qkv_proj.bias),
                optional(attention.q_norm.weight if attention.q_norm is not None else None),
                optional(attention.k_norm.weight if attention.k_norm is not None else None),
                attention.o_proj.weight.detach(), optional(attention.o_proj.bias),
                layer.post_attention_layernorm.weight.detach(), mlp.gate_up_proj.weight.detach(),
                optional(mlp.gate_up_proj.bias), mlp.down_proj.weight.detach(), optional(mlp.down_proj.bias),
            )
        return stack

    def _attach_caches(self, kv_caches: list[LayerKVCache], dtype: torch.dtype) -> bool:
        """Hand the caches to the stack: float caches in the model's dtype, or int8 caches
        with their scales (which the stack quantizes into and attends over directly)."""
        if len(kv_caches) != len(self._model.model.layers):
            return False
        layers = [LayerKVCache(*kv_cache) for kv_cache in kv_caches]
        tensors = [tensor for layer in layers for tensor in layer if tensor is not None]
        if any(tensor.device.type != "cpu" or not tensor.is_contiguous() for tensor in tensors):
            return False
        int8 = layers[0].is_int8
        cache_dtype = torch.int8 if int8 else dtype
        if any(layer.key.dtype != cache_dtype or layer.value.dtype != cache_dtype or layer.is_int8 != int8
               for layer in layers):
            return False
        scales = [(layer.key_scales, layer.value_scales) for layer in layers] if int8 else []
        self._stack.set_kv_caches([layer.key for layer in layers], [layer.value for layer in layers],
                                  [key for key, _ in scales], [value for _, value in scales])
        return True
