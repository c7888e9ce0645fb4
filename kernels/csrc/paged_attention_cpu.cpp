// Paged attention for short queries (decodes) on CPU, reading K/V in place through block tables.
// Each query token attends the first ctx_lens[i] tokens of its sequence. The cache holds the model's
// float type, or int8 with one float scale per (slot, kv head).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec_math.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

template <typename scalar_t>
inline void softmax_numerators(scalar_t* s, int64_t n, scalar_t m, scalar_t& sum) {
  scalar_t total = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) {
      s[j] = exp_nonpositive(s[j] - m);
      total += s[j];
    }
  } else {  // double: exact exp, so float64 runs stay comparable to reference implementations
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - m);
      total += s[j];
    }
  }
  sum = total;
}

#if defined(__AVX2__) && defined(__FMA__)
#define TR_AVX2 1
// float32, head_dim 64: the block's scores for one query head, four keys per reduction (their
// horizontal sums folded together), and its weighted values with the accumulator in registers.
inline void block_scores_64(const float* q, const float* k, int64_t n, int64_t token_stride, float* out) {
  __m256 qv[8];
  for (int i = 0; i < 8; ++i) qv[i] = _mm256_loadu_ps(q + 8 * i);
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    __m256 a[4];
    for (int u = 0; u < 4; ++u) {
      const float* kk = k + (t + u) * token_stride;
      __m256 acc = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kk));
      for (int i = 1; i < 8; ++i) acc = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(kk + 8 * i), acc);
      a[u] = acc;
    }
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_storeu_ps(out + t, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
  for (; t < n; ++t) {
    const float* kk = k + t * token_stride;
    __m256 acc = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kk));
    for (int i = 1; i < 8; ++i) acc = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(kk + 8 * i), acc);
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    r = _mm_hadd_ps(r, r);
    out[t] = _mm_cvtss_f32(_mm_hadd_ps(r, r));
  }
}

inline void block_values_64(const float* weights, const float* v, int64_t n, int64_t token_stride, float* acc) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_loadu_ps(acc + 8 * i);
  for (int64_t t = 0; t < n; ++t) {
    const __m256 w = _mm256_set1_ps(weights[t]);
    const float* vv = v + t * token_stride;
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vv + 8 * i), a[i]);
  }
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(acc + 8 * i, a[i]);
}
#endif

// Blocks are scattered, so the hardware prefetcher restarts at every one; ask for the next block
// (a few KB, contiguous) while the current one is being read.
template <typename cache_t>
inline void prefetch_block(const cache_t* block, int64_t elements) {
  const char* bytes = reinterpret_cast<const char*>(block);
  const int64_t size = elements * static_cast<int64_t>(sizeof(cache_t));
  for (int64_t offset = 0; offset < size; offset += 64) __builtin_prefetch(bytes + offset);
}

template <typename scalar_t, typename cache_t>
struct Problem {
  scalar_t* out;
  const scalar_t* query;
  const cache_t* k_cache;
  const cache_t* v_cache;
  const float* k_scale;  // [slots, kv_heads], int8 caches only
  const float* v_scale;
  const int64_t* rows;
  const int32_t* seq_index;
  const int32_t* ctx_lens;
  const int32_t* block_tables;
  int64_t num_queries, max_blocks, num_heads, num_kv_heads, head_dim, block_size;
  int64_t q_stride_t, q_stride_h, o_stride_t, o_stride_h;
  scalar_t scale;
};

// HEAD_DIM > 0 fixes the head size at compile time (fully unrolled, vectorised dot products);
// 0 reads it at run time. One work item is one query token: a cache block ([block_size, kv_heads,
// head_dim], contiguous) is then streamed once, front to back, for all heads.
template <typename scalar_t, typename cache_t, int HEAD_DIM>
void paged_attention_kernel(const Problem<scalar_t, cache_t>& p) {
  constexpr bool quantized = std::is_same_v<cache_t, int8_t>;
#ifdef TR_AVX2
  constexpr bool avx2_64 = HEAD_DIM == 64 && std::is_same_v<scalar_t, float> && std::is_same_v<cache_t, float>;
#else
  constexpr bool avx2_64 = false;
#endif
  const int64_t head_dim = HEAD_DIM > 0 ? HEAD_DIM : p.head_dim;
  const int64_t num_heads = p.num_heads, block_size = p.block_size;
  const int64_t group = num_heads / p.num_kv_heads;
  const int64_t token_stride = p.num_kv_heads * head_dim;
  const int64_t block_stride = block_size * token_stride;
  at::parallel_for(0, p.num_queries, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> scores;
    std::vector<scalar_t> acc(num_heads * head_dim);
    std::vector<scalar_t> q_local(num_heads * head_dim);
    std::vector<scalar_t> inv_sum(num_heads);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = p.rows[i];
      const int64_t ctx = p.ctx_lens[i];
      const int64_t num_blocks = (ctx + block_size - 1) / block_size;
      const int32_t* table = p.block_tables + static_cast<int64_t>(p.seq_index[i]) * p.max_blocks;
      scores.resize(num_heads * ctx);
      for (int64_t h = 0; h < num_heads; ++h) {
        const scalar_t* q = p.query + row * p.q_stride_t + h * p.q_stride_h;
        for (int64_t d = 0; d < head_dim; ++d) q_local[h * head_dim + d] = q[d] * p.scale;
      }
      // Pass 1: scores. Query head h reads kv head h / group.
      for (int64_t b = 0; b < num_blocks; ++b) {
        const int64_t block = table[b];
        const cache_t* kb = p.k_cache + block * block_stride;
        const int64_t n = std::min(block_size, ctx - b * block_size);
        if (b + 1 < num_blocks) prefetch_block(p.k_cache + static_cast<int64_t>(table[b + 1]) * block_stride, block_stride);
#ifdef TR_AVX2
        if constexpr (avx2_64) {
          for (int64_t h = 0; h < num_heads; ++h) {
            block_scores_64(q_local.data() + h * 64, kb + (h / group) * 64, n, token_stride,
                            scores.data() + h * ctx + b * block_size);
          }
          continue;
        }
#endif
        for (int64_t t = 0; t < n; ++t) {
          const int64_t j = b * block_size + t;
          for (int64_t h = 0; h < num_heads; ++h) {
            const int64_t g = h / group;
            const cache_t* k = kb + t * token_stride + g * head_dim;
            const scalar_t* q = q_local.data() + h * head_dim;
            scalar_t s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < head_dim; ++d) s += q[d] * static_cast<scalar_t>(k[d]);
            if constexpr (quantized) s *= p.k_scale[(block * block_size + t) * p.num_kv_heads + g];
            scores[h * ctx + j] = s;
          }
        }
      }
      // Softmax per head.
      for (int64_t h = 0; h < num_heads; ++h) {
        scalar_t* s = scores.data() + h * ctx;
        scalar_t m = -std::numeric_limits<scalar_t>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < ctx; ++j) m = std::max(m, s[j]);
        scalar_t sum = 0;
        softmax_numerators(s, ctx, m, sum);
        inv_sum[h] = scalar_t(1) / sum;
      }
      // Pass 2: weighted sum of values, streamed the same way.
      std::fill(acc.begin(), acc.end(), scalar_t(0));
      for (int64_t b = 0; b < num_blocks; ++b) {
        const int64_t block = table[b];
        const cache_t* vb = p.v_cache + block * block_stride;
        const int64_t n = std::min(block_size, ctx - b * block_size);
        if (b + 1 < num_blocks) prefetch_block(p.v_cache + static_cast<int64_t>(table[b + 1]) * block_stride, block_stride);
#ifdef TR_AVX2
        if constexpr (avx2_64) {
          for (int64_t h = 0; h < num_heads; ++h) {
            block_values_64(scores.data() + h * ctx + b * block_size, vb + (h / group) * 64, n, token_stride,
                            acc.data() + h * 64);
          }
          continue;
        }
#endif
        for (int64_t t = 0; t < n; ++t) {
          const int64_t j = b * block_size + t;
          for (int64_t h = 0; h < num_heads; ++h) {
            const int64_t g = h / group;
            const cache_t* v = vb + t * token_stride + g * head_dim;
            scalar_t weight = scores[h * ctx + j];
            if constexpr (quantized) weight *= p.v_scale[(block * block_size + t) * p.num_kv_heads + g];
            scalar_t* a = acc.data() + h * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) a[d] += weight * static_cast<scalar_t>(v[d]);
          }
        }
      }
      for (int64_t h = 0; h < num_heads; ++h) {
        scalar_t* o = p.out + row * p.o_stride_t + h * p.o_stride_h;
        for (int64_t d = 0; d < head_dim; ++d) o[d] = acc[h * head_dim + d] * inv_sum[h];
      }
    }
  });
}

template <typename scalar_t, typename cache_t>
void dispatch_head_dim(const Problem<scalar_t, cache_t>& p) {
  if (p.head_dim == 64) paged_attention_kernel<scalar_t, cache_t, 64>(p);
  else if (p.head_dim == 128) paged_attention_kernel<scalar_t, cache_t, 128>(p);
  else paged_attention_kernel<scalar_t, cache_t, 0>(p);
}

}  // namespace

// out, query: [tokens, heads, dim] (last dim contiguous); k/v_cache: [blocks, block_size, kv_heads, dim]
// contiguous, the query's dtype or int8 (then k/v_scale: float32 [blocks, block_size, kv_heads]);
// rows: int64 [n] query rows to compute; seq_index, ctx_lens: int32 [n]; block_tables: int32
// [seqs, max_blocks] contiguous.
void paged_attention(torch::Tensor out, torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                     c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale, torch::Tensor rows,
                     torch::Tensor seq_index, torch::Tensor ctx_lens, torch::Tensor block_tables, double scale) {
  TORCH_CHECK(query.dim() == 3 && out.dim() == 3 && k_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "query/out need a contiguous last dim");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && block_tables.is_contiguous(),
              "caches and block tables must be contiguous");
  TORCH_CHECK(rows.scalar_type() == torch::kInt64 && seq_index.scalar_type() == torch::kInt32 &&
                  ctx_lens.scalar_type() == torch::kInt32 && block_tables.scalar_type() == torch::kInt32,
              "index dtypes");
  TORCH_CHECK(out.scalar_type() == query.scalar_type(), "dtype mismatch");
  const bool quantized = k_cache.scalar_type() == torch::kInt8;
  TORCH_CHECK(quantized || k_cache.scalar_type() == query.scalar_type(), "cache dtype must match the query or be int8");
  TORCH_CHECK(!quantized || (k_scale.has_value() && v_scale.has_value() && k_scale->is_contiguous() &&
                             v_scale->is_contiguous() && k_scale->scalar_type() == torch::kFloat32),
              "int8 caches need contiguous float32 scales");
  const int64_t num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(num_heads % num_kv_heads == 0 && k_cache.size(3) == head_dim, "head shapes");
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "paged_attention", [&] {
    auto fill = [&](auto* k, auto* v) {
      using cache_t = std::remove_const_t<std::remove_pointer_t<decltype(k)>>;
      Problem<scalar_t, cache_t> p{out.data_ptr<scalar_t>(), query.data_ptr<scalar_t>(), k, v,
                                   quantized ? k_scale->data_ptr<float>() : nullptr,
                                   quantized ? v_scale->data_ptr<float>() : nullptr,
                                   rows.data_ptr<int64_t>(), seq_index.data_ptr<int32_t>(),
                                   ctx_lens.data_ptr<int32_t>(), block_tables.data_ptr<int32_t>(), rows.size(0),
                                   block_tables.size(1), num_heads, num_kv_heads, head_dim, block_size,
                                   query.stride(0), query.stride(1), out.stride(0), out.stride(1),
                                   static_cast<scalar_t>(scale)};
      dispatch_head_dim(p);
    };
    if (quantized) fill(k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>());
    else fill(k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>());
  });
}
