// AMX (Advanced Matrix Extensions, INT8) kernels of the w4 and w8 lanes layouts, for batched
// rows of x (cpu_quant_lanes_layout.h says what the layouts are). Part of cpu_quant_linear.h,
// included after cpu_quant_lanes.h: uses its QuantPart, ActivationCodes, KernelArgs and
// store_lanes_block. Ends with run_lanes, which sends each block of a layer's lanes parts to
// the VNNI kernel or to the tiles.
//
// Why: a batched decode step (tens of rows of x) is compute-bound on the AVX-512 VNNI lanes
// kernel: two vpdpbusd per row of x and 8 columns of 16 weight rows. An AMX tile multiply
// (tdpbssd) takes 16 rows of x by 64 columns against 16 weight rows in one instruction, 16x
// the work of a vpdpbusd, on a unit of its own.
//
// Why the lanes layouts need no repacking: a tile multiply's second operand holds, per tile row,
// 16 columns of 4 bytes each (the "VNNI" layout of B: 4 consecutive k of one output column).
// One 64-byte step of a w4 lanes block is exactly that once split into nibbles: its low nibbles
// are k = 8t .. 8t + 3 of the 16 weight rows, its high nibbles k = 8t + 4 .. 8t + 7. So a group's
// steps, split (minus the zero point) and stored low, high, low, high, are the B tiles of that
// group in column order,
// and the A tiles are x's int8 codes as prepare_lanes_activations already writes them (each row
// of x in column order, rows code_stride apart). A w8 block's steps are B tiles as they lie in
// memory (signed bytes: tdpbssd).
//
// Per group (w4; 128-column blocks of x for w8) and 16 rows of x the tile product is an exact
// int32 sum (w4: of (q - z) x, the zero point inside it), converted and scaled by x's block
// scale and the weights' scale in float32; results meet the VNNI kernel's error bound and
// differ from it only by float32 rounding.

#pragma once

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace fitserve_cpu {

#define FITSERVE_AMX \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,f16c,gfni,amx-tile,amx-int8")))

constexpr int64_t kAmxRows = 16;     // rows of x per A tile (and int32 rows of a C tile)
constexpr int64_t kAmxColumns = 64;  // columns of x (bytes) per A tile row
// Rows of x from which a lanes part runs on AMX tiles (below: the VNNI lanes kernel). A tile
// multiply costs the same for 8 rows of x as for 16: on a 2-core Xeon with AMX, Qwen2.5-0.5B's
// projections (w4, group 128) ran 0.7-0.96x as fast as on the VNNI kernel at 8 rows; a whole
// layer ran about as fast at 16 (0.96-1.17x over runs) and faster from 32 (1.17-1.33x; 64 rows
// 1.26-1.43x; benchmarks/cpu_quant_kernels.py --section batch).
constexpr int64_t kAmxMinRows = 16;

// Whether oneDNN's ISA limit (ONEDNN_MAX_CPU_ISA), which keeps torch's matmuls off AMX on a
// machine that mishandles it, leaves AMX on: unset, or naming an AMX level (or ALL / DEFAULT).
// The same variable holds fitserve's tiles off, so one setting covers both.
inline bool onednn_isa_allows_amx() {
  const char* limit = std::getenv("ONEDNN_MAX_CPU_ISA");
  if (limit == nullptr || *limit == '\0') return true;
  std::string upper(limit);
  std::transform(upper.begin(), upper.end(), upper.begin(), [](unsigned char c) { return std::toupper(c); });
  return upper.find("AMX") != std::string::npos || upper == "ALL" || upper == "DEFAULT";
}

// Whether the CPU has AMX-TILE and AMX-INT8 and this process may use the tile registers: Linux
// hands the tile state to a process only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA), once; without it the first tile instruction faults.
inline bool request_amx_int8() {
  if (!cpu_has_avx512_vnni()) return false;  // also honours ATEN_CPU_CAPABILITY=avx2
  if (!onednn_isa_allows_amx()) return false;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tile = (edx >> 24) & 1u, int8 = (edx >> 25) & 1u;
  if (!tile || !int8) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

inline bool cpu_has_amx_int8() {
  static const bool has = request_amx_int8();
  return has;
}

// The tile configuration every AMX kernel here uses: tiles 0-4 all 16 rows of 64 bytes (C
// tiles 0 and 1, x tiles 2 and 4, weight tile 3: amx_block_of_x, amx_block_of_x_pair).
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
  AmxTileConfig() {
    for (int i = 0; i < 5; ++i) {
      bytes_per_row[i] = kAmxColumns;
      rows[i] = kAmxRows;
    }
  }
};

// Loads the configuration into this thread's tile registers. Called at the start of each claim
// of work: torch's matmul (oneDNN) runs on the same threads and loads configurations of its own.
FITSERVE_AMX inline void load_amx_config() {
  static const AmxTileConfig config;
  _tile_loadconfig(&config);
}

// A part runs on AMX tiles where its blocks of x are whole tiles: w4 groups of a multiple of 64
// columns; w8 K a multiple of 64 (then its 128-column blocks are one or two tiles).
inline bool amx_fits(const QuantPart& p) {
  if (!p.lanes) return false;
  return p.is_w4 ? p.group_size % kAmxColumns == 0 : p.w8_lanes_layout.K % kAmxColumns == 0;
}

// The block scales of x for the tiles (ActivationCodes::tile_scales): prepare_lanes_activations
// keeps them per tile of kLanesTileRows rows; a tile multiply's 16 rows of x want each block's
// scales side by side. Rows past M get 0, which drops whatever their codes multiply to.
inline void prepare_amx_tables(int64_t M, int64_t K, int64_t block, ActivationCodes& a) {
  const int64_t blocks = (K + block - 1) / block, stride = (M + kAmxRows - 1) / kAmxRows * kAmxRows;
  a.table_stride = stride;
  float* scales = a.tile_scales.get(blocks * stride);
  std::memset(scales, 0, sizeof(float) * static_cast<size_t>(blocks * stride));
  for (int64_t m0 = 0; m0 < M; m0 += kLanesTileRows) {
    const int64_t tile_rows = std::min<int64_t>(kLanesTileRows, M - m0);
    const int64_t from = (m0 / kLanesTileRows) * a.extra_stride;
    for (int64_t g = 0; g < blocks; ++g)
      for (int64_t lane = 0; lane < tile_rows; ++lane)
        scales[g * stride + m0 + lane] = a.group_scales.data[from + g * tile_rows + lane];
  }
}

// This thread's scratch: one block's weights as B tiles, and two C tiles as stored.
struct AmxScratch {
  AlignedBuffer<int8_t> weights;
  // C tiles 0 and 1 (of a pair's two tiles of x rows; a single tile uses the first).
  alignas(64) int32_t product[2][kAmxRows * kAmxRows];
  static AmxScratch& here() {
    thread_local AmxScratch scratch;
    return scratch;
  }
};

// A w4 lanes block as B tiles of signed bytes: each code minus its group's zero point (-15 ..
// 15), so that a tile product is sum (q - z) x exactly and no zero-point term is left for the
// float work. Step t's low nibbles become tile row 2t, its high nibbles row 2t + 1 (columns
// 8t .. 8t + 7 in order); rows past R are 0. K / 8 steps, 128 bytes of tile rows each.
FITSERVE_AMX inline void w4_block_as_tiles(const W4Lanes& L, const uint8_t* codes, const uint8_t* zeros, int64_t R,
                                           int8_t* tiles) {
  const int64_t step_bytes = 4 * R;
  const __mmask64 code_mask = R == kLaneRows ? ~__mmask64(0) : (~__mmask64(0)) >> (64 - step_bytes);
  const __mmask16 row_mask = static_cast<__mmask16>((1u << R) - 1);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < L.groups; ++g) {
    // Row r's zero point in each byte of 32-bit lane r (0 in lanes past R, as the codes).
    const __m512i z = _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(row_mask, zeros + g * R)),
                                         _mm512_set1_epi32(0x01010101));
    for (int64_t t = 0; t < L.steps_per_group; ++t, codes += step_bytes, tiles += 2 * kAmxColumns) {
      const __m512i v = _mm512_maskz_loadu_epi8(code_mask, codes);
      _mm512_store_si512(tiles, _mm512_sub_epi8(_mm512_and_si512(v, nibble), z));
      _mm512_store_si512(tiles + kAmxColumns, _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), nibble), z));
    }
  }
}

// A w8 lanes block of fewer than 16 rows as whole 64-byte tile rows (zero-padded); a full
// block's steps are its tiles as they lie.
FITSERVE_AMX inline void w8_block_as_tiles(const W8Lanes& L, const uint8_t* codes, int64_t R, int8_t* tiles) {
  const int64_t step_bytes = 4 * R;
  const __mmask64 code_mask = (~__mmask64(0)) >> (64 - step_bytes);
  for (int64_t t = 0; t < L.K / 4; ++t)
    _mm512_store_si512(tiles + t * kAmxColumns, _mm512_maskz_loadu_epi8(code_mask, codes + t * step_bytes));
}

// acc[m] += cvt(C row m) * (weight_scale * xs[m]) for the 16 rows of the C tile just stored.
FITSERVE_AMX __attribute__((always_inline)) inline void add_amx_product(const int32_t* product, const float* xs,
                                                                         __m512 weight_scale,
                                                                         __m512 (&acc)[kAmxRows]) {
#pragma GCC unroll 16
  for (int m = 0; m < kAmxRows; ++m) {
    const __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(product + m * kAmxRows));
    acc[m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(weight_scale, _mm512_set1_ps(xs[m])), acc[m]);
  }
}

// What amx_block_of_x reads for one block of 16 output rows and 16 rows of x (and
// amx_block_of_x_pair for 32 rows of x, 16 rows apart).
struct AmxBlockArgs {
  const int8_t* x_tile;  // 16 rows of x's codes, code_stride apart
  int64_t code_stride;
  const int8_t* tiles;  // the weight block as B tiles (64 columns per 1 KiB)
  int64_t K, block_columns;
  const uint16_t* half_scales;  // w4: the block's group scales [groups][R]; w8: nullptr
  int64_t R;
  __mmask16 row_mask;
  __m512 row_scales;  // w8: the block's row scales
  const float* x_scales;  // block g's scales of the 16 rows of x at g * table_stride
  int64_t table_stride;
};

// The weights' scales of block g of x for the block's 16 output rows: w4's group scales, or
// w8's row scales (the same for every block of x).
FITSERVE_AMX __attribute__((always_inline)) inline __m512 amx_weight_scale(const AmxBlockArgs& args, int64_t g) {
  return args.half_scales
      ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(args.row_mask, args.half_scales + g * args.R)) : args.row_scales;
}

// Block g of x (a w4 group, or a w8 128-column block) for 16 rows of x and 16 output rows: its
// tile products into C tile 0 (x tile 2, weight tile 3), stored, and scaled into acc.
FITSERVE_AMX __attribute__((always_inline)) inline void amx_block_of_x(const AmxBlockArgs& args, int64_t g,
                                                                        int32_t* product, __m512 (&acc)[kAmxRows]) {
  const int64_t first = g * args.block_columns, last = std::min(args.K, first + args.block_columns);
  _tile_zero(0);
  for (int64_t k = first; k < last; k += kAmxColumns) {
    _tile_loadd(3, args.tiles + k * kLaneRows, kAmxColumns);
    _tile_loadd(2, args.x_tile + k, args.code_stride);
    _tile_dpbssd(0, 2, 3);  // signed x against signed weights (w4: q - z)
  }
  _tile_stored(0, product, kAmxRows * sizeof(int32_t));
  add_amx_product(product, args.x_scales + g * args.table_stride, amx_weight_scale(args, g), acc);
}

// The same for two 16-row tiles of x at once (the second one 16 rows further), sharing each
// weight tile: C tiles 0 and 1, x tiles 2 and 4, the weight tile 3.
FITSERVE_AMX __attribute__((always_inline)) inline void amx_block_of_x_pair(const AmxBlockArgs& args, int64_t g,
                                                                             int32_t* product0, int32_t* product1,
                                                                             __m512 (&acc0)[kAmxRows],
                                                                             __m512 (&acc1)[kAmxRows]) {
  const int64_t first = g * args.block_columns, last = std::min(args.K, first + args.block_columns);
  const int8_t* x_second = args.x_tile + kAmxRows * args.code_stride;
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t k = first; k < last; k += kAmxColumns) {
    _tile_loadd(3, args.tiles + k * kLaneRows, kAmxColumns);
    _tile_loadd(2, args.x_tile + k, args.code_stride);
    _tile_dpbssd(0, 2, 3);
    _tile_loadd(4, x_second + k, args.code_stride);
    _tile_dpbssd(1, 4, 3);
  }
  _tile_stored(0, product0, kAmxRows * sizeof(int32_t));
  _tile_stored(1, product1, kAmxRows * sizeof(int32_t));
  const __m512 weight_scale = amx_weight_scale(args, g);
  add_amx_product(product0, args.x_scales + g * args.table_stride, weight_scale, acc0);
  add_amx_product(product1, args.x_scales + g * args.table_stride + kAmxRows, weight_scale, acc1);
}

// Block b of a lanes part (w4 or w8) against all M rows of x on AMX tiles; x's codes hold whole
// tiles of rows (the rows past M are read and their results dropped: their scales are 0).
// Per 32 rows of x (16 for the last tile of rows, if odd), the block's groups one after another:
// per group one tile product per 64 columns and 16 rows of x into a C tile, then each C tile's
// 16 x 16 sums scaled into float accumulators.
FITSERVE_AMX void amx_lanes_block(const KernelArgs& args, int64_t b, int64_t M) {
  const QuantPart& p = *args.part;
  const ActivationCodes& a = *args.act;
  AmxScratch& scratch = AmxScratch::here();
  const int64_t K = p.is_w4 ? p.w4_lanes_layout.K : p.w8_lanes_layout.K;
  const int64_t R = p.is_w4 ? p.w4_lanes_layout.block_rows(b) : p.w8_lanes_layout.block_rows(b);
  const __mmask16 row_mask = static_cast<__mmask16>((1u << R) - 1);
  // The block's B tiles: 64 columns (16 tile rows of 64 bytes) after another.
  const int8_t* tiles;
  const uint16_t* half_scales = nullptr;
  int64_t block_columns;  // columns of x per scale: the w4 group, or w8's 128-column block of x
  if (p.is_w4) {
    const W4Lanes& L = p.w4_lanes_layout;
    int8_t* unpacked = scratch.weights.get(K * kLaneRows);
    w4_block_as_tiles(L, p.codes + L.code_offset(b), p.zero_codes + L.group_offset(b), R, unpacked);
    tiles = unpacked;
    // GCC's tileloadd does not tell the compiler that it reads memory: the stores above must
    // not be moved past the tile loads below.
    asm volatile("" ::: "memory");
    half_scales = p.half_scales + L.group_offset(b);
    block_columns = L.G;
  } else {
    const W8Lanes& L = p.w8_lanes_layout;
    if (R == kLaneRows) {
      tiles = reinterpret_cast<const int8_t*>(p.codes + L.code_offset(b));
    } else {
      int8_t* padded = scratch.weights.get(K * kLaneRows);
      w8_block_as_tiles(L, p.codes + L.code_offset(b), R, padded);
      tiles = padded;
      asm volatile("" ::: "memory");  // as for w4 above
    }
    block_columns = kW8XBlock;
  }
  const int64_t blocks = (K + block_columns - 1) / block_columns;
  const __m512 row_scales =
      p.is_w4 ? _mm512_set1_ps(1.0f) : _mm512_maskz_loadu_ps(row_mask, p.row_scales + b * kLaneRows);
  int64_t m0 = 0;
  const auto store_rows = [&](int64_t first, const __m512* results) {
    const int64_t rows = std::min(kAmxRows, M - first);
    for (int64_t m = 0; m < rows; ++m) store_lanes_block<1>(args, b, first + m, row_mask, &results[m]);
  };
  // Two tiles of x rows at a time (the second may be partial), sharing each weight tile: on a
  // 2-core Xeon, Qwen2.5-0.5B's projections at 32 and 64 rows took 5-15% less time than one
  // tile at a time (3 alternating processes each).
  for (; m0 + kAmxRows < M; m0 += 2 * kAmxRows) {
    const AmxBlockArgs block_args{a.codes.data + m0 * a.code_stride, a.code_stride, tiles, K, block_columns,
                                  p.is_w4 ? half_scales : nullptr, R, row_mask, row_scales,
                                  a.tile_scales.data + m0, a.table_stride};
    __m512 acc0[kAmxRows], acc1[kAmxRows];
    for (int m = 0; m < kAmxRows; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < blocks; ++g)
      amx_block_of_x_pair(block_args, g, scratch.product[0], scratch.product[1], acc0, acc1);
    store_rows(m0, acc0);
    store_rows(m0 + kAmxRows, acc1);
  }
  for (; m0 < M; m0 += kAmxRows) {
    const int8_t* x_tile = a.codes.data + m0 * a.code_stride;
    __m512 acc[kAmxRows];
#pragma GCC unroll 16
    for (int m = 0; m < kAmxRows; ++m) acc[m] = _mm512_setzero_ps();
    const AmxBlockArgs block_args{x_tile, a.code_stride, tiles, K, block_columns, p.is_w4 ? half_scales : nullptr,
                                  R, row_mask, row_scales, a.tile_scales.data + m0, a.table_stride};
    for (int64_t g = 0; g < blocks; ++g) amx_block_of_x(block_args, g, scratch.product[0], acc);
    store_rows(m0, acc);
  }
}

// Block b of a lanes-layout part (w4 or w8) against all M rows of x: on AMX tiles (amx: this
// call may use them) or in tiles of kLanesTileRows rows through the VNNI kernel.
inline void run_lanes_block(const KernelArgs& args, int64_t b, int64_t M, bool amx) {
  const QuantPart& p = *args.part;
  if (amx && amx_fits(p)) {
    amx_lanes_block(args, b, M);
    return;
  }
  for (int64_t m0 = 0; m0 < M; m0 += kLanesTileRows) {
    const int mr = static_cast<int>(std::min<int64_t>(kLanesTileRows, M - m0));
    with_rows<kLanesTileRows>(mr, [&](auto R) {
      constexpr int MR = decltype(R)::value;
      if (!p.is_w4) w8_lanes_block<MR>(args, p.w8_lanes_layout, b, m0);
      else if (kHasGfni) w4_lanes_block<MR, true>(args, p.w4_lanes_layout, b, m0);
      else w4_lanes_block<MR, false>(args, p.w4_lanes_layout, b, m0);
    });
  }
}

// Lanes-layout parts (w4 or w8; MixLLM's layer has one of each) over all M rows of x in one
// parallel region: the parts' blocks, one after another, split between threads (~32 KiB per
// claim), each block met by the rows of x in tiles while it is in L1/L2. Why one region: a
// decode row's call is short (a MixLLM o projection's w8 part is 6 blocks, ~86 KiB), and each
// region costs a fork, a join and a cold start of the threads' streams. amx: parts that fit run
// on AMX tiles (each claim loads the tile configuration first).
inline void run_lanes(const KernelArgs* parts, int64_t count, int64_t M, bool amx) {
  int64_t blocks = 0, smallest_block_bytes = std::numeric_limits<int64_t>::max();
  std::array<int64_t, kMaxLanesParts> part_end{};
  TORCH_CHECK(count >= 1 && count <= kMaxLanesParts, "run_lanes: 1 to ", kMaxLanesParts, " parts");
  for (int64_t i = 0; i < count; ++i) {
    const QuantPart& p = *parts[i].part;
    blocks += p.is_w4 ? p.w4_lanes_layout.blocks : p.w8_lanes_layout.blocks;
    part_end[i] = blocks;
    smallest_block_bytes = std::min(smallest_block_bytes,
                                    kLaneRows * (p.is_w4 ? p.w4_lanes_layout.K / 2 : p.w8_lanes_layout.K));
  }
  const int64_t chunk = std::max<int64_t>(1, kClaimBytes / std::max<int64_t>(1, smallest_block_bytes));
  parallel_for_stealing(blocks, chunk, [&](int64_t first, int64_t last) {
    if (amx) load_amx_config();
    int64_t part = 0;
    for (int64_t item = first; item < last; ++item) {
      while (item >= part_end[part]) ++part;
      run_lanes_block(parts[part], item - (part ? part_end[part - 1] : 0), M, amx);
    }
  });
}

}  // namespace fitserve_cpu
