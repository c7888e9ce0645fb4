// The large-batch path of the quantised linears: dequantise the weights a tile of output channels
// at a time (128 x K floats, in L2) and multiply each tile with ATen's GEMM.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>

// y[:, n] = x @ w_n for every output channel n < N, where dequant_row(n, dst) writes w_n as K floats.
// x: float32 [M, K] contiguous; y: float32 [M, N].
template <typename DequantRow>
void dequantised_matmul(const torch::Tensor& x, int64_t N, torch::Tensor& y, DequantRow dequant_row) {
  constexpr int64_t kTileRows = 128;
  const int64_t K = x.size(1);
  const int64_t tiles = (N + kTileRows - 1) / kTileRows;
  // The tensor ops below run on OpenMP worker threads too, which do not inherit the caller's
  // thread-local state (inference mode): without it the copy_ into y is refused there.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    torch::Tensor tile = torch::empty({kTileRows, K}, x.options());
    float* t = tile.data_ptr<float>();
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n0 = i * kTileRows, rows = std::min(kTileRows, N - n0);
      for (int64_t r = 0; r < rows; ++r) dequant_row(n0 + r, t + r * K);
      // Inside a parallel region ATen runs this GEMM on the calling thread.
      y.narrow(1, n0, rows).copy_(at::mm(x, tile.narrow(0, 0, rows).t()));
    }
  });
}
