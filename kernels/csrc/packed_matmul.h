// A register-blocked float32 GEMM over weights laid out in 16-channel blocks interleaved per k
// ([ceil(N / 16), K, 16]): 6 rows of x x 16 channels per call, twelve accumulators in registers, no
// horizontal sums. The weights are int8 (converted in registers, per-channel scales applied at the
// end) or a float panel with the scales folded in. int8 linears keep their weights in this layout;
// GGUF linears dequantise each block into a panel when enough rows share it.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TR_AVX2 1
#endif

namespace packed {

constexpr int64_t kPackN = 16;
constexpr int64_t kMicroRows = 6;
constexpr int64_t kPanelMinRows = 24;  // rows over which converting a block to floats once pays

// Accumulators are named variables, not an array: with an array GCC stores all twelve to the stack
// on every k (measured at a fifth of the FMA rate).
template <int MR, typename W>
inline void packed_block(const float* x, int64_t ldx, int64_t K, const W* w, const float* scale, float* y,
                         int64_t ldy, int64_t valid) {
  float out[kMicroRows][kPackN];
#ifdef TR_AVX2
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx, *x4 = x + 4 * ldx, *x5 = x + 5 * ldx;
  for (int64_t k = 0; k < K; ++k) {
    __m256 w0, w1, b;
    if constexpr (std::is_same_v<W, float>) {
      w0 = _mm256_loadu_ps(w + k * kPackN);
      w1 = _mm256_loadu_ps(w + k * kPackN + 8);
    } else {
      const __m128i w16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k * kPackN));
      w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w16));
      w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w16, 8)));
    }
#define TR_ROW(r)                                        \
  if constexpr (MR > r) {                                \
    b = _mm256_broadcast_ss(x##r + k);                   \
    c##r##0 = _mm256_fmadd_ps(b, w0, c##r##0);           \
    c##r##1 = _mm256_fmadd_ps(b, w1, c##r##1);           \
  }
    TR_ROW(0) TR_ROW(1) TR_ROW(2) TR_ROW(3) TR_ROW(4) TR_ROW(5)
#undef TR_ROW
  }
  const bool scaled = !std::is_same_v<W, float>;  // a float panel has the scales folded in
  const __m256 s0 = scaled ? _mm256_loadu_ps(scale) : _mm256_set1_ps(1.0f);
  const __m256 s1 = scaled ? _mm256_loadu_ps(scale + 8) : _mm256_set1_ps(1.0f);
#define TR_OUT(r)                                                  \
  if constexpr (MR > r) {                                          \
    _mm256_storeu_ps(out[r], _mm256_mul_ps(c##r##0, s0));          \
    _mm256_storeu_ps(out[r] + 8, _mm256_mul_ps(c##r##1, s1));      \
  }
  TR_OUT(0) TR_OUT(1) TR_OUT(2) TR_OUT(3) TR_OUT(4) TR_OUT(5)
#undef TR_OUT
#else
  for (int r = 0; r < MR; ++r) {
    for (int64_t j = 0; j < kPackN; ++j) out[r][j] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t j = 0; j < kPackN; ++j) out[r][j] += x[r * ldx + k] * static_cast<float>(w[k * kPackN + j]);
    }
    if constexpr (!std::is_same_v<W, float>) {
      for (int64_t j = 0; j < kPackN; ++j) out[r][j] *= scale[j];
    }
  }
#endif
  for (int r = 0; r < MR; ++r) std::copy(out[r], out[r] + valid, y + r * ldy);
}

template <typename W>
void packed_rows(const float* x, int64_t m0, int64_t m1, int64_t K, const W* w, const float* s, float* y, int64_t N,
                 int64_t n0, int64_t valid) {
  int64_t m = m0;
  for (; m + kMicroRows <= m1; m += kMicroRows) packed_block<6>(x + m * K, K, K, w, s, y + m * N + n0, N, valid);
  const float* xm = x + m * K;
  float* ym = y + m * N + n0;
  switch (m1 - m) {
    case 5: packed_block<5>(xm, K, K, w, s, ym, N, valid); break;
    case 4: packed_block<4>(xm, K, K, w, s, ym, N, valid); break;
    case 3: packed_block<3>(xm, K, K, w, s, ym, N, valid); break;
    case 2: packed_block<2>(xm, K, K, w, s, ym, N, valid); break;
    case 1: packed_block<1>(xm, K, K, w, s, ym, N, valid); break;
    default: break;
  }
}

// Rows of x kept in L2 while a thread walks its channel blocks.
inline int64_t chunk_rows(int64_t K) {
  return std::max<int64_t>(kMicroRows, (256 * 1024 / (K * 4)) / kMicroRows * kMicroRows);
}

// y [M, N] = x [M, K] @ W^T, W in 16-channel blocks: fill(b, panel) writes block b as K x 16 floats
// (scales folded in) into a thread's panel, once per chunk of rows.
template <typename Fill>
void panel_matmul(const float* x, int64_t M, int64_t K, int64_t N, float* y, Fill fill) {
  const int64_t blocks = (N + kPackN - 1) / kPackN, chunk = chunk_rows(K);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(K * kPackN);
    for (int64_t m0 = 0; m0 < M; m0 += chunk) {
      const int64_t m1 = std::min(M, m0 + chunk);
      for (int64_t b = begin; b < end; ++b) {
        fill(b, panel.data());
        packed_rows(x, m0, m1, K, panel.data(), static_cast<const float*>(nullptr), y, N, b * kPackN,
                    std::min(kPackN, N - b * kPackN));
      }
    }
  });
}

// The shape every quantised linear shares: x [..., K] -> y [..., N], run(x rows, M, y rows) on the
// flattened rows (none when M is 0), then the bias.
template <typename Run>
torch::Tensor linear_rows(const torch::Tensor& x, int64_t K, int64_t N, const c10::optional<torch::Tensor>& bias,
                          Run run) {
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  torch::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  torch::Tensor y = torch::empty({M, N}, x.options());
  if (M > 0) run(x2.data_ptr<float>(), M, y.data_ptr<float>());
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y.view(out_shape);
}

}  // namespace packed
