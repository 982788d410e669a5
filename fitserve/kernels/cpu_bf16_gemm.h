// y = x W^T + b for 2 to a few dozen rows of bf16 x against bf16 W, with vdpbf16ps (AVX512-BF16).
//
// Why: these are the projections of a batched decode step (one row per running sequence).
// On a 2-core Zen 4 the matmul library (oneDNN through at::linear) takes 1.3-1.5 ms for 2-8
// rows of a 9728x896 bf16 weight, reading it at 12-14 GB/s, and 2.6 ms for 32 rows (214
// GFLOP/s of a ~420 peak): too little work per call for its blocking and packing to pay off.
// Here W streams from memory once per call, and each vdpbf16ps multiplies 32 bf16 pairs exactly
// and adds them into float32 lanes, so there is nothing to widen. Up to 8 rows of x that fit
// in L1 meet W row by row, one sequential stream as in the single-row kernel; more rows meet
// it in blocks of four rows that stay in L1 while tiles of up to six rows of x pass over them.
//
// Accumulation is float32 (round-to-nearest-even per vdpbf16ps, as oneDNN's bf16 kernels on
// these CPUs), rounded once to bf16 with the bias added, as at::linear does.

#pragma once

#include "cpu_kernels.h"

namespace fitserve_cpu {

constexpr int kGemmTileRows = 6;  // rows of x per tile: 6 x 4 accumulators + 4 W + 1 x = 29 zmm

// The lines a W block asks for ahead of use: `next` up to `end`, `per_step` lines per
// 32-element step of the tiles that pass over the current block, so the fetch of a block
// ahead is spread over all the compute of this one (a burst at one tile's start would stall
// on the core's outstanding-miss limit; spread too thin, it would arrive late).
struct PrefetchCursor {
  const char* next;
  const char* end;
  int per_step;
  FITSERVE_AVX512_BF16 inline void step() {
    for (int i = 0; i < per_step && next < end; ++i, next += 64) _mm_prefetch(next, _MM_HINT_T0);
  }
};

// out[m][r] = the sum of acc[m][r]'s lanes, eight sums at a time: each vector's halves added,
// then one transposing reduction of eight (hsum8) instead of eight separate reductions: a
// third of the instructions, +1-5% on batched-decode shapes (A/B inside one process).
template <int MR>
FITSERVE_AVX512_BF16 inline void reduce_tile(const __m512 (&acc)[MR][4], float out[][4]) {
  constexpr int kCount = MR * 4;
  alignas(32) float sums[(kCount + 7) / 8 * 8];
  for (int group = 0; group < kCount; group += 8) {
    __m256 halves[8];
    for (int i = 0; i < 8; ++i) {
      const int index = group + i;
      halves[i] = index < kCount ? _mm256_add_ps(_mm512_castps512_ps256(acc[index / 4][index % 4]),
                                                 _mm512_extractf32x8_ps(acc[index / 4][index % 4], 1))
                                 : _mm256_setzero_ps();
    }
    _mm256_store_ps(sums + group, hsum8(halves));
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 4; ++r) out[m][r] = sums[m * 4 + r];
}

// MR rows of x against 4 rows of W over K: out[m][r] = x_m . w_r.
template <int MR>
FITSERVE_AVX512_BF16 inline void dot_tile_bf16(const BF16* const* x_rows, const BF16* const* w_rows, int64_t K,
                                               PrefetchCursor& prefetch, float out[][4]) {
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    prefetch.step();
    __m512bh w[4];
    for (int r = 0; r < 4; ++r) w[r] = (__m512bh)_mm512_loadu_si512(w_rows[r] + k);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x_rows[m] + k);
      for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, w[r]);
    }
  }
  if (k < K) {  // the last K % 32 elements, the rest of the vector zero
    const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1);
    __m512bh w[4];
    for (int r = 0; r < 4; ++r) w[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w_rows[r] + k);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x_rows[m] + k);
      for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, w[r]);
    }
  }
  reduce_tile<MR>(acc, out);
}

// Rows [n0, n0 + 4) of the output for every row of x (W rows past N repeat the last one and
// their results are dropped), asking meanwhile for the block ahead_blocks further on.
FITSERVE_AVX512_BF16 inline void gemm_bf16_block(const BF16* x, const BF16* w, const BF16* bias, BF16* out,
                                                 int64_t M, int64_t N, int64_t K, int64_t n0, int64_t ahead_blocks) {
  const BF16* w_rows[4];
  for (int r = 0; r < 4; ++r) w_rows[r] = w + std::min(n0 + r, N - 1) * K;
  const int rows = static_cast<int>(std::min<int64_t>(4, N - n0));
  // The four rows of a block are contiguous: the block ahead is one run of lines.
  const int64_t ahead_row = std::min(n0 + 4 * ahead_blocks, N), ahead_end = std::min(ahead_row + 4, N);
  const int64_t tiles = (M + kGemmTileRows - 1) / kGemmTileRows, steps = tiles * ((K + 31) / 32);
  const int64_t lines = ((ahead_end - ahead_row) * K * static_cast<int64_t>(sizeof(BF16)) + 63) / 64;
  PrefetchCursor prefetch{reinterpret_cast<const char*>(w + ahead_row * K),
                          reinterpret_cast<const char*>(w + ahead_end * K),
                          static_cast<int>(std::max<int64_t>(1, (lines + steps - 1) / steps))};
  float tile[kGemmTileRows][4];
  for (int64_t m0 = 0; m0 < M; m0 += kGemmTileRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kGemmTileRows, M - m0));
    const BF16* x_rows[kGemmTileRows];
    for (int m = 0; m < mr; ++m) x_rows[m] = x + (m0 + m) * K;
    switch (mr) {
      case 6: dot_tile_bf16<6>(x_rows, w_rows, K, prefetch, tile); break;
      case 5: dot_tile_bf16<5>(x_rows, w_rows, K, prefetch, tile); break;
      case 4: dot_tile_bf16<4>(x_rows, w_rows, K, prefetch, tile); break;
      case 3: dot_tile_bf16<3>(x_rows, w_rows, K, prefetch, tile); break;
      case 2: dot_tile_bf16<2>(x_rows, w_rows, K, prefetch, tile); break;
      default: dot_tile_bf16<1>(x_rows, w_rows, K, prefetch, tile); break;
    }
    for (int m = 0; m < mr; ++m)
      for (int r = 0; r < rows; ++r)
        out[(m0 + m) * N + n0 + r] = static_cast<BF16>(tile[m][r] + (bias ? static_cast<float>(bias[n0 + r]) : 0.0f));
  }
}

// MR (few) rows of x against one row of W: W read as one sequential stream, as in the
// single-row kernel, for the memory-bound case where the four-row blocks' interleaved streams
// fetch W more slowly than the compute needs it.
template <int MR>
FITSERVE_AVX512_BF16 inline void dot_rows_stream(const BF16* const* x_rows, const BF16* w, int64_t K, float* out) {
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    prefetch_ahead(w + k);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + k), w1 = (__m512bh)_mm512_loadu_si512(w + k + 32);
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_loadu_si512(x_rows[m] + k), w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], (__m512bh)_mm512_loadu_si512(x_rows[m] + k + 32), w1);
    }
  }
  for (; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + k);
    for (int m = 0; m < MR; ++m)
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_maskz_loadu_epi16(mask, x_rows[m] + k), wv);
  }
  for (int m = 0; m < MR; ++m) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

template <int MR>
FITSERVE_AVX512_BF16 inline void gemm_bf16_rows(const BF16* x, const BF16* w, const BF16* bias, BF16* out, int64_t N,
                                                int64_t K, int64_t first_row, int64_t last_row) {
  const BF16* x_rows[MR];
  for (int m = 0; m < MR; ++m) x_rows[m] = x + m * K;
  float sums[MR];
  for (int64_t n = first_row; n < last_row; ++n) {
    dot_rows_stream<MR>(x_rows, w + n * K, K, sums);
    for (int m = 0; m < MR; ++m) out[m * N + n] = static_cast<BF16>(sums[m] + (bias ? static_cast<float>(bias[n]) : 0.0f));
  }
}

// Up to this many rows of x, and while they fit in L1 beside the stream (kStreamXBytes), W
// streams row by row; beyond, the four-row blocks reuse each W load for more rows of x.
constexpr int64_t kStreamRowsMax = 8;
constexpr int64_t kStreamXBytes = 24 * 1024;

// Callers check cpu_has_avx512_bf16().
inline void linear_bf16_dot(const BF16* x, const BF16* w, const BF16* bias, BF16* out, int64_t M, int64_t N,
                            int64_t K) {
  if (M <= kStreamRowsMax && M * K * static_cast<int64_t>(sizeof(BF16)) <= kStreamXBytes) {
    const int64_t chunk_rows = std::max<int64_t>(1, kClaimBytes / (K * static_cast<int64_t>(sizeof(BF16))));
    const int64_t chunks = (N + chunk_rows - 1) / chunk_rows;
    parallel_for_stealing(chunks, 1, [&](int64_t first, int64_t last) {
      const int64_t first_row = first * chunk_rows, last_row = std::min(N, last * chunk_rows);
      switch (M) {
        case 8: gemm_bf16_rows<8>(x, w, bias, out, N, K, first_row, last_row); break;
        case 7: gemm_bf16_rows<7>(x, w, bias, out, N, K, first_row, last_row); break;
        case 6: gemm_bf16_rows<6>(x, w, bias, out, N, K, first_row, last_row); break;
        case 5: gemm_bf16_rows<5>(x, w, bias, out, N, K, first_row, last_row); break;
        case 4: gemm_bf16_rows<4>(x, w, bias, out, N, K, first_row, last_row); break;
        case 3: gemm_bf16_rows<3>(x, w, bias, out, N, K, first_row, last_row); break;
        case 2: gemm_bf16_rows<2>(x, w, bias, out, N, K, first_row, last_row); break;
        default: gemm_bf16_rows<1>(x, w, bias, out, N, K, first_row, last_row); break;
      }
    });
    return;
  }
  const int64_t blocks = (N + 3) / 4, block_bytes = 4 * K * static_cast<int64_t>(sizeof(BF16));
  const int64_t chunk = std::max<int64_t>(1, kClaimBytes / block_bytes);
  // Ask for W kPrefetchBytes ahead (at least the next block), as the single-row kernel does.
  const int64_t ahead_blocks = std::max<int64_t>(1, (kPrefetchBytes + block_bytes - 1) / block_bytes);
  parallel_for_stealing(blocks, chunk, [&](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) gemm_bf16_block(x, w, bias, out, M, N, K, block * 4, ahead_blocks);
  });
}

}  // namespace fitserve_cpu
