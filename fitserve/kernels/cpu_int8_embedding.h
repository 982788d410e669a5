// Embedding lookup into int8 rows (fitserve/layers/embedding.py's Int8Embedding): the rows of
// the given token ids, each code times its row's scale, rounded once to the output dtype.
//
// Why: the matrix of a tied w8 LM head is held in the w8 lanes layout (cpu_quant_lanes_layout.h),
// where a row's bytes lie 4 at a time, 4 * R bytes apart. PyTorch gathers them through an index
// tensor of [tokens, hidden] int64 built by ~10 ops: 0.27 ms of a 8.5 ms single-stream step of
// Qwen2.5-0.5B in w4 (2-core Zen 4), during which the weights' stream stands still. Here it is
// one pass over the bytes it returns.

#pragma once

#include "cpu_quant_lanes_layout.h"

namespace fitserve_cpu {

// codes int8 [V, H] (row-major, or the w8 lanes layout with `lanes`), scales float32 [V],
// ids int64 or int32 of any shape -> [*ids.shape, H] in `dtype` (float32, bfloat16 or float16), each
// value float(code) * scale as PyTorch computes it, then one rounding to `dtype`.
inline torch::Tensor int8_embedding_rows(const torch::Tensor& codes, const torch::Tensor& scales,
                                         const torch::Tensor& ids, bool lanes, at::ScalarType dtype) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous() && codes.device().is_cpu(),
              "int8_embedding_rows: codes must be a contiguous CPU int8 matrix [vocab, hidden]");
  const int64_t vocab = codes.size(0), hidden = codes.size(1);
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == vocab && scales.scalar_type() == at::kFloat &&
              scales.is_contiguous(), "int8_embedding_rows: scales must be float32 [vocab]");
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
              "int8_embedding_rows: token ids must be int64 or int32");
  TORCH_CHECK(!lanes || W8Lanes::fits(hidden), "int8_embedding_rows: the lanes layout needs hidden % 4 == 0");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "int8_embedding_rows: dtype must be float32, bfloat16 or float16");
  const torch::Tensor flat_ids = ids.to(at::kLong).contiguous().view(-1);
  const int64_t tokens = flat_ids.numel();
  const int64_t* id = flat_ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(id[t] >= 0 && id[t] < vocab, "int8_embedding_rows: token id ", id[t], " outside the vocabulary of ",
                vocab);
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(hidden);
  torch::Tensor out = torch::empty(shape, codes.options().dtype(dtype));
  const int8_t* code = codes.data_ptr<int8_t>();
  const float* scale = scales.data_ptr<float>();
  const W8Lanes layout(vocab, hidden);
  auto fill = [&](auto* typed_out) {
    using T = std::remove_pointer_t<decltype(typed_out)>;
    at::parallel_for(0, tokens, 16, [&](int64_t first, int64_t last) {
      for (int64_t t = first; t < last; ++t) {
        const int64_t n = id[t];
        const float s = scale[n];
        T* row = typed_out + t * hidden;
        if (!lanes) {
          const int8_t* source = code + n * hidden;
          for (int64_t k = 0; k < hidden; ++k) row[k] = static_cast<T>(static_cast<float>(source[k]) * s);
          continue;
        }
        // Row n's 4-byte words: one per step of 4 columns, 4 * R bytes apart (R: its block's rows).
        const int64_t stride = 4 * layout.block_rows(n / kLaneRows);
        const int8_t* word = code + layout.code_byte(n, 0);
        for (int64_t k = 0; k < hidden; k += 4, word += stride)
          for (int j = 0; j < 4; ++j) row[k + j] = static_cast<T>(static_cast<float>(word[j]) * s);
      }
    });
  };
  if (dtype == at::kFloat) fill(out.data_ptr<float>());
  else if (dtype == at::kBFloat16) fill(out.data_ptr<BF16>());
  else fill(out.data_ptr<at::Half>());
  return out;
}

}  // namespace fitserve_cpu
