// Small math helpers shared by tokenrelay's CPU kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX__)

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

#if defined(__AVX2__) && defined(__FMA__)
// exp(x) for x <= 0, eight at a time: exp_nonpositive's method (above) in AVX2. (gcc does not
// vectorise the scalar one: its bit-cast through memcpy and floor stay scalar in a loop.)
inline __m256 exp_nonpositive8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
  const __m256 whole = _mm256_floor_ps(t);
  const __m256 f = _mm256_sub_ps(t, whole);
  __m256 p = _mm256_set1_ps(1.5316e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3395e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4023e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9315e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(whole), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif
