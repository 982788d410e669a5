// y = x W^T + b for a layer stored as BitStack blocks (fitserve/quant/bitstack_packing.py):
// W = Σ_b sign_b ⊙ (u_b v_b), signs packed 1 bit per weight (set bit = -1), u_b [N, r] and
// v_b [r, K] in float16. One object per layer, holding one or more parts (the projections of a
// fused qkv or gate_up layer, each writing its own consecutive rows), each a list of blocks of
// which the first `active` are used, so a resize changes a count or drops tensors, nothing more.
//
// Few rows of x (decode): W is never rebuilt. Per block and row x of the input,
//   T[k, j] = v[j, k] x[k]                         (K x r, the r scaled copies of x)
//   (S T)[n, j] = Σ_k T[k, j] - 2 Σ_{k: bit set} T[k, j]   (S = 1 - 2B, B the sign bits as 0/1)
//   y[n] += Σ_j u[n, j] (S T)[n, j]
// T is rounded to int8 per block of 128 columns and rank (scale t = max|T| / 127, as QuantLinear
// rounds x), so B T is an integer product: each 4 bits of a weight row index a 16-entry table of
// their 0/1 bytes, and vpdpbusd multiplies those four columns of the row by the 16 ranks of the
// columns at once, one 32-bit lane per rank (AVX-512 VNNI; AVX2 does the same with vpmaddubsw +
// vpmaddwd on two 256-bit halves). Ranks above 16 take several
// 16-lane chunks; ranks below 16 leave lanes idle. The sums are exact in int32, so the only
// error beyond float32 rounding is the rounding of T: at most t/2 per element (the bound
// tests/kernels/test_bitstack_linear.py checks). Why this shape: the work is N K r
// multiply-adds per block, 64 per vpdpbusd, with four weight rows sharing each load of T;
// nothing of W but its bits is read, so the kernel is compute-bound, not memory-bound (see
// benchmarks/cpu_bitstack_kernels.py for the fraction of the vpdpbusd peak it reaches).
//
// Many rows (prefill): slices of rows of W are rebuilt (float32, or bf16 for bf16 x on CPUs
// with bf16 arithmetic) into the process-wide dequantizing scratch shared with QuantLinear and
// multiplied by the matmul library, as QuantLinear does for its formats.

#pragma once

#include "cpu_kernels.h"
#include "cpu_quant_linear.h"

#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace fitserve_cpu {

constexpr int64_t kBitStackColumns = 128;  // columns of T per int8 scale
constexpr int64_t kBitStackGroups = kBitStackColumns / 4;  // 4-column groups per scale block
constexpr int64_t kBitStackLanes = 16;     // ranks per chunk (one 512-bit vector of int32)
constexpr int kBitStackTileRows = 8;       // weight rows sharing each load of T
// Rows of x up to which the integer kernel runs by default (above: rebuild W and matmul). The
// kernel's work grows with the rows of x (N K r per block and row) while the rebuild's barely
// does: benchmarks/cpu_bitstack_kernels.py --section rows (gate_up 9728x896, 3 blocks, one
// thread, 2-core Zen 4 shared with other jobs): kernel 6.5 / 8.8 / 16 / 33 / 65 / 135 ms at
// 1 / 2 / 4 / 8 / 16 / 32 rows, rebuild + matmul 72-120 ms throughout; 8 keeps the kernel
// where it is clearly faster (2.4x at 8 rows).
constexpr int64_t kBitStackDecodeMaxRows = 8;

inline bool cpu_has_f16c() { return __builtin_cpu_supports("f16c"); }

struct BitStackBlock {
  torch::Tensor signs, u, v;  // uint8 [N, ceil(K/8)], float16 [N, r], float16 [r, K]
  const uint8_t* sign_bytes = nullptr;
  const uint16_t* u_half = nullptr;
  const uint16_t* v_half = nullptr;
};

struct BitStackPart {
  int64_t rows = 0, row_offset = 0, rank = 0;
  std::vector<BitStackBlock> blocks;
  int64_t active = 0;  // blocks [0, active) take part in products
};

// Per block, rank chunk and row of x, the int8 T in the kernels' order, and its scales:
//   codes   [chunks][padded groups][16 lanes][4 bytes]  lane j of group g: T[4g .. 4g+3, 16c + j]
//   scales  [chunks][scale blocks][16]  -2 t of each rank and block of 128 columns
//   offsets [chunks][16]                Σ over blocks of t Σ_k code (the Σ_k T term)
struct BitStackActivations {
  int64_t scale_blocks = 0, padded_columns = 0, chunks = 0;
  int64_t code_stride = 0, scale_stride = 0, offset_stride = 0;  // per (block, row of x)
  // AVX-512: codes stored + 128 as unsigned bytes (see bitstack_tile_vnni); AVX2: signed.
  bool unsigned_codes = false;
  AlignedBuffer<int8_t> codes;
  AlignedBuffer<float> scales, offsets;
};

// One thread's buffers while it prepares T (threads prepare different blocks at once).
struct BitStackStaging {
  std::vector<int8_t> codes;    // [16][padded_columns] codes of one chunk in column order
  std::vector<float> products;  // one 128-column slice of v[j] * x
};

// T of one block for one row x into slot (codes, scales, offsets).
FITSERVE_AVX2_F16C inline void prepare_bitstack_block(const float* x, const uint16_t* v, int64_t rank, int64_t K,
                                                      const BitStackActivations& a, int8_t* codes, float* scales,
                                                      float* offsets) {
  thread_local BitStackStaging staging;
  const int64_t P = a.padded_columns, groups = P / 4;
  staging.codes.resize(static_cast<size_t>(kBitStackLanes * P));
  staging.products.resize(static_cast<size_t>(kBitStackColumns));
  for (int64_t c = 0; c < a.chunks; ++c) {
    std::fill(staging.codes.begin(), staging.codes.end(), 0);
    float* chunk_scales = scales + c * a.scale_blocks * kBitStackLanes;
    for (int64_t j = 0; j < kBitStackLanes; ++j) {
      const int64_t r = c * kBitStackLanes + j;
      float offset = 0.0f;
      for (int64_t b = 0; b < a.scale_blocks; ++b) {
        const int64_t first = b * kBitStackColumns, count = std::min(kBitStackColumns, K - first);
        float scale = 0.0f;
        if (r < rank) {
          const uint16_t* vr = v + r * K + first;
          float* p = staging.products.data();
          int64_t k = 0;
          for (; k + 8 <= count; k += 8)
            _mm256_storeu_ps(p + k, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vr + k))),
                                                  _mm256_loadu_ps(x + first + k)));
          for (; k < count; ++k) p[k] = _cvtsh_ss(vr[k]) * x[first + k];
          int8_t* row_codes = staging.codes.data() + j * P + first;
          scale = quantize_block(p, count, row_codes);
          int32_t sum = 0;
          for (int64_t i = 0; i < count; ++i) sum += row_codes[i];
          offset += scale * static_cast<float>(sum);
        }
        chunk_scales[b * kBitStackLanes + j] = -2.0f * scale;
      }
      offsets[c * kBitStackLanes + j] = offset;
    }
    // Column order -> lane order: dword g of rank j's codes becomes lane j of group g.
    const uint32_t flip = a.unsigned_codes ? 0x80808080u : 0u;
    uint32_t* out = reinterpret_cast<uint32_t*>(codes + c * groups * 64);
    for (int64_t j = 0; j < kBitStackLanes; ++j) {
      const uint32_t* in = reinterpret_cast<const uint32_t*>(staging.codes.data() + j * P);
      for (int64_t g = 0; g < groups; ++g) out[g * kBitStackLanes + j] = in[g] ^ flip;
    }
  }
}

// What a row tile needs: the part, the prepared activations of every (block, row of x), where
// the results go, and the thread's buffers.
struct SmallRankActivations;

struct BitStackArgs {
  const BitStackPart* part;
  const BitStackActivations* act;  // the lane-per-rank kernel's T, or nullptr
  int64_t M, K;
  const float* bias;  // [out_features] or nullptr
  float* out;          // [M, out_features]
  int64_t out_features;
  const SmallRankActivations* small_rank = nullptr;  // the columns-in-lanes kernel's t, or nullptr
};

// The results of a tile: Σ over blocks and chunks of u ⊙ (S T), one 16-lane vector per (row of
// x, weight row), summed across lanes at the end.
struct BitStackTileBuffers {
  AlignedBuffer<float> totals;     // [M][kBitStackTileRows][16]
  AlignedBuffer<int32_t> set_bits;  // AVX-512: [kBitStackTileRows][scale blocks] 128 x set bits
};

// A tile's buffers, from the calling thread's: its zeroed totals and (AVX-512) its set-bit counts.
struct BitStackTile {
  float* totals;
  int32_t* set_bits;
};

inline BitStackTile begin_tile(const BitStackArgs& args) {
  thread_local BitStackTileBuffers buffers;
  const BitStackActivations& a = *args.act;
  BitStackTile tile{buffers.totals.get(args.M * kBitStackTileRows * kBitStackLanes),
                    buffers.set_bits.get(kBitStackTileRows * a.scale_blocks)};
  std::memset(tile.totals, 0, sizeof(float) * args.M * kBitStackTileRows * kBitStackLanes);
  return tile;
}

// The packed bits of row n (ceil(K/8) bytes) as 64-bit words; bytes past the row read as 0.
inline uint64_t sign_word(const uint8_t* row, int64_t row_bytes, int64_t byte) {
  uint64_t word = 0;
  if (__builtin_expect(byte + 8 <= row_bytes, 1)) std::memcpy(&word, row + byte, 8);
  else if (byte < row_bytes) std::memcpy(&word, row + byte, static_cast<size_t>(row_bytes - byte));
  return word;
}

// out[m][row] = the tile's sums (one per row of x and weight row) plus the bias.
inline void finish_tile(const BitStackArgs& args, int64_t n0, int rows, const float* sums) {
  const BitStackPart& p = *args.part;
  for (int64_t m = 0; m < args.M; ++m)
    for (int r = 0; r < rows; ++r) {
      const int64_t row = p.row_offset + n0 + r;
      args.out[m * args.out_features + row] = sums[m * kBitStackTileRows + r] + (args.bias ? args.bias[row] : 0.0f);
    }
}

// ------------------------------------------------------------------------- AVX-512 VNNI

// 128 x the set bits of each block of 128 columns of one weight row (the +128 of the unsigned
// codes to take back).
inline void count_set_bits(const uint8_t* row, int64_t row_bytes, int64_t scale_blocks, int32_t* set_bits) {
  for (int64_t s = 0; s < scale_blocks; ++s)
    set_bits[s] = 128 * (__builtin_popcountll(sign_word(row, row_bytes, 16 * s)) +
                         __builtin_popcountll(sign_word(row, row_bytes, 16 * s + 8)));
}

// The four 0/1 bytes a 4-bit sign pattern stands for (bit i -> byte i): the broadcast operand of
// one vpdpbusd, read straight from this 64-byte table, so the bits are never expanded in memory.
alignas(64) inline constexpr uint32_t kNibbleBytes[16] = {
    0x00000000, 0x00000001, 0x00000100, 0x00000101, 0x00010000, 0x00010001, 0x00010100, 0x00010101,
    0x01000000, 0x01000001, 0x01000100, 0x01000101, 0x01010000, 0x01010001, 0x01010100, 0x01010101};

// acc += vpdpbusd(t, the 32 bits at word broadcast to every lane), written out because the
// compiler neither folds the broadcast into the instruction nor keeps an array of accumulators in
// place (GCC 12 copied each accumulator once per instruction: 8 register moves per 8 vpdpbusd).
FITSERVE_VNNI inline void dpbusd_broadcast(__m512i& acc, __m512i t, const uint8_t* word) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(t), "m"(*reinterpret_cast<const int32_t*>(word)));
}

// Rows [n0, n0 + R) of the part. The codes are stored + 128 (unsigned) and the 0/1 bits are the
// signed operand, so that each vpdpbusd takes its four bits as a broadcast memory operand (one
// instruction per 64 multiply-adds); the +128 adds 128 per set bit, subtracted per block of 128
// columns from the bits' popcount. The broadcast comes from kNibbleBytes indexed by the sign
// nibble, not from the row's bits expanded to 0/1 bytes in a buffer: on Zen 4 (one thread,
// gate_up shape) 0.77 instead of 0.71 of the register-only vpdpbusd rate (the expansion's 64-byte
// stores were the cost; with no expansion at all, a wrong result as an experiment, 0.87).
template <int R>
FITSERVE_VNNI void bitstack_tile_vnni(const BitStackArgs& args, int64_t n0) {
  const BitStackPart& p = *args.part;
  const BitStackActivations& a = *args.act;
  const int64_t P = a.padded_columns, row_bytes = (args.K + 7) / 8;
  const BitStackTile tile = begin_tile(args);
  float* totals = tile.totals;
  int32_t* set_bits = tile.set_bits;
  const uint8_t* nibble_bytes = reinterpret_cast<const uint8_t*>(kNibbleBytes);
  for (int64_t b = 0; b < p.active; ++b) {
    const BitStackBlock& block = p.blocks[b];
    const uint8_t* rows[R];
    for (int r = 0; r < R; ++r) {
      rows[r] = block.sign_bytes + (n0 + r) * row_bytes;
      count_set_bits(rows[r], row_bytes, a.scale_blocks, set_bits + r * a.scale_blocks);
    }
    for (int64_t m = 0; m < args.M; ++m) {
      const int64_t slot = b * args.M + m;
      const int8_t* codes = a.codes.data + slot * a.code_stride;
      const float* scales = a.scales.data + slot * a.scale_stride;
      const float* offsets = a.offsets.data + slot * a.offset_stride;
      for (int64_t c = 0; c < a.chunks; ++c) {
        __m512 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
        const int8_t* chunk_codes = codes + c * (P / 4) * 64;
        for (int64_t s = 0; s < a.scale_blocks; ++s) {
          __m512i sums[R];
          for (int r = 0; r < R; ++r) sums[r] = _mm512_setzero_si512();
          const int8_t* t = chunk_codes + s * kBitStackGroups * 64;
          // Each sign byte covers two groups; bytes past the row (padding) would add nothing.
          const int64_t first_byte = s * kBitStackColumns / 8;
          const int64_t bytes = std::min<int64_t>(kBitStackColumns / 8, row_bytes - first_byte);
          for (int64_t i = 0; i < bytes; ++i) {
            const __m512i low = _mm512_load_si512(t + 2 * i * 64), high = _mm512_load_si512(t + (2 * i + 1) * 64);
            for (int r = 0; r < R; ++r) {
              const unsigned byte = rows[r][first_byte + i];
              dpbusd_broadcast(sums[r], low, nibble_bytes + 4 * (byte & 15u));
              dpbusd_broadcast(sums[r], high, nibble_bytes + 4 * (byte >> 4));
            }
          }
          const __m512 scale = _mm512_load_ps(scales + (c * a.scale_blocks + s) * kBitStackLanes);
          for (int r = 0; r < R; ++r) {
            const __m512i exact = _mm512_sub_epi32(sums[r], _mm512_set1_epi32(set_bits[r * a.scale_blocks + s]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, acc[r]);
          }
        }
        const __m512 offset = _mm512_loadu_ps(offsets + c * kBitStackLanes);
        const int64_t lanes = std::min<int64_t>(kBitStackLanes, p.rank - c * kBitStackLanes);
        const __mmask16 lane_mask = static_cast<__mmask16>((1u << lanes) - 1);
        for (int r = 0; r < R; ++r) {
          const __m512 u = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
              lane_mask, block.u_half + (n0 + r) * p.rank + c * kBitStackLanes));
          float* total = totals + (m * kBitStackTileRows + r) * kBitStackLanes;
          _mm512_store_ps(total, _mm512_fmadd_ps(u, _mm512_add_ps(acc[r], offset), _mm512_load_ps(total)));
        }
      }
    }
  }
  for (int64_t i = 0; i < args.M * kBitStackTileRows; ++i) totals[i] = _mm512_reduce_add_ps(_mm512_load_ps(totals + i * kBitStackLanes));
  finish_tile(args, n0, R, totals);
}

// ------------------------------------------------------------ AVX-512 VNNI, small ranks
//
// The kernel above puts the ranks in the 16 lanes of each vpdpbusd, so a block of rank r < 16
// costs as much as rank 16. Small ranks (what `--rank auto` picks) put the COLUMNS in the lanes
// instead: per block, rank j and row x, t_j[k] = v[j, k] x[k] is rounded to int8 per group of
// kSmallRankColumns columns (scale t = max|t_j| / 127 over the group, stored in column order);
// per weight row, 64 sign bits become 64 0/1 bytes with one masked move (the mask loaded straight
// from the packed signs), and one vpdpbusd per rank adds those 64 columns of B t_j into 16 int32
// lanes, the 0/1 bytes reused by every rank of the block. After each group the int32 sums are
// converted and added with weight u[n, j] (-2 t) into one float vector per row, and
//   y[n] += Σ_j u[n, j] (Σ_k t_j[k] - 2 Σ_{k: bit set} t_j[k])    (S = 1 - 2B).
// Work per weight and block: (2 ceil(r / 2) + r) / 64 instructions for the bits (expanded once
// per pass of two ranks) and products plus 2 r / kSmallRankColumns for the conversions, against
// 16 ceil(r / 16) / 64 in the lane-per-rank kernel: cheaper up to rank ~6 by this count;
// measured, up to rank 6 (kBitStackSmallRankMax).
// Error: as above, the rounding of t alone, at most t/2 per element with t per group.

constexpr int64_t kSmallRankColumns = 128;  // columns of t_j per int8 scale
constexpr int kSmallRankTileRows = 4;       // weight rows sharing each load of t_j
constexpr int kSmallRankChunk = 2;          // ranks per pass over a row's bits (registers)
// Parts of rank up to this run the columns-in-lanes kernel on AVX-512 VNNI by default, from
// benchmarks/cpu_bitstack_kernels.py --section ranks (one decode row, each Qwen2.5-0.5B layer
// shape at w4's bytes, two threads of a 2-core Zen 4 shared with other jobs, best of ~20 calls):
// gate_up 9728x896 columns-in-lanes / lane-per-rank 0.47 / 1.58 ms at rank 1 (4 blocks), 1.22 /
// 1.59 at rank 4 (4 blocks), 1.64 / 1.23 at rank 8 (3 blocks); the other shapes cross alike.
constexpr int64_t kBitStackSmallRankMax = 6;

// Per (block, row of x) of a small-rank part: int8 t_j in column order and its scales.
//   codes   [rank][padded columns]   (0 past K)
//   scales  [rank][groups]           -2 t of each group
//   offsets [rank]                   Σ over groups of t Σ_k code (the Σ_k t_j[k] term)
struct SmallRankActivations {
  int64_t groups = 0, padded_columns = 0, code_stride = 0, scale_stride = 0, offset_stride = 0;
  AlignedBuffer<int8_t> codes;
  AlignedBuffer<float> scales, offsets;
};

FITSERVE_AVX2_F16C inline void prepare_small_rank_block(const float* x, const uint16_t* v, int64_t rank, int64_t K,
                                                        const SmallRankActivations& a, int8_t* codes, float* scales,
                                                        float* offsets) {
  thread_local std::vector<float> products;
  products.resize(static_cast<size_t>(kSmallRankColumns));
  for (int64_t j = 0; j < rank; ++j) {
    int8_t* row_codes = codes + j * a.padded_columns;
    std::memset(row_codes, 0, static_cast<size_t>(a.padded_columns));
    float offset = 0.0f;
    for (int64_t g = 0; g < a.groups; ++g) {
      const int64_t first = g * kSmallRankColumns, count = std::min(kSmallRankColumns, K - first);
      const uint16_t* vj = v + j * K + first;
      float* p = products.data();
      int64_t k = 0;
      for (; k + 8 <= count; k += 8)
        _mm256_storeu_ps(p + k, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vj + k))),
                                              _mm256_loadu_ps(x + first + k)));
      for (; k < count; ++k) p[k] = _cvtsh_ss(vj[k]) * x[first + k];
      const float scale = quantize_block(p, count, row_codes + first);
      int32_t sum = 0;
      for (int64_t i = 0; i < count; ++i) sum += row_codes[first + i];
      offset += scale * static_cast<float>(sum);
      scales[j * a.groups + g] = -2.0f * scale;
    }
    offsets[j] = offset;
  }
}

FITSERVE_VNNI inline float sum_lanes(const float* lanes) { return _mm512_reduce_add_ps(_mm512_load_ps(lanes)); }

// Rows [n0, n0 + R) and ranks [j0, j0 + J) of one block for one row of x: adds u ⊙ (the -2 t
// scaled sums of the set bits' t) into totals[r] (16 lanes per row, summed once per tile) and
// the Σ_k t term to sums[r]. The scale is per rank, so it is applied per group to a float
// accumulator per (row, rank) and u once per block; no per-row table, no thread-local lookup
// (the per-call work once cost as much as the products on 896-wide matrices).
template <int R, int J>
FITSERVE_VNNI void small_rank_tile_vnni(const BitStackBlock& block, int64_t rank, int64_t K, int64_t n0, int64_t j0,
                                        const SmallRankActivations& a, const int8_t* codes, const float* scales,
                                        const float* offsets, float* totals, float* sums) {
  const int64_t row_bytes = (K + 7) / 8, groups = a.groups, P = a.padded_columns;
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = block.sign_bytes + (n0 + r) * row_bytes;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512 scaled[R][J];
  for (int r = 0; r < R; ++r)
    for (int jj = 0; jj < J; ++jj) scaled[r][jj] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[R][J];
    for (int r = 0; r < R; ++r)
      for (int jj = 0; jj < J; ++jj) acc[r][jj] = _mm512_setzero_si512();
    const int64_t end = std::min(K, (g + 1) * kSmallRankColumns);
    for (int64_t column = g * kSmallRankColumns; column < end; column += 64) {
      __m512i t[J];
      for (int jj = 0; jj < J; ++jj) t[jj] = _mm512_load_si512(codes + (j0 + jj) * P + column);
      const int64_t byte = column / 8;
      const bool inside = byte + 8 <= row_bytes;  // else the row's last bytes (past K: codes 0)
      for (int r = 0; r < R; ++r) {
        uint64_t word;
        if (__builtin_expect(inside, 1)) std::memcpy(&word, rows[r] + byte, 8);
        else word = sign_word(rows[r], row_bytes, byte);
        const __m512i bits = _mm512_maskz_mov_epi8(_cvtu64_mask64(word), ones);
        for (int jj = 0; jj < J; ++jj) acc[r][jj] = _mm512_dpbusd_epi32(acc[r][jj], bits, t[jj]);
      }
    }
    for (int jj = 0; jj < J; ++jj) {
      const __m512 scale = _mm512_set1_ps(scales[(j0 + jj) * groups + g]);
      for (int r = 0; r < R; ++r) scaled[r][jj] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][jj]), scale, scaled[r][jj]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m512 total = _mm512_load_ps(totals + r * 16);
    for (int jj = 0; jj < J; ++jj) {
      const float u = _cvtsh_ss(block.u_half[(n0 + r) * rank + j0 + jj]);
      sums[r] += u * offsets[j0 + jj];
      total = _mm512_fmadd_ps(scaled[r][jj], _mm512_set1_ps(u), total);
    }
    _mm512_store_ps(totals + r * 16, total);
  }
}

template <int R>
FITSERVE_VNNI void small_rank_ranks_vnni(const BitStackBlock& block, int64_t rank, int64_t K, int64_t n0,
                                         const SmallRankActivations& a, const int8_t* codes, const float* scales,
                                         const float* offsets, float* totals, float* sums) {
  static_assert(kSmallRankChunk == 2, "the switch below lists the rank chunks");
  for (int64_t j0 = 0; j0 < rank; j0 += kSmallRankChunk) {
    if (rank - j0 >= 2) small_rank_tile_vnni<R, 2>(block, rank, K, n0, j0, a, codes, scales, offsets, totals, sums);
    else small_rank_tile_vnni<R, 1>(block, rank, K, n0, j0, a, codes, scales, offsets, totals, sums);
  }
}

// Rows [n0, n0 + rows) (rows <= kBitStackTileRows) of a small-rank part for every row of x and
// active block, four rows at a time (eight rows at rank 1 measured no faster).
inline void small_rank_rows_vnni(const BitStackArgs& args, const SmallRankActivations& a, int64_t n0, int rows) {
  const BitStackPart& p = *args.part;
  thread_local AlignedBuffer<float> sum_buffer;
  float* sums = sum_buffer.get(args.M * kBitStackTileRows);
  alignas(64) float totals[kBitStackTileRows * 16];
  for (int64_t m = 0; m < args.M; ++m) {
    float* s = sums + m * kBitStackTileRows;
    std::fill(s, s + kBitStackTileRows, 0.0f);
    std::fill(totals, totals + kBitStackTileRows * 16, 0.0f);
    for (int64_t b = 0; b < p.active; ++b) {
      const int64_t slot = b * args.M + m;
      const int8_t* codes = a.codes.data + slot * a.code_stride;
      const float* scales = a.scales.data + slot * a.scale_stride;
      const float* offsets = a.offsets.data + slot * a.offset_stride;
      const BitStackBlock& block = p.blocks[b];
      static_assert(kSmallRankTileRows == 4 && kBitStackTileRows == 8, "the switch below lists the tile sizes");
      for (int first = 0; first < rows; first += kSmallRankTileRows) {
        float* t = totals + first * 16;
        switch (std::min(kSmallRankTileRows, rows - first)) {
          case 4: small_rank_ranks_vnni<4>(block, p.rank, args.K, n0 + first, a, codes, scales, offsets, t, s + first); break;
          case 3: small_rank_ranks_vnni<3>(block, p.rank, args.K, n0 + first, a, codes, scales, offsets, t, s + first); break;
          case 2: small_rank_ranks_vnni<2>(block, p.rank, args.K, n0 + first, a, codes, scales, offsets, t, s + first); break;
          default: small_rank_ranks_vnni<1>(block, p.rank, args.K, n0 + first, a, codes, scales, offsets, t, s + first); break;
        }
      }
    }
    for (int r = 0; r < rows; ++r) s[r] += sum_lanes(totals + r * 16);
  }
  finish_tile(args, n0, rows, sums);
}

// vpdpbusd instructions per second that one thread retires with twelve independent
// accumulators and no memory operands: the compute bound the kernel's speed is quoted against
// (benchmarks/cpu_bitstack_kernels.py multiplies it by the threads and measures it in the same run).
FITSERVE_VNNI inline double dpbusd_rate_one_thread(int64_t iterations) {
  __m512i acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_epi32(i);
  const __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(3);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iterations; ++it)
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  __m512i total = acc[0];
  for (int i = 1; i < 12; ++i) total = _mm512_add_epi32(total, acc[i]);
  volatile int sink = _mm512_reduce_add_epi32(total);  // keeps the loop
  (void)sink;
  return 12.0 * static_cast<double>(iterations) / seconds;
}

// The same on every one of torch's threads at once, summed (0 where the CPU lacks VNNI).
inline double dpbusd_rate(int64_t iterations) {
  if (!cpu_has_avx512_vnni()) return 0.0;
  const int threads = at::get_num_threads();
  std::vector<double> rates(static_cast<size_t>(threads), 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) rates[t] = dpbusd_rate_one_thread(iterations);
  });
  double total = 0.0;
  for (const double rate : rates) total += rate;
  return total;
}

// ------------------------------------------------------------------------- AVX2

template <int R>
FITSERVE_AVX2_F16C void bitstack_tile_avx2(const BitStackArgs& args, int64_t n0) {
  const BitStackPart& p = *args.part;
  const BitStackActivations& a = *args.act;
  const int64_t P = a.padded_columns, row_bytes = (args.K + 7) / 8;
  const BitStackTile tile = begin_tile(args);
  float* totals = tile.totals;
  const __m256i ones16 = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < p.active; ++b) {
    const BitStackBlock& block = p.blocks[b];
    const uint8_t* rows[R];
    for (int r = 0; r < R; ++r) rows[r] = block.sign_bytes + (n0 + r) * row_bytes;
    for (int64_t m = 0; m < args.M; ++m) {
      const int64_t slot = b * args.M + m;
      const int8_t* codes = a.codes.data + slot * a.code_stride;
      const float* scales = a.scales.data + slot * a.scale_stride;
      const float* offsets = a.offsets.data + slot * a.offset_stride;
      for (int64_t c = 0; c < a.chunks; ++c) {
        __m256 acc[R][2];
        for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        const int8_t* chunk_codes = codes + c * (P / 4) * 64;
        for (int64_t s = 0; s < a.scale_blocks; ++s) {
          __m256i sums[R][2];
          for (int r = 0; r < R; ++r) sums[r][0] = sums[r][1] = _mm256_setzero_si256();
          const int8_t* t = chunk_codes + s * kBitStackGroups * 64;
          const int64_t first_byte = s * kBitStackColumns / 8;
          const int64_t groups = 2 * std::min<int64_t>(kBitStackColumns / 8, row_bytes - first_byte);
          for (int64_t g = 0; g < groups; ++g) {
            const __m256i t0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(t + g * 64));
            const __m256i t1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(t + g * 64 + 32));
            for (int r = 0; r < R; ++r) {
              const unsigned nibble = (rows[r][first_byte + g / 2] >> (4 * (g & 1))) & 15u;
              const __m256i w = _mm256_set1_epi32(static_cast<int32_t>(kNibbleBytes[nibble]));
              // 0/1 bytes times int8: pair sums within ±254, no saturation.
              sums[r][0] = _mm256_add_epi32(sums[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(w, t0), ones16));
              sums[r][1] = _mm256_add_epi32(sums[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(w, t1), ones16));
            }
          }
          const float* scale = scales + (c * a.scale_blocks + s) * kBitStackLanes;
          const __m256 s0 = _mm256_load_ps(scale), s1 = _mm256_load_ps(scale + 8);
          for (int r = 0; r < R; ++r) {
            acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][0]), s0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][1]), s1, acc[r][1]);
          }
        }
        const __m256 o0 = _mm256_loadu_ps(offsets + c * kBitStackLanes), o1 = _mm256_loadu_ps(offsets + c * kBitStackLanes + 8);
        const int64_t lanes = std::min<int64_t>(kBitStackLanes, p.rank - c * kBitStackLanes);
        for (int r = 0; r < R; ++r) {
          alignas(32) uint16_t u_bits[kBitStackLanes] = {};
          std::memcpy(u_bits, block.u_half + (n0 + r) * p.rank + c * kBitStackLanes, 2 * lanes);
          const __m256 u0 = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(u_bits)));
          const __m256 u1 = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(u_bits + 8)));
          float* total = totals + (m * kBitStackTileRows + r) * kBitStackLanes;
          _mm256_store_ps(total, _mm256_fmadd_ps(u0, _mm256_add_ps(acc[r][0], o0), _mm256_load_ps(total)));
          _mm256_store_ps(total + 8, _mm256_fmadd_ps(u1, _mm256_add_ps(acc[r][1], o1), _mm256_load_ps(total + 8)));
        }
      }
    }
  }
  for (int64_t i = 0; i < args.M * kBitStackTileRows; ++i)
    totals[i] = hsum(_mm256_add_ps(_mm256_load_ps(totals + i * kBitStackLanes), _mm256_load_ps(totals + i * kBitStackLanes + 8)));
  finish_tile(args, n0, R, totals);
}

// ------------------------------------------------------------------------- rebuilding W

// row[k] += ±magnitude[k], minus where bit k of the packed signs is set (an exact sign flip).
FITSERVE_AVX2_F16C inline void add_signed(const float* magnitude, const uint8_t* bits, int64_t K, float* row) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits[k / 8]), bit), bit);
    const __m256 sign = _mm256_castsi256_ps(_mm256_slli_epi32(set, 31));
    _mm256_storeu_ps(row + k, _mm256_add_ps(_mm256_loadu_ps(row + k), _mm256_xor_ps(_mm256_loadu_ps(magnitude + k), sign)));
  }
  for (; k < K; ++k) row[k] += (bits[k / 8] >> (k % 8)) & 1 ? -magnitude[k] : magnitude[k];
}

// Rows [first, first + count) of the part's W = Σ_{b < active} sign_b ⊙ (u_b v_b) into weight
// (float32 [count, K]), as dequantize_blocks computes it: u_b v_b by the matmul library in
// float32, the signs applied, blocks added in order.
inline void rebuild_rows(const BitStackPart& p, int64_t K, const std::vector<torch::Tensor>& v_float, int64_t first,
                         int64_t count, torch::Tensor& magnitude, float* weight) {
  const int64_t row_bytes = (K + 7) / 8;
  std::memset(weight, 0, sizeof(float) * count * K);
  for (int64_t b = 0; b < p.active; ++b) {
    const BitStackBlock& block = p.blocks[b];
    at::mm_out(magnitude, block.u.narrow(0, first, count).to(torch::kFloat), v_float[b]);
    const float* mag = magnitude.data_ptr<float>();
    at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        add_signed(mag + i * K, block.sign_bytes + (first + i) * row_bytes, K, weight + i * K);
    });
  }
}

// ------------------------------------------------------------------------- the layer

class BitStackLinear {
 public:
  // isa: "auto" (the best this CPU runs), "avx512_vnni", "avx2" or "reference" (rebuild and
  // matmul for every row count). decode_max_rows: up to this many rows of x the integer
  // kernel runs, above it the rebuilding path. small_rank_max: on AVX-512 VNNI, parts of rank up
  // to this run the columns-in-lanes kernel, higher ranks the lane-per-rank one (0: never).
  BitStackLinear(int64_t in_features, int64_t out_features, c10::optional<torch::Tensor> bias, const std::string& isa,
                 int64_t decode_max_rows, int64_t small_rank_max)
      : in_features_(in_features), out_features_(out_features), decode_max_rows_(decode_max_rows),
        small_rank_max_(small_rank_max) {
    TORCH_CHECK(in_features > 0 && out_features > 0, "BitStackLinear: in_features and out_features must be positive");
    TORCH_CHECK(decode_max_rows >= 0, "BitStackLinear: decode_max_rows must be >= 0");
    TORCH_CHECK(small_rank_max >= 0, "BitStackLinear: small_rank_max must be >= 0");
    const bool avx2 = cpu_has_avx2_fma() && cpu_has_f16c();
    if (isa == "auto") isa_ = cpu_has_avx512_vnni() && avx2 ? QuantIsa::kAvx512Vnni
                                : avx2 ? QuantIsa::kAvx2 : QuantIsa::kReference;
    else if (isa == "avx512_vnni") isa_ = QuantIsa::kAvx512Vnni;
    else if (isa == "avx2") isa_ = QuantIsa::kAvx2;
    else if (isa == "reference") isa_ = QuantIsa::kReference;
    else TORCH_CHECK(false, "BitStackLinear: isa must be auto, avx512_vnni, avx2 or reference (got ", isa, ")");
    TORCH_CHECK(isa_ != QuantIsa::kAvx512Vnni || (cpu_has_avx512_vnni() && avx2),
                "BitStackLinear: this CPU lacks AVX-512 VNNI");
    TORCH_CHECK(isa_ != QuantIsa::kAvx2 || avx2, "BitStackLinear: this CPU lacks AVX2/FMA/F16C");
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features && bias->device().is_cpu(),
                  "BitStackLinear: bias must be a CPU tensor [out_features]");
      bias_ = bias->to(torch::kFloat).contiguous();
      bias_bf16_ = bias->to(torch::kBFloat16).contiguous();
    }
  }

  // A part of `rows` output rows with rank `rank`, after the parts added before; returns its
  // index. The parts must cover out_features rows before forward.
  int64_t add_part(int64_t rows, int64_t rank) {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(rows > 0 && rank > 0, "BitStackLinear.add_part: rows and rank must be positive");
    TORCH_CHECK(covered_rows_ + rows <= out_features_, "BitStackLinear.add_part: parts would cover ",
                covered_rows_ + rows, " rows of a layer with ", out_features_);
    BitStackPart part;
    part.rows = rows;
    part.rank = rank;
    part.row_offset = covered_rows_;
    covered_rows_ += rows;
    parts_.push_back(std::move(part));
    return static_cast<int64_t>(parts_.size()) - 1;
  }

  // Append one block to a part (signs uint8 [rows, ceil(K/8)], u float16 [rows, rank], v
  // float16 [rank, K]; kept by reference when contiguous) and make it active when every block
  // before it is (a part that was set to fewer active blocks stays so).
  void append_block(int64_t part_index, torch::Tensor signs, torch::Tensor u, torch::Tensor v) {
    std::lock_guard<std::mutex> lock(mutex_);
    BitStackPart& part = part_at(part_index);
    const int64_t K = in_features_;
    TORCH_CHECK(signs.dim() == 2 && signs.scalar_type() == torch::kByte && signs.size(0) == part.rows &&
                    signs.size(1) == (K + 7) / 8,
                "BitStackLinear.append_block: signs must be uint8 [", part.rows, ", ", (K + 7) / 8, "]");
    TORCH_CHECK(u.dim() == 2 && u.scalar_type() == torch::kHalf && u.size(0) == part.rows && u.size(1) == part.rank,
                "BitStackLinear.append_block: u must be float16 [", part.rows, ", ", part.rank, "]");
    TORCH_CHECK(v.dim() == 2 && v.scalar_type() == torch::kHalf && v.size(0) == part.rank && v.size(1) == K,
                "BitStackLinear.append_block: v must be float16 [", part.rank, ", ", K, "]");
    TORCH_CHECK(signs.device().is_cpu() && u.device().is_cpu() && v.device().is_cpu(),
                "BitStackLinear.append_block: blocks must be CPU tensors");
    BitStackBlock block;
    block.signs = signs.contiguous();
    block.u = u.contiguous();
    block.v = v.contiguous();
    block.sign_bytes = block.signs.data_ptr<uint8_t>();
    block.u_half = reinterpret_cast<const uint16_t*>(block.u.data_ptr());
    block.v_half = reinterpret_cast<const uint16_t*>(block.v.data_ptr());
    const bool all_active = part.active == static_cast<int64_t>(part.blocks.size());
    part.blocks.push_back(std::move(block));
    if (all_active) part.active = static_cast<int64_t>(part.blocks.size());
  }

  // Drop a part's blocks from `blocks` on (their tensors are released here; the memory returns
  // once no one else holds them).
  void truncate(int64_t part_index, int64_t blocks) {
    std::lock_guard<std::mutex> lock(mutex_);
    BitStackPart& part = part_at(part_index);
    TORCH_CHECK(blocks >= 0 && blocks <= static_cast<int64_t>(part.blocks.size()), "BitStackLinear.truncate: ",
                blocks, " outside [0, ", part.blocks.size(), "]");
    part.blocks.resize(static_cast<size_t>(blocks));
    part.blocks.shrink_to_fit();
    part.active = std::min(part.active, blocks);
  }

  // Use only the first `blocks` stored blocks of a part (cheap: a count).
  void set_active_blocks(int64_t part_index, int64_t blocks) {
    std::lock_guard<std::mutex> lock(mutex_);
    BitStackPart& part = part_at(part_index);
    TORCH_CHECK(blocks >= 0 && blocks <= static_cast<int64_t>(part.blocks.size()), "BitStackLinear.set_active_blocks: ",
                blocks, " outside the stored [0, ", part.blocks.size(), "]");
    part.active = blocks;
  }

  int64_t stored_blocks(int64_t part_index) {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(part_at(part_index).blocks.size());
  }
  int64_t active_blocks(int64_t part_index) {
    std::lock_guard<std::mutex> lock(mutex_);
    return part_at(part_index).active;
  }

  // x [M, in_features] float32 or bfloat16, contiguous -> [M, out_features] in x's dtype.
  torch::Tensor forward(const torch::Tensor& x) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features_ && x.is_contiguous() && x.device().is_cpu(),
                "BitStackLinear.forward: x must be a contiguous CPU tensor [M, ", in_features_, "]");
    TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16,
                "BitStackLinear.forward: x must be float32 or bfloat16");
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(covered_rows_ == out_features_, "BitStackLinear.forward: the parts cover ", covered_rows_, " of ",
                out_features_, " output rows");
    const int64_t M = x.size(0);
    const bool kernel = isa_ != QuantIsa::kReference && M <= decode_max_rows_;
    if (!kernel && x.scalar_type() == torch::kBFloat16 && native_bf16_) {
      torch::Tensor out = torch::empty({M, out_features_}, x.options());
      for (const BitStackPart& part : parts_) run_rebuilt(part, x, out);
      return out;
    }
    const torch::Tensor x_float = x.scalar_type() == torch::kFloat ? x : x.to(torch::kFloat);
    torch::Tensor out = torch::empty({M, out_features_}, x_float.options());
    if (M > 0 && kernel) run_kernels(x_float, out);
    else if (M > 0)
      for (const BitStackPart& part : parts_) run_rebuilt(part, x_float, out);
    return x.scalar_type() == torch::kFloat ? out : out.to(x.scalar_type());
  }

  // Bytes held: the stored blocks of every part (signs, u, v) and the bias.
  int64_t bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t total = bias_.defined() ? bias_.nbytes() : 0;
    for (const BitStackPart& part : parts_)
      for (const BitStackBlock& block : part.blocks) total += block.signs.nbytes() + block.u.nbytes() + block.v.nbytes();
    return total;
  }

  std::string isa() const { return isa_name(isa_); }
  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }
  int64_t decode_max_rows() const { return decode_max_rows_; }
  int64_t small_rank_max() const { return small_rank_max_; }
  // The decode kernel each part runs: "small_rank" (columns in the lanes), "lanes_per_rank",
  // or "rebuild" (no integer kernel: isa "reference").
  std::vector<std::string> part_kernels() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::string> names;
    for (const BitStackPart& part : parts_)
      names.push_back(isa_ == QuantIsa::kReference ? "rebuild" : small_rank(part) ? "small_rank" : "lanes_per_rank");
    return names;
  }
  int64_t num_parts() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(parts_.size());
  }

 private:
  BitStackPart& part_at(int64_t index) {
    TORCH_CHECK(index >= 0 && index < static_cast<int64_t>(parts_.size()), "BitStackLinear: no part ", index,
                " (the layer has ", parts_.size(), ")");
    return parts_[static_cast<size_t>(index)];
  }

  bool small_rank(const BitStackPart& part) const {
    return isa_ == QuantIsa::kAvx512Vnni && part.rank <= small_rank_max_;
  }

  // Decode rows through the integer kernels: T of every (part, block, row of x) prepared on the
  // calling thread, then the row tiles of all parts in one parallel region. One region per
  // call, not two per part: on a shared 2-core machine each region's join waited for a
  // descheduled thread, and a fused qkv layer had six (the engine's two-thread decode step took
  // 3.3x its one-thread time; one thread was 0.29x bf16's tokens/s, two 0.18x).
  void run_kernels(const torch::Tensor& x, torch::Tensor& out) {
    const int64_t M = x.size(0), K = in_features_;
    const float* bias = bias_.defined() ? bias_.data_ptr<float>() : nullptr;
    const float* xs = x.data_ptr<float>();
    float* o = out.data_ptr<float>();
    activations_.resize(parts_.size());
    small_rank_activations_.resize(parts_.size());
    std::vector<BitStackArgs> args;
    std::vector<int64_t> tile_ends;  // cumulative tiles of the parts in `args`
    for (size_t i = 0; i < parts_.size(); ++i) {
      const BitStackPart& part = parts_[i];
      if (part.active == 0) {  // no block loaded: the bias alone
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < part.rows; ++n)
            o[m * out_features_ + part.row_offset + n] = bias ? bias[part.row_offset + n] : 0.0f;
        continue;
      }
      if (small_rank(part)) {
        args.push_back(BitStackArgs{&part, nullptr, M, K, bias, o, out_features_,
                                    prepare_small_rank(part, x, small_rank_activations_[i])});
        tile_ends.push_back((tile_ends.empty() ? 0 : tile_ends.back()) +
                            (part.rows + kBitStackTileRows - 1) / kBitStackTileRows);
        continue;
      }
      BitStackActivations& a = activations_[i];
      a.scale_blocks = (K + kBitStackColumns - 1) / kBitStackColumns;
      a.padded_columns = a.scale_blocks * kBitStackColumns;
      a.chunks = (part.rank + kBitStackLanes - 1) / kBitStackLanes;
      a.code_stride = a.chunks * a.padded_columns * kBitStackLanes;
      a.scale_stride = a.chunks * a.scale_blocks * kBitStackLanes;
      a.offset_stride = a.chunks * kBitStackLanes;
      a.unsigned_codes = isa_ == QuantIsa::kAvx512Vnni;
      const int64_t slots = part.active * M;
      int8_t* codes = a.codes.get(slots * a.code_stride);
      float* scales = a.scales.get(slots * a.scale_stride);
      float* offsets = a.offsets.get(slots * a.offset_stride);
      for (int64_t slot = 0; slot < slots; ++slot)
        prepare_bitstack_block(xs + (slot % M) * K, part.blocks[slot / M].v_half, part.rank, K, a,
                               codes + slot * a.code_stride, scales + slot * a.scale_stride,
                               offsets + slot * a.offset_stride);
      args.push_back(BitStackArgs{&part, &a, M, K, bias, o, out_features_});
      tile_ends.push_back((tile_ends.empty() ? 0 : tile_ends.back()) +
                          (part.rows + kBitStackTileRows - 1) / kBitStackTileRows);
    }
    if (args.empty()) return;
    const bool vnni = isa_ == QuantIsa::kAvx512Vnni;
    parallel_for_stealing(tile_ends.back(), 4, [&](int64_t first, int64_t last) {
      size_t i = 0;
      for (int64_t tile = first; tile < last; ++tile) {
        while (tile >= tile_ends[i]) ++i;
        const BitStackArgs& part_args = args[i];
        const int64_t n0 = (tile - (i == 0 ? 0 : tile_ends[i - 1])) * kBitStackTileRows;
        run_tile(part_args, vnni, n0, std::min<int64_t>(kBitStackTileRows, part_args.part->rows - n0));
      }
    });
  }

  // t of every (block, row of x) of a small-rank part into `a` (on the calling thread, as the
  // lane-per-rank kernel's T); returns `a`.
  const SmallRankActivations* prepare_small_rank(const BitStackPart& part, const torch::Tensor& x,
                                                 SmallRankActivations& a) {
    const int64_t M = x.size(0), K = in_features_;
    a.groups = (K + kSmallRankColumns - 1) / kSmallRankColumns;
    a.padded_columns = a.groups * kSmallRankColumns;
    a.code_stride = part.rank * a.padded_columns;
    a.scale_stride = part.rank * a.groups;
    a.offset_stride = part.rank;
    const int64_t slots = part.active * M;
    int8_t* codes = a.codes.get(slots * a.code_stride);
    float* scales = a.scales.get(slots * a.scale_stride);
    float* offsets = a.offsets.get(slots * a.offset_stride);
    const float* xs = x.data_ptr<float>();
    for (int64_t slot = 0; slot < slots; ++slot)
      prepare_small_rank_block(xs + (slot % M) * K, part.blocks[slot / M].v_half, part.rank, K, a,
                               codes + slot * a.code_stride, scales + slot * a.scale_stride,
                               offsets + slot * a.offset_stride);
    return &a;
  }

  static void run_tile(const BitStackArgs& args, bool vnni, int64_t n0, int64_t rows) {
    if (args.small_rank != nullptr) {  // the columns-in-lanes kernel
      small_rank_rows_vnni(args, *args.small_rank, n0, static_cast<int>(rows));
      return;
    }
    if (vnni) {
      static_assert(kBitStackTileRows == 8, "the switch below lists the tile sizes");
      switch (rows) {
        case 8: bitstack_tile_vnni<8>(args, n0); break;
        case 7: bitstack_tile_vnni<7>(args, n0); break;
        case 6: bitstack_tile_vnni<6>(args, n0); break;
        case 5: bitstack_tile_vnni<5>(args, n0); break;
        case 4: bitstack_tile_vnni<4>(args, n0); break;
        case 3: bitstack_tile_vnni<3>(args, n0); break;
        case 2: bitstack_tile_vnni<2>(args, n0); break;
        default: bitstack_tile_vnni<1>(args, n0); break;
      }
      return;
    }
    // AVX2 has 16 vector registers: four rows at a time (two 8-lane halves each).
    for (int64_t half = 0; half < rows; half += 4) {
      switch (std::min<int64_t>(4, rows - half)) {
        case 4: bitstack_tile_avx2<4>(args, n0 + half); break;
        case 3: bitstack_tile_avx2<3>(args, n0 + half); break;
        case 2: bitstack_tile_avx2<2>(args, n0 + half); break;
        default: bitstack_tile_avx2<1>(args, n0 + half); break;
      }
    }
  }

  // Rebuild slices of the part's rows into the shared scratch and multiply with the matmul
  // library; x and out both float32 or both bfloat16.
  void run_rebuilt(const BitStackPart& part, const torch::Tensor& x, torch::Tensor& out) {
    const int64_t M = x.size(0), K = in_features_;
    const at::ScalarType dtype = x.scalar_type();
    const torch::Tensor& bias = dtype == torch::kFloat ? bias_ : bias_bf16_;
    DequantScratch& scratch = DequantScratch::instance();
    std::lock_guard<std::mutex> lock(scratch.mutex);
    const int64_t slice_rows = DequantScratch::slice_rows(K, M);
    std::vector<torch::Tensor> v_float;
    for (int64_t b = 0; b < part.active; ++b) v_float.push_back(part.blocks[b].v.to(torch::kFloat));
    for (int64_t first = 0; first < part.rows; first += slice_rows) {
      const int64_t count = std::min(slice_rows, part.rows - first);
      torch::Tensor magnitude = torch::empty({count, K}, torch::kFloat);
      torch::Tensor rebuilt = dtype == torch::kFloat ? DequantScratch::take(scratch.weight, count, K, dtype)
                                                     : torch::empty({count, K}, torch::kFloat);
      rebuild_rows(part, K, v_float, first, count, magnitude, rebuilt.data_ptr<float>());
      torch::Tensor weight = rebuilt;
      if (dtype != torch::kFloat) {  // rounded once to bf16, as .to(torch.bfloat16) does
        weight = DequantScratch::take(scratch.weight, count, K, dtype);
        weight.copy_(rebuilt);
      }
      const int64_t row = part.row_offset + first;
      out.narrow(1, row, count).copy_(scratch.multiply(x, weight, bias.defined() ? bias.narrow(0, row, count) : bias));
    }
  }

  int64_t in_features_, out_features_, decode_max_rows_, small_rank_max_;
  QuantIsa isa_ = QuantIsa::kReference;
  torch::Tensor bias_, bias_bf16_;
  const bool native_bf16_ = cpu_has_avx512_bf16();
  std::vector<BitStackPart> parts_;
  int64_t covered_rows_ = 0;
  std::mutex mutex_;
  std::vector<BitStackActivations> activations_;  // one per part
  std::vector<SmallRankActivations> small_rank_activations_;  // one per part
};

}  // namespace fitserve_cpu
