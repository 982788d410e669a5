// Causal prefill attention with AVX2 FMA in float32 arithmetic, for bf16 (or float32) tensors:
// flash-style, an online softmax over groups of 128 keys, so nothing of size context x context
// is materialised.
//
// Why: a CPU without bf16 arithmetic (AVX2 parts such as AMD Zen 3) had to widen a bf16
// prefill's q, k and v to float32 copies and run torch's fused attention on them. That kernel
// works in 256-query x 512-key blocks and skips only blocks wholly above the diagonal, so a
// 1024-token causal prompt computes half again as many scores as it needs; on two Zen 3 cores
// it made ~52 useful GFLOP/s, and attention took ~10% of a Qwen2.5-0.5B prefill. Here tiles
// of 6 query rows follow the diagonal in blocks of 16 keys, bf16 inputs are widened once
// while packing and the output is rounded once to the tensors' dtype.
//
// Layout: each KV head's keys are packed transposed, [block][D][16 keys], so a score tile is
// D broadcast-FMAs of a query element against two 8-key vectors; values are packed
// [token][D] in float32. Both are padded with zero keys to a whole block.
//
// Numerics: scores, softmax and both products in float32 (probabilities are not rounded),
// q scaled before the product; the output is rounded once to the dtype.
//
// An int8 context is packed as its integers in float32 (pack_* with T = int8_t), its scales
// per KV head and position beside it: the key scales multiply the scores, the value scales
// the probabilities after the running sum has taken them.

#pragma once

#include "cpu_kernels.h"

namespace fitserve_cpu {

constexpr int kAvx2KeyBlock = 16;  // keys per block: two 8-float vectors of scores per row
constexpr int kAvx2QueryRows = 6;  // rows per tile: 6 x 2 score accumulators, 6 x 2 output ones
constexpr int kAvx2KeyGroup = 128;  // keys per softmax step
constexpr int kAvx2TilesPerTask = 8;  // tiles that share each key group's loads

// keys [Tk, Hk, D] (token stride `stride`) -> packed[hk][block][D][16 keys], float32, zero-padded.
template <typename T>
void pack_keys_transposed(const T* keys, int64_t stride, int64_t tokens, int64_t kv_heads, int64_t D,
                          int64_t blocks, float* packed) {
  at::parallel_for(0, kv_heads * blocks, 16, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t head = task / blocks, block = task % blocks;
      float* dst = packed + task * D * kAvx2KeyBlock;
      for (int64_t j = 0; j < kAvx2KeyBlock; ++j) {
        const int64_t token = block * kAvx2KeyBlock + j;
        const T* src = keys + token * stride + head * D;
        for (int64_t d = 0; d < D; ++d) dst[d * kAvx2KeyBlock + j] = token < tokens ? to_float(src[d]) : 0.0f;
      }
    }
  });
}

// values [Tk, Hk, D] -> packed[hk][token][D], float32, zero-padded to `padded_tokens`.
template <typename T>
void pack_values_float(const T* values, int64_t stride, int64_t tokens, int64_t kv_heads, int64_t D,
                       int64_t padded_tokens, float* packed) {
  at::parallel_for(0, kv_heads * padded_tokens, 256, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t head = task / padded_tokens, token = task % padded_tokens;
      float* dst = packed + task * D;
      const T* src = values + token * stride + head * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = token < tokens ? to_float(src[d]) : 0.0f;
    }
  });
}

// The running state of kAvx2QueryRows consecutive query rows of one head: scaled queries,
// unnormalised output, and the online softmax's running max and sum.
template <int D>
struct QueryTile {
  alignas(32) float q[kAvx2QueryRows][D];
  alignas(32) float acc[kAvx2QueryRows][D];
  int64_t position[kAvx2QueryRows];
  float running_max[kAvx2QueryRows];
  float running_sum[kAvx2QueryRows];
  int64_t first_row;
  int64_t rows;

  // Rows past `rows` repeat the last real row (computed, not stored) so the tiles stay full.
  template <typename T>
  void start(const T* query, int64_t query_stride, int64_t head, int64_t first, int64_t count,
             int64_t context_offset, float scale) {
    first_row = first;
    rows = count;
    for (int r = 0; r < kAvx2QueryRows; ++r) {
      const int64_t row = first + std::min<int64_t>(r, count - 1);
      const T* src = query + row * query_stride + head * D;
      for (int d = 0; d < D; ++d) {
        q[r][d] = to_float(src[d]) * scale;
        acc[r][d] = 0.0f;
      }
      position[r] = context_offset + row;
      running_max[r] = -std::numeric_limits<float>::infinity();
      running_sum[r] = 0.0f;
    }
  }

  int64_t last_key() const { return position[kAvx2QueryRows - 1]; }

  template <typename T>
  void finish(int64_t head, T* out, int64_t out_stride) const {
    for (int r = 0; r < kAvx2QueryRows && r < rows; ++r) {
      const __m256 inverse = _mm256_set1_ps(1.0f / running_sum[r]);
      T* o = out + (first_row + r) * out_stride + head * D;
      for (int d = 0; d < D; d += 8) store8(o + d, _mm256_mul_ps(_mm256_load_ps(acc[r] + d), inverse));
    }
  }
};

// One tile against the keys [group_start, group_start + 16 * blocks): scores, the online
// softmax over all of them at once (its per-row scalar work spread over many keys), and the
// value product. Keys past a row's position are masked on the diagonal.
template <int D>
void attend_key_group(QueryTile<D>& tile, const float* keys_t, const float* values, int64_t group_start,
                      int blocks, const float* key_scales, const float* value_scales) {
  constexpr int R = kAvx2QueryRows, kChunks = D / 16;
  alignas(32) float p[R][kAvx2KeyGroup];
  const __m256 lanes_low = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 lanes_high = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
  const __m256 minus_infinity = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const bool diagonal = group_start + blocks * kAvx2KeyBlock > tile.position[0] + 1;  // a row misses some key
  for (int block = 0; block < blocks; ++block) {
    const float* keys = keys_t + (group_start / kAvx2KeyBlock + block) * D * kAvx2KeyBlock;
    __m256 scores[R][2];
    for (int r = 0; r < R; ++r) scores[r][0] = scores[r][1] = _mm256_setzero_ps();
    for (int d = 0; d < D; ++d) {
      const __m256 k_low = _mm256_load_ps(keys + d * kAvx2KeyBlock);
      const __m256 k_high = _mm256_load_ps(keys + d * kAvx2KeyBlock + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 q_d = _mm256_broadcast_ss(&tile.q[r][d]);
        scores[r][0] = _mm256_fmadd_ps(q_d, k_low, scores[r][0]);
        scores[r][1] = _mm256_fmadd_ps(q_d, k_high, scores[r][1]);
      }
    }
    if (key_scales) {
      const float* block_scales = key_scales + group_start + block * kAvx2KeyBlock;
      const __m256 scale_low = _mm256_loadu_ps(block_scales), scale_high = _mm256_loadu_ps(block_scales + 8);
      for (int r = 0; r < R; ++r) {
        scores[r][0] = _mm256_mul_ps(scores[r][0], scale_low);
        scores[r][1] = _mm256_mul_ps(scores[r][1], scale_high);
      }
    }
    for (int r = 0; r < R; ++r) {
      if (diagonal) {
        const __m256 visible =
            _mm256_set1_ps(static_cast<float>(tile.position[r] - group_start - block * kAvx2KeyBlock));
        scores[r][0] = _mm256_blendv_ps(minus_infinity, scores[r][0], _mm256_cmp_ps(lanes_low, visible, _CMP_LE_OQ));
        scores[r][1] = _mm256_blendv_ps(minus_infinity, scores[r][1], _mm256_cmp_ps(lanes_high, visible, _CMP_LE_OQ));
      }
      _mm256_store_ps(p[r] + block * kAvx2KeyBlock, scores[r][0]);
      _mm256_store_ps(p[r] + block * kAvx2KeyBlock + 8, scores[r][1]);
    }
  }
  const int keys_in_group = blocks * kAvx2KeyBlock;
  __m256 correction[R];
  for (int r = 0; r < R; ++r) {
    __m256 max_vec = minus_infinity;
    for (int k = 0; k < keys_in_group; k += 8) max_vec = _mm256_max_ps(max_vec, _mm256_load_ps(p[r] + k));
    const float new_max = std::max(tile.running_max[r], hmax(max_vec));
    const float factor = std::exp(tile.running_max[r] - new_max);
    const __m256 new_max_vec = _mm256_set1_ps(new_max);
    __m256 sum = _mm256_setzero_ps();
    for (int k = 0; k < keys_in_group; k += 8) {
      const __m256 s = _mm256_load_ps(p[r] + k);
      __m256 e = exp256(_mm256_sub_ps(s, new_max_vec));
      // exp256 clamps -inf to a tiny positive value; masked keys must weigh exactly 0.
      if (diagonal) e = _mm256_and_ps(e, _mm256_cmp_ps(s, minus_infinity, _CMP_NEQ_OQ));
      sum = _mm256_add_ps(sum, e);
      if (value_scales) e = _mm256_mul_ps(e, _mm256_loadu_ps(value_scales + group_start + k));
      _mm256_store_ps(p[r] + k, e);
    }
    tile.running_sum[r] = tile.running_sum[r] * factor + hsum(sum);
    tile.running_max[r] = new_max;
    correction[r] = _mm256_set1_ps(factor);
  }
  const float* group_values = values + group_start * D;
  for (int chunk = 0; chunk < kChunks; ++chunk) {
    __m256 o[R][2];
    for (int r = 0; r < R; ++r) {
      o[r][0] = _mm256_mul_ps(_mm256_load_ps(tile.acc[r] + chunk * 16), correction[r]);
      o[r][1] = _mm256_mul_ps(_mm256_load_ps(tile.acc[r] + chunk * 16 + 8), correction[r]);
    }
    for (int key = 0; key < keys_in_group; ++key) {
      const __m256 v_low = _mm256_loadu_ps(group_values + key * D + chunk * 16);
      const __m256 v_high = _mm256_loadu_ps(group_values + key * D + chunk * 16 + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 weight = _mm256_broadcast_ss(&p[r][key]);
        o[r][0] = _mm256_fmadd_ps(weight, v_low, o[r][0]);
        o[r][1] = _mm256_fmadd_ps(weight, v_high, o[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(tile.acc[r] + chunk * 16, o[r][0]);
      _mm256_store_ps(tile.acc[r] + chunk * 16 + 8, o[r][1]);
    }
  }
}

// kAvx2TilesPerTask tiles of one head (consecutive rows) against their causal context, key
// group by key group: each group's keys and values are read from memory once for all the
// tiles instead of once per tile (a KV head's packed keys and values outgrow the L2 cache
// past ~1k tokens).
template <int D, typename T>
void attend_rows_avx2(const T* query, int64_t query_stride, int64_t head, const float* keys_t,
                      const float* values, int64_t first_row, int64_t rows, int64_t context_offset, float scale,
                      T* out, int64_t out_stride, const float* key_scales, const float* value_scales) {
  QueryTile<D> tiles[kAvx2TilesPerTask];
  const int count = static_cast<int>((rows + kAvx2QueryRows - 1) / kAvx2QueryRows);
  for (int t = 0; t < count; ++t)
    tiles[t].start(query, query_stride, head, first_row + t * kAvx2QueryRows,
                   std::min<int64_t>(kAvx2QueryRows, rows - t * kAvx2QueryRows), context_offset, scale);
  const int64_t last_key = tiles[count - 1].last_key();
  for (int64_t group_start = 0; group_start <= last_key; group_start += kAvx2KeyGroup)
    for (int t = 0; t < count; ++t) {
      if (group_start > tiles[t].last_key()) continue;
      const int blocks = static_cast<int>(
          std::min<int64_t>(kAvx2KeyGroup / kAvx2KeyBlock, (tiles[t].last_key() - group_start) / kAvx2KeyBlock + 1));
      attend_key_group<D>(tiles[t], keys_t, values, group_start, blocks, key_scales, value_scales);
    }
  for (int t = 0; t < count; ++t) tiles[t].finish(head, out, out_stride);
}

// key_scales / value_scales: an int8 context's scales [Hk][key_blocks * 16], else null.
template <int D, typename T>
void prefill_attention_avx2_impl(const T* query, int64_t query_stride, const float* packed_keys,
                                 const float* packed_values, T* out, int64_t out_stride, int64_t query_len,
                                 int64_t context_len, int64_t num_heads, int64_t num_kv_heads, int64_t key_blocks,
                                 float scale, const float* key_scales, const float* value_scales) {
  const int64_t per_kv_head = key_blocks * kAvx2KeyBlock * D, padded = key_blocks * kAvx2KeyBlock;
  for_each_head_row_group(num_heads, num_kv_heads, query_len, kAvx2QueryRows * kAvx2TilesPerTask,
                          [&](int64_t head, int64_t kv_head, int64_t first_row, int64_t rows) {
                            attend_rows_avx2<D, T>(query, query_stride, head, packed_keys + kv_head * per_kv_head,
                                                   packed_values + kv_head * per_kv_head, first_row, rows,
                                                   context_len - query_len, scale, out, out_stride,
                                                   key_scales ? key_scales + kv_head * padded : nullptr,
                                                   value_scales ? value_scales + kv_head * padded : nullptr);
                          });
}

// An int8 context's scales [Tk, Hk] -> [Hk][padded], zero past Tk (prefill_attention_avx2_impl's layout).
inline void transpose_scales(const float* scales, int64_t tokens, int64_t kv_heads, int64_t padded, float* out) {
  for (int64_t h = 0; h < kv_heads; ++h)
    for (int64_t token = 0; token < padded; ++token)
      out[h * padded + token] = token < tokens ? scales[token * kv_heads + h] : 0.0f;
}

}  // namespace fitserve_cpu
