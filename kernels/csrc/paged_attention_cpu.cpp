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
// float32 caches, head size D (a multiple of 32), G query heads per kv head (grouped-query attention).
// Each K/V row is loaded once for the G query heads that read it, and a block is walked token by
// token, front to back, so the memory is streamed in address order.

// Row max, then numerators exp(s - max) in place; returns their sum.
inline float softmax_numerators8(float* s, int64_t n) {
  __m256 m8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + j));
  float m = -std::numeric_limits<float>::infinity();
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m8);
  for (float x : lanes) m = std::max(m, x);
  for (int64_t r = j; r < n; ++r) m = std::max(m, s[r]);
  const __m256 mv = _mm256_set1_ps(m);
  __m256 total = _mm256_setzero_ps();
  j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, e);
    total = _mm256_add_ps(total, e);
  }
  float sum = hsum(total);
  for (; j < n; ++j) {
    s[j] = exp_nonpositive(s[j] - m);
    sum += s[j];
  }
  return sum;
}

// Scores of four consecutive tokens (rows k, k + token_stride, ...) for the G heads of one kv head:
// out[h * out_stride + u] = q[h] . k[u].
template <int D, int G>
inline void group_scores4(const float* q, const float* k, int64_t token_stride, float* out, int64_t out_stride) {
  __m256 acc[G][4];
  for (int h = 0; h < G; ++h)
    for (int u = 0; u < 4; ++u) acc[h][u] = _mm256_setzero_ps();
  for (int c = 0; c < D / 8; ++c) {
    __m256 kk[4];
    for (int u = 0; u < 4; ++u) kk[u] = _mm256_loadu_ps(k + u * token_stride + 8 * c);
    for (int h = 0; h < G; ++h) {
      const __m256 qv = _mm256_loadu_ps(q + h * D + 8 * c);
      for (int u = 0; u < 4; ++u) acc[h][u] = _mm256_fmadd_ps(qv, kk[u], acc[h][u]);
    }
  }
  for (int h = 0; h < G; ++h) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(acc[h][0], acc[h][1]), _mm256_hadd_ps(acc[h][2], acc[h][3]));
    _mm_storeu_ps(out + h * out_stride, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
  }
}

template <int D, int G>
inline void group_scores1(const float* q, const float* k, float* out, int64_t out_stride) {
  for (int h = 0; h < G; ++h) {
    __m256 acc = _mm256_setzero_ps();
    for (int c = 0; c < D / 8; ++c) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * D + 8 * c), _mm256_loadu_ps(k + 8 * c), acc);
    out[h * out_stride] = hsum(acc);
  }
}

// acc[h] += sum_t w[h * w_stride + t] * v[t] over n tokens, for the G heads of one kv head; the
// accumulators of a 32-wide slice of the head stay in registers for the whole block.
template <int D, int G>
inline void group_values(const float* w, int64_t w_stride, const float* v, int64_t n, int64_t token_stride, float* acc) {
  for (int slice = 0; slice < D / 32; ++slice) {
    __m256 a[G][4];
    for (int h = 0; h < G; ++h)
      for (int i = 0; i < 4; ++i) a[h][i] = _mm256_loadu_ps(acc + h * D + 32 * slice + 8 * i);
    for (int64_t t = 0; t < n; ++t) {
      const float* vv = v + t * token_stride + 32 * slice;
      __m256 x[4];
      for (int i = 0; i < 4; ++i) x[i] = _mm256_loadu_ps(vv + 8 * i);
      for (int h = 0; h < G; ++h) {
        const __m256 wt = _mm256_set1_ps(w[h * w_stride + t]);
        for (int i = 0; i < 4; ++i) a[h][i] = _mm256_fmadd_ps(wt, x[i], a[h][i]);
      }
    }
    for (int h = 0; h < G; ++h)
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(acc + h * D + 32 * slice + 8 * i, a[h][i]);
  }
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

// Work item i's context: its query row, how many keys it attends, its blocks; and its heads'
// queries, already scaled, copied into q_local ([num_heads, head_dim]).
struct QueryContext {
  int64_t row, ctx, num_blocks;
  const int32_t* table;
};

template <typename scalar_t, typename cache_t>
inline QueryContext query_context(const Problem<scalar_t, cache_t>& p, int64_t i, int64_t head_dim, scalar_t* q_local) {
  const int64_t row = p.rows[i];
  const int64_t ctx = p.ctx_lens[i];
  for (int64_t h = 0; h < p.num_heads; ++h) {
    const scalar_t* q = p.query + row * p.q_stride_t + h * p.q_stride_h;
    for (int64_t d = 0; d < head_dim; ++d) q_local[h * head_dim + d] = q[d] * p.scale;
  }
  return {row, ctx, (ctx + p.block_size - 1) / p.block_size,
          p.block_tables + static_cast<int64_t>(p.seq_index[i]) * p.max_blocks};
}

// HEAD_DIM > 0 fixes the head size at compile time (fully unrolled, vectorised dot products);
// 0 reads it at run time. One work item is one query token: a cache block ([block_size, kv_heads,
// head_dim], contiguous) is then streamed once, front to back, for all heads.
template <typename scalar_t, typename cache_t, int HEAD_DIM>
void paged_attention_kernel(const Problem<scalar_t, cache_t>& p) {
  constexpr bool quantized = std::is_same_v<cache_t, int8_t>;
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
      const auto [row, ctx, num_blocks, table] = query_context(p, i, head_dim, q_local.data());
      scores.resize(num_heads * ctx);
      // Pass 1: scores. Query head h reads kv head h / group.
      for (int64_t b = 0; b < num_blocks; ++b) {
        const int64_t block = table[b];
        const cache_t* kb = p.k_cache + block * block_stride;
        const int64_t n = std::min(block_size, ctx - b * block_size);
        if (b + 1 < num_blocks) prefetch_block(p.k_cache + static_cast<int64_t>(table[b + 1]) * block_stride, block_stride);
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

#ifdef TR_AVX2
// The heads of one kv head in chunks of at most four (what fits the registers), for C = chunk size.
template <int D>
inline void scores4_chunks(const float* q, const float* k, int64_t token_stride, float* out, int64_t out_stride,
                           int64_t group) {
  for (int64_t h = 0; h < group; h += 4) {
    const float* qh = q + h * D;
    float* oh = out + h * out_stride;
    switch (std::min<int64_t>(4, group - h)) {
      case 1: group_scores4<D, 1>(qh, k, token_stride, oh, out_stride); break;
      case 2: group_scores4<D, 2>(qh, k, token_stride, oh, out_stride); break;
      case 3: group_scores4<D, 3>(qh, k, token_stride, oh, out_stride); break;
      default: group_scores4<D, 4>(qh, k, token_stride, oh, out_stride); break;
    }
  }
}

template <int D>
inline void scores1_chunks(const float* q, const float* k, float* out, int64_t out_stride, int64_t group) {
  for (int64_t h = 0; h < group; h += 4) {
    const float* qh = q + h * D;
    float* oh = out + h * out_stride;
    switch (std::min<int64_t>(4, group - h)) {
      case 1: group_scores1<D, 1>(qh, k, oh, out_stride); break;
      case 2: group_scores1<D, 2>(qh, k, oh, out_stride); break;
      case 3: group_scores1<D, 3>(qh, k, oh, out_stride); break;
      default: group_scores1<D, 4>(qh, k, oh, out_stride); break;
    }
  }
}

template <int D>
inline void values_chunks(const float* w, int64_t w_stride, const float* v, int64_t n, int64_t token_stride,
                          float* acc, int64_t group) {
  for (int64_t h = 0; h < group; h += 4) {
    const float* wh = w + h * w_stride;
    float* ah = acc + h * D;
    switch (std::min<int64_t>(4, group - h)) {
      case 1: group_values<D, 1>(wh, w_stride, v, n, token_stride, ah); break;
      case 2: group_values<D, 2>(wh, w_stride, v, n, token_stride, ah); break;
      case 3: group_values<D, 3>(wh, w_stride, v, n, token_stride, ah); break;
      default: group_values<D, 4>(wh, w_stride, v, n, token_stride, ah); break;
    }
  }
}

// Into L2 (T1), not L1: measured over 30 layers of DRAM-resident caches (64 decodes, 214 tokens), L1
// prefetches of the next block ran at 6-7 GB/s, L2 prefetches at ~10 GB/s on one core.
inline void prefetch_bytes(const void* start, int64_t bytes) {
  const char* p = static_cast<const char*>(start);
  for (int64_t offset = 0; offset < bytes; offset += 64) _mm_prefetch(p + offset, _MM_HINT_T1);
}

// float32 cache and queries, head size D: the grouped, streamed kernel (see group_scores4). The next
// block is prefetched a few rows at a time while the current one is read, not all at once.
template <int D>
void grouped_attention_f32(const Problem<float, float>& p) {
  const int64_t num_heads = p.num_heads, num_kv = p.num_kv_heads, block_size = p.block_size;
  const int64_t group = num_heads / num_kv;
  const int64_t token_stride = num_kv * D;
  const int64_t block_stride = block_size * token_stride;
  const int64_t row_bytes = token_stride * static_cast<int64_t>(sizeof(float));
  at::parallel_for(0, p.num_queries, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(num_heads * D);
    std::vector<float> q_local(num_heads * D);
    std::vector<float> inv_sum(num_heads);
    for (int64_t i = begin; i < end; ++i) {
      const auto [row, ctx, num_blocks, table] = query_context(p, i, D, q_local.data());
      scores.resize(num_heads * ctx);
      for (int64_t b = 0; b < num_blocks; ++b) {
        const float* kb = p.k_cache + table[b] * block_stride;
        const float* next = b + 1 < num_blocks ? p.k_cache + table[b + 1] * block_stride : nullptr;
        const int64_t n = std::min(block_size, ctx - b * block_size);
        float* sb = scores.data() + b * block_size;
        int64_t t = 0;
        for (; t + 4 <= n; t += 4) {
          if (next) prefetch_bytes(next + t * token_stride, 4 * row_bytes);
          for (int64_t g = 0; g < num_kv; ++g)
            scores4_chunks<D>(q_local.data() + g * group * D, kb + t * token_stride + g * D, token_stride,
                              sb + g * group * ctx + t, ctx, group);
        }
        for (; t < n; ++t) {
          if (next) prefetch_bytes(next + t * token_stride, row_bytes);
          for (int64_t g = 0; g < num_kv; ++g)
            scores1_chunks<D>(q_local.data() + g * group * D, kb + t * token_stride + g * D,
                              sb + g * group * ctx + t, ctx, group);
        }
      }
      for (int64_t h = 0; h < num_heads; ++h) inv_sum[h] = 1.0f / softmax_numerators8(scores.data() + h * ctx, ctx);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t b = 0; b < num_blocks; ++b) {
        const float* vb = p.v_cache + table[b] * block_stride;
        const float* next = b + 1 < num_blocks ? p.v_cache + table[b + 1] * block_stride : nullptr;
        const int64_t n = std::min(block_size, ctx - b * block_size);
        for (int64_t g = 0; g < num_kv; ++g) {
          // this kv head's share of the next block, as this one's is read
          if (next) prefetch_bytes(next + g * (block_stride / num_kv), block_stride / num_kv * 4);
          values_chunks<D>(scores.data() + g * group * ctx + b * block_size, ctx, vb + g * D, n, token_stride,
                           acc.data() + g * group * D, group);
        }
      }
      for (int64_t h = 0; h < num_heads; ++h) {
        float* o = p.out + row * p.o_stride_t + h * p.o_stride_h;
        const float scale = inv_sum[h];
        for (int64_t d = 0; d < D; ++d) o[d] = acc[h * D + d] * scale;
      }
    }
  });
}
#endif

template <typename scalar_t, typename cache_t>
void dispatch_head_dim(const Problem<scalar_t, cache_t>& p) {
#ifdef TR_AVX2
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<cache_t, float>) {
    if (p.head_dim == 64) return grouped_attention_f32<64>(p);
    if (p.head_dim == 128) return grouped_attention_f32<128>(p);
  }
#endif
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

// k_cache/v_cache[slot_mapping[i]] = key/value[i]: the new tokens' K/V written into float caches
// ([blocks, block_size, kv_heads, dim], contiguous) from key/value [tokens, kv_heads, dim] with a
// contiguous last dim. One call for both, where index_copy_ took two torch dispatches of ~75 us each.
void write_kv_cache(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor key, torch::Tensor value,
                    torch::Tensor slot_mapping) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4, "caches: contiguous, 4-D");
  TORCH_CHECK(key.dim() == 3 && value.dim() == 3 && key.stride(2) == 1 && value.stride(2) == 1,
              "key, value: [tokens, kv_heads, dim] with a contiguous last dim");
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == v_cache.scalar_type(),
              "key, value: the caches' dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.is_contiguous() &&
                  slot_mapping.size(0) == key.size(0) && value.size(0) == key.size(0),
              "slot_mapping: int64, one per token");
  const int64_t kv_heads = k_cache.size(2), dim = k_cache.size(3);
  TORCH_CHECK(key.size(1) == kv_heads && key.size(2) == dim && value.size(1) == kv_heads && value.size(2) == dim,
              "head shapes");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < key.size(0); ++i)
    TORCH_CHECK(slots[i] >= 0 && slots[i] < num_slots, "slot_mapping: slot out of range");
  const int64_t element = k_cache.element_size();
  char* caches[2] = {static_cast<char*>(k_cache.data_ptr()), static_cast<char*>(v_cache.data_ptr())};
  const char* sources[2] = {static_cast<const char*>(key.data_ptr()), static_cast<const char*>(value.data_ptr())};
  const int64_t token_strides[2] = {key.stride(0), value.stride(0)};
  const int64_t head_strides[2] = {key.stride(1), value.stride(1)};
  for (int which = 0; which < 2; ++which) {
    for (int64_t i = 0; i < key.size(0); ++i) {
      char* dst = caches[which] + slots[i] * kv_heads * dim * element;
      for (int64_t h = 0; h < kv_heads; ++h) {
        const char* src = sources[which] + (i * token_strides[which] + h * head_strides[which]) * element;
        std::memcpy(dst + h * dim * element, src, dim * element);
      }
    }
  }
}
