// The compute kernels behind fitserve's CPU fast paths (AVX2 + FMA; AVX-512 where the CPU
// has it, chosen at run time), on raw pointers so that both the tensor-level ops of
// cpu_kernels.cpp and the fused decode stack of cpu_decode_stack.h call them directly.
//
// 1. linear_impl: y = x W^T + b for a few rows of x (decode), W in bfloat16 or float32.
//    Decode reads every weight once per step, so the kernel streams W exactly once and keeps
//    the rows of x in registers/L1; bfloat16 weights are widened to float32 in registers (a
//    16-bit shift), so a CPU without native bf16 arithmetic still reads half the bytes.
//    Accumulation is float32; the result is rounded once to the output dtype, as torch does.
// 2. Decode attention over the paged K/V cache lives in cpu_decode_attention.h.
// 3. rms_norm_impl (+ residual add), rotary_impl, silu_mul_impl: the small per-layer ops
//    fused, so a decode step is a few calls per layer instead of ~50 tiny torch ops.
//
// Parallelism goes through at::parallel_for, i.e. torch's own OpenMP pool and thread count.
// Included by exactly one translation unit (cpu_kernels.cpp), hence the definitions here.

#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace fitserve_cpu {

using BF16 = at::BFloat16;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const BF16* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline float to_float(float v) { return v; }
inline float to_float(BF16 v) { return static_cast<float>(v); }

inline float hsum(__m256 v) {
  __m128 low = _mm256_castps256_ps128(v);
  __m128 high = _mm256_extractf128_ps(v, 1);
  low = _mm_add_ps(low, high);
  __m128 shuffled = _mm_movehdup_ps(low);
  __m128 sums = _mm_add_ps(low, shuffled);
  shuffled = _mm_movehl_ps(shuffled, sums);
  sums = _mm_add_ss(sums, shuffled);
  return _mm_cvtss_f32(sums);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// The eight horizontal sums of a[0..7], as one vector (lane j = sum of a[j]).
inline __m256 hsum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// The first 64-byte boundary at or after p, in a buffer allocated 64 bytes longer than used,
// so 8- and 16-float loads never straddle a cache line.
template <typename T>
inline T* align64(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~static_cast<uintptr_t>(63));
}

struct AlignedFloats {
  std::vector<float> storage;
  float* data;
  explicit AlignedFloats(size_t count) : storage(count + 16), data(align64(storage.data())) {}
};

template <typename T>
inline void widen_row(const T* source, float* target, int64_t count) {
  int64_t k = 0;
  for (; k + 8 <= count; k += 8) _mm256_storeu_ps(target + k, load8(source + k));
  for (; k < count; ++k) target[k] = to_float(source[k]);
}

// ------------------------------------------------------------------------------ scheduling

// at::parallel_for over [0, items) where a thread that finishes its share early takes the
// unfinished tail of another's. Each thread owns a contiguous share and walks it front to
// back in chunks (its loads stay one ascending stream for the prefetchers); a thread that is
// done claims chunks from the back of the others' shares. Two threads streaming memory on a
// shared machine finish their static halves ~8% apart at random (one is descheduled, or
// gets less bandwidth for a while), and the early one would otherwise spin at the barrier:
// +2-5% read bandwidth for one decode row over the Qwen2.5-0.5B projections. fn(first,
// last) must not care which thread runs it: every item is computed the same way by whoever
// claims it, so results do not depend on the schedule.
class StealingRanges {
 public:
  explicit StealingRanges(int64_t items, int64_t shares) {
    TORCH_CHECK(items < (int64_t{1} << 31), "StealingRanges: too many items");
    if (shares > kInlineShares) heap_shares_ = std::make_unique<Share[]>(static_cast<size_t>(shares));
    shares_ = heap_shares_ ? heap_shares_.get() : inline_shares_.data();
    for (int64_t t = 0; t < shares; ++t) shares_[t].packed.store(pack(items * t / shares, items * (t + 1) / shares));
  }

  // Claim up to `chunk` items of share t: from its front when own, else from its back.
  bool claim(int64_t t, bool own, int64_t chunk, int64_t& first, int64_t& last) {
    std::atomic<uint64_t>& packed = shares_[t].packed;
    uint64_t current = packed.load(std::memory_order_relaxed);
    while (true) {
      const int64_t front = static_cast<int64_t>(current >> 32), back = static_cast<int64_t>(current & 0xffffffffu);
      if (front >= back) return false;
      uint64_t next;
      if (own) {
        first = front, last = std::min(front + chunk, back), next = pack(last, back);
      } else {
        first = std::max(back - chunk, front), last = back, next = pack(front, first);
      }
      if (packed.compare_exchange_weak(current, next, std::memory_order_relaxed)) return true;
    }
  }

 private:
  static uint64_t pack(int64_t front, int64_t back) {
    return (static_cast<uint64_t>(front) << 32) | static_cast<uint64_t>(back);
  }
  struct alignas(64) Share {  // one cache line each: owners never share a line
    std::atomic<uint64_t> packed{0};
  };
  // Up to kInlineShares threads the shares live on the caller's stack: with a heap allocation
  // per region, setting up the ranges took 0.64-0.70 us of each decode projection's call (its
  // memory out of the caches after the weights streamed through them), on the stack 0.13-0.14
  // (2-core Zen 4, timed inside a single-stream step).
  static constexpr int64_t kInlineShares = 8;
  std::array<Share, kInlineShares> inline_shares_;
  std::unique_ptr<Share[]> heap_shares_;
  Share* shares_ = nullptr;
};

// What a claim of parallel_for_stealing should cover when items are weight rows: ~32 KiB, so
// a compare-and-swap per claim is noise next to streaming them.
constexpr int64_t kClaimBytes = 32768;

template <typename F>
void parallel_for_stealing(int64_t items, int64_t chunk, const F& fn) {
  if (items <= 0) return;
  const int64_t shares = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  StealingRanges ranges(items, shares);
  at::parallel_for(0, shares, 1, [&](int64_t first_share, int64_t last_share) {
    int64_t first, last;
    for (int64_t t = first_share; t < last_share; ++t) {
      while (ranges.claim(t, true, chunk, first, last)) fn(first, last);
      for (int64_t other = 1; other < shares; ++other)
        while (ranges.claim((t + other) % shares, false, chunk, first, last)) fn(first, last);
    }
  });
}

// ------------------------------------------------------------------------------ linear

constexpr int kRowsOfW = 4;  // weight rows per block: each x load feeds 4 FMAs

// Weights stream from memory once per decode step. Asking for the lines 8 KiB ahead into L2
// (not L1, where they would evict x) keeps more misses in flight than the hardware prefetcher
// alone: 20 -> 23-25 GB/s for one row of bf16 weights on a 2-core Xeon, the rate MKL's
// float32 GEMV reaches there (benchmarks/cpu_kernels.py-style sweep of distance and hint).
constexpr int64_t kPrefetchBytes = 8192;
// The AVX-512 single-row loops ask only 1 KiB ahead. On Zen 4 an 8 KiB distance caps their
// read rate at ~45 GB/s when the machine streams ~60 GB/s (a pure-read loop, or the same loop
// asking 0.5-2 KiB ahead, reaches it), and costs 2-4% in slower phases too: 1.06x (bf16)
// and 1.12x (float32) single-stream decode in in-process A/Bs alternating every 8 steps.
// Several rows of x per W line (the vdpbf16ps kernels) keep the longer distance: at 8 rows,
// 1 KiB ahead measured 0.71x.
constexpr int64_t kSingleRowPrefetchBytes = 1024;
template <int64_t Distance = kPrefetchBytes, typename WT>
inline void prefetch_ahead(const WT* w) {
  const char* line = reinterpret_cast<const char*>(w) + Distance;
  _mm_prefetch(line, _MM_HINT_T1);
  _mm_prefetch(line + 64, _MM_HINT_T1);
}

// One row of x against one row of W straight from memory, four independent accumulators:
// for a single decode row this streams W sequentially, the pattern the prefetcher likes best.
template <typename WT>
inline float dot_row(const float* x, const WT* w, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    prefetch_ahead(w + k);
    a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(load8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(load8(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(load8(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a0);
  float sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < K; ++k) sum += to_float(w[k]) * x[k];
  return sum;
}

// The single-row dot products with 512-bit vectors, for CPUs with AVX-512 (chosen at run
// time, so the extension still loads on AVX2-only CPUs). What makes them read faster than
// dot_row, each measured on Zen 4 by A/B runs interleaved layer by layer over the
// Qwen2.5-0.5B projections:
//
// - x's 128-element blocks stored in a scrambled order (ScrambledRow). Read in order, the
//   loads of x form a second ascending stream beside W's, and the hardware prefetchers then
//   run less far ahead on W; with x's blocks scattered only W looks like a stream: +12-15%.
// - 256 bytes of W per iteration into eight independent accumulators, every line asked for
//   1 KiB ahead (kSingleRowPrefetchBytes): more loads in flight than four accumulators (+3-5%).
// - bf16 widened without a shuffle: a 64-byte load holds 32 bf16 weights, each 32-bit lane a
//   pair; the lane shifted left by 16 is the even weight as a float32, the lane with its low
//   half masked off is the odd one. Two single-cycle integer ops per 32 weights instead of
//   two cross-lane zero-extensions (which Zen 4 runs at half rate): +3-12% (widen_pairs). For
//   bf16 weights float32 x is therefore stored with each 32-element block as its 16 even then
//   its 16 odd elements; bf16 x is widened the same way.
//
// Each product is a float32 FMA and the sums are taken in the same order whatever the
// scramble, so results do not depend on it.
constexpr int64_t kScrambleBlock = 128;

// x of one decode row in the layout the AVX-512 single-row loops read: `values` holds the
// full 128-element blocks at the offsets in `block_offsets` (a fixed permutation of the block
// slots), then the remaining K % 128 elements at their own index. S is float (float32 x;
// against bf16 weights, with `split_pairs`, every 32-element block is stored as its 16 even
// then its 16 odd elements, the lanes the widened weight pairs land in) or BF16 (bf16 x
// against bf16 weights, in its own order: the loop widens x the way it widens W). Keeping bf16
// x in bf16 halves its bytes in L1 beside the weight stream: a down projection's 4864-element
// x takes 19 KiB as float32 and, with the 9.5 KiB of each weight row, no longer stays in
// Zen 4's 32 KiB L1; that loop read at 0.81 of a pure-read loop, with bf16 x at 0.98.
template <typename S>
struct ScrambledRow {
  std::vector<S> storage;
  S* values;
  std::vector<int32_t> block_offsets;

  ScrambledRow(const S* x, int64_t K, bool split_pairs)
      : storage(K + 64 / sizeof(S)), values(align64(storage.data())), block_offsets(K / kScrambleBlock) {
    const int64_t blocks = K / kScrambleBlock;
    for (int64_t b = 0; b < blocks; ++b) block_offsets[b] = static_cast<int32_t>(b * kScrambleBlock);
    uint32_t state = 0x9E3779B9u;  // a fixed Fisher-Yates shuffle (xorshift32)
    for (int64_t b = blocks - 1; b > 0; --b) {
      state ^= state << 13, state ^= state >> 17, state ^= state << 5;
      std::swap(block_offsets[b], block_offsets[state % (b + 1)]);
    }
    for (int64_t b = 0; b < blocks; ++b)
      place(x + b * kScrambleBlock, values + block_offsets[b], kScrambleBlock, split_pairs);
    place(x + blocks * kScrambleBlock, values + blocks * kScrambleBlock, K - blocks * kScrambleBlock, split_pairs);
  }

  static void place(const S* x, S* out, int64_t count, bool split_pairs) {
    int64_t k = 0;
    if (split_pairs)
      for (; k + 32 <= count; k += 32)
        for (int i = 0; i < 16; ++i) {
          out[k + i] = x[k + 2 * i];
          out[k + 16 + i] = x[k + 2 * i + 1];
        }
    for (; k < count; ++k) out[k] = x[k];
  }
};

// The sum of all lanes of eight accumulators, pairwise.
__attribute__((target("avx512f,avx512bw,fma"))) inline float sum_of_eight(const __m512 (&acc)[8]) {
  const __m512 sum01 = _mm512_add_ps(acc[0], acc[1]), sum23 = _mm512_add_ps(acc[2], acc[3]);
  const __m512 sum45 = _mm512_add_ps(acc[4], acc[5]), sum67 = _mm512_add_ps(acc[6], acc[7]);
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(sum01, sum23), _mm512_add_ps(sum45, sum67)));
}

// 32 bf16 values at p as float32, without a shuffle (see above): `even` gets elements
// 0, 2, .., 30 and `odd` 1, 3, .., 31.
__attribute__((target("avx512f,avx512bw,fma"))) inline void widen_pairs(const BF16* p, __m512& even, __m512& odd) {
  const __m512i pairs = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// The 32 elements of x at xs in the lanes widen_pairs gives the weights: float32 x is stored
// split that way by ScrambledRow<float>; bf16 x is widened the way the weights are.
__attribute__((target("avx512f,avx512bw,fma"))) inline void x_halves(const float* xs, __m512& even, __m512& odd) {
  even = _mm512_loadu_ps(xs);
  odd = _mm512_loadu_ps(xs + 16);
}
__attribute__((target("avx512f,avx512bw,fma"))) inline void x_halves(const BF16* xs, __m512& even, __m512& odd) {
  widen_pairs(xs, even, odd);
}

template <typename S>
__attribute__((target("avx512f,avx512bw,fma")))
float dot_row_bf16_avx512(const ScrambledRow<S>& x, const BF16* w, int64_t K) {
  __m512 acc[8];
  for (auto& a : acc) a = _mm512_setzero_ps();
  __m512 w_even, w_odd, x_even, x_odd;
  int64_t k = 0;
  for (int64_t block = 0; k + kScrambleBlock <= K; k += kScrambleBlock, ++block) {
    prefetch_ahead<kSingleRowPrefetchBytes>(w + k);
    prefetch_ahead<kSingleRowPrefetchBytes>(w + k + 64);
    const S* xs = x.values + x.block_offsets[block];
    for (int j = 0; j < 4; ++j) {
      widen_pairs(w + k + 32 * j, w_even, w_odd);
      x_halves(xs + 32 * j, x_even, x_odd);
      acc[2 * j] = _mm512_fmadd_ps(w_even, x_even, acc[2 * j]);
      acc[2 * j + 1] = _mm512_fmadd_ps(w_odd, x_odd, acc[2 * j + 1]);
    }
  }
  const S* tail = x.values;  // past the full blocks, x sits at its own index
  for (; k + 32 <= K; k += 32) {
    widen_pairs(w + k, w_even, w_odd);
    x_halves(tail + k, x_even, x_odd);
    acc[0] = _mm512_fmadd_ps(w_even, x_even, acc[0]);
    acc[1] = _mm512_fmadd_ps(w_odd, x_odd, acc[1]);
  }
  float sum = sum_of_eight(acc);
  for (; k < K; ++k) sum += to_float(w[k]) * to_float(tail[k]);
  return sum;
}

__attribute__((target("avx512f,avx512bw,fma")))
float dot_row_f32_avx512(const ScrambledRow<float>& x, const float* w, int64_t K) {
  __m512 acc[8];
  for (auto& a : acc) a = _mm512_setzero_ps();
  int64_t k = 0;
  for (int64_t block = 0; k + kScrambleBlock <= K; k += kScrambleBlock, ++block) {
    const float* xs = x.values + x.block_offsets[block];
    for (int half = 0; half < 2; ++half) {  // 2 x 256 bytes of W
      const float* wh = w + k + 64 * half;
      prefetch_ahead<kSingleRowPrefetchBytes>(wh);
      prefetch_ahead<kSingleRowPrefetchBytes>(wh + 32);
      for (int j = 0; j < 4; ++j)
        acc[4 * half + j] = _mm512_fmadd_ps(_mm512_loadu_ps(wh + 16 * j), _mm512_load_ps(xs + 64 * half + 16 * j),
                                            acc[4 * half + j]);
    }
  }
  const float* tail = x.values;
  for (; k + 16 <= K; k += 16) acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(tail + k), acc[0]);
  float sum = sum_of_eight(acc);
  for (; k < K; ++k) sum += w[k] * tail[k];
  return sum;
}

// PyTorch's own switch, ATEN_CPU_CAPABILITY, limits fitserve's kernels as it limits torch's:
// set to "avx2" (or "default") no AVX-512 code of ours runs either. Users set it on VMs that
// mishandle AVX-512; benchmarks set it to measure the AVX2 paths on an AVX-512 machine. Read
// once, when the module loads (as torch reads it once).
inline bool cpu_avx512_allowed() {
  static const bool allowed = [] {
    const char* capability = std::getenv("ATEN_CPU_CAPABILITY");
    if (capability == nullptr) return true;
    std::string lower(capability);
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
    return lower != "avx2" && lower != "default";
  }();
  return allowed;
}

const bool kHasAvx512 =
    cpu_avx512_allowed() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");

// Functions using vdpbf16ps (bf16 pair dot products into float32) carry this target, and run
// only where cpu_has_avx512_bf16() (Zen 4, Cooper Lake, Sapphire Rapids and later).
#define FITSERVE_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))

inline bool cpu_has_avx512_bf16() {
  return cpu_avx512_allowed() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bf16");
}

// MR rows of x against kRowsOfW float32 rows of W (already widened into an L1/L2 buffer).
template <int MR>
inline void micro_kernel(const float* const* x_rows, const float* w, int64_t K, float out[][kRowsOfW]) {
  __m256 acc[MR][kRowsOfW];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kRowsOfW; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[kRowsOfW];
    for (int r = 0; r < kRowsOfW; ++r) wv[r] = _mm256_loadu_ps(w + r * K + k);
    for (int m = 0; m < MR; ++m) {
      __m256 xv = _mm256_loadu_ps(x_rows[m] + k);
      for (int r = 0; r < kRowsOfW; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kRowsOfW; ++r) {
      float sum = hsum(acc[m][r]);
      for (int64_t kk = k; kk < K; ++kk) sum += x_rows[m][kk] * w[r * K + kk];
      out[m][r] = sum;
    }
}

// One output of a single decode row: the AVX-512 loop over the scrambled x where linear_impl
// prepared one, dot_row over the plain x otherwise.
template <typename S>
inline float single_row_dot(bool scrambled, const ScrambledRow<S>& x_scrambled, const float* x, const BF16* w,
                            int64_t K) {
  return scrambled ? dot_row_bf16_avx512(x_scrambled, w, K) : dot_row(x, w, K);
}
inline float single_row_dot(bool scrambled, const ScrambledRow<float>& x_scrambled, const float* x, const float* w,
                            int64_t K) {
  return scrambled ? dot_row_f32_avx512(x_scrambled, w, K) : dot_row(x, w, K);
}

// This thread's buffer for a block of W widened to float32 (several rows of x), kept across
// calls: fn of parallel_for_stealing runs once per claimed chunk, too often to allocate.
inline float* widened_block_scratch(int64_t count) {
  thread_local std::vector<float> storage;
  if (storage.size() < static_cast<size_t>(count + 16)) storage.resize(count + 16);
  return align64(storage.data());
}

template <typename XT, typename WT>
void linear_impl(const XT* x, const WT* w, const WT* bias, XT* out, int64_t M, int64_t N, int64_t K) {
  // One row of x on an AVX-512 CPU: the layout of dot_row_bf16_avx512 / dot_row_f32_avx512,
  // in bf16 where both x and W are (see ScrambledRow).
  const bool scrambled = M == 1 && kHasAvx512;
  constexpr bool kBf16Row = std::is_same<XT, BF16>::value && std::is_same<WT, BF16>::value;
  const bool x_stays_bf16 = scrambled && kBf16Row;
  // x is small (a few decode rows): widen it once so the inner loops only widen W.
  AlignedFloats x_buffer(x_stays_bf16 ? 0 : M * K);
  float* x_float = x_buffer.data;
  if (!x_stays_bf16)
    for (int64_t m = 0; m < M; ++m) widen_row(x + m * K, x_float + m * K, K);
  using RowElement = std::conditional_t<kBf16Row, BF16, float>;
  const RowElement* row_source;
  if constexpr (kBf16Row) row_source = x;
  else row_source = x_float;
  const ScrambledRow<RowElement> x_scrambled(row_source, scrambled ? K : 0,
                                             !kBf16Row && std::is_same<WT, BF16>::value);
  const int64_t num_blocks = (N + kRowsOfW - 1) / kRowsOfW;
  const int64_t chunk = std::max<int64_t>(1, kClaimBytes / (kRowsOfW * K * static_cast<int64_t>(sizeof(WT))));
  parallel_for_stealing(num_blocks, chunk, [&](int64_t first, int64_t last) {
    float* w_float = M == 1 ? nullptr : widened_block_scratch(kRowsOfW * K);
    float block_out[3][kRowsOfW];
    for (int64_t block = first; block < last; ++block) {
      const int64_t n0 = block * kRowsOfW;
      const int rows = static_cast<int>(std::min<int64_t>(kRowsOfW, N - n0));
      const WT* w_block = w + n0 * K;
      if (M == 1) {
        for (int r = 0; r < rows; ++r)
          out[n0 + r] = static_cast<XT>(single_row_dot(scrambled, x_scrambled, x_float, w_block + r * K, K) +
                                        (bias ? to_float(bias[n0 + r]) : 0.0f));
        continue;
      }
      // Several rows of x: widen this block of W once into an L1-resident buffer, then reuse
      // it for every row of x.
      for (int r = 0; r < rows; ++r) widen_row(w_block + r * K, w_float + r * K, K);
      for (int r = rows; r < kRowsOfW; ++r) std::fill_n(w_float + r * K, K, 0.0f);
      for (int64_t m0 = 0; m0 < M; m0 += 3) {
        const int mr = static_cast<int>(std::min<int64_t>(3, M - m0));
        const float* x_rows[3];
        for (int m = 0; m < mr; ++m) x_rows[m] = x_float + (m0 + m) * K;
        if (mr == 3) micro_kernel<3>(x_rows, w_float, K, block_out);
        else if (mr == 2) micro_kernel<2>(x_rows, w_float, K, block_out);
        else micro_kernel<1>(x_rows, w_float, K, block_out);
        for (int m = 0; m < mr; ++m)
          for (int r = 0; r < rows; ++r)
            out[(m0 + m) * N + n0 + r] =
                static_cast<XT>(block_out[m][r] + (bias ? to_float(bias[n0 + r]) : 0.0f));
      }
    }
  });
}

// ---------------------------------------------------------------------- decode attention

// exp for x <= 0 (softmax after subtracting the max): Cody-Waite range reduction and a
// degree-6 polynomial, ~1 ulp in float32 over the range softmax uses.
inline __m256 exp256(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.3f);
  x = _mm256_max_ps(x, lowest);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

// ------------------------------------------------------------------ fused elementwise ops
//
// Decode runs one token through ~20 small ops per layer; each torch op costs a dispatch and
// a pass over memory. These fuse them with the rounding of the unfused torch code kept:
// every intermediate the torch code stores in the model dtype is rounded to it here too
// (to_dtype below), and plain arithmetic is compiled without FMA contraction.

template <typename T>
inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

// out = weight * to_dtype(h * rsqrt(mean(h^2) + eps)), with h = x (+ residual, rounded to
// dtype and written back to residual when given). Rows in parallel.
template <typename T>
void rms_norm_impl(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t hidden, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t first, int64_t last) {
    std::vector<float> h(hidden);
    for (int64_t row = first; row < last; ++row) {
      const T* xr = x + row * hidden;
      T* rr = residual ? residual + row * hidden : nullptr;
      for (int64_t i = 0; i < hidden; ++i) {
        float value = to_float(xr[i]);
        if (rr) {
          value = round_to<T>(value + to_float(rr[i]));
          rr[i] = static_cast<T>(value);
        }
        h[i] = value;
      }
      __m256 sum_vec = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= hidden; i += 8) {
        __m256 v = _mm256_loadu_ps(h.data() + i);
        sum_vec = _mm256_add_ps(sum_vec, _mm256_mul_ps(v, v));
      }
      float sum = hsum(sum_vec);
      for (; i < hidden; ++i) sum += h[i] * h[i];
      const float inverse = 1.0f / std::sqrt(sum / static_cast<float>(hidden) + eps);
      T* o = out + row * hidden;
      for (int64_t j = 0; j < hidden; ++j) o[j] = static_cast<T>(to_float(weight[j]) * round_to<T>(h[j] * inverse));
    }
  });
}

// The parallel loop of the causal prefill attention kernels: tasks of up to `rows_per_task`
// consecutive query rows of one head, fn(head, kv_head, first_row, rows). Head-major, so each
// thread gets whole heads and the long (late) rows are shared evenly.
template <typename Fn>
void for_each_head_row_group(int64_t num_heads, int64_t num_kv_heads, int64_t query_len, int64_t rows_per_task,
                             const Fn& fn) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t row_groups = (query_len + rows_per_task - 1) / rows_per_task;
  at::parallel_for(0, num_heads * row_groups, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t head = task / row_groups, first_row = (task % row_groups) * rows_per_task;
      fn(head, head / group, first_row, std::min<int64_t>(rows_per_task, query_len - first_row));
    }
  });
}

// Round 8 floats to the nearest bfloat16, ties to even, as c10::BFloat16 does (NaN stays a
// quiet NaN); the result is still a float whose low 16 bits are zero.
inline __m256 round_to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb);
  __m256i rounded = _mm256_and_si256(_mm256_add_epi32(bits, bias), _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __m256 is_nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), is_nan);
}

// Store 8 floats as float32, or as bfloat16 (rounded to nearest even).
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(BF16* p, __m256 v) {
  const __m256i high = _mm256_srli_epi32(_mm256_castps_si256(round_to_bf16(v)), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

// count floats rounded to bfloat16 (to nearest even, as c10::BFloat16 / .to(torch.bfloat16)).
inline void narrow_row(const float* source, BF16* target, int64_t count) {
  int64_t k = 0;
  for (; k + 8 <= count; k += 8) store8(target + k, _mm256_loadu_ps(source + k));
  for (; k < count; ++k) target[k] = static_cast<BF16>(source[k]);
}

// exp for any float (clamped where float32 overflows or flushes).
inline __m256 exp256_any(__m256 x) { return exp256(_mm256_min_ps(x, _mm256_set1_ps(88.3f))); }

// In place on the first `num_heads` heads of each row of qkv ([tokens, row_stride]):
// x * cos + rotate_half(x) * sin, each product rounded to the dtype as torch does.
template <typename T>
void rotary_impl(T* qkv, const T* cos, const T* sin, int64_t tokens, int64_t row_stride, int64_t num_heads,
                 int64_t head_dim) {
  const int64_t half = head_dim / 2;
  // Each product rounded to T, then their sum rounded to T, as the Python path computes it;
  // 8 pairs at a time (a one-token step ran the scalar loop on one thread while the others
  // waited, ~3 us per layer of Qwen2.5-0.5B; 32 tokens took 1.5% of a batched decode step).
  auto rounded = [](__m256 v) {
    if constexpr (std::is_same_v<T, BF16>) return round_to_bf16(v);
    else return v;
  };
  const __m256 sign = _mm256_set1_ps(-0.0f);
  at::parallel_for(0, tokens, 16, [&](int64_t first, int64_t last) {
    for (int64_t token = first; token < last; ++token) {
      const T* c = cos + token * head_dim;
      const T* s = sin + token * head_dim;
      for (int64_t head = 0; head < num_heads; ++head) {
        T* x = qkv + token * row_stride + head * head_dim;
        int64_t i = 0;
        for (; i + 8 <= half; i += 8) {
          const __m256 x1 = load8(x + i), x2 = load8(x + i + half);
          const __m256 a1 = rounded(_mm256_mul_ps(x1, load8(c + i)));
          const __m256 b1 = rounded(_mm256_mul_ps(_mm256_xor_ps(x2, sign), load8(s + i)));
          const __m256 a2 = rounded(_mm256_mul_ps(x2, load8(c + i + half)));
          const __m256 b2 = rounded(_mm256_mul_ps(x1, load8(s + i + half)));
          store8(x + i, _mm256_add_ps(a1, b1));
          store8(x + i + half, _mm256_add_ps(a2, b2));
        }
        for (; i < half; ++i) {
          const float x1 = to_float(x[i]), x2 = to_float(x[i + half]);
          const float a1 = round_to<T>(x1 * to_float(c[i])), b1 = round_to<T>(-x2 * to_float(s[i]));
          const float a2 = round_to<T>(x2 * to_float(c[i + half])), b2 = round_to<T>(x1 * to_float(s[i + half]));
          x[i] = static_cast<T>(a1 + b1);
          x[i + half] = static_cast<T>(a2 + b2);
        }
      }
    }
  });
}

// [tokens, 2 * inter] (gate | up) -> [tokens, inter]: to_dtype(silu(gate)) * up.
template <typename T>
void silu_mul_impl(const T* gate_up, T* out, int64_t tokens, int64_t inter) {
  at::parallel_for(0, tokens, 1, [&](int64_t first, int64_t last) {
    for (int64_t token = first; token < last; ++token) {
      const T* gate = gate_up + token * 2 * inter;
      const T* up = gate + inter;
      T* o = out + token * inter;
      int64_t i = 0;
      const __m256 one = _mm256_set1_ps(1.0f);
      for (; i + 8 <= inter; i += 8) {
        __m256 g = load8(gate + i);
        __m256 e = exp256_any(_mm256_sub_ps(_mm256_setzero_ps(), g));
        __m256 silu_vec = _mm256_div_ps(g, _mm256_add_ps(one, e));
        if constexpr (std::is_same_v<T, BF16>) {
          // Both roundings to bf16 in registers (the scalar conversions cost 3x torch's time).
          store8(o + i, _mm256_mul_ps(round_to_bf16(silu_vec), load8(up + i)));
        } else {
          _mm256_storeu_ps(o + i, _mm256_mul_ps(silu_vec, load8(up + i)));
        }
      }
      for (; i < inter; ++i) {
        const float g = to_float(gate[i]);
        o[i] = static_cast<T>(round_to<T>(g / (1.0f + std::exp(-g))) * to_float(up[i]));
      }
    }
  });
}

}  // namespace fitserve_cpu
