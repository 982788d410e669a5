// y = x W^T + b for a linear layer whose weight is stored in fitserve's integer formats
// (fitserve/quant/packing.py defines them: w8 = int8 codes and a float32 scale per output row;
// w4 = 4-bit codes packed per group, a float16 scale and a uint8 zero per group of G input
// columns). One object per layer, called by the Python path and by the fused decode stack alike.
//
// A layer holds one or more parts, each writing its output rows to the positions `out_rows`
// gives (MixLLM keeps most rows in w4 and the salient ones in w8, in one layer).
//
// Few rows of x (decode): the weights stream from memory once per call for all rows, and the
// products are integer dot products. Each row of x is rounded to int8 per block of columns
// (the w4 group, or 128 columns for w8) with scale max|x|/127, and then
//   w4: x . w_g = s_g * xs_g * (sum q*xq - z_g * sum xq)   (q the 4-bit codes, 0..15)
//   w8: x . w_b = s_n * xs_b * sum w*xq
// with AVX-512 VNNI (vpdpbusd: unsigned bytes times signed bytes into int32 lanes) or AVX2
// (vpmaddubsw + vpmaddwd). The sums are exact in int32; the only error beyond float32 rounding
// is the rounding of x to int8, at most xs_b/2 per element (see tests/kernels/
// test_quant_linear.py for the bound the tests check). Why integers: one vpdpbusd multiplies 64
// weights, where widening 4-bit codes to float32 takes ~3 instructions per 16 weights before the
// FMA; per 128 w4 weights the loop below spends ~12 vector instructions, which keeps up with
// memory on two Zen 4 cores.
//
// Many rows (prefill): each part is dequantized, in slices of rows, into a float32 buffer
// exactly as dequantize_w4 / dequantize_w8 compute it, and the matmul library multiplies
// (at::addmm / at::mm), so the result equals dequantize-then-F.linear up to the library's own
// summation order (identical calls where the layer is one part).
//
// On AVX-512 VNNI, add_w4 and add_w8 repack a part into its lanes layout (16 output rows in the
// vector lanes, cpu_quant_lanes_layout.h; kernels and dequantizing readers in cpu_quant_lanes.h).
// w4's lanes kernel takes 64 multiplies per vpdpbusd instead of 32, and w8's drops the per-row
// horizontal sums and per-block conversions of the row kernel (~20 -> ~60 multiplies per
// instruction), so a batched decode step, which is compute-bound, runs ~2x the rows of x per
// second. The row layouts below are what AVX2 (and lanes=false) run.
//
// The 4-bit layout: byte i of a group's G/2 bytes holds column i in its low nibble and column
// G/2 + i in its high nibble. A vector of V bytes (V = 64 with AVX-512, 32 with AVX2) of codes
// thus gives, after a mask and a shift, the codes of two runs of columns; the int8 x rows are
// stored in that same order ("chunks": V low-nibble partners then V high-nibble partners), so
// the kernels never shuffle weights. A 32-bit lane of a chunk covers 4 bytes of one group,
// which is how a lane finds its group's scales.

#pragma once

#include "cpu_kernels.h"
#include "cpu_quant_lanes_layout.h"

#include <array>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

namespace fitserve_cpu {

#define FITSERVE_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,f16c,gfni")))
#define FITSERVE_AVX2_F16C __attribute__((target("avx2,fma,f16c")))

inline bool cpu_has_avx512_vnni() {
  return cpu_avx512_allowed() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni");
}

inline bool cpu_has_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

// Which code computes a part: the integer kernels (for few rows of x) or the dequantize-then-
// matmul path only (every row count; where no kernel fits the CPU or the group size).
enum class QuantIsa { kReference, kAvx2, kAvx512Vnni };

inline const char* isa_name(QuantIsa isa) {
  switch (isa) {
    case QuantIsa::kAvx512Vnni: return "avx512_vnni";
    case QuantIsa::kAvx2: return "avx2";
    default: return "reference";
  }
}

constexpr int64_t kW8XBlock = 128;  // columns of x per int8 scale against w8 weights
// Rows of x up to which the integer kernels run by default (above: dequantize and matmul).
// benchmarks/cpu_quant_kernels.py --section rows (gate_up 9728x896, float32 x, 2-core Zen 4
// shared with other jobs): the kernel took 0.1-0.3x the dequantize-and-matmul time at every
// row count from 1 to 128, in w4 and w8; 64 keeps a batched decode step (32 sequences in the
// CPU benchmark) on the kernel with margin, as BF16_DOT_MAX_ROWS does for bf16 weights.
constexpr int64_t kQuantDecodeMaxRows = 64;
// The same for a layer with a w4 part in the lanes layout (AVX-512 VNNI), measured with
// benchmarks/cpu_quant_kernels.py-style alternating calls, one thread of a 2-core Zen 4 shared
// with other jobs, bf16 x: the lanes kernel took 0.2-0.5x the dequantize-and-bf16-matmul time
// from 64 to 384 rows (qkv, gate_up, down), and 0.6-0.8x at 512 and 1024 rows (where it still
// beat bf16 weights in F.linear, 0.7-0.8x). The w8 kernel loses from ~128 rows (1.1x at 128,
// 1.1-2.2x at 256), but in a MixLLM layer its tenth of the rows costs less than the w4 part
// gains. 256 keeps batched decode and short prompts on the integer kernels; longer prompts keep
// float activations (the dequantizing path), which decides their numerics, not speed alone: at
// 1024, tests/quant/test_quality.py's perplexity over 512-token windows moved 0.18% from the
// dequantized reference (its bound is 0.1%), and 32-request serving (one thread) gained ~5%.
constexpr int64_t kQuantLanesDecodeMaxRows = 256;
// decode_max_rows argument meaning "the measured default for the parts the layer holds".
constexpr int64_t kQuantDecodeMaxRowsAuto = -1;

// A buffer of T whose data starts on a 64-byte boundary, grown on demand and kept.
template <typename T>
struct AlignedBuffer {
  std::vector<T> storage;
  T* data = nullptr;
  T* get(int64_t count) {
    const size_t needed = static_cast<size_t>(count) + 64 / sizeof(T);
    if (storage.size() < needed) storage.resize(needed);
    data = align64(storage.data());
    return data;
  }
};

// Round count floats of x to int8 codes (nearest, ties to even) with scale max|x|/127;
// returns the scale (0 for an all-zero block, whose codes are all 0).
inline float quantize_block(const float* x, int64_t count, int8_t* codes) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
  float amax = hmax(vmax);
  for (; i < count; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
  const __m256 vinverse = _mm256_set1_ps(inverse);
  for (i = 0; i + 8 <= count; i += 8) {
    const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinverse));
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packs_epi16(words, words));
  }
  for (; i < count; ++i)
    codes[i] = static_cast<int8_t>(std::clamp(std::nearbyint(x[i] * inverse), -127.0f, 127.0f));
  return amax / 127.0f;
}

// ---------------------------------------------------------------------------------- parts

// Where a 4-bit part's chunks of V bytes fall on its groups: a chunk holds `groups_per_chunk`
// whole groups (G <= 2V), or a group spans `chunks_per_group` chunks (G a multiple of 2V).
struct W4Layout {
  int64_t K = 0, G = 0, groups = 0, row_bytes = 0, vector_bytes = 0, chunks = 0, full_chunks = 0, tail_bytes = 0;
  int64_t groups_per_chunk = 1, chunks_per_group = 1;

  // False where the kernels' layout assumptions do not hold for this group size (G a multiple
  // of 32 that divides 2V, or a multiple of 2V); the part then takes the dequantizing path.
  static bool fits(int64_t G, int64_t vector_bytes) {
    if (G % 32 != 0) return false;
    return G <= 2 * vector_bytes ? (2 * vector_bytes) % G == 0 : G % (2 * vector_bytes) == 0;
  }

  W4Layout() = default;
  W4Layout(int64_t K_, int64_t G_, int64_t vector_bytes_) : K(K_), G(G_), vector_bytes(vector_bytes_) {
    groups = K / G;
    row_bytes = K / 2;
    chunks = (row_bytes + vector_bytes - 1) / vector_bytes;
    full_chunks = row_bytes / vector_bytes;
    tail_bytes = row_bytes - full_chunks * vector_bytes;
    if (G <= 2 * vector_bytes) groups_per_chunk = 2 * vector_bytes / G;
    else chunks_per_group = G / (2 * vector_bytes);
  }
  int64_t lanes() const { return vector_bytes / 4; }
};

// Whether the dequantizing path may use AVX-512 for values of type T (BF16: needs AVX-512 BF16's
// rounding instruction). Tests turn it off to check the scalar loops that CPUs without those
// extensions run (set_scalar_dequantize).
inline std::atomic<bool> force_scalar_dequantize{false};
template <typename T>
bool vector_dequantize() {
  if (force_scalar_dequantize.load(std::memory_order_relaxed)) return false;
  return std::is_same_v<T, BF16> ? cpu_has_avx512_bf16() : kHasAvx512;
}

// Where the dequantizing path writes a part's rows: row n of the part (of K values) to row
// n - first of `out`, or, given `to_rows` (a mixed layer dequantized whole), to row to_rows[n].
template <typename T>
struct RowsOut {
  T* out;
  int64_t K, first;
  const int64_t* to_rows = nullptr;
  T* row(int64_t n) const { return out + (to_rows ? to_rows[n] : n - first) * K; }
};

struct QuantPart {
  bool is_w4 = false;
  torch::Tensor qweight, scales, zeros, out_rows;  // as stored; zeros undefined for w8
  int64_t rows = 0, group_size = 0;
  bool identity_rows = true;  // rows 0..N-1 of the layer in order (no out_rows)
  std::vector<int64_t> row_map;  // out_rows as a vector (identity when empty)
  QuantIsa isa = QuantIsa::kReference;
  W4Layout layout;
  // In a lanes layout (cpu_quant_lanes.h): the AVX-512 VNNI kernel and the dequantizing path
  // read `w4_lanes_layout` or `w8_lanes_layout`; the tensors above hold that layout.
  bool lanes = false;
  W4Lanes w4_lanes_layout;
  W8Lanes w8_lanes_layout;
  std::vector<int32_t> lane_rows;  // out_rows as int32 for the lanes kernel's scatter (mixed layers)
  // The tensors' data, taken once (Tensor::data_ptr checks the dtype on every call: at two
  // calls per weight row it cost as much as the row's arithmetic).
  const uint8_t* codes = nullptr;        // w4 codes or w8 int8 weights, as bytes
  const uint16_t* half_scales = nullptr;  // w4: float16 bits
  const float* row_scales = nullptr;      // w8
  const uint8_t* zero_codes = nullptr;    // w4

  void take_pointers() {
    codes = static_cast<const uint8_t*>(qweight.data_ptr());
    if (is_w4) {
      half_scales = static_cast<const uint16_t*>(scales.data_ptr());
      zero_codes = zeros.data_ptr<uint8_t>();
    } else {
      row_scales = scales.data_ptr<float>();
    }
  }

  int64_t out_row(int64_t n) const { return identity_rows ? n : row_map[n]; }
  int64_t bytes() const {
    int64_t total = qweight.nbytes() + scales.nbytes();
    if (zeros.defined()) total += zeros.nbytes();
    if (out_rows.defined()) total += out_rows.nbytes();
    return total;
  }
};

// x rows quantized for one part's kernel (see the file comment for the layouts).
struct ActivationCodes {
  int64_t code_stride = 0;   // bytes of codes per row of x
  int64_t scale_stride = 0;  // floats of lane scales (w4) or block scales (w8) per row of x
  int64_t extra_stride = 0;  // w4: zero terms (floats) per row; w8: offset lanes (int32) per row
  AlignedBuffer<int8_t> codes;
  AlignedBuffer<float> scales;      // w4: [M][chunks][lanes] xs of each lane's group; w8: [M][blocks]
  AlignedBuffer<float> zero_terms;  // w4: [M][groups] xs_g * sum of the group's codes
  AlignedBuffer<float> group_scales;  // w4: [M][groups] xs_g
  AlignedBuffer<int32_t> offsets;   // w8 (AVX-512): [M][blocks][16] -128 * each lane's code sum; lanes layouts: x codes as int32 quads [tiles][K/4][8]
  AlignedBuffer<int32_t> block_sums;  // lanes layouts: [tiles][blocks][8] sum of each block's codes
  // AMX (cpu_quant_amx.h): group_scales again as [blocks][table_stride], each block's scales
  // for the rows of x side by side (table_stride: M rounded up to whole tiles of 16).
  int64_t table_stride = 0;
  AlignedBuffer<float> tile_scales;
  std::vector<int8_t> natural;      // one row's codes in column order (w4 staging)
};

// The rows m0 .. m0 + MR - 1 of quantized x, as the kernels read them (offsets only for w8 on
// AVX-512, zero terms only for w4).
template <int MR>
struct XRows {
  const int8_t* codes[MR];
  const float* scales[MR];
  const float* zero_terms[MR];
  const int32_t* offsets[MR];
  XRows(const ActivationCodes& a, int64_t m0) {
    for (int m = 0; m < MR; ++m) {
      const int64_t row = m0 + m;
      codes[m] = a.codes.data + row * a.code_stride;
      scales[m] = a.scales.data + row * a.scale_stride;
      zero_terms[m] = a.zero_terms.data ? a.zero_terms.data + row * a.extra_stride : nullptr;
      offsets[m] = a.offsets.data ? a.offsets.data + row * a.extra_stride : nullptr;
    }
  }
};

// w4: codes in chunk order, each lane's group scale and each group's zero term.
inline void prepare_w4_activations(const float* x, int64_t M, const W4Layout& L, ActivationCodes& a) {
  const int64_t V = L.vector_bytes, lanes = L.lanes(), half = L.G / 2;
  a.code_stride = L.chunks * 2 * V;
  a.scale_stride = L.chunks * lanes;
  a.extra_stride = L.groups;
  int8_t* codes = a.codes.get(M * a.code_stride);
  float* lane_scales = a.scales.get(M * a.scale_stride);
  float* zero_terms = a.zero_terms.get(M * a.extra_stride);
  float* all_group_scales = a.group_scales.get(M * a.extra_stride);
  a.natural.resize(static_cast<size_t>(L.K));
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * L.K;
    int8_t* row = codes + m * a.code_stride;
    float* group_scales = all_group_scales + m * a.extra_stride;
    for (int64_t g = 0; g < L.groups; ++g) {
      const float scale = quantize_block(xr + g * L.G, L.G, a.natural.data() + g * L.G);
      int32_t sum = 0;
      for (int64_t k = 0; k < L.G; ++k) sum += a.natural[g * L.G + k];
      group_scales[g] = scale;
      zero_terms[m * a.extra_stride + g] = scale * static_cast<float>(sum);
    }
    std::memset(row, 0, static_cast<size_t>(a.code_stride));
    for (int64_t b = 0; b < L.row_bytes; b += 16) {  // G/2 and V are multiples of 16
      const int64_t g = b / half, j = b % half, c = b / V, o = b % V;
      std::memcpy(row + c * 2 * V + o, a.natural.data() + g * L.G + j, 16);
      std::memcpy(row + c * 2 * V + V + o, a.natural.data() + g * L.G + half + j, 16);
    }
    float* scales_row = lane_scales + m * a.scale_stride;
    for (int64_t c = 0; c < L.chunks; ++c)
      for (int64_t l = 0; l < lanes; ++l) {
        const int64_t b = c * V + 4 * l;
        scales_row[c * lanes + l] = b < L.row_bytes ? group_scales[b / half] : 0.0f;
      }
  }
}

// w8: codes in column order (zero-padded to whole 128-column blocks), one scale per block and,
// for the AVX-512 kernel (which adds 128 to each weight to make it unsigned), -128 times the
// sum of the codes each 32-bit lane meets in a block, the lane's starting value.
inline void prepare_w8_activations(const float* x, int64_t M, int64_t K, bool offsets, ActivationCodes& a) {
  const int64_t blocks = (K + kW8XBlock - 1) / kW8XBlock;
  a.code_stride = blocks * kW8XBlock;
  a.scale_stride = blocks;
  a.extra_stride = blocks * 16;
  int8_t* codes = a.codes.get(M * a.code_stride);
  float* scales = a.scales.get(M * a.scale_stride);
  int32_t* lane_offsets = offsets ? a.offsets.get(M * a.extra_stride) : nullptr;
  for (int64_t m = 0; m < M; ++m) {
    int8_t* row = codes + m * a.code_stride;
    std::memset(row, 0, static_cast<size_t>(a.code_stride));
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first = b * kW8XBlock, count = std::min(kW8XBlock, K - first);
      scales[m * blocks + b] = quantize_block(x + m * K + first, count, row + first);
      if (!offsets) continue;
      for (int l = 0; l < 16; ++l) {
        int32_t sum = 0;
        for (int i = 0; i < 4; ++i) sum += row[first + 4 * l + i] + row[first + 64 + 4 * l + i];
        lane_offsets[m * a.extra_stride + b * 16 + l] = -128 * sum;
      }
    }
  }
}

// What every kernel gets: the part, the activations, and where results go. out is float32
// [M, out_features]; each result is written with the bias of its output row added.
struct KernelArgs {
  const QuantPart* part;
  const ActivationCodes* act;
  const float* bias;  // [out_features] or nullptr
  float* out;
  int64_t out_features;
  // The lanes kernels' results rounded to bf16 straight into this [M, out_features] buffer
  // instead of `out` (a bf16 decode step; store_lanes_block).
  BF16* out_bf16 = nullptr;
};

// ------------------------------------------------------------------------- AVX-512 VNNI

// Sum over groups of s_g * z_g * zero_terms[m][g] for MR rows of x, 16 groups at a time.
template <int MR>
FITSERVE_VNNI inline void w4_zero_corrections_vnni(const uint16_t* scales, const uint8_t* zeros, int64_t groups,
                                                   const float* const* zero_terms, float* corrections) {
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 mask = groups - g >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (groups - g)) - 1);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, scales + g));
    const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, zeros + g)));
    const __m512 sz = _mm512_mul_ps(s, z);
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(mask, zero_terms[m] + g), acc[m]);
  }
  for (int m = 0; m < MR; ++m) corrections[m] = _mm512_reduce_add_ps(acc[m]);
}

// Rows [first, last) of a w4 part with GPC = 2 or 4 groups per chunk (G = 64 or 32) against MR
// rows of x starting at m0: each chunk's lanes get their group's scales by a permute.
template <int MR, int GPC>
FITSERVE_VNNI void w4_rows_vnni(const KernelArgs& args, int64_t m0, int64_t first, int64_t last) {
  static_assert(GPC == 2 || GPC == 4, "G >= 128 runs w4_rows_vnni_wide");
  const QuantPart& p = *args.part;
  const W4Layout& L = p.layout;
  const ActivationCodes& a = *args.act;
  const XRows<MR> rows(a, m0);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  // Lane l of a chunk covers bytes 4l..4l+3: group l / (16 / GPC) of the chunk.
  const __m512i lane_group = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               GPC == 4 ? 2 : GPC == 2 ? 3 : 4);
  const __mmask64 tail_mask = L.tail_bytes ? (~__mmask64(0)) >> (64 - L.tail_bytes) : 0;
  const int tail_groups = static_cast<int>(L.tail_bytes / (L.G / 2));
  for (int64_t n = first; n < last; ++n) {
    const uint8_t* codes = p.codes + n * L.row_bytes;
    const uint16_t* scales = p.half_scales + n * L.groups;
    __m512 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < L.chunks; ++c) {
      __m512i v;
      __m512 s;
      if (c < L.full_chunks) {
        _mm_prefetch(reinterpret_cast<const char*>(codes + c * 64) + kSingleRowPrefetchBytes, _MM_HINT_T1);
        v = _mm512_loadu_si512(codes + c * 64);
      } else {
        v = _mm512_maskz_loadu_epi8(tail_mask, codes + c * 64);
      }
      const __mmask8 gmask = static_cast<__mmask8>(c < L.full_chunks ? (1u << GPC) - 1 : (1u << tail_groups) - 1);
      s = _mm512_permutexvar_ps(lane_group, _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_maskz_loadu_epi16(gmask, scales + c * GPC))));
      const __m512i lo = _mm512_and_si512(v, nibble);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      for (int m = 0; m < MR; ++m) {
        const int8_t* xc = rows.codes[m] + c * 128;
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_load_si512(xc));
        dot = _mm512_dpbusd_epi32(dot, hi, _mm512_load_si512(xc + 64));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, _mm512_load_ps(rows.scales[m] + c * 16)), acc[m]);
      }
    }
    float corrections[MR];
    w4_zero_corrections_vnni<MR>(scales, p.zero_codes + n * L.groups, L.groups, rows.zero_terms, corrections);
    const int64_t row = p.out_row(n);
    const float b = args.bias ? args.bias[row] : 0.0f;
    for (int m = 0; m < MR; ++m)
      args.out[(m0 + m) * args.out_features + row] = _mm512_reduce_add_ps(acc[m]) - corrections[m] + b;
  }
}

// Rows [first, last) of a w8 part: each weight byte plus 128 (an xor) is unsigned for
// vpdpbusd, and the lanes start at -128 times their codes' sums, so each lane ends exact.
template <int MR>
FITSERVE_VNNI void w8_rows_vnni(const KernelArgs& args, int64_t m0, int64_t first, int64_t last) {
  const QuantPart& p = *args.part;
  const ActivationCodes& a = *args.act;
  const int64_t K = p.qweight.size(1), blocks = a.scale_stride;
  const XRows<MR> rows(a, m0);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t n = first; n < last; ++n) {
    const int8_t* w = reinterpret_cast<const int8_t*>(p.codes) + n * K;
    __m512 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t col = b * kW8XBlock, left = K - col;
      __m512i w0, w1;
      if (left >= 128) {
        _mm_prefetch(reinterpret_cast<const char*>(w + col) + kSingleRowPrefetchBytes, _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(w + col) + kSingleRowPrefetchBytes + 64, _MM_HINT_T1);
        w0 = _mm512_loadu_si512(w + col);
        w1 = _mm512_loadu_si512(w + col + 64);
      } else {
        const __mmask64 m0mask = left >= 64 ? ~__mmask64(0) : (~__mmask64(0)) >> (64 - left);
        const __mmask64 m1mask = left > 64 ? (~__mmask64(0)) >> (128 - left) : 0;
        w0 = _mm512_maskz_loadu_epi8(m0mask, w + col);
        w1 = _mm512_maskz_loadu_epi8(m1mask, w + col + 64);
      }
      w0 = _mm512_xor_si512(w0, flip);
      w1 = _mm512_xor_si512(w1, flip);
      for (int m = 0; m < MR; ++m) {
        __m512i dot = _mm512_load_si512(rows.offsets[m] + b * 16);
        dot = _mm512_dpbusd_epi32(dot, w0, _mm512_load_si512(rows.codes[m] + col));
        dot = _mm512_dpbusd_epi32(dot, w1, _mm512_load_si512(rows.codes[m] + col + 64));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(rows.scales[m][b]), acc[m]);
      }
    }
    const int64_t row = p.out_row(n);
    const float b = args.bias ? args.bias[row] : 0.0f;
    for (int m = 0; m < MR; ++m)
      args.out[(m0 + m) * args.out_features + row] = _mm512_reduce_add_ps(acc[m]) * p.row_scales[n] + b;
  }
}

// The high nibble of each byte as a byte: one GF(2) affine transform (a bit permutation) where
// the CPU has GFNI, else a shift and a mask.
const bool kHasGfni = __builtin_cpu_supports("gfni");
template <bool Gfni>
FITSERVE_VNNI inline __m512i high_nibbles(__m512i v, __m512i nibble) {
  if constexpr (Gfni) {
    // Output bit i (i < 4) takes input bit i + 4: matrix rows (bytes 7 - i) 0x10, 0x20, 0x40, 0x80.
    return _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(0x1020408000000000LL), 0);
  } else {
    return _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
  }
}

// NR rows of a w4 part with G a multiple of 128 (each chunk inside one group), MR rows of x
// from m0. Per weight row the products s_g * xs_g are formed once for all groups (16 per
// vector) and each chunk broadcasts its group's, and the zero terms start the accumulators (at
// minus s_g * z_g * xs_g * sum of the group's codes, in the lane of g): per chunk and row of x
// that leaves two vpdpbusd, a conversion and an FMA; NR weight rows share each load of x.
template <int MR, int NR, bool Gfni>
FITSERVE_VNNI inline void w4_block_vnni_wide(const KernelArgs& args, int64_t m0, int64_t n, float* products) {
  const QuantPart& p = *args.part;
  const W4Layout& L = p.layout;
  const ActivationCodes& a = *args.act;
  const int64_t groups = L.groups, stride = (groups + 15) / 16 * 16;
  const uint8_t* codes[NR];
  __m512 acc[NR][MR];
  for (int r = 0; r < NR; ++r) {
    codes[r] = p.codes + (n + r) * L.row_bytes;
    const uint16_t* scales = p.half_scales + (n + r) * groups;
    const uint8_t* zeros = p.zero_codes + (n + r) * groups;
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
      const __mmask16 mask = groups - g >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (groups - g)) - 1);
      const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, scales + g));
      const __m512 sz = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, zeros + g))));
      for (int m = 0; m < MR; ++m) {
        const int64_t row = (m0 + m) * a.extra_stride + g;
        // A full store (the buffer is padded to 16 per row): a masked store would not forward
        // to the loads below, which then wait for it to retire.
        // A full store (the buffer is padded to 16 per row): a masked store would not forward
        // to the loads below, which then wait for it to retire.
        _mm512_storeu_ps(products + (r * MR + m) * stride + g,
                         _mm512_mul_ps(s, _mm512_maskz_loadu_ps(mask, a.group_scales.data + row)));
        acc[r][m] = _mm512_fnmadd_ps(sz, _mm512_maskz_loadu_ps(mask, a.zero_terms.data + row), acc[r][m]);
      }
    }
  }
  // Every address of the loop in a register before it (the compiler cannot prove the stores
  // above leave the structures they come from alone, and would recompute them per chunk).
  const XRows<MR> rows(a, m0);
  const float* row_products[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) row_products[r][m] = products + (r * MR + m) * stride;
  const int64_t chunks = L.chunks, chunks_per_group = L.chunks_per_group;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  int64_t group = 0, in_group = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i lo[NR], hi[NR];
    for (int r = 0; r < NR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(codes[r] + c * 64) + kSingleRowPrefetchBytes, _MM_HINT_T1);
      const __m512i v = _mm512_loadu_si512(codes[r] + c * 64);
      lo[r] = _mm512_and_si512(v, nibble);
      hi[r] = high_nibbles<Gfni>(v, nibble);
    }
    for (int m = 0; m < MR; ++m) {
      const int8_t* xc = rows.codes[m] + c * 128;
      const __m512i x0 = _mm512_load_si512(xc), x1 = _mm512_load_si512(xc + 64);
      for (int r = 0; r < NR; ++r) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], x0), hi[r], x1);
        // The broadcast folds into the FMA's memory operand ({1to16}): no extra instruction.
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(row_products[r][m][group]), acc[r][m]);
      }
    }
    if (++in_group == chunks_per_group) in_group = 0, ++group;
  }
  for (int r = 0; r < NR; ++r) {
    const int64_t row = p.out_row(n + r);
    const float b = args.bias ? args.bias[row] : 0.0f;
    for (int m = 0; m < MR; ++m) args.out[(m0 + m) * args.out_features + row] = _mm512_reduce_add_ps(acc[r][m]) + b;
  }
}

template <int MR, bool Gfni>
FITSERVE_VNNI void w4_rows_vnni_wide(const KernelArgs& args, int64_t m0, int64_t first, int64_t last) {
  // One weight row per pass. Four rows sharing each load of x ran 10% faster from cache, but
  // from memory the four interleaved streams read at 0.45-0.65x the single stream's rate
  // (gate_up 9728x896, 2-core Zen 4, 16 copies alternating); two rows at ~0.65x.
  constexpr int NR = 1;
  thread_local AlignedBuffer<float> buffer;
  float* products = buffer.get(NR * MR * ((args.part->layout.groups + 15) / 16 * 16));
  for (int64_t n = first; n < last; ++n) w4_block_vnni_wide<MR, NR, Gfni>(args, m0, n, products);
}

// --------------------------------------------------------------------------------- AVX2

FITSERVE_AVX2_F16C inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// Row n's results: each accumulated sum of q * s * x, less the zeros' share (the sum over
// groups of s * z * xs * the sum of x's codes in the group), plus the bias.
template <int MR>
FITSERVE_AVX2_F16C void store_w4_row_avx2(const KernelArgs& args, int64_t m0, int64_t n, const __m256 (&acc)[MR],
                                          const float (&corrections)[MR]) {
  const int64_t row = args.part->out_row(n);
  const float b = args.bias ? args.bias[row] : 0.0f;
  for (int m = 0; m < MR; ++m) args.out[(m0 + m) * args.out_features + row] = hsum(acc[m]) - corrections[m] + b;
}

// Groups g .. g + 7 of one row of W (Masked: only the lanes in `mask`, the others neither
// read from x's tables nor written): each group's s * xs for the MR rows of x into
// factors[m * groups + g], and s * z * the group's zero term added to zero_shares[m].
template <int MR, bool Masked>
FITSERVE_AVX2_F16C inline void w4_eight_group_factors(const uint16_t* scales, const uint8_t* zeros,
                                                      const float* const* x_group_scales,
                                                      const float* const* zero_terms, int64_t groups, int64_t g,
                                                      __m256i mask, float* factors, __m256 (&zero_shares)[MR]) {
  const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + g)));
  const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zeros + g))));
  const __m256 sz = _mm256_mul_ps(s, z);
  for (int m = 0; m < MR; ++m) {
    float* to = factors + m * groups + g;
    if constexpr (Masked) {
      _mm256_maskstore_ps(to, mask, _mm256_mul_ps(s, _mm256_maskload_ps(x_group_scales[m] + g, mask)));
      zero_shares[m] = _mm256_fmadd_ps(sz, _mm256_maskload_ps(zero_terms[m] + g, mask), zero_shares[m]);
    } else {
      _mm256_storeu_ps(to, _mm256_mul_ps(s, _mm256_loadu_ps(x_group_scales[m] + g)));
      zero_shares[m] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(zero_terms[m] + g), zero_shares[m]);
    }
  }
}

// Groups spanning whole chunks (G a multiple of 64; CPG chunks of 64 codes per group, 0: read
// from the layout): the products of up to four chunks are summed as int16 pairs (a chunk's
// pair sums are at most 2 * 2 * 15 * 127 = 7620, so four stay exact in int16), widened to
// int32 once per four chunks, and scaled once per group.
template <int MR, int CPG>
FITSERVE_AVX2_F16C void w4_rows_avx2_whole_groups(const KernelArgs& args, int64_t m0, int64_t first, int64_t last) {
  const QuantPart& p = *args.part;
  const W4Layout& L = p.layout;
  const ActivationCodes& a = *args.act;
  const XRows<MR> rows(a, m0);
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  constexpr int64_t kChunksPerInt16Sum = 4;
  const int64_t per_group = CPG > 0 ? CPG : L.chunks_per_group, groups = L.groups;
  // Per row of W, each group's s * xs for every row of x and the zeros' share, 8 groups at a
  // time where the row's scales and zeros can be read 8 at once, before its chunks: the chunk
  // loop then only broadcasts one float per group.
  thread_local AlignedBuffer<float> factor_buffer;
  float* factors = factor_buffer.get(MR * groups);
  const float* x_group_scales[MR];
  for (int m = 0; m < MR; ++m) x_group_scales[m] = a.group_scales.data + (m0 + m) * a.extra_stride;
  const int64_t vector_groups = groups / 8 * 8, rows_of_w = p.scales.size(0);
  const __m256i tail_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(groups - vector_groups)),
                                               _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (int64_t n = first; n < last; ++n) {
    const uint8_t* codes = p.codes + n * L.row_bytes;
    const uint16_t* scales = p.half_scales + n * groups;
    const uint8_t* zeros = p.zero_codes + n * groups;
    float corrections[MR];
    __m256 zero_shares[MR];
    for (int m = 0; m < MR; ++m) corrections[m] = 0.0f, zero_shares[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < vector_groups; g += 8)
      w4_eight_group_factors<MR, false>(scales, zeros, x_group_scales, rows.zero_terms, groups, g, tail_mask, factors,
                                        zero_shares);
    // The last groups: 8 at once where the next rows' scales and zeros follow this row's
    // (the lanes past the row are masked out; all 8 must lie within the part's tensors, whose
    // values are finite), one at a time near the part's end.
    int64_t tail_start = vector_groups;
    if (tail_start < groups && n * groups + tail_start + 8 <= rows_of_w * groups) {
      w4_eight_group_factors<MR, true>(scales, zeros, x_group_scales, rows.zero_terms, groups, tail_start, tail_mask,
                                       factors, zero_shares);
      tail_start = groups;
    }
    for (int64_t g = tail_start; g < groups; ++g) {
      const float s = half_to_float(scales[g]), sz = s * static_cast<float>(zeros[g]);
      for (int m = 0; m < MR; ++m) {
        factors[m * groups + g] = s * x_group_scales[m][g];
        corrections[m] += sz * rows.zero_terms[m][g];
      }
    }
    for (int m = 0; m < MR; ++m) corrections[m] += hsum(zero_shares[m]);
    __m256 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t group = 0; group < groups; ++group) {
      const int64_t c0 = group * per_group;
      __m256i dot[MR];
      for (int m = 0; m < MR; ++m) dot[m] = _mm256_setzero_si256();
      for (int64_t k0 = 0; k0 < per_group; k0 += kChunksPerInt16Sum) {
        const int64_t k1 = std::min<int64_t>(per_group, k0 + kChunksPerInt16Sum);
        __m256i pairs[MR];
        for (int m = 0; m < MR; ++m) pairs[m] = _mm256_setzero_si256();
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t c = c0 + k;
          _mm_prefetch(reinterpret_cast<const char*>(codes + c * 32) + kSingleRowPrefetchBytes, _MM_HINT_T1);
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + c * 32));
          const __m256i lo = _mm256_and_si256(v, nibble);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
          for (int m = 0; m < MR; ++m) {
            const int8_t* xc = rows.codes[m] + c * 64;
            pairs[m] = _mm256_add_epi16(pairs[m], _mm256_add_epi16(
                _mm256_maddubs_epi16(lo, _mm256_load_si256(reinterpret_cast<const __m256i*>(xc))),
                _mm256_maddubs_epi16(hi, _mm256_load_si256(reinterpret_cast<const __m256i*>(xc + 32)))));
          }
        }
        for (int m = 0; m < MR; ++m) dot[m] = _mm256_add_epi32(dot[m], _mm256_madd_epi16(pairs[m], ones));
      }
      for (int m = 0; m < MR; ++m)
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m]), _mm256_broadcast_ss(factors + m * groups + group), acc[m]);
    }
    store_w4_row_avx2<MR>(args, m0, n, acc, corrections);
  }
}

// G = 32: two groups per chunk, each lane taking its group's scale; a row's last chunk may be
// half (K an odd multiple of 32).
template <int MR>
FITSERVE_AVX2_F16C void w4_rows_avx2_group32(const KernelArgs& args, int64_t m0, int64_t first, int64_t last) {
  const QuantPart& p = *args.part;
  const W4Layout& L = p.layout;
  const ActivationCodes& a = *args.act;
  const XRows<MR> rows(a, m0);
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i lane_group = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  for (int64_t n = first; n < last; ++n) {
    const uint8_t* codes = p.codes + n * L.row_bytes;
    const uint16_t* scales = p.half_scales + n * L.groups;
    __m256 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t c = 0; c < L.chunks; ++c) {
      __m256i v;
      if (c < L.full_chunks) {
        _mm_prefetch(reinterpret_cast<const char*>(codes + c * 32) + kSingleRowPrefetchBytes, _MM_HINT_T1);
        v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + c * 32));
      } else {  // the last 16 bytes of a row whose byte count is an odd multiple of 16
        v = _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + c * 32)));
      }
      const uint32_t pair = c < L.full_chunks ? (static_cast<uint32_t>(scales[2 * c + 1]) << 16) | scales[2 * c]
                                              : scales[2 * c];
      const __m256 s = _mm256_permutevar8x32_ps(
          _mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(pair)))), lane_group);
      const __m256i lo = _mm256_and_si256(v, nibble);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      for (int m = 0; m < MR; ++m) {
        const int8_t* xc = rows.codes[m] + c * 64;
        const __m256i pairs = _mm256_add_epi16(
            _mm256_maddubs_epi16(lo, _mm256_load_si256(reinterpret_cast<const __m256i*>(xc))),
            _mm256_maddubs_epi16(hi, _mm256_load_si256(reinterpret_cast<const __m256i*>(xc + 32))));
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
        acc[m] = _mm256_fmadd_ps(dot, _mm256_mul_ps(s, _mm256_load_ps(rows.scales[m] + c * 8)), acc[m]);
      }
    }
    const uint8_t* zeros = p.zero_codes + n * L.groups;
    float corrections[MR];
    for (int m = 0; m < MR; ++m) {
      corrections[m] = 0.0f;
      for (int64_t g = 0; g < L.groups; ++g)
        corrections[m] += half_to_float(scales[g]) * static_cast<float>(zeros[g]) * rows.zero_terms[m][g];
    }
    store_w4_row_avx2<MR>(args, m0, n, acc, corrections);
  }
}

// Signed times signed with vpmaddubsw: |w| (unsigned) times x with w's sign; |w| <= 128 and
// |x| <= 127 keep each pair's sum within int16.
template <int MR>
FITSERVE_AVX2_F16C void w8_rows_avx2(const KernelArgs& args, int64_t m0, int64_t first, int64_t last) {
  const QuantPart& p = *args.part;
  const ActivationCodes& a = *args.act;
  const int64_t K = p.qweight.size(1), blocks = a.scale_stride;
  const XRows<MR> rows(a, m0);
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) int8_t tail[32];
  for (int64_t n = first; n < last; ++n) {
    const int8_t* w = reinterpret_cast<const int8_t*>(p.codes) + n * K;
    __m256 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      __m256i dot[MR];
      for (int m = 0; m < MR; ++m) dot[m] = _mm256_setzero_si256();
      for (int64_t col = b * kW8XBlock; col < std::min(K, (b + 1) * kW8XBlock); col += 32) {
        __m256i wv;
        if (col + 32 <= K) {
          _mm_prefetch(reinterpret_cast<const char*>(w + col) + kSingleRowPrefetchBytes, _MM_HINT_T1);
          wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + col));
        } else {
          std::memset(tail, 0, sizeof(tail));
          std::memcpy(tail, w + col, static_cast<size_t>(K - col));
          wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
        }
        const __m256i magnitude = _mm256_abs_epi8(wv);
        for (int m = 0; m < MR; ++m) {
          const __m256i signed_x = _mm256_sign_epi8(_mm256_load_si256(reinterpret_cast<const __m256i*>(rows.codes[m] + col)), wv);
          dot[m] = _mm256_add_epi32(dot[m], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, signed_x), ones));
        }
      }
      for (int m = 0; m < MR; ++m)
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m]), _mm256_set1_ps(rows.scales[m][b]), acc[m]);
    }
    const int64_t row = p.out_row(n);
    const float b = args.bias ? args.bias[row] : 0.0f;
    for (int m = 0; m < MR; ++m) args.out[(m0 + m) * args.out_features + row] = hsum(acc[m]) * p.row_scales[n] + b;
  }
}

// ------------------------------------------------------------------------- dispatch

// f(std::integral_constant<int, rows>) for rows in 1..Max.
template <int Max, typename F>
inline void with_rows(int rows, const F& f) {
  if constexpr (Max >= 1) {
    if (rows == Max) f(std::integral_constant<int, Max>{});
    else with_rows<Max - 1>(rows, f);
  }
}

}  // namespace fitserve_cpu

#include "cpu_quant_lanes.h"
#include "cpu_quant_amx.h"

namespace fitserve_cpu {

constexpr int kVnniTileRows = 8;  // rows of x per pass over a weight row: 2 accumulators each
constexpr int kAvx2TileRows = 4;  // 16 ymm registers

// The integer kernel of one part over all M rows of x: weight rows split between threads
// (~32 KiB per claim), each weight row met by the rows of x in tiles while it is in L1.
inline void run_part_kernel(const KernelArgs& args, int64_t M) {
  const QuantPart& p = *args.part;
  const int64_t row_bytes = std::max<int64_t>(1, p.is_w4 ? p.layout.row_bytes : p.qweight.size(1));
  const int64_t chunk = std::max<int64_t>(1, kClaimBytes / row_bytes);
  const bool vnni = p.isa == QuantIsa::kAvx512Vnni;
  const int tile = vnni ? kVnniTileRows : kAvx2TileRows;
  parallel_for_stealing(p.rows, chunk, [&](int64_t first, int64_t last) {
    for (int64_t n0 = first; n0 < last; n0 += 8) {  // x tiles meet 8 weight rows at a time
      const int64_t n1 = std::min(last, n0 + 8);
      for (int64_t m0 = 0; m0 < M; m0 += tile) {
        const int mr = static_cast<int>(std::min<int64_t>(tile, M - m0));
        if (!p.is_w4) {
          if (vnni) with_rows<kVnniTileRows>(mr, [&](auto R) { w8_rows_vnni<decltype(R)::value>(args, m0, n0, n1); });
          else with_rows<kAvx2TileRows>(mr, [&](auto R) { w8_rows_avx2<decltype(R)::value>(args, m0, n0, n1); });
        } else if (vnni) {
          with_rows<kVnniTileRows>(mr, [&](auto R) {
            constexpr int MR = decltype(R)::value;
            switch (p.layout.groups_per_chunk) {
              case 4: w4_rows_vnni<MR, 4>(args, m0, n0, n1); break;
              case 2: w4_rows_vnni<MR, 2>(args, m0, n0, n1); break;
              default:
                if (kHasGfni) w4_rows_vnni_wide<MR, true>(args, m0, n0, n1);
                else w4_rows_vnni_wide<MR, false>(args, m0, n0, n1);
                break;
            }
          });
        } else {
          with_rows<kAvx2TileRows>(mr, [&](auto R) {
            constexpr int MR = decltype(R)::value;
            if (p.layout.groups_per_chunk == 2) w4_rows_avx2_group32<MR>(args, m0, n0, n1);
            else if (p.layout.chunks_per_group == 2) w4_rows_avx2_whole_groups<MR, 2>(args, m0, n0, n1);
            else w4_rows_avx2_whole_groups<MR, 0>(args, m0, n0, n1);  // G a multiple of 64
          });
        }
      }
    }
  });
}

// ------------------------------------------------------------------------- dequantize

// Rows [first, first + count) of a part as float32 [count, K], as dequantize_w4 / dequantize_w8
// compute them: (q - z) * s and q * s, one float32 rounding each.
// One w4 group with 512-bit vectors (G/2 a multiple of 16): 16 codes widened to int32 at a
// time, (q - z) * s in float32, stored as float32 or rounded to bf16 by vcvtneps2bf16 (nearest
// even, as c10::BFloat16). ~1 ns per weight in the scalar loop (the bf16 rounding does not
// vectorize) made the dequantizing prefill 1.2x the bf16 model's projections.
template <typename T>
FITSERVE_AVX512_BF16 void dequantize_w4_group_avx512(const uint8_t* codes, int64_t half, float scale, int zero, T* out) {
  const __m512 s = _mm512_set1_ps(scale);
  const __m512i z = _mm512_set1_epi32(zero), nibble = _mm512_set1_epi32(0x0F);
  for (int64_t i = 0; i < half; i += 16) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
    const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, nibble), z)), s);
    const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), z)), s);
    if constexpr (std::is_same_v<T, BF16>) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)_mm512_cvtneps_pbh(lo));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + half + i), (__m256i)_mm512_cvtneps_pbh(hi));
    } else {
      _mm512_storeu_ps(out + i, lo);
      _mm512_storeu_ps(out + half + i, hi);
    }
  }
}

// One w8 row the same way: w * s, 16 at a time, the last K % 16 by a masked load and store.
template <typename T>
FITSERVE_AVX512_BF16 void dequantize_w8_row_avx512(const int8_t* w, int64_t K, float scale, T* out) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + k))), s);
    if constexpr (std::is_same_v<T, BF16>) _mm256_mask_storeu_epi16(out + k, mask, (__m256i)_mm512_cvtneps_pbh(v));
    else _mm512_mask_storeu_ps(out + k, mask, v);
  }
}

// T = BF16: each float32 value rounded to bfloat16 (nearest even), as .to(torch.bfloat16) does.
template <typename T>
void dequantize_rows(const QuantPart& p, int64_t K, int64_t first, int64_t count, const RowsOut<T>& out) {
  if (p.lanes) {
    if (p.is_w4) dequantize_w4_lanes_rows(p, p.w4_lanes_layout, first, count, out);
    else dequantize_w8_lanes_rows(p, p.w8_lanes_layout, first, count, out);
    return;
  }
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = first + r;
      T* o = out.row(n);
      if (!p.is_w4) {
        const int8_t* w = reinterpret_cast<const int8_t*>(p.codes) + n * K;
        const float s = p.row_scales[n];
        if (vector_dequantize<T>()) {
          dequantize_w8_row_avx512<T>(w, K, s, o);
          continue;
        }
        for (int64_t k = 0; k < K; ++k) o[k] = static_cast<T>(static_cast<float>(w[k]) * s);
        continue;
      }
      const int64_t G = p.group_size, groups = K / G, half = G / 2;
      const bool vectorized = half % 16 == 0 && vector_dequantize<T>();
      const uint8_t* codes = p.codes + n * (K / 2);
      const at::Half* scales = reinterpret_cast<const at::Half*>(p.half_scales) + n * groups;
      const uint8_t* zeros = p.zero_codes + n * groups;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = static_cast<float>(scales[g]);
        const int z = zeros[g];
        const uint8_t* gc = codes + g * half;
        T* og = o + g * G;
        if (vectorized) {
          dequantize_w4_group_avx512<T>(gc, half, s, z, og);
          continue;
        }
        for (int64_t i = 0; i < half; ++i) {
          og[i] = static_cast<T>(static_cast<float>((gc[i] & 0x0F) - z) * s);
          og[half + i] = static_cast<T>(static_cast<float>((gc[i] >> 4) - z) * s);
        }
      }
    }
  });
}

// The float32 buffers of the dequantizing path, one per process: layers run one after
// another, so one buffer the size of the largest slice serves all of them (a buffer per
// layer would add up to a float32 copy of the model).
// The most float32 elements of one dequantized slice, and of its product.
constexpr int64_t kDequantSliceElements = int64_t{16} << 20;

struct DequantScratch {
  std::mutex mutex;
  // Rows of a [N, K] weight per slice against M rows of x, within kDequantSliceElements.
  static int64_t slice_rows(int64_t K, int64_t M) {
    return std::max<int64_t>(1, std::min(kDequantSliceElements / K, kDequantSliceElements / std::max<int64_t>(M, 1)));
  }
  torch::Tensor weight, product;  // float32 or bfloat16: reallocated when the dtype changes
  static DequantScratch& instance() {
    static DequantScratch scratch;
    return scratch;
  }
  static torch::Tensor take(torch::Tensor& storage, int64_t rows, int64_t cols, at::ScalarType dtype) {
    if (!storage.defined() || storage.numel() < rows * cols || storage.scalar_type() != dtype) {
      // A normal tensor even when first made under inference mode (the engine): an inference
      // tensor could not be written by a later call outside it (a test, a user's own loop).
      c10::InferenceMode not_inference(false);
      storage = torch::empty({rows * cols}, torch::dtype(dtype));
    }
    return storage.narrow(0, 0, rows * cols).view({rows, cols});
  }
  // x @ weight.T (+ bias) for one slice of weight rows, in the shared product buffer (valid
  // until the next take); the caller holds `mutex`.
  torch::Tensor multiply(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
    torch::Tensor result = take(product, x.size(0), weight.size(0), x.scalar_type());
    if (bias.defined()) at::addmm_out(result, bias, x, weight.t());
    else at::mm_out(result, x, weight.t());
    return result;
  }
};


// ------------------------------------------------------------------------- the layer

// What a forward call works in: x widened from bf16, x quantized for the kernels, results
// before rounding to bf16. One per calling thread, shared by every layer: per layer, these
// buffers were out of the caches at each call (a decode step streams the weights of ~100
// projections between two calls of one layer): preparing a one-row x of 896 columns took
// 1.8-2.7 us on one thread while the others waited, 0.7-1.4 with shared buffers (2-core Zen 4,
// timed inside the step).
struct QuantScratch {
  ActivationCodes activations;
  std::array<ActivationCodes, kMaxLanesParts> lane_activations;  // per part, where all parts are in lanes layouts
  AlignedBuffer<float> x_staging, out_staging;                    // bf16 decode steps (forward)
};

inline QuantScratch& quant_scratch() {
  thread_local QuantScratch scratch;
  return scratch;
}

class QuantLinear {
 public:
  // isa: "auto" (the best this CPU runs), "amx" (the AVX-512 VNNI kernels, and AMX tiles for
  // batched rows: cpu_quant_amx.h), "avx512_vnni", "avx2" or "reference" (dequantize and matmul
  // for every row count). decode_max_rows: up to this many rows of x the integer
  // kernels run, above it the dequantizing path (kQuantDecodeMaxRowsAuto: kQuantLanesDecodeMaxRows
  // once the layer has a lanes-layout part, else kQuantDecodeMaxRows). lanes: on AVX-512 VNNI, parts
  // are repacked into their lanes layout and run its kernel (false: the row-major kernels, kept
  // for comparison in benchmarks/cpu_quant_kernels.py).
  QuantLinear(int64_t in_features, int64_t out_features, c10::optional<torch::Tensor> bias, const std::string& isa,
              int64_t decode_max_rows, bool lanes = true)
      : in_features_(in_features), out_features_(out_features), decode_max_rows_(decode_max_rows),
        lanes_(lanes), covered_(static_cast<size_t>(std::max<int64_t>(out_features, 0)), 0) {
    TORCH_CHECK(in_features > 0 && out_features > 0, "QuantLinear: in_features and out_features must be positive");
    TORCH_CHECK(decode_max_rows >= 0 || decode_max_rows == kQuantDecodeMaxRowsAuto,
                "QuantLinear: decode_max_rows must be >= 0 (or -1: the default for the parts added)");
    if (isa == "auto") isa_ = cpu_has_avx512_vnni() ? QuantIsa::kAvx512Vnni
                                : cpu_has_avx2_fma() ? QuantIsa::kAvx2 : QuantIsa::kReference;
    else if (isa == "avx512_vnni" || isa == "amx") isa_ = QuantIsa::kAvx512Vnni;
    else if (isa == "avx2") isa_ = QuantIsa::kAvx2;
    else if (isa == "reference") isa_ = QuantIsa::kReference;
    else TORCH_CHECK(false, "QuantLinear: isa must be auto, amx, avx512_vnni, avx2 or reference (got ", isa, ")");
    TORCH_CHECK(isa != "amx" || cpu_has_amx_int8(), "QuantLinear: this CPU (or this process) cannot use AMX-INT8");
    amx_ = lanes_ && (isa == "amx" || (isa == "auto" && cpu_has_amx_int8()));
    TORCH_CHECK(isa_ != QuantIsa::kAvx512Vnni || cpu_has_avx512_vnni(), "QuantLinear: this CPU lacks AVX-512 VNNI");
    TORCH_CHECK(isa_ != QuantIsa::kAvx2 || cpu_has_avx2_fma(), "QuantLinear: this CPU lacks AVX2/FMA");
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features && bias->device().is_cpu(),
                  "QuantLinear: bias must be a CPU tensor [out_features]");
      bias_ = bias->to(torch::kFloat).contiguous();
      bias_bf16_ = bias->to(torch::kBFloat16).contiguous();
    }
  }

  // qweight int8 [N, K], scales float32 [N]; out_rows int64 [N] (the layer rows it writes).
  // qweight in the row layout ("rows", fitserve.quant.packing) or in the lanes layout as an
  // earlier add_w8 returned it. Returns the tensors the part holds, as add_w4 does: on AVX-512
  // VNNI (with lanes, K a multiple of 4) qweight repacked into the lanes layout (the same size;
  // scales stay in row order), elsewhere the tensors given in the row layout.
  std::vector<torch::Tensor> add_w8(torch::Tensor qweight, torch::Tensor scales, c10::optional<torch::Tensor> out_rows,
                                    const std::string& layout, bool in_place) {
    check_layout_name("add_w8", layout);
    TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == torch::kChar && qweight.size(1) == in_features_,
                "add_w8: qweight must be int8 [N, in_features]");
    TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == torch::kFloat && scales.size(0) == qweight.size(0),
                "add_w8: scales must be float32 [N]");
    QuantPart part;
    part.rows = qweight.size(0);
    part.lanes = isa_ == QuantIsa::kAvx512Vnni && lanes_ && W8Lanes::fits(in_features_);
    part.w8_lanes_layout = W8Lanes(part.rows, in_features_);
    const torch::Tensor q = checked_storage(qweight);
    if (part.lanes == (layout == "lanes")) {
      part.qweight = q;
    } else {  // convert between the layouts
      TORCH_CHECK(W8Lanes::fits(in_features_), "add_w8: the lanes layout needs in_features a multiple of 4");
      part.qweight = converted_storage(q, in_place);
      const torch::Tensor from = in_place ? q.clone() : q;
      w8_convert_lanes(part.w8_lanes_layout, part.lanes, from.data_ptr<int8_t>(), part.qweight.data_ptr<int8_t>());
    }
    part.scales = checked_storage(scales);
    part.isa = isa_;
    set_rows(part, out_rows);
    if (part.lanes && !part.identity_rows) part.lane_rows.assign(part.row_map.begin(), part.row_map.end());
    part.take_pointers();
    parts_.push_back(std::move(part));
    return {parts_.back().qweight, parts_.back().scales};
  }

  // qweight uint8 [N, K/2], scales float16 [N, K/G], zeros uint8 [N, K/G], in the w4 layout
  // ("rows", fitserve.quant.packing) or in the lanes layout (cpu_quant_lanes_layout.h) as an
  // earlier add_w4 returned them. Returns the tensors the part holds: on AVX-512 VNNI (with
  // lanes) the weights in the lanes layout, the same size, elsewhere in the row layout
  // (converted back if they came as lanes). A conversion writes new tensors, and the caller's
  // are not kept, so a caller that drops its own holds the weights once; with in_place it
  // rewrites the caller's tensors instead (fitserve's Linear, which owns its buffers).
  std::vector<torch::Tensor> add_w4(torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                                    int64_t group_size, c10::optional<torch::Tensor> out_rows,
                                    const std::string& layout, bool in_place) {
    check_layout_name("add_w4", layout);
    TORCH_CHECK(group_size >= 2 && group_size % 2 == 0 && in_features_ % group_size == 0,
                "add_w4: group size ", group_size, " must be even and divide in_features ", in_features_);
    const int64_t groups = in_features_ / group_size;
    TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == torch::kByte && qweight.size(1) * 2 == in_features_,
                "add_w4: qweight must be uint8 [N, in_features / 2]");
    TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == torch::kHalf && scales.size(0) == qweight.size(0) &&
                    scales.size(1) == groups, "add_w4: scales must be float16 [N, in_features / group_size]");
    TORCH_CHECK(zeros.dim() == 2 && zeros.scalar_type() == torch::kByte && zeros.sizes() == scales.sizes(),
                "add_w4: zeros must be uint8 [N, in_features / group_size]");
    QuantPart part;
    part.is_w4 = true;
    part.rows = qweight.size(0);
    part.group_size = group_size;
    part.lanes = isa_ == QuantIsa::kAvx512Vnni && lanes_ && W4Lanes::fits(group_size);
    part.w4_lanes_layout = W4Lanes(part.rows, in_features_, group_size);
    const bool given_lanes = layout == "lanes";
    if (part.lanes == given_lanes) {
      part.qweight = checked_storage(qweight);
      part.scales = checked_storage(scales);
      part.zeros = checked_storage(zeros);
    } else {  // convert between the layouts
      TORCH_CHECK(W4Lanes::fits(group_size), "add_w4: the lanes layout needs a group size that is a multiple of 8");
      const torch::Tensor q = checked_storage(qweight), s = checked_storage(scales), z = checked_storage(zeros);
      part.qweight = converted_storage(q, in_place);
      part.scales = converted_storage(s, in_place);
      part.zeros = converted_storage(z, in_place);
      const torch::Tensor q_from = in_place ? q.clone() : q, s_from = in_place ? s.clone() : s;
      const torch::Tensor z_from = in_place ? z.clone() : z;
      w4_convert_lanes(part.w4_lanes_layout, part.lanes, q_from.data_ptr<uint8_t>(),
                       static_cast<const uint16_t*>(s_from.data_ptr()), z_from.data_ptr<uint8_t>(),
                       part.qweight.data_ptr<uint8_t>(), static_cast<uint16_t*>(part.scales.data_ptr()),
                       part.zeros.data_ptr<uint8_t>());
    }
    const int64_t vector_bytes = isa_ == QuantIsa::kAvx512Vnni ? 64 : 32;
    part.isa = isa_ != QuantIsa::kReference && (part.lanes || W4Layout::fits(group_size, vector_bytes))
                   ? isa_ : QuantIsa::kReference;
    if (part.isa != QuantIsa::kReference && !part.lanes) part.layout = W4Layout(in_features_, group_size, vector_bytes);
    set_rows(part, out_rows);
    if (part.lanes && !part.identity_rows) part.lane_rows.assign(part.row_map.begin(), part.row_map.end());
    part.take_pointers();
    parts_.push_back(std::move(part));
    const QuantPart& added = parts_.back();
    return {added.qweight, added.scales, added.zeros};
  }

  // x [M, in_features] float32 or bfloat16, contiguous -> [M, out_features] in x's dtype.
  torch::Tensor forward(const torch::Tensor& x) { return forward_into(x, torch::Tensor()); }

  // forward, writing a bf16 decode step's results into `reuse` where it is a contiguous
  // [M, out_features] tensor of x's dtype (the fused decode stack's buffers: allocating a
  // fresh tensor took 0.8-0.9 us of each one-row projection on a 2-core Zen 4, its memory out
  // of the caches, taking the buffer 0.2). Other paths, or an unfit `reuse`, return a new tensor.
  torch::Tensor forward_into(const torch::Tensor& x, const torch::Tensor& reuse) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features_ && x.is_contiguous() && x.device().is_cpu(),
                "QuantLinear.forward: x must be a contiguous CPU tensor [M, ", in_features_, "]");
    TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16,
                "QuantLinear.forward: x must be float32 or bfloat16");
    TORCH_CHECK(covered_rows_ == out_features_, "QuantLinear.forward: the parts cover ", covered_rows_, " of ",
                out_features_, " output rows");
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t M = x.size(0);
    const int64_t max_rows = decode_max_rows();
    if (x.scalar_type() == torch::kBFloat16 && native_bf16_ && M > max_rows) {
      // Prefill of a bf16 model on a CPU with bf16 arithmetic: bf16 weights into the bf16
      // matmul, which runs ~2.2x faster there than float32 (benchmarks/cpu_quant_kernels.py
      // --section prefill, 2-core Zen 4): F.linear(x, dequantize(...).to(bf16), bias.to(bf16)).
      torch::Tensor out = torch::empty({M, out_features_}, x.options());
      run_all_dequantized(x, out);
      return out;
    }
    if (x.scalar_type() == torch::kBFloat16 && M > 0 && M <= max_rows && all_parts_have_kernels()) {
      // A bf16 decode step: x widened and the float32 results rounded to bf16 (to nearest
      // even, as .to(torch.bfloat16)) in the calling thread's QuantScratch, or by the lanes
      // kernels as they store them. torch's two conversions cost
      // 2.5-9 us per projection at one row of x (Zen 4, one thread), ~3% of a w4 model's step.
      QuantScratch& scratch = quant_scratch();
      float* x_float = scratch.x_staging.get(M * in_features_);
      const BF16* x_bf16 = x.data_ptr<BF16>();
      for_row_ranges(M, in_features_, [&](int64_t first, int64_t last) {
        widen_row(x_bf16 + first * in_features_, x_float + first * in_features_, (last - first) * in_features_);
      });
      const bool fits = reuse.defined() && reuse.scalar_type() == torch::kBFloat16 && reuse.dim() == 2 &&
                        reuse.size(0) == M && reuse.size(1) == out_features_ && reuse.is_contiguous() &&
                        reuse.device().is_cpu() && !reuse.is_same(x);
      torch::Tensor out = fits ? reuse : torch::empty({M, out_features_}, x.options());
      BF16* out_bf16 = out.data_ptr<BF16>();
      if (runs_in_one_lanes_region()) {
        // The threads round their own results as they store them: converting them afterwards
        // took 1.5-7 us per projection on one thread while the others waited (Qwen2.5-0.5B's
        // projections at one row, 2-core Zen 4).
        run_kernels(x_float, M, nullptr, out_bf16);
        return out;
      }
      float* results = scratch.out_staging.get(M * out_features_);
      run_kernels(x_float, M, results);
      for_row_ranges(M, out_features_, [&](int64_t first, int64_t last) {
        narrow_row(results + first * out_features_, out_bf16 + first * out_features_, (last - first) * out_features_);
      });
      return out;
    }
    const torch::Tensor x_float = x.scalar_type() == torch::kFloat ? x : x.to(torch::kFloat);
    torch::Tensor out = torch::empty({M, out_features_}, x_float.options());
    if (M == 0) return out.to(x.scalar_type());
    if (M > max_rows) {
      run_all_dequantized(x_float, out);
      return x.scalar_type() == torch::kFloat ? out : out.to(x.scalar_type());
    }
    if (all_parts_have_kernels()) {  // M <= max_rows here
      run_kernels(x_float.data_ptr<float>(), M, out.data_ptr<float>());
    } else {
      for (const QuantPart& part : parts_) {
        if (part.isa != QuantIsa::kReference) run_kernel(part, x_float.data_ptr<float>(), M, out.data_ptr<float>());
        else run_dequantized(part, x_float, out);
      }
    }
    return x.scalar_type() == torch::kFloat ? out : out.to(x.scalar_type());
  }

  // Stored bytes of all parts (codes, scales, zeros, out_rows) and the bias.
  int64_t bytes() const {
    int64_t total = bias_.defined() ? bias_.nbytes() : 0;  // the bf16 copy is only read by prefill
    for (const QuantPart& part : parts_) total += part.bytes();
    return total;
  }

  std::string isa() const { return amx_ ? "amx" : isa_name(isa_); }
  // The code each part runs for decode rows, in the order they were added ("amx": the VNNI
  // kernel for a few rows, AMX tiles from kAmxMinRows).
  std::vector<std::string> part_isas() const {
    std::vector<std::string> names;
    for (const QuantPart& part : parts_) names.emplace_back(uses_amx(part) ? "amx" : isa_name(part.isa));
    return names;
  }
  // The layout each part's tensors are held in: "lanes" (on AVX-512 VNNI) or "rows".
  std::vector<std::string> part_layouts() const {
    std::vector<std::string> names;
    for (const QuantPart& part : parts_) names.emplace_back(part.lanes ? "lanes" : "rows");
    return names;
  }
  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }
  // Rows of x up to which the integer kernels run (the default depends on the parts added).
  int64_t decode_max_rows() const {
    if (decode_max_rows_ != kQuantDecodeMaxRowsAuto) return decode_max_rows_;
    for (const QuantPart& part : parts_)
      if (part.lanes) return kQuantLanesDecodeMaxRows;
    return kQuantDecodeMaxRows;
  }

 private:
  // No part runs the dequantizing path at every row count.
  bool all_parts_have_kernels() const {
    return std::all_of(parts_.begin(), parts_.end(), [](const QuantPart& part) { return part.isa != QuantIsa::kReference; });
  }

  static void check_layout_name(const char* method, const std::string& layout) {
    TORCH_CHECK(layout == "rows" || layout == "lanes", method, ": layout must be rows or lanes (got ", layout, ")");
  }

  // Where a part converted between layouts is held: the given (contiguous) tensor itself with
  // in_place, so weights stay in the memory their owner chose (fitserve's loader puts them in
  // huge pages; the source is copied aside first), else a new tensor.
  static torch::Tensor converted_storage(const torch::Tensor& t, bool in_place) {
    return in_place ? t : torch::empty_like(t);
  }

  static torch::Tensor checked_storage(const torch::Tensor& t) {
    TORCH_CHECK(t.device().is_cpu(), "QuantLinear: weights must be CPU tensors");
    return t.contiguous();
  }

  void set_rows(QuantPart& part, const c10::optional<torch::Tensor>& out_rows) {
    std::vector<int64_t> rows;
    if (out_rows.has_value() && out_rows->defined()) {
      TORCH_CHECK(out_rows->dim() == 1 && out_rows->scalar_type() == torch::kLong && out_rows->size(0) == part.rows,
                  "QuantLinear: out_rows must be int64 [N] (one output row per weight row)");
      part.out_rows = out_rows->contiguous();
      const int64_t* data = part.out_rows.data_ptr<int64_t>();
      rows.assign(data, data + part.rows);
      part.identity_rows = false;
    } else {
      TORCH_CHECK(part.rows <= out_features_, "QuantLinear: a part without out_rows has more rows than the layer");
      rows.resize(static_cast<size_t>(part.rows));
      for (int64_t n = 0; n < part.rows; ++n) rows[n] = n;
    }
    for (const int64_t row : rows) {
      TORCH_CHECK(row >= 0 && row < out_features_, "QuantLinear: output row ", row, " outside [0, ", out_features_, ")");
      TORCH_CHECK(!covered_[row], "QuantLinear: output row ", row, " is written by two parts");
    }
    for (const int64_t row : rows) covered_[row] = 1;
    covered_rows_ += part.rows;
    if (!part.identity_rows) part.row_map = std::move(rows);
  }

  // fn(first, last) over row ranges of an [M, width] buffer: split between threads where the rows
  // are several (a batched decode step converts x and its results around the kernels while the
  // other threads would wait), whole where there is one.
  template <typename F>
  static void for_row_ranges(int64_t M, int64_t width, const F& fn) {
    if (M == 1) fn(0, 1);
    else at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width)), fn);
  }

  // Block of x (columns sharing one scale) a lanes-layout part's kernel reads x in.
  static int64_t lanes_block(const QuantPart& part) { return part.is_w4 ? part.group_size : kW8XBlock; }

  // Whether run_kernels runs every part in one lanes region (run_lanes), whose kernels can also
  // store bf16 results.
  bool runs_in_one_lanes_region() const {
    return parts_.size() <= kMaxLanesParts &&
           std::all_of(parts_.begin(), parts_.end(), [](const QuantPart& part) { return part.lanes; });
  }

  // Every part's integer kernel (all have one). Lanes-layout parts run in one parallel region
  // (run_lanes), and a part whose x blocks are those of the part before it (MixLLM's w4 group
  // 128 and w8's 128-column blocks) reads that part's quantized x. out_bf16 (only where
  // runs_in_one_lanes_region): the results rounded to bf16 there instead of float32 in out.
  void run_kernels(const float* x, int64_t M, float* out, BF16* out_bf16 = nullptr) {
    if (!runs_in_one_lanes_region()) {
      TORCH_CHECK(out_bf16 == nullptr, "QuantLinear: bf16 results need the lanes kernels");
      for (const QuantPart& part : parts_) run_kernel(part, x, M, out);
      return;
    }
    std::array<ActivationCodes, kMaxLanesParts>& lane_activations = quant_scratch().lane_activations;
    std::array<KernelArgs, kMaxLanesParts> args;
    const float* bias = bias_.defined() ? bias_.data_ptr<float>() : nullptr;
    for (size_t i = 0; i < parts_.size(); ++i) {
      const bool reuse = i > 0 && lanes_block(parts_[i - 1]) == lanes_block(parts_[i]);
      if (!reuse) prepare_lanes_for(x, M, parts_[i], lane_activations[i]);
      args[i] = KernelArgs{&parts_[i], reuse ? args[i - 1].act : &lane_activations[i], bias, out, out_features_,
                           out_bf16};
    }
    run_lanes(args.data(), static_cast<int64_t>(parts_.size()), M, amx_rows(M));
  }

  // Whether the part runs on AMX tiles from kAmxMinRows rows of x.
  bool uses_amx(const QuantPart& part) const { return amx_ && amx_fits(part); }
  // Whether M rows of x run on AMX tiles (the parts that fit them).
  bool amx_rows(int64_t M) const { return amx_ && M >= kAmxMinRows; }

  // x quantized for a lanes part's kernel; for the tiles the codes buffer holds whole 16-row
  // tiles (an A tile reads 16 rows; the rows past M are read, never used).
  void prepare_lanes_for(const float* x, int64_t M, const QuantPart& part, ActivationCodes& a) {
    const bool tiles = amx_rows(M);
    prepare_lanes_activations(x, M, in_features_, lanes_block(part), a,
                              tiles ? (M + kAmxRows - 1) / kAmxRows * kAmxRows : M);
    if (tiles) prepare_amx_tables(M, in_features_, lanes_block(part), a);
  }

  // The part's integer kernel: x float32 [M, in_features], results into out [M, out_features].
  void run_kernel(const QuantPart& part, const float* x, int64_t M, float* out) {
    const bool vnni = part.isa == QuantIsa::kAvx512Vnni;
    ActivationCodes& activations = quant_scratch().activations;
    if (part.lanes) {
      prepare_lanes_for(x, M, part, activations);
      const KernelArgs args{&part, &activations, bias_.defined() ? bias_.data_ptr<float>() : nullptr,
                            out, out_features_};
      run_lanes(&args, 1, M, amx_rows(M));
      return;
    }
    if (part.is_w4) prepare_w4_activations(x, M, part.layout, activations);
    else prepare_w8_activations(x, M, in_features_, vnni, activations);
    const KernelArgs args{&part, &activations, bias_.defined() ? bias_.data_ptr<float>() : nullptr,
                          out, out_features_};
    run_part_kernel(args, M);
  }

  // Every part through the dequantizing path. A layer whose whole weight fits one slice is
  // dequantized whole, each part's rows to their output rows, and multiplied in one call: for a
  // MixLLM layer that is one matmul instead of one per part plus a scatter of each product's
  // columns into the output (the 1024-token prefill of Qwen2.5-0.5B's shape took 1.11x the w4
  // model's time that way, 2-core Zen 4).
  void run_all_dequantized(const torch::Tensor& x, torch::Tensor& out) {
    const int64_t K = in_features_;
    if (parts_.size() == 1 || out_features_ * K > kDequantSliceElements) {
      for (const QuantPart& part : parts_) run_dequantized(part, x, out);
      return;
    }
    const at::ScalarType dtype = x.scalar_type();
    const torch::Tensor& bias = dtype == torch::kFloat ? bias_ : bias_bf16_;
    DequantScratch& scratch = DequantScratch::instance();
    std::lock_guard<std::mutex> lock(scratch.mutex);
    torch::Tensor weight = DequantScratch::take(scratch.weight, out_features_, K, dtype);
    for (const QuantPart& part : parts_) {
      const int64_t* to_rows = part.identity_rows ? nullptr : part.row_map.data();
      if (dtype == torch::kFloat) dequantize_rows(part, K, 0, part.rows, RowsOut<float>{weight.data_ptr<float>(), K, 0, to_rows});
      else dequantize_rows(part, K, 0, part.rows, RowsOut<BF16>{weight.data_ptr<BF16>(), K, 0, to_rows});
    }
    if (bias.defined()) at::addmm_out(out, bias, x, weight.t());
    else at::mm_out(out, x, weight.t());
  }

  // Dequantize slices of rows into the shared scratch and multiply with the matmul library.
  // x and out are both float32 or both bfloat16; the weight slices take their dtype.
  void run_dequantized(const QuantPart& part, const torch::Tensor& x, torch::Tensor& out) {
    const int64_t M = x.size(0), K = in_features_;
    const at::ScalarType dtype = x.scalar_type();
    const torch::Tensor& bias = dtype == torch::kFloat ? bias_ : bias_bf16_;
    DequantScratch& scratch = DequantScratch::instance();
    std::lock_guard<std::mutex> lock(scratch.mutex);
    int64_t slice_rows = DequantScratch::slice_rows(K, M);
    // Whole blocks of the lanes layout per slice (a block cut by a slice is unpacked twice).
    if (part.lanes && slice_rows > kLaneRows) slice_rows -= slice_rows % kLaneRows;
    for (int64_t first = 0; first < part.rows; first += slice_rows) {
      const int64_t count = std::min(slice_rows, part.rows - first);
      torch::Tensor weight = DequantScratch::take(scratch.weight, count, K, dtype);
      if (dtype == torch::kFloat) dequantize_rows(part, K, first, count, RowsOut<float>{weight.data_ptr<float>(), K, first});
      else dequantize_rows(part, K, first, count, RowsOut<BF16>{weight.data_ptr<BF16>(), K, first});
      if (part.identity_rows && first == 0 && count == out_features_) {  // F.linear's own call
        if (bias.defined()) at::addmm_out(out, bias, x, weight.t());
        else at::mm_out(out, x, weight.t());
        continue;
      }
      if (part.identity_rows) {
        out.narrow(1, first, count)
            .copy_(scratch.multiply(x, weight, bias.defined() ? bias.narrow(0, first, count) : bias));
      } else {
        const torch::Tensor rows = part.out_rows.narrow(0, first, count);
        out.index_copy_(1, rows, scratch.multiply(x, weight, bias.defined() ? bias.index_select(0, rows) : bias));
      }
    }
  }

  int64_t in_features_, out_features_, decode_max_rows_;
  bool lanes_ = true;
  bool amx_ = false;  // lanes parts run on AMX tiles from kAmxMinRows rows of x (cpu_quant_amx.h)
  QuantIsa isa_ = QuantIsa::kReference;
  torch::Tensor bias_, bias_bf16_;  // float32, and rounded to bf16 for the bf16 matmul
  const bool native_bf16_ = cpu_has_avx512_bf16();
  std::vector<QuantPart> parts_;
  std::vector<uint8_t> covered_;
  int64_t covered_rows_ = 0;
  std::mutex mutex_;
};

}  // namespace fitserve_cpu
