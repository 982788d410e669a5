// The "lanes" layouts of w4 and w8: output rows in the vector lanes (kernels: cpu_quant_lanes.h).
// Why: a batched decode step (tens of rows of x) is compute-bound. The row-major kernel puts 16
// lanes of ONE weight row's columns in a vector, so per 128 columns and row of x it spends two
// vpdpbusd, a conversion and an FMA (and a horizontal sum per row at the end): 32 multiplies per
// instruction, the rate of vdpbf16ps on bf16 weights. With 16 output rows in the 16 lanes, a
// vpdpbusd takes its 4 bytes of x from one broadcast and every lane is a useful output: 64
// multiplies per instruction, the per-group float work (scales, zero point) is done once per
// group for 16 rows, and nothing is summed across lanes.
//
// The layout (fitserve.quant.packing.pack_w4_lanes is its PyTorch definition). Output rows form
// blocks of 16 (the last block holds the N % 16 rows left, R <= 16). Within a block, for each
// step t of 8 columns (k = 8t .. 8t + 7), 4R bytes: bytes 4r .. 4r + 3 belong to row r of the
// block, byte j holding column 8t + j in its low nibble and 8t + 4 + j in its high nibble. So
// one 64-byte load is 16 rows x 8 columns; v & 0xF and v >> 4 are two vpdpbusd operands whose
// lane r meets x[8t .. 8t+3] and x[8t+4 .. 8t+7] (4 bytes of x, broadcast from memory). The
// blocks follow each other (block b at byte 16 b K / 2), so a part is one contiguous stream and
// takes exactly the bytes of the row-major layout (no padding, no second copy). Scales and zeros
// [N, K/G] are laid out the same way per block: for each group, the R values of the block's rows.
//
// w8 (fitserve.quant.packing.pack_w8_lanes): the same blocks of 16 output rows; within a block,
// per step t of 4 columns, 4R bytes: bytes 4r .. 4r + 3 are row r's int8 weights at columns
// 4t .. 4t + 3. One 64-byte load is 16 rows x 4 columns, one vpdpbusd operand (after adding 128
// to make the bytes unsigned). The row scales stay as they are (one per row, in row order).

#pragma once

#include "cpu_kernels.h"

#include <cstring>
#include <vector>

namespace fitserve_cpu {

constexpr int64_t kLaneRows = 16;  // output rows per block: the int32 lanes of a 512-bit vector

// Where a lanes-layout part's blocks and steps lie.
struct W4Lanes {
  int64_t N = 0, K = 0, G = 0, groups = 0, steps_per_group = 0, blocks = 0;
  W4Lanes() = default;
  W4Lanes(int64_t N_, int64_t K_, int64_t G_)
      : N(N_), K(K_), G(G_), groups(K_ / G_), steps_per_group(G_ / 8), blocks((N_ + kLaneRows - 1) / kLaneRows) {}
  // The layout needs groups of whole 8-column steps.
  static bool fits(int64_t G) { return G % 8 == 0; }
  int64_t block_rows(int64_t b) const { return std::min(kLaneRows, N - b * kLaneRows); }
  int64_t code_offset(int64_t b) const { return b * kLaneRows * (K / 2); }
  int64_t group_offset(int64_t b) const { return b * kLaneRows * groups; }
  // Byte of the codes (in the layout) holding row n's column k, and whether it is the high nibble.
  int64_t code_byte(int64_t n, int64_t k) const {
    const int64_t b = n / kLaneRows, r = n % kLaneRows;
    return code_offset(b) + (k / 8) * 4 * block_rows(b) + 4 * r + (k % 4);
  }
  int64_t group_index(int64_t n, int64_t g) const {
    const int64_t b = n / kLaneRows;
    return group_offset(b) + g * block_rows(b) + n % kLaneRows;
  }
};

// Where a w8 lanes-layout part's blocks lie (K a multiple of 4: whole 4-column steps).
struct W8Lanes {
  int64_t N = 0, K = 0, blocks = 0;
  W8Lanes() = default;
  W8Lanes(int64_t N_, int64_t K_) : N(N_), K(K_), blocks((N_ + kLaneRows - 1) / kLaneRows) {}
  static bool fits(int64_t K) { return K % 4 == 0; }
  int64_t block_rows(int64_t b) const { return std::min(kLaneRows, N - b * kLaneRows); }
  int64_t code_offset(int64_t b) const { return b * kLaneRows * K; }
  // Byte (in the layout) of row n's weight at column k.
  int64_t code_byte(int64_t n, int64_t k) const {
    const int64_t b = n / kLaneRows, r = n % kLaneRows;
    return code_offset(b) + (k / 4) * 4 * block_rows(b) + 4 * r + (k % 4);
  }
};

// Row-major w8 weights [N, K] into the lanes layout, or back (to_lanes false): 4-byte words
// move, so each row's words are copied as int32. Run once when a part is added.
inline void w8_convert_lanes(const W8Lanes& L, bool to_lanes, const int8_t* codes, int8_t* out_codes) {
  at::parallel_for(0, L.N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t k = 0; k < L.K; k += 4) {
        const int64_t row_major = n * L.K + k, lanes = L.code_byte(n, k);
        std::memcpy(out_codes + (to_lanes ? lanes : row_major), codes + (to_lanes ? row_major : lanes), 4);
      }
  });
}

// Row-major w4 (codes [N, K/2] in the format's group layout, scales/zeros [N, K/G]) into the
// lanes layout, or back (to_lanes false). Run once when a part is added.
inline void w4_convert_lanes(const W4Lanes& L, bool to_lanes, const uint8_t* codes, const uint16_t* scales,
                             const uint8_t* zeros, uint8_t* out_codes, uint16_t* out_scales, uint8_t* out_zeros) {
  const int64_t K = L.K, G = L.G, half = G / 2, groups = L.groups;
  at::parallel_for(0, L.N, 64, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> row(static_cast<size_t>(K));  // one code per byte, column order
    for (int64_t n = begin; n < end; ++n) {
      if (to_lanes) {
        const uint8_t* src = codes + n * (K / 2);
        for (int64_t g = 0; g < groups; ++g)
          for (int64_t i = 0; i < half; ++i) {
            row[g * G + i] = src[g * half + i] & 0x0F;
            row[g * G + half + i] = src[g * half + i] >> 4;
          }
        for (int64_t k = 0; k < K; k += 8)
          for (int64_t j = 0; j < 4; ++j)
            out_codes[L.code_byte(n, k + j)] = static_cast<uint8_t>(row[k + j] | (row[k + 4 + j] << 4));
        for (int64_t g = 0; g < groups; ++g) {
          out_scales[L.group_index(n, g)] = scales[n * groups + g];
          out_zeros[L.group_index(n, g)] = zeros[n * groups + g];
        }
      } else {
        for (int64_t k = 0; k < K; k += 8)
          for (int64_t j = 0; j < 4; ++j) {
            const uint8_t byte = codes[L.code_byte(n, k + j)];
            row[k + j] = byte & 0x0F;
            row[k + 4 + j] = byte >> 4;
          }
        uint8_t* dst = out_codes + n * (K / 2);
        for (int64_t g = 0; g < groups; ++g)
          for (int64_t i = 0; i < half; ++i)
            dst[g * half + i] = static_cast<uint8_t>(row[g * G + i] | (row[g * G + half + i] << 4));
        for (int64_t g = 0; g < groups; ++g) {
          out_scales[n * groups + g] = scales[L.group_index(n, g)];
          out_zeros[n * groups + g] = zeros[L.group_index(n, g)];
        }
      }
    }
  });
}

}  // namespace fitserve_cpu
