// The int8 KV cache format on the CPU (fitserve/attention/cache_layout.py defines it): int8
// K/V rows of head_dim values and one float32 scale per token per KV head beside them.
//
// Loads that widen int8 in registers (an int8 value is exact in float32 and bfloat16, so the
// attention loops run their float arithmetic on the integers and apply the scales to scores
// and probabilities), and the quantizing store of the fused decode stack, which computes
// exactly the float32 operations of cache_layout.quantize_int8 so both paths store the same
// bytes.

#pragma once

#include "cpu_kernels.h"

#include <cmath>

namespace fitserve_cpu {

inline __m256 load8(const int8_t* p) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
}
inline float to_float(int8_t v) { return static_cast<float>(v); }

// Where the cache's scales live: [num_blocks, block_size, num_kv_heads] float32 each, or
// none for a float cache.
struct KVScales {
  const float* key = nullptr;
  const float* value = nullptr;
  explicit operator bool() const { return key != nullptr; }
};

// x [head_dim] (float32 or bfloat16) -> int8 values and the returned scale, as
// quantize_int8: amax = max |x|, values = round_half_even(x * (127 / amax)), scale = amax / 127.
template <typename T>
inline float quantize_row_int8(const T* x, int8_t* values, int64_t head_dim) {
  float amax = 0.0f;
  for (int64_t d = 0; d < head_dim; ++d) amax = std::max(amax, std::fabs(to_float(x[d])));
  const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
  for (int64_t d = 0; d < head_dim; ++d) {
    const float q = std::nearbyint(to_float(x[d]) * inverse);  // ties to even (default rounding mode)
    values[d] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
  }
  return amax / 127.0f;
}

}  // namespace fitserve_cpu
