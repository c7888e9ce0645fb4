// Linear layers straight from GGUF blocks (no float32 copy of the weights): y = x @ W^T, W given
// as ggml blocks of 32 weights along K. Q4_1: {fp16 d, fp16 m, 16 bytes of nibbles}, w = d*q + m,
// element j (j < 16) in the low nibble of byte j, j + 16 in its high nibble. Q8_0: {fp16 d,
// 32 int8}, w = d*q. Few rows: a fused kernel unpacks each block in registers (the m term of Q4_1
// needs only the block sums of x); many rows: each block of 16 output channels is dequantised into a
// float32 panel that the register-blocked kernel of packed_matmul.h multiplies.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "packed_matmul.h"
#include "vec_math.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TR_GGUF_AVX2 1
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kRowBlock = 8;
constexpr int64_t kFusedMaxRows = 16;

enum class QType : int64_t { Q4_1 = 3, Q8_0 = 8 };

inline int64_t block_bytes(QType t) { return t == QType::Q4_1 ? 20 : 34; }

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef TR_GGUF_AVX2
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// The 32 weights of one block, as float (d and m applied).
inline void dequant_block(QType t, const uint8_t* b, float* out) {
  const float d = half_to_float(b);
  if (t == QType::Q4_1) {
    const float m = half_to_float(b + 2);
    const uint8_t* qs = b + 4;
    for (int j = 0; j < 16; ++j) {
      out[j] = d * static_cast<float>(qs[j] & 0x0F) + m;
      out[j + 16] = d * static_cast<float>(qs[j] >> 4) + m;
    }
  } else {
    const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
    for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(qs[j]);
  }
}

#ifdef TR_GGUF_AVX2
// The block's 32 quantised values times d, as four vectors of 8 (the m term is added separately).
inline void scaled_values(QType t, const uint8_t* b, __m256 v[4]) {
  const __m256 d = _mm256_set1_ps(half_to_float(b));
  if (t == QType::Q4_1) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4));
    const __m128i low = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
    const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
    v[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(low)));
    v[1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(low, 8))));
    v[2] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(high)));
    v[3] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(high, 8))));
  } else {
    const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
    for (int i = 0; i < 4; ++i) {
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * i));
      v[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)));
    }
  }
}
#endif

// y[m0 .. m0+rows)[n] for one weight row; x rows have stride K, xsum holds their block sums.
void dot_rows(QType t, const uint8_t* row, int64_t blocks, const float* x, const float* xsum, int64_t rows,
              int64_t K, float* y, int64_t y_stride) {
  const int64_t bb = block_bytes(t);
  float total[kRowBlock] = {0};
#ifdef TR_GGUF_AVX2
  __m256 acc[kRowBlock];
  for (int64_t m = 0; m < rows; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* blk = row + b * bb;
    __m256 v[4];
    scaled_values(t, blk, v);
    const float mterm = t == QType::Q4_1 ? half_to_float(blk + 2) : 0.0f;
    for (int64_t m = 0; m < rows; ++m) {
      const float* xb = x + m * K + b * kBlock;
      for (int i = 0; i < 4; ++i) acc[m] = _mm256_fmadd_ps(v[i], _mm256_loadu_ps(xb + 8 * i), acc[m]);
      total[m] += mterm * xsum[m * blocks + b];
    }
  }
  for (int64_t m = 0; m < rows; ++m) total[m] += hsum(acc[m]);
#else
  float w[kBlock];
  for (int64_t b = 0; b < blocks; ++b) {
    dequant_block(t, row + b * bb, w);
    for (int64_t m = 0; m < rows; ++m) {
      const float* xb = x + m * K + b * kBlock;
      for (int j = 0; j < kBlock; ++j) total[m] += w[j] * xb[j];
    }
  }
#endif
  for (int64_t m = 0; m < rows; ++m) y[m * y_stride] = total[m];
}

}  // namespace

// x: float32 [..., K]; weight: uint8 [N, K / 32 * block_bytes]; qtype: 3 (Q4_1) or 8 (Q8_0).
torch::Tensor gguf_linear(torch::Tensor x, torch::Tensor weight, int64_t qtype, c10::optional<torch::Tensor> bias) {
  const QType t = static_cast<QType>(qtype);
  TORCH_CHECK(t == QType::Q4_1 || t == QType::Q8_0, "gguf_linear: only Q4_1 and Q8_0 blocks");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kUInt8 && weight.is_contiguous(),
              "gguf_linear: x float32, weight uint8 contiguous");
  const int64_t K = x.size(-1), N = weight.size(0), blocks = K / kBlock;
  TORCH_CHECK(K % kBlock == 0 && weight.size(1) == blocks * block_bytes(t), "gguf_linear: weight does not match K");
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const int64_t row_bytes = weight.size(1);
  return packed::linear_rows(x, K, N, bias, [&](const float* xp, int64_t M, float* yp) {
    if (M <= kFusedMaxRows) {
      std::vector<float> xs(M * blocks);  // x's sum over each 32-wide block: the m term of Q4_1
      for (int64_t i = 0; i < M * blocks; ++i) xs[i] = std::accumulate(xp + i * kBlock, xp + (i + 1) * kBlock, 0.0f);
      at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
            dot_rows(t, w + n * row_bytes, blocks, xp + m0 * K, xs.data() + m0 * blocks, std::min(kRowBlock, M - m0),
                     K, yp + m0 * N + n, N);
          }
        }
      });
      return;
    }
    // each 16-channel block is dequantised once per chunk of rows into a panel for the packed kernel
    packed::panel_matmul(xp, M, K, N, yp, [&](int64_t b, float* panel) {
      thread_local std::vector<float> rows;
      rows.resize(packed::kPackN * K);
      const int64_t n0 = b * packed::kPackN, valid = std::min(packed::kPackN, N - n0);
      for (int64_t j = 0; j < valid; ++j) {
        for (int64_t kb = 0; kb < blocks; ++kb) {
          dequant_block(t, w + (n0 + j) * row_bytes + kb * block_bytes(t), rows.data() + j * K + kb * kBlock);
        }
      }
      std::fill(rows.begin() + valid * K, rows.end(), 0.0f);  // channels past N: zeros, never stored
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t j = 0; j < packed::kPackN; ++j) panel[k * packed::kPackN + j] = rows[j * K + k];
      }
    });
  });
}

// Rows `ids` of a GGUF matrix, dequantised: the embedding lookup of a quantised table.
torch::Tensor gguf_rows(torch::Tensor weight, int64_t qtype, torch::Tensor ids, int64_t K) {
  const QType t = static_cast<QType>(qtype);
  TORCH_CHECK(ids.scalar_type() == torch::kInt64, "gguf_rows: int64 ids");
  torch::Tensor flat = ids.reshape({-1}).contiguous();
  torch::Tensor out = torch::empty({flat.size(0), K}, torch::dtype(torch::kFloat32));
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const int64_t row_bytes = weight.size(1), blocks = K / kBlock, rows = weight.size(0);
  const int64_t* id = flat.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < flat.size(0); ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < rows, "gguf_rows: id out of range");
    for (int64_t b = 0; b < blocks; ++b) {
      dequant_block(t, w + id[i] * row_bytes + b * block_bytes(t), o + i * K + b * kBlock);
    }
  }
  auto shape = ids.sizes().vec();
  shape.push_back(K);
  return out.view(shape);
}
