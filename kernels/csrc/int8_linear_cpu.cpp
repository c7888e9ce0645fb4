// Weight-only int8 linear on CPU: y = x @ (q * scale[:, None])^T + bias, with q int8 [N, K] and
// x, y float32. Few rows (decoding) are memory-bound: a fused kernel reads each int8 weight once and
// converts it in registers. Many rows (prefill) are compute-bound: each thread dequantises a tile of
// weights into a cache-sized float32 buffer and hands it to the regular GEMM. Weights repacked once
// (int8_pack) take one register-blocked kernel at every batch size instead (int8_linear_packed).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "tiled_matmul.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TR_AVX2 1
#endif

namespace {

constexpr int64_t kRowBlock = 8;     // rows of x sharing one pass over a weight row
constexpr int64_t kFusedMaxRows = 16;

#ifdef TR_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}
#endif

// Dot products of `rows` rows of x (stride K) with one int8 weight row, scaled.
inline void dot_rows(const float* x, int64_t rows, int64_t K, const int8_t* w, float scale, float* out,
                     int64_t out_stride) {
  int64_t k = 0;
  float partial[kRowBlock] = {0};
#ifdef TR_AVX2
  __m256 acc[kRowBlock];
  for (int64_t m = 0; m < rows; ++m) acc[m] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k))));
    for (int64_t m = 0; m < rows; ++m) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), wv, acc[m]);
  }
  for (int64_t m = 0; m < rows; ++m) partial[m] = hsum(acc[m]);
#endif
  for (; k < K; ++k) {
    const float wk = static_cast<float>(w[k]);
    for (int64_t m = 0; m < rows; ++m) partial[m] += x[m * K + k] * wk;
  }
  for (int64_t m = 0; m < rows; ++m) out[m * out_stride] = partial[m] * scale;
}

void fused_small(const float* x, int64_t M, int64_t K, const int8_t* q, const float* scale, int64_t N, float* y) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
        dot_rows(x + m0 * K, std::min(kRowBlock, M - m0), K, q + n * K, scale[n], y + m0 * N + n, N);
      }
    }
  });
}

// -- packed layout: weights of 16 output channels interleaved per k, [ceil(N / 16), K, 16] ---------
// A register-blocked kernel (6 rows of x x 16 channels, 12 accumulators) then converts each loaded
// weight vector once for 6 rows and never reduces horizontally: near the FMA rate at any batch size,
// while reading 1 byte per weight.
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

void packed_matmul(const float* x, int64_t M, int64_t K, const int8_t* qp, const float* scale, int64_t N, float* y) {
  const int64_t blocks = (N + kPackN - 1) / kPackN;
  // rows of x that stay in L2 while a thread walks its channel blocks
  const int64_t chunk = std::max<int64_t>(kMicroRows, (256 * 1024 / (K * 4)) / kMicroRows * kMicroRows);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    // Many rows: each block's weights become a float panel (scales folded in) once per chunk, and the
    // kernel runs on FMAs alone. Few rows (decoding): int8 straight from memory, converted per k.
    std::vector<float> panel;
    for (int64_t m0 = 0; m0 < M; m0 += chunk) {
      const int64_t m1 = std::min(M, m0 + chunk);
      const bool use_panel = m1 - m0 >= kPanelMinRows;
      if (use_panel) panel.resize(K * kPackN);
      for (int64_t b = begin; b < end; ++b) {
        const int8_t* w = qp + b * K * kPackN;
        const float* s = scale + b * kPackN;
        const int64_t n0 = b * kPackN, valid = std::min(kPackN, N - n0);
        if (use_panel) {
          float* p = panel.data();
          for (int64_t k = 0; k < K; ++k) {
#pragma omp simd
            for (int64_t j = 0; j < kPackN; ++j) p[k * kPackN + j] = static_cast<float>(w[k * kPackN + j]) * s[j];
          }
          packed_rows(x, m0, m1, K, panel.data(), s, y, N, n0, valid);
        } else {
          packed_rows(x, m0, m1, K, w, s, y, N, n0, valid);
        }
      }
    }
  });
}

}  // namespace

std::vector<torch::Tensor> int8_pack(torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && q.dim() == 2 && scale.scalar_type() == torch::kFloat32 &&
                  scale.numel() == q.size(0), "int8_pack: q int8 [N, K], scale float32 [N]");
  const int64_t N = q.size(0), K = q.size(1), blocks = (N + kPackN - 1) / kPackN;
  torch::Tensor src = q.contiguous();
  torch::Tensor packed = torch::zeros({blocks, K, kPackN}, q.options());
  torch::Tensor padded = torch::zeros({blocks * kPackN}, scale.options());
  padded.narrow(0, 0, N).copy_(scale);
  const int8_t* in = src.data_ptr<int8_t>();
  int8_t* out = packed.data_ptr<int8_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t j = 0; j < std::min(kPackN, N - b * kPackN); ++j) {
        const int8_t* row = in + (b * kPackN + j) * K;
        for (int64_t k = 0; k < K; ++k) out[(b * K + k) * kPackN + j] = row[k];
      }
    }
  });
  return {packed, padded};
}

torch::Tensor int8_linear_packed(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, int64_t N,
                                 c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && packed.scalar_type() == torch::kInt8 && packed.dim() == 3 &&
                  packed.size(2) == kPackN && packed.is_contiguous() && scale.is_contiguous() &&
                  scale.numel() == packed.size(0) * kPackN && N <= scale.numel(),
              "int8_linear_packed: packed int8 [N/16, K, 16] and its padded scales (see int8_pack)");
  const int64_t K = packed.size(1);
  TORCH_CHECK(x.size(-1) == K, "int8_linear_packed: x's last dim must be K");
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  torch::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  torch::Tensor y = torch::empty({M, N}, x.options());
  if (M > 0) {
    packed_matmul(x2.data_ptr<float>(), M, K, packed.data_ptr<int8_t>(), scale.data_ptr<float>(), N,
                  y.data_ptr<float>());
  }
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y.view(out_shape);
}

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && q.scalar_type() == torch::kInt8 &&
                  scale.scalar_type() == torch::kFloat32, "int8_linear: x float32, q int8, scale float32");
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && scale.is_contiguous() && q.size(0) == scale.size(0), "int8_linear: q [N, K]");
  const int64_t K = q.size(1), N = q.size(0);
  TORCH_CHECK(x.size(-1) == K, "int8_linear: x's last dim must be K");
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  torch::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  torch::Tensor y = torch::empty({M, N}, x.options());
  if (M > 0) {
    if (M <= kFusedMaxRows) {
      fused_small(x2.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), scale.data_ptr<float>(), N, y.data_ptr<float>());
    } else {
      const int8_t* qp = q.data_ptr<int8_t>();
      const float* sp = scale.data_ptr<float>();
      dequantised_matmul(x2, N, y, [&](int64_t n, float* dst) {
        const int8_t* src = qp + n * K;
        const float s = sp[n];
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<float>(src[k]) * s;
      });
    }
  }
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y.view(out_shape);
}
