// The AVX-512 VNNI kernels and the dequantizing readers of the w4 and w8 lanes layouts
// (cpu_quant_lanes_layout.h says what the layouts are and why). Part of cpu_quant_linear.h,
// included from it: uses its QuantPart, ActivationCodes, KernelArgs, high_nibbles, with_rows.

#pragma once

namespace fitserve_cpu {

constexpr int kLanesTileRows = 8;  // rows of x per pass over a block: 8 int32 + 8 float accumulators
constexpr int64_t kMaxLanesParts = 4;  // parts of one layer run_lanes takes in one region (MixLLM: 2)

// x rows for the lanes kernels, in tiles of up to 8 rows (the last one the rows left, T) laid out
// so that a tile's step is one cache line or less: the int8 codes as int32 quads [K/4][T] per
// tile (4 consecutive columns of one row each, in column order: a w4 step of 8 columns reads its
// T low-nibble partners, then its T high-nibble partners; a w8 step of 4 columns one quad per
// row), and per block of x (`block` columns, the w4 group or 128 for w8; the last block the
// columns left) [blocks][T] xs_b, xs_b * (sum of the block's codes) (w4's zero-point term) and
// the sum itself (w8's exact offset). A tile's loads differ by constant offsets from one pointer
// (no per-row addresses in registers), and a pass over a block reads only its tile's bytes: with
// tiles padded to 8, one row of x against down (K = 4864) read a 38 KiB x buffer per block, and a
// call from memory took 1.3-1.4x as long (Zen 4, one thread). K is a multiple of 4.
//
// Tiles are prepared in parallel (each writes only its own tables), and a tile's quads are
// written in order, its rows read side by side: in a batched decode step this preparation runs
// before the kernel while the other threads wait, and with one thread scattering each row's
// quads 32 bytes apart it took ~9% of a 32-row call against down (486 us, 2 Zen 4 threads).
// rows_held: rows the codes buffer holds (>= M; AMX tiles read whole tiles of 16 rows).
inline void prepare_lanes_activations(const float* x, int64_t M, int64_t K, int64_t block, ActivationCodes& a,
                                      int64_t rows_held = 0) {
  constexpr int T = kLanesTileRows;
  const int64_t tiles = (M + T - 1) / T, quads_per_row = K / 4, blocks = (K + block - 1) / block;
  a.code_stride = (K + 63) / 64 * 64;
  a.scale_stride = quads_per_row * T;  // int32 quads per whole tile
  a.extra_stride = blocks * T;         // values per block table of a whole tile
  int8_t* codes = a.codes.get(std::max(M, rows_held) * a.code_stride);
  int32_t* quads = a.offsets.get(tiles * a.scale_stride);
  float* group_scales = a.group_scales.get(tiles * a.extra_stride);
  float* zero_terms = a.zero_terms.get(tiles * a.extra_stride);
  int32_t* sums = a.block_sums.get(tiles * a.extra_stride);
  auto prepare_tile = [&](int64_t tile) {
    const int64_t m0 = tile * T, tile_rows = std::min<int64_t>(T, M - m0);
    for (int64_t lane = 0; lane < tile_rows; ++lane) {
      const int64_t m = m0 + lane;
      int8_t* row = codes + m * a.code_stride;
      for (int64_t g = 0; g < blocks; ++g) {
        const int64_t first = g * block, count = std::min(block, K - first);
        const float scale = quantize_block(x + m * K + first, count, row + first);
        int32_t sum = 0;
        for (int64_t k = 0; k < count; ++k) sum += row[first + k];
        const int64_t at = tile * a.extra_stride + g * tile_rows + lane;
        group_scales[at] = scale;
        zero_terms[at] = scale * static_cast<float>(sum);
        sums[at] = sum;
      }
    }
    int32_t* tile_quads = quads + tile * a.scale_stride;
    const int8_t* tile_codes = codes + m0 * a.code_stride;
    if (tile_rows == 1) {
      std::memcpy(tile_quads, tile_codes, static_cast<size_t>(K));
      return;
    }
    for (int64_t q = 0; q < quads_per_row; ++q, tile_quads += tile_rows)
      for (int64_t lane = 0; lane < tile_rows; ++lane)
        std::memcpy(tile_quads + lane, tile_codes + lane * a.code_stride + 4 * q, 4);
  };
  if (tiles == 1) prepare_tile(0);
  else at::parallel_for(0, tiles, 1, [&](int64_t first, int64_t last) {
    for (int64_t tile = first; tile < last; ++tile) prepare_tile(tile);
  });
}

// acc + vpdpbusd(u, the int32 at s broadcast to 16 lanes), the broadcast folded into the
// instruction's memory operand ({1to16}). GCC emits a separate vpbroadcastd for the intrinsic
// with _mm512_set1_epi32(*s), one more instruction per vpdpbusd.
FITSERVE_VNNI inline __m512i dpbusd_broadcast(__m512i acc, __m512i u, const int32_t* s) {
#if defined(__GNUC__) && !defined(__clang__)
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*s));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, u, _mm512_set1_epi32(*s));
#endif
}

// Results of block b (lanes: its rows) for MR rows of x from m0, with their biases, to the
// block's output columns (in order, or scattered to out_rows in a mixed layer): float32 into
// args.out, or rounded once to bf16 into args.out_bf16 (as narrow_row rounds).
template <int MR>
FITSERVE_VNNI inline void store_lanes_block(const KernelArgs& args, int64_t b, int64_t m0, __mmask16 row_mask,
                                            const __m512* out) {
  const QuantPart& p = *args.part;
  const int64_t n0 = b * kLaneRows;
  const int32_t* lane_rows = p.identity_rows ? nullptr : p.lane_rows.data() + n0;
  const __m512i columns = lane_rows ? _mm512_maskz_loadu_epi32(row_mask, lane_rows) : _mm512_setzero_si512();
  __m512 bias = _mm512_setzero_ps();
  if (args.bias) {
    bias = lane_rows ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), row_mask, columns, args.bias, 4)
                     : _mm512_maskz_loadu_ps(row_mask, args.bias + n0);
  }
  const int64_t R = std::min(kLaneRows, p.rows - n0);
  for (int m = 0; m < MR; ++m) {
    const __m512 values = _mm512_add_ps(out[m], bias);
    if (args.out_bf16 == nullptr) {
      float* row = args.out + (m0 + m) * args.out_features;
      if (lane_rows) _mm512_mask_i32scatter_ps(row, row_mask, columns, values, 4);
      else _mm512_mask_storeu_ps(row + n0, row_mask, values);
      continue;
    }
    BF16* row = args.out_bf16 + (m0 + m) * args.out_features;
    if (!lane_rows && R == kLaneRows) {
      store8(row + n0, _mm512_castps512_ps256(values));
      store8(row + n0 + 8, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(values), 1)));
      continue;
    }
    alignas(64) float lanes[kLaneRows];
    _mm512_store_ps(lanes, values);
    for (int64_t r = 0; r < R; ++r) row[lane_rows ? lane_rows[r] : n0 + r] = static_cast<BF16>(lanes[r]);
  }
}

// One step of a w4 lanes block (16 rows x 8 columns): its low and high nibbles into
// accumulators First and First + 1 (mod kAcc) of each of the MR rows of x.
template <int MR, int kAcc, int First, bool Gfni>
FITSERVE_VNNI inline void w4_lanes_step(__m512i (&acc)[MR][kAcc], const uint8_t* codes, const int32_t* quads,
                                        __mmask64 code_mask) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  _mm_prefetch(reinterpret_cast<const char*>(codes) + kSingleRowPrefetchBytes, _MM_HINT_T1);
  const __m512i v = _mm512_maskz_loadu_epi8(code_mask, codes);
  const __m512i lo = _mm512_and_si512(v, nibble);
  const __m512i hi = high_nibbles<Gfni>(v, nibble);
  for (int m = 0; m < MR; ++m) {
    acc[m][First % kAcc] = dpbusd_broadcast(acc[m][First % kAcc], lo, quads + m);
    acc[m][(First + 1) % kAcc] = dpbusd_broadcast(acc[m][(First + 1) % kAcc], hi, quads + MR + m);
  }
}

// Block b (16 output rows, or the R left) against MR rows of x from m0. Per step: one load and
// two unpacking instructions shared by the MR rows, then two vpdpbusd per row of x into its
// group's int32 accumulator (the row's 4 bytes of x broadcast from memory); per group and row
// of x: conversion, scale and zero-point term on 16 rows at once. Results go to the block's
// output columns with their biases.
template <int MR, bool Gfni>
FITSERVE_VNNI void w4_lanes_block(const KernelArgs& args, const W4Lanes& L, int64_t b, int64_t m0) {
  constexpr int T = kLanesTileRows;
  static_assert(MR <= T, "a pass covers one tile of x rows (MR: its rows)");
  const QuantPart& p = *args.part;
  const ActivationCodes& a = *args.act;
  const int64_t R = L.block_rows(b), step_bytes = 4 * R;
  const uint8_t* codes = p.codes + L.code_offset(b);
  const uint16_t* scales = p.half_scales + L.group_offset(b);
  const uint8_t* zeros = p.zero_codes + L.group_offset(b);
  const __mmask64 code_mask = R == kLaneRows ? ~__mmask64(0) : (~__mmask64(0)) >> (64 - step_bytes);
  const __mmask16 row_mask = static_cast<__mmask16>((1u << R) - 1);
  const int64_t tile = m0 / T;
  const int32_t* quads = a.offsets.data + tile * a.scale_stride;  // step t of row m: 2 MR t + m, 2 MR t + MR + m
  const float* xs = a.group_scales.data + tile * a.extra_stride;
  const float* zt = a.zero_terms.data + tile * a.extra_stride;
  // Several int32 accumulators per row of x where the rows are few, so that one row of x is not
  // held to the vpdpbusd latency: each step feeds two (its low and high nibbles), and with one
  // or two rows two steps go at once into four (one row of x against o, 896 x 896, in L2, one
  // Zen 4 thread: 8.0 us against 8.4 with two; the rest is the vector units' throughput).
  constexpr int kAcc = MR <= 2 ? 4 : MR <= 4 ? 2 : 1;
  constexpr int kUnroll = kAcc == 4 ? 2 : 1;
  __m512 out[MR];
  for (int m = 0; m < MR; ++m) out[m] = _mm512_setzero_ps();
  const int64_t spg = L.steps_per_group;
  const uint8_t* c = codes;
  for (int64_t g = 0; g < L.groups; ++g) {
    __m512i acc[MR][kAcc];
    for (int m = 0; m < MR; ++m)
      for (int i = 0; i < kAcc; ++i) acc[m][i] = _mm512_setzero_si512();
    int64_t t = 0;
    for (; t + kUnroll <= spg; t += kUnroll, c += kUnroll * step_bytes, quads += 2 * MR * kUnroll) {
      w4_lanes_step<MR, kAcc, 0, Gfni>(acc, c, quads, code_mask);
      if constexpr (kUnroll == 2) w4_lanes_step<MR, kAcc, 2, Gfni>(acc, c + step_bytes, quads + 2 * MR, code_mask);
    }
    for (; t < spg; ++t, c += step_bytes, quads += 2 * MR) w4_lanes_step<MR, kAcc, 0, Gfni>(acc, c, quads, code_mask);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(row_mask, scales + g * R));
    const __m512 sz = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(row_mask, zeros + g * R))));
    for (int m = 0; m < MR; ++m) {
      __m512i dot = acc[m][0];
      for (int i = 1; i < kAcc; ++i) dot = _mm512_add_epi32(dot, acc[m][i]);
      out[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, _mm512_set1_ps(xs[g * MR + m])), out[m]);
      out[m] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(zt[g * MR + m]), out[m]);
    }
  }
  store_lanes_block<MR>(args, b, m0, row_mask, out);
}

// w8 block b (16 output rows, or the R left) against MR rows of x from m0. Per step of 4
// columns: one load and one xor (+128: unsigned bytes for vpdpbusd) shared by the MR rows, then
// one vpdpbusd per row of x with its 4 bytes broadcast from memory; each accumulator starts at
// -128 times the x block's code sum, so it ends exact. Per block of x (128 columns) and row of x:
// conversion and its scale on 16 rows at once; the row scales once at the end.
template <int MR>
FITSERVE_VNNI void w8_lanes_block(const KernelArgs& args, const W8Lanes& L, int64_t b, int64_t m0) {
  constexpr int T = kLanesTileRows;
  static_assert(MR <= T, "a pass covers one tile of x rows (MR: its rows)");
  const QuantPart& p = *args.part;
  const ActivationCodes& a = *args.act;
  const int64_t R = L.block_rows(b), step_bytes = 4 * R, steps = L.K / 4;
  const __mmask64 code_mask = R == kLaneRows ? ~__mmask64(0) : (~__mmask64(0)) >> (64 - step_bytes);
  const __mmask16 row_mask = static_cast<__mmask16>((1u << R) - 1);
  const int64_t tile = m0 / T;
  const int32_t* quads = a.offsets.data + tile * a.scale_stride;  // step t of row m: MR t + m
  const float* xs = a.group_scales.data + tile * a.extra_stride;
  const int32_t* sums = a.block_sums.data + tile * a.extra_stride;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  constexpr int64_t kStepsPerBlock = kW8XBlock / 4;
  // Two int32 accumulators per row of x where the rows are few (as in w4_lanes_block).
  constexpr int kAcc = MR <= 4 ? 2 : 1;
  __m512 out[MR];
  for (int m = 0; m < MR; ++m) out[m] = _mm512_setzero_ps();
  const uint8_t* c = p.codes + L.code_offset(b);
  for (int64_t g = 0, t = 0; t < steps; ++g) {
    const int64_t end = std::min(steps, t + kStepsPerBlock);
    __m512i acc[MR][kAcc];
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = _mm512_set1_epi32(-128 * sums[g * MR + m]);
      if constexpr (kAcc == 2) acc[m][1] = _mm512_setzero_si512();
    }
    for (; t + 1 < end; t += 2, c += 2 * step_bytes, quads += 2 * MR) {
      _mm_prefetch(reinterpret_cast<const char*>(c) + kSingleRowPrefetchBytes, _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(c + step_bytes) + kSingleRowPrefetchBytes, _MM_HINT_T1);
      const __m512i v0 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(code_mask, c), flip);
      const __m512i v1 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(code_mask, c + step_bytes), flip);
      for (int m = 0; m < MR; ++m) {
        acc[m][0] = dpbusd_broadcast(acc[m][0], v0, quads + m);
        acc[m][kAcc - 1] = dpbusd_broadcast(acc[m][kAcc - 1], v1, quads + MR + m);
      }
    }
    if (t < end) {  // an odd number of steps left in the block (K % 8 == 4)
      const __m512i v = _mm512_xor_si512(_mm512_maskz_loadu_epi8(code_mask, c), flip);
      for (int m = 0; m < MR; ++m) acc[m][0] = dpbusd_broadcast(acc[m][0], v, quads + m);
      ++t, c += step_bytes, quads += MR;
    }
    for (int m = 0; m < MR; ++m) {
      const __m512i dot = kAcc == 2 ? _mm512_add_epi32(acc[m][0], acc[m][kAcc - 1]) : acc[m][0];
      out[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xs[g * MR + m]), out[m]);
    }
  }
  const __m512 row_scales = _mm512_maskz_loadu_ps(row_mask, p.row_scales + b * kLaneRows);
  for (int m = 0; m < MR; ++m) out[m] = _mm512_mul_ps(out[m], row_scales);
  store_lanes_block<MR>(args, b, m0, row_mask, out);
}

// 128-bit lane i (0-3) of v; the extract instruction takes its lane as an immediate.
__attribute__((target("avx512f"))) inline __m128i lane128(__m512i v, int i) {
  switch (i) {
    case 0: return _mm512_castsi512_si128(v);
    case 1: return _mm512_extracti32x4_epi32(v, 1);
    case 2: return _mm512_extracti32x4_epi32(v, 2);
    default: return _mm512_extracti32x4_epi32(v, 3);
  }
}

// Rows [first, first + count) of a w4 lanes-layout part (to `out`'s rows), each value (q - z) * s in
// float32 as dequantize_w4 computes it (T = BF16: then rounded to nearest even). Per step of a
// block, the codes are split into nibbles and interleaved so that each 64-bit word is one row's 8
// columns in order; two rows at a time are widened, offset by their zeros, scaled and stored.
template <typename T>
FITSERVE_AVX512_BF16 void dequantize_w4_lanes_block_avx512(const QuantPart& p, const W4Lanes& L, int64_t b,
                                                           int64_t first, int64_t count, const RowsOut<T>& out) {
  const int64_t R = L.block_rows(b), step_bytes = 4 * R, n0 = b * kLaneRows, K = L.K;
  const uint8_t* codes = p.codes + L.code_offset(b);
  const uint16_t* scales = p.half_scales + L.group_offset(b);
  const uint8_t* zeros = p.zero_codes + L.group_offset(b);
  const __mmask64 code_mask = R == kLaneRows ? ~__mmask64(0) : (~__mmask64(0)) >> (64 - step_bytes);
  const __mmask16 row_mask = static_cast<__mmask16>((1u << R) - 1);
  // Pair q: after the interleave, 128-bit lane q / 2 of word (q % 2) holds rows `pair_rows`.
  static constexpr int pair_rows[8][2] = {{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11}, {12, 13}, {14, 15}};
  T* rows[kLaneRows];
  for (int r = 0; r < kLaneRows; ++r) {
    const int64_t n = n0 + r;
    rows[r] = r < R && n >= first && n < first + count ? out.row(n) : nullptr;
  }
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < L.groups; ++g) {
    const __m512i z = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(row_mask, zeros + g * R));
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(row_mask, scales + g * R));
    __m512i pz[8];
    __m512 ps[8];
    for (int q = 0; q < 8; ++q) {
      // Lanes 0-7 take row a's value, 8-15 row b's.
      const __m512i index = _mm512_mask_set1_epi32(_mm512_set1_epi32(pair_rows[q][0]), 0xFF00, pair_rows[q][1]);
      pz[q] = _mm512_permutexvar_epi32(index, z);
      ps[q] = _mm512_permutexvar_ps(index, s);
    }
    for (int64_t t = 0; t < L.steps_per_group; ++t) {
      const int64_t step = g * L.steps_per_group + t, k = 8 * step;
      const __m512i v = _mm512_maskz_loadu_epi8(code_mask, codes + step * step_bytes);
      const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      // 128-bit lane i: unpacklo = rows 4i, 4i+1 (8 codes each, in column order); unpackhi = 4i+2, 4i+3.
      const __m512i words[2] = {_mm512_unpacklo_epi32(lo, hi), _mm512_unpackhi_epi32(lo, hi)};
      for (int q = 0; q < 8; ++q) {
        const int ra = pair_rows[q][0], rb = pair_rows[q][1];
        if (!rows[ra] && !rows[rb]) continue;
        const int lane = q / 2, word = q % 2;
        const __m128i bytes = lane128(words[word], lane);
        const __m512 values = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(bytes), pz[q])), ps[q]);
        if constexpr (std::is_same_v<T, BF16>) {
          const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(values);
          if (rows[ra]) _mm_storeu_si128(reinterpret_cast<__m128i*>(rows[ra] + k), _mm256_castsi256_si128(rounded));
          if (rows[rb]) _mm_storeu_si128(reinterpret_cast<__m128i*>(rows[rb] + k), _mm256_extracti128_si256(rounded, 1));
        } else {
          if (rows[ra]) _mm256_storeu_ps(rows[ra] + k, _mm512_castps512_ps256(values));
          if (rows[rb]) _mm256_storeu_ps(rows[rb] + k, _mm512_extractf32x8_ps(values, 1));
        }
      }
    }
  }
}

// The same one value at a time (CPUs with VNNI but no AVX-512 BF16, for bf16 slices).
template <typename T>
void dequantize_w4_lanes_row_scalar(const QuantPart& p, const W4Lanes& L, int64_t n, T* out) {
  for (int64_t k = 0; k < L.K; ++k) {
    const uint8_t byte = p.codes[L.code_byte(n, k)];
    const int q = k % 8 < 4 ? byte & 0x0F : byte >> 4;
    const int64_t gi = L.group_index(n, k / L.G);
    const float s = static_cast<float>(reinterpret_cast<const at::Half*>(p.half_scales)[gi]);
    out[k] = static_cast<T>(static_cast<float>(q - p.zero_codes[gi]) * s);
  }
}

// Rows [first, first + count) of an N-row lanes-layout part, by blocks of 16 split between
// threads: each block through block(b) where the CPU has the vector path, else each of its rows
// in the range through row(n).
template <typename Block, typename Row>
void for_lane_blocks(int64_t first, int64_t count, int64_t N, bool vectorized, const Block& block, const Row& row) {
  const int64_t b0 = first / kLaneRows, b1 = (first + count + kLaneRows - 1) / kLaneRows;
  at::parallel_for(b0, b1, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if (vectorized) {
        block(b);
        continue;
      }
      const int64_t n1 = std::min({first + count, (b + 1) * kLaneRows, N});
      for (int64_t n = std::max(first, b * kLaneRows); n < n1; ++n) row(n);
    }
  });
}

template <typename T>
void dequantize_w4_lanes_rows(const QuantPart& p, const W4Lanes& L, int64_t first, int64_t count, const RowsOut<T>& out) {
  for_lane_blocks(first, count, L.N, vector_dequantize<T>(),
                  [&](int64_t b) { dequantize_w4_lanes_block_avx512<T>(p, L, b, first, count, out); },
                  [&](int64_t n) { dequantize_w4_lanes_row_scalar<T>(p, L, n, out.row(n)); });
}

// Rows [first, first + count) of a w8 lanes-layout part (to `out`'s rows), each value w * s in
// float32 as dequantize_w8 computes it (T = BF16: then rounded to nearest even). Per 4 steps of a
// block (16 columns of 16 rows), a 4x4 transpose of 32-bit words within each 128-bit lane puts
// one row's 16 bytes in a lane; each row is widened, scaled and stored.
template <typename T>
FITSERVE_AVX512_BF16 void dequantize_w8_lanes_block_avx512(const QuantPart& p, const W8Lanes& L, int64_t b,
                                                           int64_t first, int64_t count, const RowsOut<T>& out) {
  const int64_t R = L.block_rows(b), step_bytes = 4 * R, n0 = b * kLaneRows, K = L.K, steps = K / 4;
  const uint8_t* codes = p.codes + L.code_offset(b);
  const __mmask64 code_mask = R == kLaneRows ? ~__mmask64(0) : (~__mmask64(0)) >> (64 - step_bytes);
  T* rows[kLaneRows];
  __m512 scales[kLaneRows];
  for (int r = 0; r < kLaneRows; ++r) {
    const int64_t n = n0 + r;
    rows[r] = r < R && n >= first && n < first + count ? out.row(n) : nullptr;
    scales[r] = _mm512_set1_ps(rows[r] ? p.row_scales[n] : 0.0f);
  }
  for (int64_t s0 = 0; s0 < steps; s0 += 4) {
    const int64_t here = std::min<int64_t>(4, steps - s0), k = 4 * s0;
    __m512i v[4];
    for (int i = 0; i < 4; ++i)
      v[i] = i < here ? _mm512_maskz_loadu_epi8(code_mask, codes + (s0 + i) * step_bytes) : _mm512_setzero_si512();
    const __m512i t0 = _mm512_unpacklo_epi32(v[0], v[1]), t1 = _mm512_unpackhi_epi32(v[0], v[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(v[2], v[3]), t3 = _mm512_unpackhi_epi32(v[2], v[3]);
    // 128-bit lane i of words[j] holds row 4i + j's 16 bytes (columns k .. k + 15, in order).
    const __m512i words[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                              _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
    const __mmask16 mask = here == 4 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (4 * here)) - 1);
    for (int r = 0; r < kLaneRows; ++r) {
      if (!rows[r]) continue;
      const __m128i bytes = lane128(words[r % 4], r / 4);
      const __m512 values = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), scales[r]);
      if constexpr (std::is_same_v<T, BF16>) _mm256_mask_storeu_epi16(rows[r] + k, mask, (__m256i)_mm512_cvtneps_pbh(values));
      else _mm512_mask_storeu_ps(rows[r] + k, mask, values);
    }
  }
}

template <typename T>
void dequantize_w8_lanes_rows(const QuantPart& p, const W8Lanes& L, int64_t first, int64_t count, const RowsOut<T>& out) {
  // One value at a time where the CPU lacks the vector path (VNNI but no AVX-512 BF16, bf16 slices).
  const auto row = [&](int64_t n) {
    T* o = out.row(n);
    for (int64_t k = 0; k < L.K; ++k)
      o[k] = static_cast<T>(static_cast<float>(static_cast<int8_t>(p.codes[L.code_byte(n, k)])) * p.row_scales[n]);
  };
  for_lane_blocks(first, count, L.N, vector_dequantize<T>(),
                  [&](int64_t b) { dequantize_w8_lanes_block_avx512<T>(p, L, b, first, count, out); }, row);
}

}  // namespace fitserve_cpu
