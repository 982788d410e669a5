// Tensor-level CPU ops for fitserve (fitserve/kernels/cpu.py builds this file on first use):
// argument checks and dtype dispatch around the kernels of cpu_kernels.h, plus the fused
// decode stack of cpu_decode_stack.h, exposed to Python.

#include "cpu_kernels.h"
#include "cpu_argmax.h"
#include "cpu_bf16_gemm.h"
#include "cpu_decode_attention.h"
#include "cpu_decode_stack.h"
#include "cpu_int8_embedding.h"
#include "cpu_prefill_attention.h"
#include "cpu_prefill_attention_avx2.h"
#include "cpu_quant_linear.h"
#include "cpu_bitstack_linear.h"

namespace fitserve_cpu {

torch::Tensor linear_small_batch(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "x [M, K] and weight [N, K]");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "contiguous x and weight");
  TORCH_CHECK(x.size(1) == weight.size(1), "x and weight disagree on K");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto out = torch::empty({M, N}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == weight.scalar_type());
  auto run = [&](auto* x_ptr, auto* w_ptr) {
    using XT = std::remove_pointer_t<decltype(x_ptr)>;
    using WT = std::remove_pointer_t<decltype(w_ptr)>;
    const WT* b = has_bias ? bias->data_ptr<WT>() : nullptr;
    linear_impl<XT, WT>(x_ptr, w_ptr, b, out.data_ptr<XT>(), M, N, K);
  };
  const auto xt = x.scalar_type(), wt = weight.scalar_type();
  if (xt == at::kBFloat16 && wt == at::kBFloat16) run(x.data_ptr<BF16>(), weight.data_ptr<BF16>());
  else if (xt == at::kFloat && wt == at::kBFloat16) run(x.data_ptr<float>(), weight.data_ptr<BF16>());
  else if (xt == at::kFloat && wt == at::kFloat) run(x.data_ptr<float>(), weight.data_ptr<float>());
  else TORCH_CHECK(false, "linear_small_batch: unsupported dtypes");
  return out;
}

// bf16 x [M, K] against bf16 W [N, K] with vdpbf16ps (cpu_bf16_gemm.h), for a few decode rows.
torch::Tensor linear_bf16_dot(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "linear_bf16_dot needs a CPU with AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "x [M, K] and weight [N, K]");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "contiguous x and weight");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "bf16 x and weight");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) TORCH_CHECK(bias->is_contiguous() && bias->scalar_type() == at::kBFloat16 && bias->numel() == weight.size(0));
  auto out = torch::empty({x.size(0), weight.size(0)}, x.options());
  linear_bf16_dot(x.data_ptr<BF16>(), weight.data_ptr<BF16>(), has_bias ? bias->data_ptr<BF16>() : nullptr,
                  out.data_ptr<BF16>(), x.size(0), weight.size(0), x.size(1));
  return out;
}

// The scales of an int8 cache [num_blocks, block_size, Hkv, D]: float32 [num_blocks, block_size,
// Hkv] each, contiguous; none for a float cache.
KVScales kv_scales_of(const torch::Tensor& key_cache, const c10::optional<torch::Tensor>& key_scales,
                      const c10::optional<torch::Tensor>& value_scales) {
  const bool int8 = key_cache.scalar_type() == at::kChar;
  const bool given = key_scales.has_value() && key_scales->defined() && value_scales.has_value() && value_scales->defined();
  TORCH_CHECK(int8 == given, "an int8 KV cache comes with key and value scales, a float one without");
  if (!int8) return {};
  for (const auto* scales : {&*key_scales, &*value_scales})
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->is_contiguous() && scales->dim() == 3 &&
                scales->sizes() == key_cache.sizes().slice(0, 3), "KV scales: contiguous float32 [blocks, block_size, Hkv]");
  return {key_scales->data_ptr<float>(), value_scales->data_ptr<float>()};
}

// query [T, Hq, D]; caches [num_blocks, block_size, Hkv, D] in the query's dtype, or int8 with
// their scales; block_tables [S, max_blocks] int32; seq_lens [S] int32; query_rows [S] int64
// (the query row of each sequence); out [T, Hq, D].
void paged_decode_attention(torch::Tensor query, torch::Tensor key_cache, torch::Tensor value_cache,
                            torch::Tensor block_tables, torch::Tensor seq_lens, torch::Tensor query_rows,
                            torch::Tensor out, double scale, c10::optional<torch::Tensor> key_scales,
                            c10::optional<torch::Tensor> value_scales) {
  TORCH_CHECK(query.is_contiguous() && out.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous());
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
              query_rows.scalar_type() == at::kLong);
  const KVScales scales = kv_scales_of(key_cache, key_scales, value_scales);
  TORCH_CHECK((scales || query.scalar_type() == key_cache.scalar_type()) && out.scalar_type() == query.scalar_type() &&
              value_cache.scalar_type() == key_cache.scalar_type(), "paged_decode_attention: dtypes");
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  auto rows = query_rows.contiguous();
  const int64_t num_seqs = lens.size(0);
  const int64_t num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = key_cache.size(1), num_kv_heads = key_cache.size(2);
  TORCH_CHECK(num_heads % num_kv_heads == 0);
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto attend = [&](auto* key_data, auto* value_data) {
      decode_attention_impl(query.data_ptr<T>(), key_data, value_data, tables.data_ptr<int32_t>(),
                            lens.data_ptr<int32_t>(), rows.data_ptr<int64_t>(), out.data_ptr<T>(), num_seqs, num_heads,
                            num_kv_heads, head_dim, block_size, tables.size(1), num_heads * head_dim,
                            static_cast<float>(scale), scales);
    };
    if (scales) attend(key_cache.data_ptr<int8_t>(), value_cache.data_ptr<int8_t>());
    else attend(key_cache.data_ptr<T>(), value_cache.data_ptr<T>());
  };
  if (query.scalar_type() == at::kFloat) run(static_cast<float*>(nullptr));
  else if (query.scalar_type() == at::kBFloat16) run(static_cast<BF16*>(nullptr));
  else TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16");
}

// x [rows, width] float32 or bfloat16 -> [rows] int64: torch.max(x, -1).indices.
torch::Tensor argmax_rows(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() && x.size(1) > 0,
              "argmax_rows: a contiguous [rows, width] CPU tensor with width > 0");
  auto out = torch::empty({x.size(0)}, x.options().dtype(at::kLong));
  if (x.scalar_type() == at::kFloat)
    argmax_rows_impl<float>(x.data_ptr<float>(), x.size(0), x.size(1), out.data_ptr<int64_t>());
  else if (x.scalar_type() == at::kBFloat16)
    argmax_rows_impl<BF16>(x.data_ptr<BF16>(), x.size(0), x.size(1), out.data_ptr<int64_t>());
  else TORCH_CHECK(false, "argmax_rows: float32 or bfloat16");
  return out;
}

std::vector<torch::Tensor> rms_norm(torch::Tensor x, torch::Tensor weight, double eps,
                                    c10::optional<torch::Tensor> residual) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && x.scalar_type() == weight.scalar_type());
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  auto out = torch::empty_like(x);
  const bool add = residual.has_value() && residual->defined();
  if (add) TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type());
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rms_norm_impl<T>(x.data_ptr<T>(), add ? residual->data_ptr<T>() : nullptr, weight.data_ptr<T>(),
                     out.data_ptr<T>(), rows, hidden, static_cast<float>(eps));
  };
  if (x.scalar_type() == at::kFloat) run(static_cast<float*>(nullptr));
  else if (x.scalar_type() == at::kBFloat16) run(static_cast<BF16*>(nullptr));
  else TORCH_CHECK(false, "rms_norm: float32 or bfloat16");
  return {out, add ? *residual : x};
}

void rotary_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t num_heads, int64_t head_dim) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && cos.is_contiguous() && sin.is_contiguous());
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && head_dim % 2 == 0 && cos.size(-1) == head_dim);
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rotary_impl<T>(qkv.data_ptr<T>(), cos.data_ptr<T>(), sin.data_ptr<T>(), qkv.size(0), qkv.stride(0), num_heads,
                   head_dim);
  };
  if (qkv.scalar_type() == at::kFloat) run(static_cast<float*>(nullptr));
  else if (qkv.scalar_type() == at::kBFloat16) run(static_cast<BF16*>(nullptr));
  else TORCH_CHECK(false, "rotary_: float32 or bfloat16");
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.size(-1) % 2 == 0);
  const int64_t inter = gate_up.size(-1) / 2, tokens = gate_up.numel() / gate_up.size(-1);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = inter;
  auto out = torch::empty(sizes, gate_up.options());
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    silu_mul_impl<T>(gate_up.data_ptr<T>(), out.data_ptr<T>(), tokens, inter);
  };
  if (gate_up.scalar_type() == at::kFloat) run(static_cast<float*>(nullptr));
  else if (gate_up.scalar_type() == at::kBFloat16) run(static_cast<BF16*>(nullptr));
  else TORCH_CHECK(false, "silu_mul: float32 or bfloat16");
  return out;
}

// The layout both prefill attention kernels read: query/out [Tq, H, D] and keys/values
// [Tk, Hk, D], each head's D elements contiguous (query rows may be strided), Tq <= Tk, whole
// groups of query heads per KV head, out contiguous.
void check_prefill_attention_arguments(const char* name, const torch::Tensor& query, const torch::Tensor& keys,
                                       const torch::Tensor& values, const torch::Tensor& out) {
  TORCH_CHECK(query.dim() == 3 && keys.dim() == 3 && out.sizes() == query.sizes() && values.sizes() == keys.sizes(),
              name, ": query/out [Tq, H, D], keys/values [Tk, Hk, D]");
  const int64_t D = query.size(2);
  TORCH_CHECK(keys.size(2) == D && query.size(1) % keys.size(1) == 0 && query.size(0) <= keys.size(0) &&
              query.size(0) > 0, name, ": head layout or lengths");
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == D && keys.stride(2) == 1 && keys.stride(1) == D &&
              values.stride(2) == 1 && values.stride(1) == D && out.is_contiguous(), name, ": strides");
}

// query [Tq, H, D] (rows may be strided, e.g. the q part of qkv rows); keys and values
// [Tk, Hk, D] with Tk >= Tq: query row r sits at position Tk - Tq + r; out [Tq, H, D].
void prefill_attention(torch::Tensor query, torch::Tensor keys, torch::Tensor values, torch::Tensor out,
                       double scale) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "prefill_attention needs a CPU with AVX512-BF16");
  check_prefill_attention_arguments("prefill_attention", query, keys, values, out);
  for (const auto* t : {&query, &keys, &values, &out})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16, "prefill_attention: bfloat16 tensors");
  TORCH_CHECK(values.strides() == keys.strides(), "prefill_attention: strides");
  const int64_t query_len = query.size(0), num_heads = query.size(1), D = query.size(2);
  const int64_t context_len = keys.size(0), num_kv_heads = keys.size(1);
  const int64_t blocks = (context_len + kKeyBlock - 1) / kKeyBlock;
  auto packed_keys = torch::empty({num_kv_heads * blocks * kKeyBlock * D}, keys.options());
  auto packed_values = torch::empty_like(packed_keys);
  auto run = [&](auto pack, auto impl) {
    pack(keys.data_ptr<BF16>(), values.data_ptr<BF16>(), keys.stride(0), context_len, num_kv_heads, blocks,
         packed_keys.data_ptr<BF16>(), packed_values.data_ptr<BF16>());
    impl(query.data_ptr<BF16>(), query.stride(0), packed_keys.data_ptr<BF16>(), packed_values.data_ptr<BF16>(),
         out.data_ptr<BF16>(), out.stride(0), query_len, context_len, num_heads, num_kv_heads, blocks,
         static_cast<float>(scale), nullptr, nullptr);
  };
  if (D == 32) run(pack_context<32>, prefill_attention_impl<32>);
  else if (D == 64) run(pack_context<64>, prefill_attention_impl<64>);
  else if (D == 128) run(pack_context<128>, prefill_attention_impl<128>);
  else TORCH_CHECK(false, "prefill_attention: head_dim 32, 64 or 128");
}

// The same contract with AVX2 FMA in float32 arithmetic (any x86-64 CPU the kernels build
// for); the four tensors are all bfloat16 or all float32.
void prefill_attention_avx2(torch::Tensor query, torch::Tensor keys, torch::Tensor values, torch::Tensor out,
                            double scale) {
  check_prefill_attention_arguments("prefill_attention_avx2", query, keys, values, out);
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "prefill_attention_avx2: bfloat16 or float32 tensors");
  for (const auto* t : {&keys, &values, &out})
    TORCH_CHECK(t->scalar_type() == dtype, "prefill_attention_avx2: all tensors in one dtype");
  const int64_t query_len = query.size(0), num_heads = query.size(1), D = query.size(2);
  const int64_t context_len = keys.size(0), num_kv_heads = keys.size(1);
  const int64_t blocks = (context_len + kAvx2KeyBlock - 1) / kAvx2KeyBlock;
  auto packed_keys = torch::empty({num_kv_heads * blocks * kAvx2KeyBlock * D}, keys.options().dtype(at::kFloat));
  auto packed_values = torch::empty_like(packed_keys);
  auto run = [&](auto* typed, auto impl) {
    using T = std::remove_pointer_t<decltype(typed)>;
    pack_keys_transposed<T>(keys.data_ptr<T>(), keys.stride(0), context_len, num_kv_heads, D, blocks,
                            packed_keys.data_ptr<float>());
    pack_values_float<T>(values.data_ptr<T>(), values.stride(0), context_len, num_kv_heads, D,
                         blocks * kAvx2KeyBlock, packed_values.data_ptr<float>());
    impl(query.data_ptr<T>(), query.stride(0), packed_keys.data_ptr<float>(), packed_values.data_ptr<float>(),
         out.data_ptr<T>(), out.stride(0), query_len, context_len, num_heads, num_kv_heads, blocks,
         static_cast<float>(scale), nullptr, nullptr);
  };
  auto dispatch = [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    if (D == 32) run(typed, prefill_attention_avx2_impl<32, T>);
    else if (D == 64) run(typed, prefill_attention_avx2_impl<64, T>);
    else if (D == 128) run(typed, prefill_attention_avx2_impl<128, T>);
    else TORCH_CHECK(false, "prefill_attention_avx2: head_dim 32, 64 or 128");
  };
  if (dtype == at::kFloat) dispatch(static_cast<float*>(nullptr));
  else dispatch(static_cast<BF16*>(nullptr));
}

// The same contract over an int8 context: keys/values [Tk, Hk, D] int8 (contiguous, a
// sequence's int8 blocks as stored) with their float32 scales [Tk, Hk]; query/out bfloat16 or
// float32. bf16 queries on AVX512-BF16 CPUs run prefill_attention's loop (unless `avx512` is
// false: tests reach the other loop that way), the rest the AVX2 one; both on the integers,
// the scales applied in their arithmetic.
void prefill_attention_int8(torch::Tensor query, torch::Tensor keys, torch::Tensor values, torch::Tensor key_scales,
                            torch::Tensor value_scales, torch::Tensor out, double scale, bool avx512) {
  check_prefill_attention_arguments("prefill_attention_int8", query, keys, values, out);
  TORCH_CHECK(keys.scalar_type() == at::kChar && values.scalar_type() == at::kChar && keys.is_contiguous() &&
              values.is_contiguous(), "prefill_attention_int8: contiguous int8 keys and values");
  for (const auto* scales : {&key_scales, &value_scales})
    TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->is_contiguous() &&
                scales->sizes() == keys.sizes().slice(0, 2), "prefill_attention_int8: float32 scales [Tk, Hk]");
  const auto dtype = query.scalar_type();
  TORCH_CHECK((dtype == at::kBFloat16 || dtype == at::kFloat) && out.scalar_type() == dtype,
              "prefill_attention_int8: bfloat16 or float32 query and out");
  const int64_t query_len = query.size(0), num_heads = query.size(1), D = query.size(2);
  const int64_t context_len = keys.size(0), num_kv_heads = keys.size(1);
  TORCH_CHECK(D == 32 || D == 64 || D == 128, "prefill_attention_int8: head_dim 32, 64 or 128");
  const KVScales scales{key_scales.data_ptr<float>(), value_scales.data_ptr<float>()};
  if (dtype == at::kBFloat16 && avx512 && cpu_has_avx512_bf16()) {
    const int64_t blocks = (context_len + kKeyBlock - 1) / kKeyBlock, padded = blocks * kKeyBlock;
    auto packed_keys = torch::empty({num_kv_heads * padded * D}, query.options());
    auto packed_values = torch::empty_like(packed_keys);
    auto packed_scales = torch::empty({2, num_kv_heads * padded}, query.options().dtype(at::kFloat));
    float* key_scale_rows = packed_scales[0].data_ptr<float>();
    float* value_scale_rows = packed_scales[1].data_ptr<float>();
    auto run = [&](auto pack, auto impl) {
      pack(keys.data_ptr<int8_t>(), values.data_ptr<int8_t>(), scales, context_len, num_kv_heads, blocks,
           packed_keys.data_ptr<BF16>(), packed_values.data_ptr<BF16>(), key_scale_rows, value_scale_rows);
      impl(query.data_ptr<BF16>(), query.stride(0), packed_keys.data_ptr<BF16>(), packed_values.data_ptr<BF16>(),
           out.data_ptr<BF16>(), out.stride(0), query_len, context_len, num_heads, num_kv_heads, blocks,
           static_cast<float>(scale), key_scale_rows, value_scale_rows);
    };
    if (D == 32) run(pack_context_int8<32>, prefill_attention_impl<32>);
    else if (D == 64) run(pack_context_int8<64>, prefill_attention_impl<64>);
    else run(pack_context_int8<128>, prefill_attention_impl<128>);
    return;
  }
  const int64_t blocks = (context_len + kAvx2KeyBlock - 1) / kAvx2KeyBlock, padded = blocks * kAvx2KeyBlock;
  auto packed_keys = torch::empty({num_kv_heads * padded * D}, query.options().dtype(at::kFloat));
  auto packed_values = torch::empty_like(packed_keys);
  auto packed_scales = torch::empty({2, num_kv_heads * padded}, packed_keys.options());
  float* key_scale_rows = packed_scales[0].data_ptr<float>();
  float* value_scale_rows = packed_scales[1].data_ptr<float>();
  pack_keys_transposed<int8_t>(keys.data_ptr<int8_t>(), keys.stride(0), context_len, num_kv_heads, D, blocks,
                               packed_keys.data_ptr<float>());
  pack_values_float<int8_t>(values.data_ptr<int8_t>(), values.stride(0), context_len, num_kv_heads, D, padded,
                            packed_values.data_ptr<float>());
  transpose_scales(scales.key, context_len, num_kv_heads, padded, key_scale_rows);
  transpose_scales(scales.value, context_len, num_kv_heads, padded, value_scale_rows);
  auto run = [&](auto* typed, auto impl) {
    using T = std::remove_pointer_t<decltype(typed)>;
    impl(query.data_ptr<T>(), query.stride(0), packed_keys.data_ptr<float>(), packed_values.data_ptr<float>(),
         out.data_ptr<T>(), out.stride(0), query_len, context_len, num_heads, num_kv_heads, blocks,
         static_cast<float>(scale), key_scale_rows, value_scale_rows);
  };
  auto dispatch = [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    if (D == 32) run(typed, prefill_attention_avx2_impl<32, T>);
    else if (D == 64) run(typed, prefill_attention_avx2_impl<64, T>);
    else run(typed, prefill_attention_avx2_impl<128, T>);
  };
  if (dtype == at::kFloat) dispatch(static_cast<float*>(nullptr));
  else dispatch(static_cast<BF16*>(nullptr));
}

}  // namespace fitserve_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fitserve_cpu;
  // The GIL is released while a kernel runs: it touches no Python object, and a server's
  // other threads (HTTP, streaming) get to run during a step.
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("linear_small_batch", &linear_small_batch, "x W^T + b for a few rows of x", release);
  m.def("linear_bf16_dot", static_cast<torch::Tensor (*)(torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>)>(&linear_bf16_dot),
        "bf16 x W^T + b for a few rows with vdpbf16ps (AVX512-BF16)", release);
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache (float or int8)",
        py::arg("query"), py::arg("key_cache"), py::arg("value_cache"), py::arg("block_tables"), py::arg("seq_lens"),
        py::arg("query_rows"), py::arg("out"), py::arg("scale"), py::arg("key_scales") = py::none(),
        py::arg("value_scales") = py::none(), release);
  m.def("int8_embedding_rows", &int8_embedding_rows, py::arg("codes"), py::arg("scales"), py::arg("ids"),
        py::arg("lanes"), py::arg("dtype"), "rows of an int8 embedding (row-major or w8 lanes layout), dequantized",
        release);
  m.def("argmax_rows", &argmax_rows, "index of each row's maximum, as torch.max(x, -1).indices", release);
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally after adding a residual (returned updated)", release);
  m.def("rotary_", &rotary_, "rotate-half rope in place on the first heads of each row", release);
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate|up projection", release);
  m.def("prefill_attention", &prefill_attention, "causal bf16 attention of a prefill (AVX512-BF16)", release);
  m.def("prefill_attention_avx2", &prefill_attention_avx2, "causal attention of a prefill (AVX2 FMA, float32 arithmetic)",
        release);
  m.def("prefill_attention_int8", &prefill_attention_int8,
        "causal attention of a prefill over an int8 context with per-token scales (AVX512-BF16 or AVX2)",
        py::arg("query"), py::arg("keys"), py::arg("values"), py::arg("key_scales"), py::arg("value_scales"),
        py::arg("out"), py::arg("scale"), py::arg("avx512") = true, release);
  m.def("has_avx512_bf16", &cpu_has_avx512_bf16, "whether this CPU has AVX512-BF16");
  py::class_<DecodeStack>(m, "DecodeStack", "a model's decoder layers for one-token-per-sequence steps")
      .def(py::init<int64_t, int64_t, int64_t, double, double, torch::Tensor, int64_t, int64_t, bool, int64_t, int64_t>(),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("scale"),
           py::arg("final_norm"), py::arg("small_batch_rows"), py::arg("float32_kernel_rows"), py::arg("native_bf16"),
           py::arg("fused_silu_max_rows"), py::arg("bf16_dot_rows"))
      .def("add_layer", &DecodeStack::add_layer)
      .def("add_quantized_layer", &DecodeStack::add_quantized_layer)
      .def("set_kv_caches", &DecodeStack::set_kv_caches)
      .def("forward", &DecodeStack::forward, release)
      .def("forward_tokens", &DecodeStack::forward_tokens, release);
  // Held by shared_ptr so that the fused decode stack can share a layer with Python.
  py::class_<QuantLinear, std::shared_ptr<QuantLinear>>(
      m, "QuantLinear", "a linear layer with w8/w4 weight parts (cpu_quant_linear.h)")
      .def(py::init<int64_t, int64_t, c10::optional<torch::Tensor>, const std::string&, int64_t, bool>(),
           py::arg("in_features"), py::arg("out_features"), py::arg("bias") = py::none(), py::arg("isa") = "auto",
           py::arg("decode_max_rows") = kQuantDecodeMaxRowsAuto, py::arg("lanes") = true)
      .def("add_w8", &QuantLinear::add_w8, py::arg("qweight"), py::arg("scales"), py::arg("out_rows") = py::none(),
           py::arg("layout") = "rows", py::arg("in_place") = false)
      .def("add_w4", &QuantLinear::add_w4, py::arg("qweight"), py::arg("scales"), py::arg("zeros"),
           py::arg("group_size"), py::arg("out_rows") = py::none(), py::arg("layout") = "rows",
           py::arg("in_place") = false)
      .def("forward", &QuantLinear::forward, py::arg("x"), release)
      .def("forward_into", &QuantLinear::forward_into, py::arg("x"), py::arg("reuse"), release)
      .def("__call__", &QuantLinear::forward, py::arg("x"), release)
      .def("bytes", &QuantLinear::bytes)
      .def("part_isas", &QuantLinear::part_isas)
      .def("part_layouts", &QuantLinear::part_layouts)
      .def_property_readonly("isa", &QuantLinear::isa)
      .def_property_readonly("in_features", &QuantLinear::in_features)
      .def_property_readonly("out_features", &QuantLinear::out_features)
      .def_property_readonly("decode_max_rows", &QuantLinear::decode_max_rows);
  m.def("has_avx512_vnni", &cpu_has_avx512_vnni, "whether this CPU has AVX-512 VNNI");
  m.def("has_amx_int8", &cpu_has_amx_int8, "whether this CPU has AMX-INT8 and this process may use its tiles");
  m.def("set_scalar_dequantize", [](bool on) { force_scalar_dequantize.store(on); },
        "tests: the integer formats' dequantizing path in scalar loops, as on CPUs without AVX-512 (BF16)");
  m.def("dpbusd_rate", &dpbusd_rate, "vpdpbusd per second on all threads (register-only loop; 0 without VNNI)",
        py::arg("iterations") = 2000000, release);
  py::class_<BitStackLinear, std::shared_ptr<BitStackLinear>>(
      m, "BitStackLinear", "a linear layer of BitStack sign/rank-r blocks (cpu_bitstack_linear.h)")
      .def(py::init<int64_t, int64_t, c10::optional<torch::Tensor>, const std::string&, int64_t, int64_t>(),
           py::arg("in_features"), py::arg("out_features"), py::arg("bias") = py::none(), py::arg("isa") = "auto",
           py::arg("decode_max_rows") = kBitStackDecodeMaxRows, py::arg("small_rank_max") = kBitStackSmallRankMax)
      .def("part_kernels", &BitStackLinear::part_kernels)
      .def("add_part", &BitStackLinear::add_part, py::arg("rows"), py::arg("rank"))
      .def("append_block", &BitStackLinear::append_block, py::arg("part"), py::arg("signs"), py::arg("u"), py::arg("v"),
           release)
      .def("truncate", &BitStackLinear::truncate, py::arg("part"), py::arg("blocks"), release)
      .def("set_active_blocks", &BitStackLinear::set_active_blocks, py::arg("part"), py::arg("blocks"), release)
      .def("stored_blocks", &BitStackLinear::stored_blocks, py::arg("part"))
      .def("active_blocks", &BitStackLinear::active_blocks, py::arg("part"))
      .def("forward", &BitStackLinear::forward, py::arg("x"), release)
      .def("__call__", &BitStackLinear::forward, py::arg("x"), release)
      .def("bytes", &BitStackLinear::bytes)
      .def_property_readonly("num_parts", &BitStackLinear::num_parts)
      .def_property_readonly("isa", &BitStackLinear::isa)
      .def_property_readonly("in_features", &BitStackLinear::in_features)
      .def_property_readonly("out_features", &BitStackLinear::out_features)
      .def_property_readonly("decode_max_rows", &BitStackLinear::decode_max_rows)
      .def_property_readonly("small_rank_max", &BitStackLinear::small_rank_max);
}
