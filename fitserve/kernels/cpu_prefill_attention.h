// Causal prefill attention in bfloat16 with AVX512-BF16 dot products (flash-style: online
// softmax over blocks of 16 keys, nothing of size context x context is materialised).
//
// Why: on CPUs with AVX512-BF16 but no AMX (AMD Zen 4, Intel Cooper Lake), torch's fused CPU
// attention runs bf16 at ~85 GFLOP/s on two cores, a fifth of the bf16 matmul rate, and was
// 20% of a 1024-token prefill of Qwen2.5-0.5B. Here both products use vdpbf16ps (32
// multiply-adds of bf16 pairs per instruction, float32 accumulation): the keys are packed so
// one 512-bit load holds 16 keys x 2 dims, the values so one holds 16 dims x 2 keys, and a
// query pair (or a probability pair) is broadcast against them.
//
// Numerics: scores and the softmax are float32; probabilities are rounded to bf16 for the
// value product, as bf16 flash kernels do; the output is rounded once to bf16.

#pragma once

#include "cpu_kernels.h"

#include <cstring>

namespace fitserve_cpu {

constexpr int kKeyBlock = 16;  // keys per block: one float32 vector of scores

// exp for x <= 0 on 16 lanes: exp256 (cpu_kernels.h) on each half, the same polynomial.
FITSERVE_AVX512_BF16 inline __m512 exp512(__m512 x) {
  const __m256 low = exp256(_mm512_castps512_ps256(x));
  const __m256 high = exp256(_mm512_extractf32x8_ps(x, 1));
  return _mm512_insertf32x8(_mm512_castps256_ps512(low), high, 1);
}

// keys [Tk, Hk, D] (token stride `stride`) -> packed[hk][block][D/2][16 keys][2 dims], zero-padded.
inline void pack_keys(const BF16* keys, int64_t stride, int64_t tokens, int64_t kv_heads, int64_t D,
                      int64_t blocks, BF16* packed) {
  const BF16 zero = BF16(0.0f);
  for (int64_t h = 0; h < kv_heads; ++h)
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t j = 0; j < kKeyBlock; ++j) {
        const int64_t token = b * kKeyBlock + j;
        const BF16* src = keys + token * stride + h * D;
        BF16* dst = packed + (h * blocks + b) * D * kKeyBlock + j * 2;
        for (int64_t d = 0; d < D; ++d) dst[(d / 2) * 2 * kKeyBlock + (d % 2)] = token < tokens ? src[d] : zero;
      }
}

// values [Tk, Hk, D] -> packed[hk][key pair][D/16][16 dims][2 keys], zero-padded.
inline void pack_values(const BF16* values, int64_t stride, int64_t tokens, int64_t kv_heads, int64_t D,
                        int64_t pairs, BF16* packed) {
  const BF16 zero = BF16(0.0f);
  for (int64_t h = 0; h < kv_heads; ++h)
    for (int64_t pair = 0; pair < pairs; ++pair)
      for (int64_t t = 0; t < 2; ++t) {
        const int64_t token = pair * 2 + t;
        const BF16* src = values + token * stride + h * D;
        BF16* dst = packed + (h * pairs + pair) * D * 2 + t;
        for (int64_t d = 0; d < D; ++d) dst[d * 2] = token < tokens ? src[d] : zero;
      }
}

// R consecutive query rows of one head against their causal context. Rows past `rows` repeat
// the last real row (computed, not stored) so the register tiles stay full.
template <int D, int R>
FITSERVE_AVX512_BF16 void attend_rows(const BF16* query, int64_t query_stride, int64_t head, const BF16* packed_keys,
                                      const BF16* packed_values, int64_t first_row, int64_t rows,
                                      int64_t context_offset, float scale, BF16* out, int64_t out_stride) {
  constexpr int kPairs = D / 2, kDimBlocks = D / 16;
  int32_t q_pairs[R][kPairs];
  int64_t position[R];
  for (int r = 0; r < R; ++r) {
    const int64_t row = first_row + std::min<int64_t>(r, rows - 1);
    std::memcpy(q_pairs[r], query + row * query_stride + head * D, D * sizeof(BF16));
    position[r] = context_offset + row;
  }
  __m512 acc[R][kDimBlocks];
  float running_max[R], running_sum[R];
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < kDimBlocks; ++b) acc[r][b] = _mm512_setzero_ps();
    running_max[r] = -std::numeric_limits<float>::infinity();
    running_sum[r] = 0.0f;
  }
  const __m512 scale_vec = _mm512_set1_ps(scale);
  const int64_t blocks = position[R - 1] / kKeyBlock + 1;
  for (int64_t block = 0; block < blocks; ++block) {
    const BF16* keys = packed_keys + block * D * kKeyBlock;
    __m512 scores[R];
    for (int r = 0; r < R; ++r) scores[r] = _mm512_setzero_ps();
    for (int pair = 0; pair < kPairs; ++pair) {
      const __m512bh key_pairs = (__m512bh)_mm512_loadu_si512(keys + pair * 2 * kKeyBlock);
      for (int r = 0; r < R; ++r)
        scores[r] = _mm512_dpbf16_ps(scores[r], (__m512bh)_mm512_set1_epi32(q_pairs[r][pair]), key_pairs);
    }
    alignas(64) int32_t p_pairs[R][kKeyBlock / 2];
    for (int r = 0; r < R; ++r) {
      const int64_t visible = position[r] - block * kKeyBlock + 1;  // keys of this block row r sees
      const __mmask16 mask = visible >= kKeyBlock ? static_cast<__mmask16>(0xFFFF)
                             : visible <= 0       ? static_cast<__mmask16>(0)
                                                  : static_cast<__mmask16>((1u << visible) - 1);
      const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), mask,
                                          _mm512_mul_ps(scores[r], scale_vec));
      const float new_max = std::max(running_max[r], _mm512_reduce_max_ps(s));
      const float correction = std::exp(running_max[r] - new_max);
      const __m512 p = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(s, _mm512_set1_ps(new_max))));
      running_sum[r] = running_sum[r] * correction + _mm512_reduce_add_ps(p);
      running_max[r] = new_max;
      const __m512 correction_vec = _mm512_set1_ps(correction);
      for (int b = 0; b < kDimBlocks; ++b) acc[r][b] = _mm512_mul_ps(acc[r][b], correction_vec);
      _mm256_store_si256(reinterpret_cast<__m256i*>(p_pairs[r]), (__m256i)_mm512_cvtneps_pbh(p));
    }
    const BF16* values = packed_values + block * (kKeyBlock / 2) * D * 2;
    for (int pair = 0; pair < kKeyBlock / 2; ++pair)
      for (int b = 0; b < kDimBlocks; ++b) {
        const __m512bh value_pairs = (__m512bh)_mm512_loadu_si512(values + (pair * kDimBlocks + b) * 32);
        for (int r = 0; r < R; ++r)
          acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)_mm512_set1_epi32(p_pairs[r][pair]), value_pairs);
      }
  }
  for (int r = 0; r < R && r < rows; ++r) {
    const __m512 inverse = _mm512_set1_ps(1.0f / running_sum[r]);
    BF16* o = out + (first_row + r) * out_stride + head * D;
    for (int b = 0; b < kDimBlocks; ++b)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + b * 16), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][b], inverse)));
  }
}

template <int D>
void prefill_attention_impl(const BF16* query, int64_t query_stride, const BF16* packed_keys,
                            const BF16* packed_values, BF16* out, int64_t out_stride, int64_t query_len,
                            int64_t context_len, int64_t num_heads, int64_t num_kv_heads, int64_t key_blocks,
                            float scale) {
  constexpr int R = 256 / D;  // rows per tile: R x D/16 accumulators fill 16 of the 32 registers
  const int64_t keys_per_head = key_blocks * kKeyBlock * D;
  for_each_head_row_group(num_heads, num_kv_heads, query_len, R,
                          [&](int64_t head, int64_t kv_head, int64_t first_row, int64_t rows) {
                            attend_rows<D, R>(query, query_stride, head, packed_keys + kv_head * keys_per_head,
                                              packed_values + kv_head * keys_per_head, first_row, rows,
                                              context_len - query_len, scale, out, out_stride);
                          });
}

}  // namespace fitserve_cpu
