// Causal attention for prefill chunks on CPU (float32), reading K/V in place from the paged cache.
// Sequence i has n new query tokens and, after this step, a context of L tokens in the cache (the
// step's own K/V already written): its query token j attends keys 0 .. L - n + j. This covers fresh
// prompts (n == L), chunked-prefill continuations and prefix-cache hits alike, with no gather.
//
// Layout: a work item is one (sequence, kv head, tile of query tokens). The tile's G query heads x
// T tokens are stacked into R query rows, stored transposed (qt[d][r]), so that a vector holds eight
// rows. Scores s[key][r] are then outer products of a broadcast K element and a vector of rows (no
// horizontal sums), the softmax max and sum run down the keys, lane-wise, and P.V accumulates the
// transposed output ot[d][r] from broadcast V elements. Each K/V block is read once per tile, for all
// R rows, and is never copied or transposed.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

#include "vec_math.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TR_AVX2 1
#endif

namespace {

#ifdef TR_AVX2
// Query rows per tile: G heads x T tokens with T = kTileRows / G. Measured on one thread (9 heads, 3
// kv heads, head size 64, fastest of 200): 24 rows beat 48 by 6 % on 32- and 128-token prompts (fewer
// masked keys on the diagonal, more tiles to share out) and tied at 256; 48 won by 3 % only on a
// 256-token chunk over 256 cached tokens, where each block read serves more rows.
constexpr int64_t kTileRows = 24;

struct Problem {
  float* out;
  const float* query;
  const float* k_cache;
  const float* v_cache;
  const int64_t* seqs;  // [num_seqs, 4]: block-table row, first query row, query tokens, context length
  const int32_t* block_tables;
  int64_t max_blocks, num_heads, num_kv, block_size, tile_tokens;
  int64_t q_stride_t, q_stride_h, o_stride_t, o_stride_h;
  float scale;
};

struct Item {
  int64_t seq, kv, t0, t1, cost;
};

// Per-thread buffers, sized for the largest tile (ldr = rows rounded up to a whole vector).
struct Scratch {
  std::vector<float> qt, ot, s, m, l, alpha;
  std::vector<int32_t> limit;
  Scratch(int64_t head_dim, int64_t ldr, int64_t block_size)
      : qt(head_dim * ldr), ot(head_dim * ldr), s(block_size * ldr), m(ldr), l(ldr), alpha(ldr), limit(ldr) {}
};

// gcc folds a vector load into every FMA that uses it (a memory operand each), so a vector used by
// several FMAs is loaded several times and the loads, not the FMAs, bound the loop; an empty asm
// pins the loaded value in a register.
inline __m256 in_register(__m256 x) {
  asm("" : "+v"(x));
  return x;
}

// s[u * ldr + 8 v + i] = q_row(8 v + i) . k_u for KEYS keys (rows k + u * ks) and RV vectors of rows.
template <int D, int KEYS, int RV>
[[gnu::noinline]] void score_tile(const float* qt, int64_t ldr, const float* k, int64_t ks, float* s) {
  __m256 acc[KEYS][RV];
  for (int u = 0; u < KEYS; ++u)
    for (int v = 0; v < RV; ++v) acc[u][v] = _mm256_setzero_ps();
  for (int d = 0; d < D; ++d) {
    __m256 q[RV];
    for (int v = 0; v < RV; ++v) q[v] = in_register(_mm256_loadu_ps(qt + d * ldr + 8 * v));
    for (int u = 0; u < KEYS; ++u) {
      const __m256 kk = _mm256_broadcast_ss(k + u * ks + d);
      for (int v = 0; v < RV; ++v) acc[u][v] = _mm256_fmadd_ps(kk, q[v], acc[u][v]);
    }
  }
  for (int u = 0; u < KEYS; ++u)
    for (int v = 0; v < RV; ++v) _mm256_storeu_ps(s + u * ldr + 8 * v, acc[u][v]);
}

// All row vectors for KEYS keys, three vectors at a time (12 accumulators: what 16 registers hold
// beside the loaded rows and the broadcast key element).
template <int D, int KEYS>
inline void score_rows(const float* qt, int64_t ldr, int64_t vecs, const float* k, int64_t ks, float* s) {
  int64_t v = 0;
  for (; v + 3 <= vecs; v += 3) score_tile<D, KEYS, 3>(qt + 8 * v, ldr, k, ks, s + 8 * v);
  if (vecs - v == 2) score_tile<D, KEYS, 2>(qt + 8 * v, ldr, k, ks, s + 8 * v);
  else if (vecs - v == 1) score_tile<D, KEYS, 1>(qt + 8 * v, ldr, k, ks, s + 8 * v);
}

template <int D>
inline void score_block(const float* qt, int64_t ldr, int64_t vecs, const float* k, int64_t ks, int64_t nk,
                        float* s) {
  int64_t u = 0;
  for (; u + 4 <= nk; u += 4) score_rows<D, 4>(qt, ldr, vecs, k + u * ks, ks, s + u * ldr);
  switch (nk - u) {
    case 3: score_rows<D, 3>(qt, ldr, vecs, k + u * ks, ks, s + u * ldr); break;
    case 2: score_rows<D, 2>(qt, ldr, vecs, k + u * ks, ks, s + u * ldr); break;
    case 1: score_rows<D, 1>(qt, ldr, vecs, k + u * ks, ks, s + u * ldr); break;
    default: break;
  }
}

// Online softmax over one block of nk keys, lane-wise down the keys: the running max m and sum l of
// each row are updated, s becomes the weights exp(s - m) and alpha the factor exp(m_old - m) that
// rescales what was accumulated before. With `masked`, keys beyond a row's limit (its last visible
// key) get weight 0; only blocks on or past the tile's diagonal need that.
inline void softmax_block(float* s, int64_t ldr, int64_t vecs, int64_t nk, int64_t first_key, const int32_t* limit,
                          bool masked, float* m, float* l, float* alpha) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t v = 0; v < vecs; ++v) {
    const __m256i lim = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(limit + 8 * v));
    const __m256 m_old = _mm256_loadu_ps(m + 8 * v);
    __m256 mx = m_old;
    for (int64_t k = 0; k < nk; ++k) {
      float* row = s + k * ldr + 8 * v;
      __m256 x = _mm256_loadu_ps(row);
      if (masked) {
        const __m256 hidden = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(first_key + k), lim));
        x = _mm256_blendv_ps(x, neg_inf, hidden);
        _mm256_storeu_ps(row, x);
      }
      mx = _mm256_max_ps(mx, x);
    }
    // Every row sees key 0 (in the first block), so mx is finite from then on; before it, m_old is
    // -inf and alpha comes out ~1e-38, which scales the zeros the sums start from.
    const __m256 a = exp_nonpositive8(_mm256_sub_ps(m_old, mx));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t k = 0; k < nk; ++k) {
      float* row = s + k * ldr + 8 * v;
      const __m256 x = _mm256_loadu_ps(row);
      __m256 e = exp_nonpositive8(_mm256_sub_ps(x, mx));
      // exp_nonpositive8 floors its argument at -87, so hidden keys are zeroed explicitly.
      if (masked) e = _mm256_andnot_ps(_mm256_cmp_ps(x, neg_inf, _CMP_EQ_OQ), e);
      _mm256_storeu_ps(row, e);
      sum = _mm256_add_ps(sum, e);
    }
    _mm256_storeu_ps(m + 8 * v, mx);
    _mm256_storeu_ps(alpha + 8 * v, a);
    _mm256_storeu_ps(l + 8 * v, _mm256_fmadd_ps(_mm256_loadu_ps(l + 8 * v), a, sum));
  }
}

// ot[c][r] = alpha[r] * ot[c][r] + sum_k p[k][r] * v_k[c] for DC head dims c and RV row vectors; the
// rescale of the online softmax rides on the accumulators' load.
template <int DC, int RV>
[[gnu::noinline]] void value_tile(const float* p, int64_t ldr, const float* v, int64_t vs, int64_t nk, const float* alpha,
                       float* ot) {
  __m256 acc[DC][RV];
  for (int j = 0; j < RV; ++j) {
    const __m256 a = _mm256_loadu_ps(alpha + 8 * j);
    for (int c = 0; c < DC; ++c) acc[c][j] = _mm256_mul_ps(_mm256_loadu_ps(ot + c * ldr + 8 * j), a);
  }
  // Without this, gcc keeps acc in memory (for the case of no keys), storing all 12 every key.
  if (nk <= 0) __builtin_unreachable();
  for (int64_t k = 0; k < nk; ++k) {
    __m256 pk[RV];
    for (int j = 0; j < RV; ++j) pk[j] = in_register(_mm256_loadu_ps(p + k * ldr + 8 * j));
    for (int c = 0; c < DC; ++c) {
      const __m256 vv = _mm256_broadcast_ss(v + k * vs + c);
      for (int j = 0; j < RV; ++j) acc[c][j] = _mm256_fmadd_ps(vv, pk[j], acc[c][j]);
    }
  }
  for (int c = 0; c < DC; ++c)
    for (int j = 0; j < RV; ++j) _mm256_storeu_ps(ot + c * ldr + 8 * j, acc[c][j]);
}

template <int D>
inline void value_block(const float* p, int64_t ldr, int64_t vecs, const float* v, int64_t vs, int64_t nk,
                        const float* alpha, float* ot) {
  constexpr int DC = 4;
  for (int64_t c = 0; c < D; c += DC) {
    int64_t j = 0;
    for (; j + 3 <= vecs; j += 3) value_tile<DC, 3>(p + 8 * j, ldr, v + c, vs, nk, alpha + 8 * j, ot + c * ldr + 8 * j);
    if (vecs - j == 2) value_tile<DC, 2>(p + 8 * j, ldr, v + c, vs, nk, alpha + 8 * j, ot + c * ldr + 8 * j);
    else if (vecs - j == 1) value_tile<DC, 1>(p + 8 * j, ldr, v + c, vs, nk, alpha + 8 * j, ot + c * ldr + 8 * j);
  }
}

// Row r of a tile is query token t0 + r / G, head kv * G + r % G; rows past the tile's end (padding
// up to a whole vector) repeat its last token with zero queries, and their output is dropped.
template <int D>
void attend_tile(const Problem& p, const Item& it, Scratch& w) {
  const int64_t* seq = p.seqs + it.seq * 4;
  const int32_t* table = p.block_tables + seq[0] * p.max_blocks;
  const int64_t start = seq[1], base = seq[3] - seq[2];  // base: tokens cached before this chunk
  const int64_t group = p.num_heads / p.num_kv;
  const int64_t rows = (it.t1 - it.t0) * group, ldr = (rows + 7) / 8 * 8, vecs = ldr / 8;
  for (int64_t r = 0; r < ldr; ++r) {
    const bool real = r < rows;
    const int64_t t = real ? it.t0 + r / group : it.t1 - 1;
    w.limit[r] = static_cast<int32_t>(base + t);
    const float* q = p.query + (start + t) * p.q_stride_t + (it.kv * group + (real ? r % group : 0)) * p.q_stride_h;
    for (int64_t d = 0; d < D; ++d) w.qt[d * ldr + r] = real ? q[d] * p.scale : 0.0f;
  }
  std::fill_n(w.ot.data(), D * ldr, 0.0f);
  std::fill_n(w.m.data(), ldr, -std::numeric_limits<float>::infinity());
  std::fill_n(w.l.data(), ldr, 0.0f);
  const int64_t ctx = base + it.t1;  // keys the tile's last token sees
  const int64_t num_blocks = (ctx + p.block_size - 1) / p.block_size;
  const int64_t ks = p.num_kv * D, block_stride = p.block_size * ks;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t first = b * p.block_size, nk = std::min(p.block_size, ctx - first);
    const int64_t offset = static_cast<int64_t>(table[b]) * block_stride + it.kv * D;
    score_block<D>(w.qt.data(), ldr, vecs, p.k_cache + offset, ks, nk, w.s.data());
    const bool masked = first + nk - 1 > base + it.t0;  // some key past the first row's limit
    softmax_block(w.s.data(), ldr, vecs, nk, first, w.limit.data(), masked, w.m.data(), w.l.data(), w.alpha.data());
    value_block<D>(w.s.data(), ldr, vecs, p.v_cache + offset, ks, nk, w.alpha.data(), w.ot.data());
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = it.t0 + r / group;
    float* o = p.out + (start + t) * p.o_stride_t + (it.kv * group + r % group) * p.o_stride_h;
    const float inv = 1.0f / w.l[r];
    for (int64_t d = 0; d < D; ++d) o[d] = w.ot[d * ldr + r] * inv;
  }
}

// Tiles cost ~ rows x keys, from a few keys to the whole context: handed out most expensive first
// from a shared counter, so that threads finishing early take the small ones (a static split of a
// causal triangle leaves one thread with most of the work).
template <int D>
void prefill_attention_f32(const Problem& p, int64_t num_seqs) {
  const int64_t group = p.num_heads / p.num_kv;
  std::vector<Item> items;
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t n = p.seqs[i * 4 + 2], base = p.seqs[i * 4 + 3] - n;
    for (int64_t t0 = 0; t0 < n; t0 += p.tile_tokens) {
      const int64_t t1 = std::min(n, t0 + p.tile_tokens);
      for (int64_t kv = 0; kv < p.num_kv; ++kv) items.push_back({i, kv, t0, t1, (t1 - t0) * group * (base + t1)});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  const int64_t count = static_cast<int64_t>(items.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  std::atomic<int64_t> next{0};
  const int64_t ldr = (p.tile_tokens * group + 7) / 8 * 8;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch w(D, ldr, p.block_size);
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) attend_tile<D>(p, items[i], w);
  });
}
#endif

}  // namespace

// Head sizes prefill_attention takes on this build: none without AVX2/FMA (callers use SDPA then).
std::vector<int64_t> prefill_head_dims() {
#ifdef TR_AVX2
  return {64, 128};
#else
  return {};
#endif
}

// out, query: float32 [tokens, heads, dim] (last dim contiguous); k/v_cache: float32 [blocks,
// block_size, kv_heads, dim] contiguous; seqs: int64 [n, 4] (block-table row, first query row, query
// tokens, context length) per sequence to attend; block_tables: int32 [seqs, max_blocks] contiguous.
void prefill_attention(torch::Tensor out, torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                       torch::Tensor seqs, torch::Tensor block_tables, double scale) {
  TORCH_CHECK(query.dim() == 3 && out.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "bad ranks");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, "query/out need a contiguous last dim");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && block_tables.is_contiguous() &&
                  seqs.is_contiguous(),
              "caches, seqs and block tables must be contiguous");
  TORCH_CHECK(query.scalar_type() == torch::kFloat32 && out.scalar_type() == torch::kFloat32 &&
                  k_cache.scalar_type() == torch::kFloat32 && v_cache.scalar_type() == torch::kFloat32,
              "prefill_attention reads float32 queries and caches");
  TORCH_CHECK(seqs.scalar_type() == torch::kInt64 && seqs.dim() == 2 && seqs.size(1) == 4, "seqs: int64 [n, 4]");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && block_tables.dim() == 2, "block_tables: int32 2-D");
  const int64_t num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = k_cache.size(1), num_kv = k_cache.size(2);
  TORCH_CHECK(num_heads % num_kv == 0 && k_cache.size(3) == head_dim && out.sizes() == query.sizes(), "head shapes");
  const int64_t* s = seqs.data_ptr<int64_t>();
  const int64_t max_blocks = block_tables.size(1), num_blocks = k_cache.size(0);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  for (int64_t i = 0; i < seqs.size(0); ++i) {
    const int64_t row = s[4 * i], first = s[4 * i + 1], n = s[4 * i + 2], length = s[4 * i + 3];
    TORCH_CHECK(row >= 0 && row < block_tables.size(0) && first >= 0 && n >= 1 && first + n <= query.size(0) &&
                    length >= n && length <= max_blocks * block_size,
                "seqs: row ", i, " out of range");
    for (int64_t b = 0; b < (length + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tables[row * max_blocks + b] >= 0 && tables[row * max_blocks + b] < num_blocks,
                  "block_tables: block out of range");
  }
#ifdef TR_AVX2
  const int64_t group = num_heads / num_kv;
  Problem p{out.data_ptr<float>(), query.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
            s, tables, max_blocks, num_heads, num_kv, block_size, std::max<int64_t>(1, kTileRows / group),
            query.stride(0), query.stride(1), out.stride(0), out.stride(1), static_cast<float>(scale)};
  if (head_dim == 64) return prefill_attention_f32<64>(p, seqs.size(0));
  if (head_dim == 128) return prefill_attention_f32<128>(p, seqs.size(0));
#endif
  TORCH_CHECK(false, "prefill_attention: head size ", head_dim, " not built (see prefill_head_dims)");
}
