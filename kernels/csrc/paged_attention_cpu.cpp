// Paged attention for short queries (decodes) on CPU, reading K/V in place through block tables.
// Each query token attends the first ctx_lens[i] tokens of its sequence.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// HEAD_DIM > 0 fixes the head size at compile time (fully unrolled, vectorised dot products);
// 0 reads it at run time. One work item is one query token: a cache block ([block_size, kv_heads,
// head_dim], contiguous) is then streamed once, front to back, for all heads.
template <typename scalar_t, int HEAD_DIM>
void paged_attention_kernel(scalar_t* out, const scalar_t* query, const scalar_t* k_cache,
                            const scalar_t* v_cache, const int64_t* rows, const int32_t* seq_index,
                            const int32_t* ctx_lens, const int32_t* block_tables, int64_t num_queries,
                            int64_t max_blocks, int64_t num_heads, int64_t num_kv_heads, int64_t runtime_head_dim,
                            int64_t block_size, int64_t q_stride_t, int64_t q_stride_h, int64_t o_stride_t,
                            int64_t o_stride_h, scalar_t scale) {
  const int64_t head_dim = HEAD_DIM > 0 ? HEAD_DIM : runtime_head_dim;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t token_stride = num_kv_heads * head_dim;
  const int64_t block_stride = block_size * token_stride;
  at::parallel_for(0, num_queries, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> scores;
    std::vector<scalar_t> acc(num_heads * head_dim);
    std::vector<scalar_t> q_local(num_heads * head_dim);
    std::vector<scalar_t> inv_sum(num_heads);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = rows[i];
      const int64_t ctx = ctx_lens[i];
      const int64_t num_blocks = (ctx + block_size - 1) / block_size;
      const int32_t* table = block_tables + static_cast<int64_t>(seq_index[i]) * max_blocks;
      scores.resize(num_heads * ctx);
      for (int64_t h = 0; h < num_heads; ++h) {
        const scalar_t* q = query + row * q_stride_t + h * q_stride_h;
        for (int64_t d = 0; d < head_dim; ++d) q_local[h * head_dim + d] = q[d] * scale;
      }
      // Pass 1: scores. Query head h reads kv head h / group.
      for (int64_t b = 0; b < num_blocks; ++b) {
        const scalar_t* kb = k_cache + static_cast<int64_t>(table[b]) * block_stride;
        if (b + 1 < num_blocks) __builtin_prefetch(k_cache + static_cast<int64_t>(table[b + 1]) * block_stride);
        const int64_t n = std::min(block_size, ctx - b * block_size);
        for (int64_t t = 0; t < n; ++t) {
          const int64_t j = b * block_size + t;
          for (int64_t h = 0; h < num_heads; ++h) {
            const scalar_t* k = kb + t * token_stride + (h / group) * head_dim;
            const scalar_t* q = q_local.data() + h * head_dim;
            scalar_t s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < head_dim; ++d) s += q[d] * k[d];
            scores[h * ctx + j] = s;
          }
        }
      }
      // Softmax per head.
      for (int64_t h = 0; h < num_heads; ++h) {
        scalar_t* s = scores.data() + h * ctx;
        scalar_t m = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t j = 0; j < ctx; ++j) m = std::max(m, s[j]);
        scalar_t sum = 0;
        for (int64_t j = 0; j < ctx; ++j) {
          s[j] = std::exp(s[j] - m);
          sum += s[j];
        }
        inv_sum[h] = scalar_t(1) / sum;
      }
      // Pass 2: weighted sum of values, streamed the same way.
      std::fill(acc.begin(), acc.end(), scalar_t(0));
      for (int64_t b = 0; b < num_blocks; ++b) {
        const scalar_t* vb = v_cache + static_cast<int64_t>(table[b]) * block_stride;
        if (b + 1 < num_blocks) __builtin_prefetch(v_cache + static_cast<int64_t>(table[b + 1]) * block_stride);
        const int64_t n = std::min(block_size, ctx - b * block_size);
        for (int64_t t = 0; t < n; ++t) {
          const int64_t j = b * block_size + t;
          for (int64_t h = 0; h < num_heads; ++h) {
            const scalar_t* v = vb + t * token_stride + (h / group) * head_dim;
            const scalar_t p = scores[h * ctx + j];
            scalar_t* a = acc.data() + h * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) a[d] += p * v[d];
          }
        }
      }
      for (int64_t h = 0; h < num_heads; ++h) {
        scalar_t* o = out + row * o_stride_t + h * o_stride_h;
        for (int64_t d = 0; d < head_dim; ++d) o[d] = acc[h * head_dim + d] * inv_sum[h];
      }
    }
  });
}

}  // namespace

// out, query: [tokens, heads, dim] (last dim contiguous); k/v_cache: [blocks, block_size, kv_heads, dim]
// contiguous; rows: int64 [n] query rows to compute; seq_index, ctx_lens: int32 [n];
// block_tables: int32 [seqs, max_blocks] contiguous.
void paged_attention(torch::Tensor out, torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                     torch::Tensor rows, torch::Tensor seq_index, torch::Tensor ctx_lens,
                     torch::Tensor block_tables, double scale) {
  TORCH_CHECK(query.dim() == 3 && out.dim() == 3 && k_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "query/out need a contiguous last dim");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && block_tables.is_contiguous(), "caches and block tables must be contiguous");
  TORCH_CHECK(rows.scalar_type() == torch::kInt64 && seq_index.scalar_type() == torch::kInt32 &&
              ctx_lens.scalar_type() == torch::kInt32 && block_tables.scalar_type() == torch::kInt32, "index dtypes");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() && out.scalar_type() == query.scalar_type(), "dtype mismatch");
  const int64_t num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(num_heads % num_kv_heads == 0 && k_cache.size(3) == head_dim, "head shapes");
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "paged_attention", [&] {
    auto run = [&](auto head_dim_constant) {
      paged_attention_kernel<scalar_t, decltype(head_dim_constant)::value>(
          out.data_ptr<scalar_t>(), query.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
          v_cache.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), seq_index.data_ptr<int32_t>(),
          ctx_lens.data_ptr<int32_t>(), block_tables.data_ptr<int32_t>(), rows.size(0), block_tables.size(1),
          num_heads, num_kv_heads, head_dim, block_size, query.stride(0), query.stride(1), out.stride(0),
          out.stride(1), static_cast<scalar_t>(scale));
    };
    if (head_dim == 64) run(std::integral_constant<int, 64>{});
    else if (head_dim == 128) run(std::integral_constant<int, 128>{});
    else run(std::integral_constant<int, 0>{});
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "paged attention over block tables for short queries (CPU)");
}
