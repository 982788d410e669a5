// The whole decoder stack of a Llama-family model for one decode step on the CPU, in one call.
//
// Why: a decode step of a small model is ~15 operations per layer, and from Python each costs
// a dispatch, a tensor allocation and the interpreter's time between calls: ~7 ms of a 43 ms
// step for Qwen2.5-0.5B on 2 cores, during which memory sits idle. Here the same kernels
// (cpu_kernels.h) and the same ATen ops run back to back with the GIL released, so the step
// is the weight stream plus small fused ops, and a server's other threads run meanwhile.
//
// Numerics are those of the Python path in fitserve/models/llama.py, operation for operation
// (the same kernels, the same ATen fallbacks, the same rounding points), so switching
// between the two never changes a token; tests/models/test_cpu_decode.py checks the
// outputs are bit-identical.

#pragma once

#include "cpu_bf16_gemm.h"
#include "cpu_decode_attention.h"
#include "cpu_kernels.h"
#include "cpu_kv_int8.h"
#include "cpu_quant_linear.h"

#include <array>
#include <cstring>
#include <memory>

namespace fitserve_cpu {

// One projection's weight: a dense tensor, or the layer's QuantLinear (integer formats; the
// same object the Python path multiplies with, so both paths run one kernel per format).
struct Projection {
  torch::Tensor dense;
  std::shared_ptr<QuantLinear> quant;
  Projection(torch::Tensor weight) : dense(std::move(weight)) {}  // NOLINT: a dense tensor is a projection
  Projection(std::shared_ptr<QuantLinear> layer) : quant(std::move(layer)) {}  // NOLINT
  int64_t rows() const { return quant ? quant->out_features() : dense.size(0); }
  int64_t columns() const { return quant ? quant->in_features() : dense.size(1); }
};

// One decoder layer's tensors, shared with the Python module's parameters (never copied).
struct DecodeLayer {
  torch::Tensor input_norm;
  Projection qkv, o;
  torch::Tensor post_norm;
  Projection gate_up, down;
  c10::optional<torch::Tensor> qkv_bias, o_bias, gate_up_bias, down_bias, q_norm, k_norm;
};

class DecodeStack {
 public:
  // small_batch_rows: up to this many rows a bfloat16 projection streams its weights through
  // linear_impl, above it the matmul library runs (on widened weights unless native_bf16).
  // float32_kernel_rows: the same limit for float32 weights. fused_silu_max_rows: float32
  // SiLU·up uses the fused kernel up to this many rows. bf16_dot_rows: bf16 projections of more
  // rows than small_batch_rows and up to this many run linear_bf16_dot (cpu_bf16_gemm.h).
  DecodeStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale,
              torch::Tensor final_norm, int64_t small_batch_rows, int64_t float32_kernel_rows, bool native_bf16,
              int64_t fused_silu_max_rows, int64_t bf16_dot_rows)
      : num_heads_(num_heads), num_kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps),
        scale_(scale), final_norm_(std::move(final_norm)), small_batch_rows_(small_batch_rows),
        float32_kernel_rows_(float32_kernel_rows), native_bf16_(native_bf16), fused_silu_max_rows_(fused_silu_max_rows),
        bf16_dot_rows_(bf16_dot_rows) {
    TORCH_CHECK(num_heads % num_kv_heads == 0 && head_dim % 2 == 0, "DecodeStack: bad head layout");
  }

  void add_layer(torch::Tensor input_norm, torch::Tensor qkv, c10::optional<torch::Tensor> qkv_bias,
                 c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm, torch::Tensor o,
                 c10::optional<torch::Tensor> o_bias, torch::Tensor post_norm, torch::Tensor gate_up,
                 c10::optional<torch::Tensor> gate_up_bias, torch::Tensor down,
                 c10::optional<torch::Tensor> down_bias) {
    for (const auto* t : {&qkv, &o, &gate_up, &down})
      TORCH_CHECK(t->is_contiguous() && t->device().is_cpu(), "DecodeStack: weights must be contiguous CPU tensors");
    push_layer(std::move(input_norm), Projection(std::move(qkv)), std::move(qkv_bias), std::move(q_norm),
               std::move(k_norm), Projection(std::move(o)), std::move(o_bias), std::move(post_norm),
               Projection(std::move(gate_up)), std::move(gate_up_bias), Projection(std::move(down)),
               std::move(down_bias));
  }

  // A layer whose projections are integer formats: each QuantLinear carries its own bias.
  void add_quantized_layer(torch::Tensor input_norm, std::shared_ptr<QuantLinear> qkv,
                           c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm,
                           std::shared_ptr<QuantLinear> o, torch::Tensor post_norm,
                           std::shared_ptr<QuantLinear> gate_up, std::shared_ptr<QuantLinear> down) {
    TORCH_CHECK(qkv && o && gate_up && down, "DecodeStack: a QuantLinear for every projection");
    push_layer(std::move(input_norm), Projection(std::move(qkv)), c10::nullopt, std::move(q_norm),
               std::move(k_norm), Projection(std::move(o)), c10::nullopt, std::move(post_norm),
               Projection(std::move(gate_up)), c10::nullopt, Projection(std::move(down)), c10::nullopt);
  }

  // The paged caches, [num_blocks, block_size, num_kv_heads, head_dim] per layer; for an int8
  // cache also its float32 scales, [num_blocks, block_size, num_kv_heads] per layer (empty
  // lists for a float cache).
  void set_kv_caches(std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                     std::vector<torch::Tensor> key_scales, std::vector<torch::Tensor> value_scales) {
    TORCH_CHECK(keys.size() == layers_.size() && values.size() == layers_.size(), "DecodeStack: one cache per layer");
    const bool int8 = !keys.empty() && keys[0].scalar_type() == at::kChar;
    TORCH_CHECK(key_scales.size() == (int8 ? keys.size() : 0) && value_scales.size() == key_scales.size(),
                "DecodeStack: scales for each layer of an int8 cache, none for a float one");
    for (size_t i = 0; i < keys.size(); ++i) {
      TORCH_CHECK(keys[i].is_contiguous() && values[i].is_contiguous() && keys[i].sizes() == values[i].sizes() &&
                  keys[i].scalar_type() == keys[0].scalar_type() && values[i].scalar_type() == keys[0].scalar_type(),
                  "DecodeStack: contiguous caches of one shape and dtype");
      TORCH_CHECK(keys[i].size(2) == num_kv_heads_ && keys[i].size(3) == head_dim_, "DecodeStack: cache layout");
      if (int8)
        for (const auto* scales : {&key_scales[i], &value_scales[i]})
          TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->is_contiguous() &&
                      scales->sizes() == keys[i].sizes().slice(0, 3),
                      "DecodeStack: float32 scales [blocks, block_size, Hkv]");
    }
    key_caches_ = std::move(keys);
    value_caches_ = std::move(values);
    key_scales_ = std::move(key_scales);
    value_scales_ = std::move(value_scales);
  }

  // hidden [T, H] (the embedded tokens, one per sequence), cos/sin [T, head_dim] in the same
  // dtype, slot_mapping [T] int64, block_tables [T, max_blocks] int32, seq_lens [T] int32
  // (lengths including the new token). Returns the final-normed hidden states [T, H] and
  // writes each layer's new K/V into its cache.
  torch::Tensor forward(torch::Tensor hidden, torch::Tensor cos, torch::Tensor sin, torch::Tensor slot_mapping,
                        torch::Tensor block_tables, torch::Tensor seq_lens) {
    TORCH_CHECK(!layers_.empty() && key_caches_.size() == layers_.size(), "DecodeStack: layers and caches first");
    TORCH_CHECK(hidden.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == hidden.size(0) &&
                cos.size(1) == head_dim_, "DecodeStack: hidden [T, H], cos/sin [T, head_dim]");
    TORCH_CHECK(cos.scalar_type() == hidden.scalar_type() &&
                (key_caches_[0].scalar_type() == hidden.scalar_type() || !key_scales_.empty()),
                "DecodeStack: cos/sin and caches in the activations' dtype (or an int8 cache)");
    TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && block_tables.scalar_type() == at::kInt &&
                seq_lens.scalar_type() == at::kInt, "DecodeStack: int64 slots, int32 tables and lengths");
    TORCH_CHECK(slot_mapping.numel() == hidden.size(0) && seq_lens.numel() == hidden.size(0) &&
                block_tables.size(0) == hidden.size(0), "DecodeStack: one token per sequence");
    at::NoGradGuard no_grad;
    if (hidden.scalar_type() == at::kBFloat16)
      return forward_impl<BF16>(hidden, cos.contiguous(), sin.contiguous(), slot_mapping.contiguous(),
                                block_tables.contiguous(), seq_lens.contiguous());
    TORCH_CHECK(hidden.scalar_type() == at::kFloat, "DecodeStack: float32 or bfloat16 activations");
    return forward_impl<float>(hidden, cos.contiguous(), sin.contiguous(), slot_mapping.contiguous(),
                               block_tables.contiguous(), seq_lens.contiguous());
  }

  // The same step from token ids: hidden = embedding rows of input_ids [T] (int64), cos/sin =
  // rows `positions` [T] (int64) of the rotary tables [P, head_dim]. Gathering the rows here
  // saves the step's embedding and rotary ops in Python, each slow right after the previous
  // step streamed the weights through the caches.
  torch::Tensor forward_tokens(torch::Tensor input_ids, torch::Tensor positions, torch::Tensor embedding,
                               torch::Tensor cos_table, torch::Tensor sin_table, torch::Tensor slot_mapping,
                               torch::Tensor block_tables, torch::Tensor seq_lens) {
    TORCH_CHECK(input_ids.dim() == 1 && positions.sizes() == input_ids.sizes() &&
                input_ids.scalar_type() == at::kLong && positions.scalar_type() == at::kLong,
                "DecodeStack: input_ids and positions [T] int64");
    TORCH_CHECK(embedding.dim() == 2 && embedding.is_contiguous() && cos_table.is_contiguous() &&
                sin_table.is_contiguous() && cos_table.sizes() == sin_table.sizes() && cos_table.dim() == 2 &&
                cos_table.size(1) == head_dim_ && cos_table.scalar_type() == embedding.scalar_type(),
                "DecodeStack: contiguous embedding [V, H] and rotary tables [P, head_dim] in its dtype");
    const int64_t tokens = input_ids.size(0), vocab = embedding.size(0), table_rows = cos_table.size(0);
    const auto ids = input_ids.contiguous(), where = positions.contiguous();
    const int64_t* id = ids.data_ptr<int64_t>();
    const int64_t* position = where.data_ptr<int64_t>();
    for (int64_t t = 0; t < tokens; ++t) {
      TORCH_CHECK(id[t] >= 0 && id[t] < vocab, "DecodeStack: token id ", id[t], " outside the vocabulary");
      TORCH_CHECK(position[t] >= 0 && position[t] < table_rows, "DecodeStack: position ", position[t],
                  " past the rotary table");
    }
    auto gather = [&](const torch::Tensor& table, const int64_t* rows) {
      torch::Tensor out = torch::empty({tokens, table.size(1)}, table.options());
      const int64_t row_bytes = table.size(1) * table.element_size();
      const char* source = static_cast<const char*>(table.data_ptr());
      char* target = static_cast<char*>(out.data_ptr());
      for (int64_t t = 0; t < tokens; ++t) std::memcpy(target + t * row_bytes, source + rows[t] * row_bytes, row_bytes);
      return out;
    };
    return forward(gather(embedding, id), gather(cos_table, position), gather(sin_table, position), slot_mapping,
                   block_tables, seq_lens);
  }

 private:
  void push_layer(torch::Tensor input_norm, Projection qkv, c10::optional<torch::Tensor> qkv_bias,
                  c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm, Projection o,
                  c10::optional<torch::Tensor> o_bias, torch::Tensor post_norm, Projection gate_up,
                  c10::optional<torch::Tensor> gate_up_bias, Projection down, c10::optional<torch::Tensor> down_bias) {
    for (const auto* t : {&input_norm, &post_norm})
      TORCH_CHECK(t->is_contiguous() && t->device().is_cpu(), "DecodeStack: weights must be contiguous CPU tensors");
    const int64_t qkv_width = (num_heads_ + 2 * num_kv_heads_) * head_dim_;
    TORCH_CHECK(qkv.rows() == qkv_width && o.columns() == num_heads_ * head_dim_, "DecodeStack: qkv/o shapes");
    layers_.push_back({std::move(input_norm), std::move(qkv), std::move(o), std::move(post_norm),
                       std::move(gate_up), std::move(down), std::move(qkv_bias), std::move(o_bias),
                       std::move(gate_up_bias), std::move(down_bias), std::move(q_norm), std::move(k_norm)});
  }

  template <typename T>
  torch::Tensor forward_impl(const torch::Tensor& hidden, const torch::Tensor& cos, const torch::Tensor& sin,
                             const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
                             const torch::Tensor& seq_lens) {
    const int64_t tokens = hidden.size(0), hidden_size = hidden.size(1);
    const int64_t q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
    const int64_t qkv_width = q_size + 2 * kv_size;
    torch::Tensor residual = hidden.contiguous().clone();  // the running sum, updated in place
    torch::Tensor normed = torch::empty_like(residual);
    torch::Tensor attention = scratch(Slot::kAttention, tokens, q_size, residual.options());
    torch::Tensor query_rows = torch::arange(tokens, slot_mapping.options());
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();

    rms_norm_impl<T>(residual.data_ptr<T>(), nullptr, layers_[0].input_norm.data_ptr<T>(), normed.data_ptr<T>(),
                     tokens, hidden_size, static_cast<float>(eps_));
    for (size_t index = 0; index < layers_.size(); ++index) {
      const DecodeLayer& layer = layers_[index];
      torch::Tensor qkv = linear(normed, layer.qkv, layer.qkv_bias, Slot::kQkv);
      T* qkv_ptr = qkv.data_ptr<T>();
      if (layer.q_norm.has_value() && layer.k_norm.has_value()) {
        head_norm<T>(qkv, 0, num_heads_, *layer.q_norm);
        head_norm<T>(qkv, q_size, num_kv_heads_, *layer.k_norm);
      }
      // q and k heads are adjacent in each row: one in-place rotation covers both.
      rotary_impl<T>(qkv_ptr, cos.data_ptr<T>(), sin.data_ptr<T>(), tokens, qkv_width, num_heads_ + num_kv_heads_,
                     head_dim_);
      write_and_attend<T>(index, qkv_ptr, slots, tokens, block_tables, seq_lens, query_rows, attention);
      torch::Tensor attention_out = linear(attention, layer.o, layer.o_bias, Slot::kAttentionOut);
      // residual += attention_out (rounded to the dtype); normed = norm(residual).
      rms_norm_impl<T>(attention_out.data_ptr<T>(), residual.data_ptr<T>(), layer.post_norm.data_ptr<T>(),
                       normed.data_ptr<T>(), tokens, hidden_size, static_cast<float>(eps_));
      torch::Tensor mlp_out = linear(silu_mul(linear(normed, layer.gate_up, layer.gate_up_bias, Slot::kGateUp)),
                                     layer.down, layer.down_bias, Slot::kMlpOut);
      // residual += mlp_out, then the next layer's input norm (the final norm after the last).
      const torch::Tensor& next_norm = index + 1 < layers_.size() ? layers_[index + 1].input_norm : final_norm_;
      rms_norm_impl<T>(mlp_out.data_ptr<T>(), residual.data_ptr<T>(), next_norm.data_ptr<T>(), normed.data_ptr<T>(),
                       tokens, hidden_size, static_cast<float>(eps_));
    }
    return normed;
  }

  // Layer `index`'s new K/V (the k and v parts of each qkv row) into its cache, quantized per
  // token and head for an int8 cache, then decode attention of the q parts over the cache.
  template <typename T>
  void write_and_attend(size_t index, const T* qkv_ptr, const int64_t* slots, int64_t tokens,
                        const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                        const torch::Tensor& query_rows, torch::Tensor& attention) {
    const int64_t q_size = num_heads_ * head_dim_, kv_size = num_kv_heads_ * head_dim_;
    const int64_t qkv_width = q_size + 2 * kv_size;
    const int64_t block_size = key_caches_[index].size(1);
    auto attend = [&](const auto* key_cache, const auto* value_cache, KVScales scales) {
      decode_attention_impl(qkv_ptr, key_cache, value_cache, block_tables.data_ptr<int32_t>(),
                            seq_lens.data_ptr<int32_t>(), query_rows.data_ptr<int64_t>(), attention.data_ptr<T>(),
                            tokens, num_heads_, num_kv_heads_, head_dim_, block_size, block_tables.size(1), qkv_width,
                            static_cast<float>(scale_), scales);
    };
    if (key_scales_.empty()) {
      T* key_cache = key_caches_[index].data_ptr<T>();
      T* value_cache = value_caches_[index].data_ptr<T>();
      for (int64_t token = 0; token < tokens; ++token) {
        const T* row = qkv_ptr + token * qkv_width;
        std::memcpy(key_cache + slots[token] * kv_size, row + q_size, kv_size * sizeof(T));
        std::memcpy(value_cache + slots[token] * kv_size, row + q_size + kv_size, kv_size * sizeof(T));
      }
      attend(key_cache, value_cache, KVScales{});
      return;
    }
    int8_t* key_cache = key_caches_[index].data_ptr<int8_t>();
    int8_t* value_cache = value_caches_[index].data_ptr<int8_t>();
    float* key_scales = key_scales_[index].data_ptr<float>();
    float* value_scales = value_scales_[index].data_ptr<float>();
    for (int64_t token = 0; token < tokens; ++token)
      for (int64_t head = 0; head < num_kv_heads_; ++head) {
        const T* key = qkv_ptr + token * qkv_width + q_size + head * head_dim_;
        const int64_t slot_head = slots[token] * num_kv_heads_ + head;  // the scale index
        key_scales[slot_head] = quantize_row_int8(key, key_cache + slot_head * head_dim_, head_dim_);
        value_scales[slot_head] = quantize_row_int8(key + kv_size, value_cache + slot_head * head_dim_, head_dim_);
      }
    attend(key_cache, value_cache, KVScales{key_scales, value_scales});
  }

  // The step's intermediates, kept between calls: a step allocated ~5 tensors per layer, each
  // an allocator call and a tensor object (the library paths below still allocate their own).
  enum class Slot { kQkv, kAttention, kAttentionOut, kGateUp, kSiluMul, kMlpOut, kCount };
  torch::Tensor scratch(Slot slot, int64_t rows, int64_t cols, const at::TensorOptions& options) {
    torch::Tensor& buffer = scratch_[static_cast<size_t>(slot)];
    if (!buffer.defined() || buffer.size(0) != rows || buffer.size(1) != cols ||
        buffer.scalar_type() != options.dtype().toScalarType())
      buffer = torch::empty({rows, cols}, options);
    return buffer;
  }

  // An integer projection runs its QuantLinear (bias included; a bf16 step's results into the
  // slot's buffer); a dense one the rule below.
  torch::Tensor linear(const torch::Tensor& x, const Projection& projection, const c10::optional<torch::Tensor>& bias,
                       Slot slot) {
    if (projection.quant) {
      if (x.scalar_type() != at::kBFloat16) return projection.quant->forward(x);
      return projection.quant->forward_into(x, scratch(slot, x.size(0), projection.rows(), x.options()));
    }
    return linear(x, projection.dense, bias, slot);
  }

  // fitserve.kernels.cpu.linear: the weight-streaming kernel for few rows of bf16 weights, the
  // matmul library otherwise (on widened weights where the CPU lacks native bf16).
  torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                       Slot slot) {
    const int64_t rows = x.size(0), in_features = x.size(1), out_features = weight.size(0);
    if (weight.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && rows <= float32_kernel_rows_) {
      torch::Tensor out = scratch(slot, rows, out_features, x.options());
      linear_impl<float, float>(x.data_ptr<float>(), weight.data_ptr<float>(),
                                bias.has_value() ? bias->data_ptr<float>() : nullptr, out.data_ptr<float>(), rows,
                                out_features, in_features);
      return out;
    }
    if (weight.scalar_type() != at::kBFloat16) return at::linear(x, weight, bias);
    if (rows <= small_batch_rows_) {
      torch::Tensor out = scratch(slot, rows, out_features, x.options());
      const BF16* b = bias.has_value() ? bias->data_ptr<BF16>() : nullptr;
      if (x.scalar_type() == at::kBFloat16)
        linear_impl<BF16, BF16>(x.data_ptr<BF16>(), weight.data_ptr<BF16>(), b, out.data_ptr<BF16>(), rows,
                                out_features, in_features);
      else
        linear_impl<float, BF16>(x.data_ptr<float>(), weight.data_ptr<BF16>(), b, out.data_ptr<float>(), rows,
                                 out_features, in_features);
      return out;
    }
    if (rows <= bf16_dot_rows_ && x.scalar_type() == at::kBFloat16) {
      torch::Tensor out = scratch(slot, rows, out_features, x.options());
      linear_bf16_dot(x.data_ptr<BF16>(), weight.data_ptr<BF16>(), bias.has_value() ? bias->data_ptr<BF16>() : nullptr,
                      out.data_ptr<BF16>(), rows, out_features, in_features);
      return out;
    }
    if (native_bf16_) return at::linear(x, weight, bias);
    if (widen_buffer_.numel() < weight.numel()) widen_buffer_ = torch::empty({weight.numel()}, x.options().dtype(at::kFloat));
    torch::Tensor wide = widen_buffer_.narrow(0, 0, weight.numel()).view(weight.sizes());
    wide.copy_(weight);
    c10::optional<torch::Tensor> wide_bias;
    if (bias.has_value()) wide_bias = bias->to(at::kFloat);
    return at::linear(x.to(at::kFloat), wide, wide_bias).to(x.scalar_type());
  }

  // SiLU(gate) * up of a [rows, 2 * inter] gate|up projection, as MLP.forward computes it.
  torch::Tensor silu_mul(const torch::Tensor& gate_up) {
    const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
    if (gate_up.scalar_type() == at::kBFloat16 || rows <= fused_silu_max_rows_) {
      torch::Tensor out = scratch(Slot::kSiluMul, rows, inter, gate_up.options());
      if (gate_up.scalar_type() == at::kBFloat16)
        silu_mul_impl<BF16>(gate_up.data_ptr<BF16>(), out.data_ptr<BF16>(), rows, inter);
      else
        silu_mul_impl<float>(gate_up.data_ptr<float>(), out.data_ptr<float>(), rows, inter);
      return out;
    }
    return at::silu(gate_up.narrow(1, 0, inter)) * gate_up.narrow(1, inter, inter);
  }

  // Qwen3's per-head RMSNorm of q (or k), in place on `heads` heads of each qkv row starting
  // at column `first`. One token: its heads are one contiguous run, which the Python path
  // normalises with the rms_norm kernel; more tokens: a strided view, which it normalises
  // with torch ops. Both are mirrored so the rounding is the same.
  template <typename T>
  void head_norm(torch::Tensor& qkv, int64_t first, int64_t heads, const torch::Tensor& weight) {
    const int64_t tokens = qkv.size(0);
    if (tokens == 1) {
      T* start = qkv.data_ptr<T>() + first;
      rms_norm_impl<T>(start, nullptr, weight.data_ptr<T>(), start, heads, head_dim_, static_cast<float>(eps_));
      return;
    }
    torch::Tensor view = qkv.narrow(1, first, heads * head_dim_).view({tokens, heads, head_dim_});
    torch::Tensor x = view.to(at::kFloat);
    x = x * at::rsqrt(x.pow(2).mean(-1, true) + eps_);
    view.copy_(weight * x.to(view.scalar_type()));
  }

  int64_t num_heads_, num_kv_heads_, head_dim_;
  double eps_, scale_;
  torch::Tensor final_norm_;
  int64_t small_batch_rows_, float32_kernel_rows_;
  bool native_bf16_;
  int64_t fused_silu_max_rows_, bf16_dot_rows_;
  std::vector<DecodeLayer> layers_;
  std::vector<torch::Tensor> key_caches_, value_caches_, key_scales_, value_scales_;
  torch::Tensor widen_buffer_;
  std::array<torch::Tensor, static_cast<size_t>(Slot::kCount)> scratch_;
};

}  // namespace fitserve_cpu
