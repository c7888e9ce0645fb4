// Weight-only int8 linear on CPU: y = x @ (q * scale[:, None])^T + bias, with q int8 [N, K] and
// x, y float32. Few rows (decoding) are memory-bound: a fused kernel reads each int8 weight once and
// converts it in registers. Many rows (prefill) are compute-bound: each 16-channel block is dequantised
// into a float32 panel for the register-blocked kernel of packed_matmul.h. Weights repacked once
// (int8_pack) skip the row layout altogether (int8_linear_packed); only a tied LM head keeps it.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "packed_matmul.h"  // also defines TR_AVX2 where AVX2 and FMA are there
#include "vec_math.h"

namespace {

constexpr int64_t kRowBlock = 8;     // rows of x sharing one pass over a weight row
constexpr int64_t kFusedMaxRows = 16;

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

// -- packed layout (packed_matmul.h) -----------------------------------------------------------------
using packed::kPackN;

void packed_matmul(const float* x, int64_t M, int64_t K, const int8_t* qp, const float* scale, int64_t N, float* y) {
  if (M >= packed::kPanelMinRows) {
    // many rows: each block becomes a float panel (scales folded in) and the kernel runs on FMAs alone
    packed::panel_matmul(x, M, K, N, y, [&](int64_t b, float* panel) {
      const int8_t* w = qp + b * K * kPackN;
      const float* s = scale + b * kPackN;
      for (int64_t k = 0; k < K; ++k) {
#pragma omp simd
        for (int64_t j = 0; j < kPackN; ++j) panel[k * kPackN + j] = static_cast<float>(w[k * kPackN + j]) * s[j];
      }
    });
    return;
  }
  // few rows (decoding): int8 straight from memory, converted in registers
  const int64_t blocks = (N + kPackN - 1) / kPackN;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      packed::packed_rows(x, 0, M, K, qp + b * K * kPackN, scale + b * kPackN, y, N, b * kPackN,
                          std::min(kPackN, N - b * kPackN));
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
  return packed::linear_rows(x, K, N, bias, [&](const float* xr, int64_t M, float* y) {
    packed_matmul(xr, M, K, packed.data_ptr<int8_t>(), scale.data_ptr<float>(), N, y);
  });
}

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && q.scalar_type() == torch::kInt8 &&
                  scale.scalar_type() == torch::kFloat32, "int8_linear: x float32, q int8, scale float32");
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && scale.is_contiguous() && q.size(0) == scale.size(0), "int8_linear: q [N, K]");
  const int64_t K = q.size(1), N = q.size(0);
  TORCH_CHECK(x.size(-1) == K, "int8_linear: x's last dim must be K");
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  return packed::linear_rows(x, K, N, bias, [&](const float* xr, int64_t M, float* y) {
    if (M <= kFusedMaxRows) {
      fused_small(xr, M, K, qp, sp, N, y);
      return;
    }
    // each 16-channel block is dequantised once per chunk of rows into a panel for the packed kernel
    packed::panel_matmul(xr, M, K, N, y, [&](int64_t b, float* panel) {
      const int64_t n0 = b * kPackN, valid = std::min(kPackN, N - n0);
      for (int64_t j = 0; j < kPackN; ++j) {
        if (j >= valid) {
          for (int64_t k = 0; k < K; ++k) panel[k * kPackN + j] = 0.0f;  // channels past N: never stored
          continue;
        }
        const int8_t* src = qp + (n0 + j) * K;
        const float s = sp[n0 + j];
        for (int64_t k = 0; k < K; ++k) panel[k * kPackN + j] = static_cast<float>(src[k]) * s;
      }
    });
  });
}
