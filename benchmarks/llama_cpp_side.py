"""The llama.cpp side of benchmarks/cpu_decode.py (optional: `pip install "fitserve[bench]"`).

`write_gguf` turns a random-weight Hugging Face checkpoint (Llama or Qwen2 layout) into a
bf16 GGUF with the `gguf` package: the same weights, the metadata llama.cpp needs, and a
placeholder vocabulary of the model's size (prompts are token ids, never text). Llama 3's
rope-scaling frequencies are left out: they change the angles, not the work per token.

`LlamaCppRunner` drives `llama_cpp` through its low-level batch API: single-stream decode,
one long prefill, and continuous batching of many sequences in one KV cache, so each step
is one `llama_decode` call, as fitserve's steps are one forward pass.
"""

from __future__ import annotations

import ctypes
import json
import time
from pathlib import Path

import numpy as np
import torch

GGUF_TENSOR_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")  # model.layers.{i}.{module...}.{weight|bias}
    layer, module, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
    return f"blk.{layer}.{GGUF_TENSOR_NAMES[module]}.{kind}"


def write_gguf(model_dir: Path, out_path: Path) -> Path:
    """A bf16 GGUF of the checkpoint in `model_dir` (written once; reused when present)."""
    import gguf
    from safetensors import safe_open

    if out_path.exists():
        return out_path
    config = json.loads((model_dir / "config.json").read_text())
    arch = {"qwen2": "qwen2", "llama": "llama"}[config["model_type"]]
    num_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
    tmp_path = out_path.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(tmp_path), arch)
    writer.add_name(f"random {arch}")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or num_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    vocab_size = config["vocab_size"]
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>".encode() for i in range(vocab_size)])
    writer.add_token_scores([0.0] * vocab_size)
    token_types = [gguf.TokenType.NORMAL] * vocab_size
    token_types[0] = gguf.TokenType.UNKNOWN
    writer.add_token_types(token_types)
    writer.add_bos_token_id(int(config.get("bos_token_id") or 1))
    writer.add_eos_token_id(int(config.get("eos_token_id") or 2) if not isinstance(config.get("eos_token_id"), list)
                            else int(config["eos_token_id"][0]))
    writer.add_unk_token_id(0)

    files = sorted(model_dir.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                gguf_name = _gguf_name(name)
                if tensor.dim() == 1 or gguf_name.endswith(".bias"):
                    # Norm weights and biases stay float32, as llama.cpp's converter keeps them.
                    writer.add_tensor(gguf_name, tensor.float().numpy())
                else:
                    raw = tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
                    writer.add_tensor(gguf_name, raw, raw_shape=raw.shape,
                                      raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp_path.rename(out_path)
    return out_path


LLAMA_CPP_TYPES = ("bfloat16", "Q4_0", "Q4_K_M", "Q8_0")
"""Weight types the benchmarks run llama.cpp with: the bf16 GGUF, and quantized copies made by
llama.cpp's own quantizer (`llama_model_quantize`, what `llama-quantize` runs)."""


def quantize_gguf(bf16_path: Path, type_name: str, num_threads: int) -> Path:
    """llama.cpp's quantization of the bf16 GGUF to `type_name` (written once; reused)."""
    if type_name == "bfloat16":
        return bf16_path
    import llama_cpp

    out_path = bf16_path.with_name(f"{bf16_path.stem}-{type_name}.gguf")
    if out_path.exists():
        return out_path
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = num_threads
    partial = out_path.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(bf16_path).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {bf16_path} to {type_name}")
    partial.rename(out_path)
    return out_path


def gguf_bits_per_weight(path: Path) -> dict:
    """Stored bits per weight of the decoder projections and of the LM head / embedding, and the
    tensor types present, read from the GGUF's tensor table."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    projection_bytes = projection_weights = head_bytes = head_weights = 0
    types: set[str] = set()
    for tensor in reader.tensors:
        if len(tensor.shape) < 2 or tensor.name.endswith(".bias"):
            continue
        weights = int(np.prod(tensor.shape))
        types.add(tensor.tensor_type.name)
        if tensor.name.startswith("blk."):
            projection_bytes += int(tensor.n_bytes)
            projection_weights += weights
        elif tensor.name in ("output.weight", "token_embd.weight"):
            head_bytes += int(tensor.n_bytes)
            head_weights += weights
    return {"projection_bits": 8 * projection_bytes / projection_weights,
            "lm_head_bits": 8 * head_bytes / head_weights, "tensor_types": sorted(types)}


class LlamaCppRunner:
    """llama.cpp on one GGUF: a `llama_cpp.Llama` for single-stream decode and prefill, and a
    second context on the same weights with room for `max_seqs` sequences of `max_len`
    tokens for continuous batching through the batch API."""

    def __init__(self, gguf_path: Path, num_threads: int, max_seqs: int, max_len: int, batch_tokens: int) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(gguf_path), n_ctx=2048, n_batch=512, n_ubatch=512, n_threads=num_threads,
            n_threads_batch=num_threads, verbose=False, logits_all=False,
        )
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = max_seqs * max_len
        params.n_batch = batch_tokens
        params.n_ubatch = min(512, batch_tokens)
        params.n_seq_max = max_seqs
        params.n_threads = params.n_threads_batch = num_threads
        params.kv_unified = True
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.llm.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the batch context")
        self.vocab_size = self.llm.n_vocab()
        self.batch_tokens = batch_tokens
        self.batch = llama_cpp.llama_batch_init(batch_tokens, 0, 1)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.llm.close()

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode over (token, position, sequence, wants_logits) entries."""
        batch = self.batch
        batch.n_tokens = len(entries)
        for i, (token, position, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        status = self.lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def _argmax(self, batch_index: int) -> int:
        pointer = self.lib.llama_get_logits_ith(self.ctx, batch_index)
        logits = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.vocab_size,))
        return int(logits.argmax())

    def _llm_argmax(self) -> int:
        pointer = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        logits = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.vocab_size,))
        return int(logits.argmax())

    def prefill(self, prompt: list[int]) -> tuple[int, float]:
        """`Llama.eval` of one prompt from an empty cache: (next token, seconds)."""
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt)
        token = self._llm_argmax()
        return token, time.perf_counter() - start

    def single_stream(self, prompt: list[int], num_tokens: int, after_step=None) -> list[float]:
        """Seconds of each `Llama.eval` of one token (greedy) after prefilling `prompt`;
        after_step() (untimed) runs after each."""
        token, _ = self.prefill(prompt)
        step_seconds = []
        for _ in range(num_tokens):
            start = time.perf_counter()
            self.llm.eval([token])
            token = self._llm_argmax()
            step_seconds.append(time.perf_counter() - start)
            if after_step is not None:
                after_step()
        return step_seconds

    def serve(self, workload: list[tuple[list[int], int]]) -> tuple[float, int, float]:
        """Continuous batching of every request at once: (seconds, output tokens, decode-only tokens/s).

        Each step packs every running decode (one token each) plus prompt chunks of waiting
        sequences up to the batch size, like fitserve's scheduler; a sequence's first output
        token comes from its last prompt position.
        """
        self.clear()
        num = len(workload)
        prompt_done = [0] * num
        outputs: list[list[int]] = [[] for _ in range(num)]
        next_token = [0] * num
        decode_tokens, decode_seconds = 0, 0.0
        start = time.perf_counter()
        while any(len(outputs[i]) < workload[i][1] for i in range(num)):
            entries: list[tuple[int, int, int, bool]] = []
            sample_at: list[tuple[int, int]] = []  # (sequence, batch index)
            for seq in range(num):
                prompt, wanted = workload[seq]
                if prompt_done[seq] == len(prompt) and len(outputs[seq]) < wanted:
                    sample_at.append((seq, len(entries)))
                    entries.append((next_token[seq], len(prompt) + len(outputs[seq]) - 1, seq, True))
            only_decodes = bool(entries)
            for seq in range(num):
                prompt, _ = workload[seq]
                room = self.batch_tokens - len(entries)
                if prompt_done[seq] < len(prompt) and room > 0:
                    only_decodes = False
                    chunk = prompt[prompt_done[seq] : prompt_done[seq] + room]
                    for i, token in enumerate(chunk):
                        last = prompt_done[seq] + i == len(prompt) - 1
                        if last:
                            sample_at.append((seq, len(entries)))
                        entries.append((token, prompt_done[seq] + i, seq, last))
                    prompt_done[seq] += len(chunk)
            step_start = time.perf_counter()
            self._decode(entries)
            for seq, index in sample_at:
                token = self._argmax(index)
                next_token[seq] = token
                outputs[seq].append(token)
            if only_decodes:
                decode_tokens += len(sample_at)
                decode_seconds += time.perf_counter() - step_start
        elapsed = time.perf_counter() - start
        produced = sum(len(o) for o in outputs)
        return elapsed, produced, decode_tokens / decode_seconds if decode_seconds else 0.0
