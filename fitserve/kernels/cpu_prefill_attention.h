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
//
// An int8 context (cpu_kv_int8.h) is packed as its integers in bf16 (exact), with each
// position's key and value scale beside the packed blocks; the key scales multiply the
// scores, the value scales the probabilities after the running sum has taken them.

#pragma once

#include "cpu_kernels.h"
#include "cpu_kv_int8.h"

#include <cstring>

namespace fitserve_cpu {

constexpr int kKeyBlock = 16;  // keys per block: one float32 vector of scores

// exp for x <= 0 on 16 lanes: exp256 (cpu_kernels.h) on each half, the same polynomial.
FITSERVE_AVX512_BF16 inline __m512 exp512(__m512 x) {
  const __m256 low = exp256(_mm512_castps512_ps256(x));
  const __m256 high = exp256(_mm512_extractf32x8_ps(x, 1));
  return _mm512_insertf32x8(_mm512_castps256_ps512(low), high, 1);
}

// 16 rows of 16 int32 transposed in place: afterwards r[i] lane j holds what r[j] lane i held.
FITSERVE_AVX512_BF16 inline void transpose_16x16_epi32(__m512i (&r)[16]) {
  __m512i pairs[16], quads[16];
  for (int k = 0; k < 8; ++k) {  // per 128-bit lane: rows 2k, 2k+1 interleaved
    pairs[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    pairs[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // quads[4k + c], lane l: column 4l + c of rows 4k .. 4k + 3
    quads[4 * k] = _mm512_unpacklo_epi64(pairs[4 * k], pairs[4 * k + 2]);
    quads[4 * k + 1] = _mm512_unpackhi_epi64(pairs[4 * k], pairs[4 * k + 2]);
    quads[4 * k + 2] = _mm512_unpacklo_epi64(pairs[4 * k + 1], pairs[4 * k + 3]);
    quads[4 * k + 3] = _mm512_unpackhi_epi64(pairs[4 * k + 1], pairs[4 * k + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // gather lane l of the four row quads into column 4l + c
    const __m512i low01 = _mm512_shuffle_i32x4(quads[c], quads[4 + c], 0x44);
    const __m512i high01 = _mm512_shuffle_i32x4(quads[c], quads[4 + c], 0xEE);
    const __m512i low23 = _mm512_shuffle_i32x4(quads[8 + c], quads[12 + c], 0x44);
    const __m512i high23 = _mm512_shuffle_i32x4(quads[8 + c], quads[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(low01, low23, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(low01, low23, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(high01, high23, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(high01, high23, 0xDD);
  }
}

// 16 keys (row pointers; nullptr for the zero keys that pad a block past the context) ->
// [D/2][16 keys][2 dims]: each 512-bit line is one dim pair of all 16 keys, a 16 x 16
// transpose of the keys' 32-bit pairs per 32 dims.
template <int D>
FITSERVE_AVX512_BF16 inline void pack_key_block(const BF16* const* rows, BF16* packed) {
  for (int chunk = 0; chunk < D / 32; ++chunk) {
    __m512i lines[kKeyBlock];
    for (int j = 0; j < kKeyBlock; ++j)
      lines[j] = rows[j] ? _mm512_loadu_si512(rows[j] + 32 * chunk) : _mm512_setzero_si512();
    transpose_16x16_epi32(lines);
    for (int pair = 0; pair < 16; ++pair) _mm512_storeu_si512(packed + (16 * chunk + pair) * 32, lines[pair]);
  }
}

// 16 values (as pack_key_block) -> [8 key pairs][D/16][16 dims][2 keys]: the two rows of a
// pair interleaved element by element, 16 dims per line.
template <int D>
FITSERVE_AVX512_BF16 inline void pack_value_block(const BF16* const* rows, BF16* packed) {
  alignas(64) static const uint16_t kLow[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHigh[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i low = _mm512_load_si512(kLow), high = _mm512_load_si512(kHigh);
  for (int pair = 0; pair < kKeyBlock / 2; ++pair)
    for (int chunk = 0; chunk < D / 32; ++chunk) {
      const BF16* first = rows[2 * pair];
      const BF16* second = rows[2 * pair + 1];
      const __m512i a = first ? _mm512_loadu_si512(first + 32 * chunk) : _mm512_setzero_si512();
      const __m512i b = second ? _mm512_loadu_si512(second + 32 * chunk) : _mm512_setzero_si512();
      BF16* out = packed + (pair * (D / 16) + 2 * chunk) * 32;
      _mm512_storeu_si512(out, _mm512_permutex2var_epi16(a, low, b));
      _mm512_storeu_si512(out + 32, _mm512_permutex2var_epi16(a, high, b));
    }
}

// The first `blocks` 16-token blocks of one KV head, packed: keys -> [block][D/2][16 keys][2
// dims], values -> [block][8 key pairs][D/16][16 dims][2 keys]. offset_of(token) is the
// element offset of the token's row in `keys` and `values`, or -1 past the context (zero rows).
template <int D, typename OffsetOf>
FITSERVE_AVX512_BF16 void pack_blocks(const BF16* keys, const BF16* values, int64_t blocks, const OffsetOf& offset_of,
                                      BF16* packed_keys, BF16* packed_values) {
  const BF16* key_rows[kKeyBlock];
  const BF16* value_rows[kKeyBlock];
  for (int64_t b = 0; b < blocks; ++b) {
    for (int j = 0; j < kKeyBlock; ++j) {
      const int64_t offset = offset_of(b * kKeyBlock + j);
      key_rows[j] = offset < 0 ? nullptr : keys + offset;
      value_rows[j] = offset < 0 ? nullptr : values + offset;
    }
    pack_key_block<D>(key_rows, packed_keys + b * kKeyBlock * D);
    pack_value_block<D>(value_rows, packed_values + b * kKeyBlock * D);
  }
}

// D int8 values -> D bf16 (exact: |v| <= 127 needs 7 significant bits).
template <int D>
FITSERVE_AVX512_BF16 inline void widen_int8_row_bf16(const int8_t* row, BF16* out) {
  for (int d = 0; d < D; d += 16) {
    const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + d), (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// pack_blocks for an int8 cache: each block's 16 rows widened to bf16 integers in a small
// buffer (L1), then packed as bf16 rows are; the scales of the packed positions (0 past the
// context) go to key_scales / value_scales [blocks * 16].
template <int D, typename OffsetOf>
FITSERVE_AVX512_BF16 void pack_blocks_int8(const int8_t* keys, const int8_t* values, KVScales scales, int64_t blocks,
                                           const OffsetOf& offset_of, BF16* packed_keys, BF16* packed_values,
                                           float* key_scales, float* value_scales) {
  alignas(64) BF16 widened[2][kKeyBlock][D];
  const BF16* key_rows[kKeyBlock];
  const BF16* value_rows[kKeyBlock];
  for (int64_t b = 0; b < blocks; ++b) {
    for (int j = 0; j < kKeyBlock; ++j) {
      const int64_t offset = offset_of(b * kKeyBlock + j);
      const int64_t pos = b * kKeyBlock + j;
      if (offset < 0) {
        key_rows[j] = value_rows[j] = nullptr;
        key_scales[pos] = value_scales[pos] = 0.0f;
        continue;
      }
      widen_int8_row_bf16<D>(keys + offset, widened[0][j]);
      widen_int8_row_bf16<D>(values + offset, widened[1][j]);
      key_rows[j] = widened[0][j];
      value_rows[j] = widened[1][j];
      key_scales[pos] = scales.key[offset / D];
      value_scales[pos] = scales.value[offset / D];
    }
    pack_key_block<D>(key_rows, packed_keys + b * kKeyBlock * D);
    pack_value_block<D>(value_rows, packed_values + b * kKeyBlock * D);
  }
}

// keys/values [Tk, Hk, D] (token stride `stride`) -> pack_blocks' layouts per KV head,
// packed[hk][block]..., zero-padded past Tk.
template <int D>
FITSERVE_AVX512_BF16 void pack_context(const BF16* keys, const BF16* values, int64_t stride, int64_t tokens,
                                       int64_t kv_heads, int64_t blocks, BF16* packed_keys, BF16* packed_values) {
  for (int64_t h = 0; h < kv_heads; ++h)
    pack_blocks<D>(keys, values, blocks,
                   [&](int64_t token) { return token < tokens ? token * stride + h * D : int64_t{-1}; },
                   packed_keys + h * blocks * kKeyBlock * D, packed_values + h * blocks * kKeyBlock * D);
}

// pack_context for an int8 context [Tk, Hk, D] (rows Hk * D apart) with its scales [Tk, Hk]:
// the scales of each KV head's packed positions go to key_scales / value_scales [hk][blocks * 16].
template <int D>
FITSERVE_AVX512_BF16 void pack_context_int8(const int8_t* keys, const int8_t* values, KVScales scales, int64_t tokens,
                                            int64_t kv_heads, int64_t blocks, BF16* packed_keys, BF16* packed_values,
                                            float* key_scales, float* value_scales) {
  const int64_t padded = blocks * kKeyBlock;
  for (int64_t h = 0; h < kv_heads; ++h)
    pack_blocks_int8<D>(keys, values, scales, blocks,
                        [&](int64_t token) { return token < tokens ? (token * kv_heads + h) * D : int64_t{-1}; },
                        packed_keys + h * padded * D, packed_values + h * padded * D, key_scales + h * padded,
                        value_scales + h * padded);
}

// Unscaled scores of R query rows against one packed block of 16 keys: scores[r] lane j =
// q_r . k_j, the rows' bf16 pairs at q_pairs, D/2 apart (vdpbf16ps, float32 sums).
template <int D, int R>
FITSERVE_AVX512_BF16 inline void score_key_block(const int32_t* q_pairs, const BF16* keys, __m512 (&scores)[R]) {
  for (int r = 0; r < R; ++r) scores[r] = _mm512_setzero_ps();
  for (int pair = 0; pair < D / 2; ++pair) {
    const __m512bh key_pairs = (__m512bh)_mm512_loadu_si512(keys + pair * 2 * kKeyBlock);
    for (int r = 0; r < R; ++r)
      scores[r] = _mm512_dpbf16_ps(scores[r], (__m512bh)_mm512_set1_epi32(q_pairs[r * (D / 2) + pair]), key_pairs);
  }
}

// R consecutive query rows of one head against their causal context. Rows past `rows` repeat
// the last real row (computed, not stored) so the register tiles stay full.
template <int D, int R>
FITSERVE_AVX512_BF16 void attend_rows(const BF16* query, int64_t query_stride, int64_t head, const BF16* packed_keys,
                                      const BF16* packed_values, int64_t first_row, int64_t rows,
                                      int64_t context_offset, float scale, BF16* out, int64_t out_stride,
                                      const float* key_scales, const float* value_scales) {
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
    score_key_block<D, R>(&q_pairs[0][0], keys, scores);
    alignas(64) int32_t p_pairs[R][kKeyBlock / 2];
    const __m512 block_scale =
        key_scales ? _mm512_mul_ps(_mm512_loadu_ps(key_scales + block * kKeyBlock), scale_vec) : scale_vec;
    for (int r = 0; r < R; ++r) {
      const int64_t visible = position[r] - block * kKeyBlock + 1;  // keys of this block row r sees
      const __mmask16 mask = visible >= kKeyBlock ? static_cast<__mmask16>(0xFFFF)
                             : visible <= 0       ? static_cast<__mmask16>(0)
                                                  : static_cast<__mmask16>((1u << visible) - 1);
      const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), mask,
                                          _mm512_mul_ps(scores[r], block_scale));
      const float new_max = std::max(running_max[r], _mm512_reduce_max_ps(s));
      const float correction = std::exp(running_max[r] - new_max);
      const __m512 p = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(s, _mm512_set1_ps(new_max))));
      running_sum[r] = running_sum[r] * correction + _mm512_reduce_add_ps(p);
      running_max[r] = new_max;
      const __m512 correction_vec = _mm512_set1_ps(correction);
      for (int b = 0; b < kDimBlocks; ++b) acc[r][b] = _mm512_mul_ps(acc[r][b], correction_vec);
      const __m512 weighted = value_scales ? _mm512_mul_ps(p, _mm512_loadu_ps(value_scales + block * kKeyBlock)) : p;
      _mm256_store_si256(reinterpret_cast<__m256i*>(p_pairs[r]), (__m256i)_mm512_cvtneps_pbh(weighted));
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

// key_scales / value_scales: an int8 context's packed scales [Hk][key_blocks * 16], else null.
template <int D>
void prefill_attention_impl(const BF16* query, int64_t query_stride, const BF16* packed_keys,
                            const BF16* packed_values, BF16* out, int64_t out_stride, int64_t query_len,
                            int64_t context_len, int64_t num_heads, int64_t num_kv_heads, int64_t key_blocks,
                            float scale, const float* key_scales, const float* value_scales) {
  constexpr int R = 256 / D;  // rows per tile: R x D/16 accumulators fill 16 of the 32 registers
  const int64_t keys_per_head = key_blocks * kKeyBlock * D, padded = key_blocks * kKeyBlock;
  for_each_head_row_group(num_heads, num_kv_heads, query_len, R,
                          [&](int64_t head, int64_t kv_head, int64_t first_row, int64_t rows) {
                            attend_rows<D, R>(query, query_stride, head, packed_keys + kv_head * keys_per_head,
                                              packed_values + kv_head * keys_per_head, first_row, rows,
                                              context_len - query_len, scale, out, out_stride,
                                              key_scales ? key_scales + kv_head * padded : nullptr,
                                              value_scales ? value_scales + kv_head * padded : nullptr);
                          });
}

}  // namespace fitserve_cpu
