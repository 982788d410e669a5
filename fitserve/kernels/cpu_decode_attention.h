// Decode attention on the CPU: one query token per sequence attends over its paged K/V cache,
// reading the blocks in place (no gather of the padded block table into a new tensor).
//
// Two loops compute it. Where the CPU has AVX512-BF16 and a bfloat16 cache has a head_dim of
// 32, 64 or 128, each (sequence, KV head) packs its cached keys and values 16 tokens at a
// time into the layouts of the prefill kernel (cpu_prefill_attention.h) with register
// transposes, then scores all query heads of its GQA group against them with vdpbf16ps,
// takes one softmax per head over the whole context and sums the values with vdpbf16ps: the
// packing is done once per group, where the float32 loop widened every key once per query
// head and was compute-bound (1.6-2x faster at 2048 positions on Zen 4). Its numerics are
// the bf16 prefill's: float32 scores (the scale applied after the dot product) and softmax,
// probabilities rounded to bf16 for the value product. Everything else (float32 caches,
// other head sizes, CPUs without AVX512-BF16) takes the float32-FMA loop, whose sums float32
// models rely on.
//
// An int8 cache (cpu_kv_int8.h) runs the same two loops on its integers, which are exact in
// float32 and bf16: the float32 loop widens them in registers, the bf16 loop converts each
// 16-token block to bf16 while packing it (the packed copy holds the integers, not
// dequantized values). The key scales multiply the scores and the value scales the
// probabilities (after their sum is taken), so the int8 bytes are the only cache bytes read.

#pragma once

#include "cpu_kernels.h"
#include "cpu_kv_int8.h"
#include "cpu_prefill_attention.h"

namespace fitserve_cpu {

// out[0..64) = sum over positions of weights[p] * value_rows[p][d0 .. d0 + 64), in registers.
template <typename T>
inline void weighted_values_64(const T* const* value_rows, const float* weights, int64_t length, int64_t d0,
                               float* out) {
  __m256 acc[8];
  for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t p = 0; p < length; ++p) {
    const __m256 weight = _mm256_set1_ps(weights[p]);
    const T* value = value_rows[p] + d0;
    for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(load8(value + 8 * c), weight, acc[c]);
  }
  for (int c = 0; c < 8; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
}

// One (sequence, KV head) in float32 arithmetic: the `group` query heads at q (head_dim apart)
// against the `length` cached tokens of the block table, written to o (head_dim apart). KV
// is T, or int8_t with `scales`.
template <typename T, typename KV = T>
void decode_attention_item_fma(const T* q, const KV* key_cache, const KV* value_cache, const int32_t* table,
                               int64_t length, int64_t kv_head, int64_t group, int64_t head_dim, int64_t block_size,
                               int64_t token_stride, float scale, T* o, KVScales scales = {}) {
  thread_local std::vector<float> q_float, acc, scores;
  thread_local std::vector<const KV*> value_rows;
  q_float.resize(group * head_dim);
  acc.resize(group * head_dim);
  // Element offset of one cached token of this (sequence, KV head), in either cache.
  auto cached = [&](int64_t pos) {
    return ((int64_t)table[pos / block_size] * block_size + pos % block_size) * token_stride + kv_head * head_dim;
  };
  for (int64_t i = 0; i < group * head_dim; ++i) q_float[i] = to_float(q[i]) * scale;
  scores.resize(group * length);
  // Scores: every query head of the group against each cached key. Eight keys at a time
  // when head_dim allows: their eight dot products are reduced together (a hadd tree), not
  // one horizontal sum per (key, head), which made this loop compute-bound.
  int64_t pos = 0;
  if (head_dim % 8 == 0) {
    for (; pos + 8 <= length; pos += 8) {
      const KV* keys[8];
      for (int j = 0; j < 8; ++j) keys[j] = key_cache + cached(pos + j);
      for (int64_t g = 0; g < group; ++g) {
        const float* qg = q_float.data() + g * head_dim;
        __m256 acc8[8];
        for (int j = 0; j < 8; ++j) acc8[j] = _mm256_setzero_ps();
        for (int64_t d = 0; d < head_dim; d += 8) {
          const __m256 qv = _mm256_loadu_ps(qg + d);
          for (int j = 0; j < 8; ++j) acc8[j] = _mm256_fmadd_ps(load8(keys[j] + d), qv, acc8[j]);
        }
        _mm256_storeu_ps(scores.data() + g * length + pos, hsum8(acc8));
      }
    }
  }
  for (; pos < length; ++pos) {
    const KV* key = key_cache + cached(pos);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q_float.data() + g * head_dim;
      int64_t d = 0;
      __m256 sum = _mm256_setzero_ps();
      for (; d + 8 <= head_dim; d += 8) sum = _mm256_fmadd_ps(load8(key + d), _mm256_loadu_ps(qg + d), sum);
      float total = hsum(sum);
      for (; d < head_dim; ++d) total += to_float(key[d]) * qg[d];
      scores[g * length + pos] = total;
    }
  }
  // An int8 cache: the key scale of each position on its scores (the cache's scale index of
  // a token is its element offset / head_dim).
  if (scales)
    for (int64_t pos = 0; pos < length; ++pos) {
      const float key_scale = scales.key[cached(pos) / head_dim];
      for (int64_t g = 0; g < group; ++g) scores[g * length + pos] *= key_scale;
    }
  // Softmax per head (max-subtracted, float32).
  thread_local std::vector<float> inverse_sum;
  inverse_sum.resize(group);
  for (int64_t g = 0; g < group; ++g) {
    float* row = scores.data() + g * length;
    float max_score = -std::numeric_limits<float>::infinity();
    for (int64_t pos = 0; pos < length; ++pos) max_score = std::max(max_score, row[pos]);
    const __m256 max_vec = _mm256_set1_ps(max_score);
    __m256 sum_vec = _mm256_setzero_ps();
    int64_t pos = 0;
    for (; pos + 8 <= length; pos += 8) {
      __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(row + pos), max_vec));
      _mm256_storeu_ps(row + pos, e);
      sum_vec = _mm256_add_ps(sum_vec, e);
    }
    float sum = hsum(sum_vec);
    for (; pos < length; ++pos) {
      row[pos] = std::exp(row[pos] - max_score);
      sum += row[pos];
    }
    inverse_sum[g] = 1.0f / sum;
  }
  // The value scales on the probabilities (after their sum was taken).
  if (scales)
    for (int64_t pos = 0; pos < length; ++pos) {
      const float value_scale = scales.value[cached(pos) / head_dim];
      for (int64_t g = 0; g < group; ++g) scores[g * length + pos] *= value_scale;
    }
  // Weighted sum of values. With head_dim a multiple of 64, each head's output stays in
  // eight registers for 64 dims while the values stream past (re-read from L1/L2 per
  // head); otherwise the accumulator lives in memory.
  if (head_dim % 64 == 0) {
    value_rows.resize(length);
    for (int64_t p = 0; p < length; ++p) value_rows[p] = value_cache + cached(p);
    for (int64_t d0 = 0; d0 < head_dim; d0 += 64)
      for (int64_t g = 0; g < group; ++g)
        weighted_values_64(value_rows.data(), scores.data() + g * length, length, d0, acc.data() + g * head_dim + d0);
  } else {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t p = 0; p < length; ++p) {
      const KV* value = value_cache + cached(p);
      for (int64_t g = 0; g < group; ++g) {
        const float weight = scores[g * length + p];
        float* a = acc.data() + g * head_dim;
        int64_t d = 0;
        const __m256 weight_vec = _mm256_set1_ps(weight);
        for (; d + 8 <= head_dim; d += 8)
          _mm256_storeu_ps(a + d, _mm256_fmadd_ps(load8(value + d), weight_vec, _mm256_loadu_ps(a + d)));
        for (; d < head_dim; ++d) a[d] += to_float(value[d]) * weight;
      }
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < head_dim; ++d)
      o[g * head_dim + d] = static_cast<T>(acc[g * head_dim + d] * inverse_sum[g]);
}

// Scores of H query heads (H compile-time, so the accumulators stay in registers) against
// all packed keys: scores[h][pos] = scale * q_h . k_pos (times key_scales[pos] for an int8
// cache), -inf past the context.
template <int D, int H>
FITSERVE_AVX512_BF16 void score_heads(const int32_t* q_pairs, const BF16* packed_keys, int64_t blocks,
                                      __mmask16 tail_mask, float scale, float* scores, int64_t padded,
                                      const float* key_scales) {
  const __m512 scale_vec = _mm512_set1_ps(scale);
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t block = 0; block < blocks; ++block) {
    __m512 acc[H];
    score_key_block<D, H>(q_pairs, packed_keys + block * kKeyBlock * D, acc);
    const __mmask16 mask = block + 1 == blocks ? tail_mask : static_cast<__mmask16>(0xFFFF);
    const __m512 block_scale =
        key_scales ? _mm512_mul_ps(_mm512_load_ps(key_scales + block * kKeyBlock), scale_vec) : scale_vec;
    for (int h = 0; h < H; ++h)
      _mm512_store_ps(scores + h * padded + block * kKeyBlock,
                      _mm512_mask_mov_ps(minus_inf, mask, _mm512_mul_ps(acc[h], block_scale)));
  }
}

// out_h = inverse_h * sum over positions of p_h[pos] * v_pos for H heads, from their bf16
// probability pairs ([H][padded / 2]) and the packed values.
template <int D, int H>
FITSERVE_AVX512_BF16 void sum_values(const int32_t* probability_pairs, const float* inverse_sum,
                                     const BF16* packed_values, int64_t padded, BF16* out) {
  constexpr int kDimBlocks = D / 16;
  __m512 acc[H][kDimBlocks];
  for (int h = 0; h < H; ++h)
    for (int b = 0; b < kDimBlocks; ++b) acc[h][b] = _mm512_setzero_ps();
  for (int64_t pair = 0; pair < padded / 2; ++pair) {
    const BF16* values = packed_values + pair * 2 * D;
    for (int b = 0; b < kDimBlocks; ++b) {
      const __m512bh value_pairs = (__m512bh)_mm512_load_si512(values + b * 32);
      for (int h = 0; h < H; ++h)
        acc[h][b] = _mm512_dpbf16_ps(acc[h][b], (__m512bh)_mm512_set1_epi32(probability_pairs[h * padded / 2 + pair]),
                                     value_pairs);
    }
  }
  for (int h = 0; h < H; ++h) {
    const __m512 inverse = _mm512_set1_ps(inverse_sum[h]);
    for (int b = 0; b < kDimBlocks; ++b)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + h * D + b * 16),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[h][b], inverse)));
  }
}

// fn(std::integral_constant<int, n>) for a runtime n in [1, kMax].
template <int kMax, typename Fn>
inline void with_head_count(int n, const Fn& fn) {
  if constexpr (kMax >= 1) {
    if (n == kMax) fn(std::integral_constant<int, kMax>{});
    else with_head_count<kMax - 1>(n, fn);
  }
}

// One (sequence, KV head) with AVX512-BF16, D = head_dim. The packed tokens are read three
// times, all heads of the group at once where registers allow: scores (vdpbf16ps of each
// query pair against 16 keys), one softmax per head over the whole context (vectorised, no
// per-block rescaling as a prefill's online softmax needs), then the value sums.
template <int D, typename KV>
FITSERVE_AVX512_BF16 void decode_attention_item_bf16(const BF16* q, const KV* key_cache, const KV* value_cache,
                                                     const int32_t* table, int64_t length, int64_t kv_head,
                                                     int64_t group, int64_t block_size, int64_t token_stride,
                                                     float scale, BF16* o, KVScales scales) {
  constexpr int kPairs = D / 2, kDimBlocks = D / 16;
  constexpr int kScoreHeads = 8;               // score accumulators per pass over the keys
  constexpr int kValueHeads = 16 / kDimBlocks;  // 16 value accumulators per pass (2 heads for D = 128)
  const int64_t blocks = (length + kKeyBlock - 1) / kKeyBlock, padded = blocks * kKeyBlock;
  thread_local std::vector<BF16> packed_storage;
  thread_local std::vector<float> score_storage, inverse_sum, scale_storage;
  thread_local std::vector<int32_t> probability_storage;
  if (packed_storage.size() < static_cast<size_t>(2 * padded * D + 32)) packed_storage.resize(2 * padded * D + 32);
  if (score_storage.size() < static_cast<size_t>(group * padded + 16)) score_storage.resize(group * padded + 16);
  if (probability_storage.size() < static_cast<size_t>(group * padded / 2 + 16))
    probability_storage.resize(group * padded / 2 + 16);
  inverse_sum.resize(group);
  if (scales && scale_storage.size() < static_cast<size_t>(2 * padded + 32)) scale_storage.resize(2 * padded + 32);
  float* key_scales = scales ? align64(scale_storage.data()) : nullptr;  // [padded], then values'
  float* value_scales = scales ? key_scales + padded : nullptr;
  BF16* packed_keys = align64(packed_storage.data());
  BF16* packed_values = packed_keys + padded * D;
  float* scores = align64(score_storage.data());                 // [group][padded]
  int32_t* probabilities = align64(probability_storage.data());  // [group][padded / 2] bf16 pairs

  // The element offset of a cached token of this KV head, in either cache.
  auto offset_of = [&](int64_t pos) {
    if (pos >= length) return int64_t{-1};
    return ((int64_t)table[pos / block_size] * block_size + pos % block_size) * token_stride + kv_head * D;
  };
  if constexpr (std::is_same_v<KV, int8_t>)
    pack_blocks_int8<D>(key_cache, value_cache, scales, blocks, offset_of, packed_keys, packed_values, key_scales,
                        value_scales);
  else
    pack_blocks<D>(key_cache, value_cache, blocks, offset_of, packed_keys, packed_values);

  const int32_t* q_pairs = reinterpret_cast<const int32_t*>(q);  // head h, pair i at h * kPairs + i
  const int tail = static_cast<int>(length - (blocks - 1) * kKeyBlock);
  const __mmask16 tail_mask = static_cast<__mmask16>(tail == kKeyBlock ? 0xFFFF : (1u << tail) - 1);
  for (int64_t first = 0; first < group; first += kScoreHeads)
    with_head_count<kScoreHeads>(static_cast<int>(std::min<int64_t>(kScoreHeads, group - first)), [&](auto heads) {
      score_heads<D, heads()>(q_pairs + first * kPairs, packed_keys, blocks, tail_mask, scale, scores + first * padded,
                              padded, key_scales);
    });

  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t h = 0; h < group; ++h) {
    const float* row = scores + h * padded;
    __m512 max_vec = minus_inf;
    for (int64_t pos = 0; pos < padded; pos += kKeyBlock) max_vec = _mm512_max_ps(max_vec, _mm512_load_ps(row + pos));
    const __m512 max_score = _mm512_set1_ps(_mm512_reduce_max_ps(max_vec));
    __m512 sum_vec = _mm512_setzero_ps();
    int32_t* pairs = probabilities + h * padded / 2;
    for (int64_t pos = 0; pos < padded; pos += kKeyBlock) {
      const __m512 s = _mm512_load_ps(row + pos);
      // Past the context the score is -inf, where exp512 gives a tiny positive number.
      const __m512 p = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, minus_inf, _CMP_NEQ_OQ),
                                           exp512(_mm512_sub_ps(s, max_score)));
      sum_vec = _mm512_add_ps(sum_vec, p);
      // An int8 cache: the value scales go on the probabilities, after the sum.
      const __m512 weighted = value_scales ? _mm512_mul_ps(p, _mm512_load_ps(value_scales + pos)) : p;
      _mm256_store_si256(reinterpret_cast<__m256i*>(pairs + pos / 2), (__m256i)_mm512_cvtneps_pbh(weighted));
    }
    inverse_sum[h] = 1.0f / _mm512_reduce_add_ps(sum_vec);
  }

  for (int64_t first = 0; first < group; first += kValueHeads)
    with_head_count<kValueHeads>(static_cast<int>(std::min<int64_t>(kValueHeads, group - first)), [&](auto heads) {
      sum_values<D, heads()>(probabilities + first * padded / 2, inverse_sum.data() + first, packed_values, padded,
                             o + first * D);
    });
}

const bool kHasAvx512Bf16 = cpu_has_avx512_bf16();

// KV is T, or int8_t with the cache's `scales`.
template <typename T, typename KV = T>
void decode_attention_impl(const T* query, const KV* key_cache, const KV* value_cache, const int32_t* block_tables,
                           const int32_t* seq_lens, const int64_t* query_rows, T* out, int64_t num_seqs,
                           int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                           int64_t table_stride, int64_t query_row_stride, float scale, KVScales scales = {}) {
  // query_row_stride: elements between the query rows (num_heads * head_dim when the queries
  // are their own tensor; more when they are the q part of fused qkv rows).
  const int64_t group = num_heads / num_kv_heads;
  const int64_t token_stride = num_kv_heads * head_dim;  // between tokens of one block
  // Little work (one short sequence) runs on the calling thread: waking the pool would cost
  // more than it saves, and on a busy machine a woken thread may wait for a core. Between the
  // projections of a fused decode step the pool is awake anyway, so the bar is low: one
  // Qwen2.5-0.5B sequence at 512 positions (14 heads) decoded 3.6% faster with its two KV
  // heads on two threads than on one (in-process A/B), neutral at 160.
  int64_t total_positions = 0;
  for (int64_t seq = 0; seq < num_seqs; ++seq) total_positions += seq_lens[seq];
  const int64_t items = num_seqs * num_kv_heads;
  const int64_t grain = total_positions * num_heads < 2048 ? items : 1;
  bool bf16_loop = false;
  if constexpr (std::is_same_v<T, BF16>)
    bf16_loop = kHasAvx512Bf16 && (head_dim == 32 || head_dim == 64 || head_dim == 128);
  at::parallel_for(0, items, grain, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t seq = item / num_kv_heads, kv_head = item % num_kv_heads;
      const int64_t length = seq_lens[seq];
      const int32_t* table = block_tables + seq * table_stride;
      const T* q = query + query_rows[seq] * query_row_stride + kv_head * group * head_dim;
      T* o = out + (query_rows[seq] * num_heads + kv_head * group) * head_dim;
      if constexpr (std::is_same_v<T, BF16>) {
        if (bf16_loop) {
          auto run = [&](auto item_fn) {
            item_fn(q, key_cache, value_cache, table, length, kv_head, group, block_size, token_stride, scale, o,
                    scales);
          };
          if (head_dim == 32) run(decode_attention_item_bf16<32, KV>);
          else if (head_dim == 64) run(decode_attention_item_bf16<64, KV>);
          else run(decode_attention_item_bf16<128, KV>);
          continue;
        }
      }
      decode_attention_item_fma<T, KV>(q, key_cache, value_cache, table, length, kv_head, group, head_dim, block_size,
                                       token_stride, scale, o, scales);
    }
  });
}

}  // namespace fitserve_cpu
