// The elementwise steps of a Llama-style decoder layer, each fused into one pass over memory:
// RMSNorm, residual add + RMSNorm, SiLU(gate) * up, and rotary embedding of q and k in place.
// Same formulas as transformers' modules. The norms take float32 (transformers computes RMSNorm in float32
// whatever the input, so float64 callers use its torch form); the other two take float32 or float64.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>

#include "vec_math.h"

namespace {

// Rows per parallel task: enough elements that a thread's start-up is paid for.
inline int64_t grain(int64_t row_elements) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elements)); }

inline void rms_row(const float* x, const float* w, float* out, int64_t n, float eps) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += x[j] * x[j];
  const float r = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = w[j] * (x[j] * r);
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.stride(1) == 1, name, ": a CPU matrix with contiguous rows");
}

void check_norm(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "x: float32");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "weight: one contiguous value per column, x's dtype");
}

}  // namespace

// out = weight * (x / sqrt(mean(x^2) + eps)), row by row.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check_rows(x, "x");
  check_norm(x, weight);
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  const int64_t n = x.size(1), xs = x.stride(0);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) rms_row(xp + i * xs, wp, op + i * n, n, static_cast<float>(eps));
  });
  return out;
}

// summed = residual + x; normed = rms_norm(summed). Returns (summed, normed).
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type(), "x, residual: same shape");
  check_norm(x, weight);
  auto summed = torch::empty({x.size(0), x.size(1)}, x.options());
  auto normed = torch::empty_like(summed);
  const int64_t n = x.size(1), xs = x.stride(0), rs = residual.stride(0);
  const float* xp = x.data_ptr<float>();
  const float* rp = residual.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* sp = summed.data_ptr<float>();
  float* np_ = normed.data_ptr<float>();
  at::parallel_for(0, x.size(0), grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* a = rp + i * rs;
      const float* b = xp + i * xs;
      float* s = sp + i * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) s[j] = a[j] + b[j];
      rms_row(s, wp, np_ + i * n, n, static_cast<float>(eps));
    }
  });
  return {summed, normed};
}

// gate_up: [rows, 2 * inter] (gate, then up) -> silu(gate) * up, [rows, inter].
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up: an even number of columns");
  const int64_t inter = gate_up.size(1) / 2;
  auto out = torch::empty({gate_up.size(0), inter}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES(gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* gp = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t gs = gate_up.stride(0);
    at::parallel_for(0, gate_up.size(0), grain(inter), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* g = gp + i * gs;
        const scalar_t* u = g + inter;
        scalar_t* o = op + i * inter;
        if constexpr (std::is_same_v<scalar_t, float>) {
          // sigmoid(g) from e = exp(-|g|) <= 1: 1 / (1 + e) for g >= 0, e / (1 + e) below
          int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
          // (the dispatch lambda is no template, so this branch is compiled for double too: hence the casts)
          const float* gf = reinterpret_cast<const float*>(g);
          const float* uf = reinterpret_cast<const float*>(u);
          float* of = reinterpret_cast<float*>(o);
          const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
          for (; j + 8 <= inter; j += 8) {
            const __m256 x = _mm256_loadu_ps(gf + j);
            const __m256 e = exp_nonpositive8(_mm256_or_ps(x, sign));  // exp(-|x|)
            const __m256 num = _mm256_blendv_ps(one, e, x);  // the sign bit of x picks e
            const __m256 sig = _mm256_div_ps(num, _mm256_add_ps(one, e));
            _mm256_storeu_ps(of + j, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(uf + j)));
          }
#endif
          for (; j < inter; ++j) {
            const float e = exp_nonpositive(-std::abs(g[j]));
            const float sig = (g[j] >= 0.0f ? 1.0f : e) / (1.0f + e);
            o[j] = (g[j] * sig) * u[j];
          }
        } else {  // float64: exact exp, so reference comparisons stay tight
          for (int64_t j = 0; j < inter; ++j) o[j] = (g[j] / (scalar_t(1) + std::exp(-g[j]))) * u[j];
        }
      }
    });
  });
  return out;
}

// In place: x <- x * cos + rotate_half(x) * sin for q [tokens, heads, dim] and k [tokens, kv_heads, dim]
// (any token/head strides, contiguous dim); cos, sin: [tokens, dim].
void rotary_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1, "q, k: [tokens, heads, dim]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 && cos.sizes() == sin.sizes(),
              "cos, sin: contiguous [tokens, dim]");
  const int64_t tokens = q.size(0), dim = q.size(2), half = dim / 2;
  TORCH_CHECK(k.size(0) == tokens && k.size(2) == dim && cos.size(0) == tokens && cos.size(1) == dim && dim % 2 == 0,
              "q, k, cos, sin: matching tokens and an even head dim");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == cos.scalar_type() &&
                  q.scalar_type() == sin.scalar_type(), "q, k, cos, sin: one dtype");
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rotary_", [&] {
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    scalar_t* tensors[2] = {q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>()};
    const int64_t heads[2] = {q.size(1), k.size(1)};
    const int64_t token_stride[2] = {q.stride(0), k.stride(0)};
    const int64_t head_stride[2] = {q.stride(1), k.stride(1)};
    at::parallel_for(0, tokens, grain((heads[0] + heads[1]) * dim), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* c = cp + t * dim;
        const scalar_t* s = sp + t * dim;
        for (int which = 0; which < 2; ++which) {
          for (int64_t h = 0; h < heads[which]; ++h) {
            scalar_t* x = tensors[which] + t * token_stride[which] + h * head_stride[which];
            _Pragma("omp simd")  // #pragma cannot sit inside the dispatch macro
            for (int64_t j = 0; j < half; ++j) {
              const scalar_t a = x[j], b = x[j + half];
              x[j] = a * c[j] - b * s[j];
              x[j + half] = b * c[j + half] + a * s[j + half];
            }
          }
        }
      }
    });
  });
}
