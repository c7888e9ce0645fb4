"""Layers over GGUF blocks: the CPU kernel against plain dequantisation, for Q4_1 and Q8_0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.gguf_linear import BLOCK_BYTES, Q4_1, Q8_0, GGUFEmbedding, GGUFLinear, dequantize


def random_blocks(rows: int, columns: int, qtype: int, seed: int = 0) -> torch.Tensor:
    """Valid blocks: finite fp16 scales (and minima), random payload bytes."""
    g = torch.Generator().manual_seed(seed)
    count = columns // 32
    raw = torch.randint(0, 256, (rows, count, BLOCK_BYTES[qtype]), dtype=torch.uint8, generator=g)
    scales = (torch.rand(rows, count, 1, generator=g) * 0.02 + 0.001).half()
    raw[..., 0:2] = scales.view(torch.uint8)
    if qtype == Q4_1:
        minima = (-torch.rand(rows, count, 1, generator=g) * 0.1).half()
        raw[..., 2:4] = minima.view(torch.uint8)
    return raw.reshape(rows, -1)


def test_dequantize_q4_1_layout() -> None:
    """One block by hand: w = d * q + m, element j in byte j's low nibble, j + 16 in its high nibble."""
    block = torch.zeros(1, 20, dtype=torch.uint8)
    block[0, 0:2] = torch.tensor([2.0], dtype=torch.float16).view(torch.uint8)
    block[0, 2:4] = torch.tensor([-1.0], dtype=torch.float16).view(torch.uint8)
    block[0, 4] = 0x3A  # element 0 = 0xA = 10, element 16 = 0x3 = 3
    w = dequantize(block, Q4_1, 32)[0]
    assert w[0].item() == 2 * 10 - 1 and w[16].item() == 2 * 3 - 1 and w[1].item() == -1


@pytest.mark.parametrize("qtype", [Q4_1, Q8_0])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 200])  # fused path up to 16 rows, float panels beyond
def test_kernel_matches_dequantised_linear(kernels, qtype: int, rows: int) -> None:  # noqa: ANN001
    blocks = random_blocks(300, 192, qtype, seed=rows)
    layer = GGUFLinear(blocks, qtype, 192, torch.randn(300), kernels)
    x = torch.randn(rows, 192)
    expected = F.linear(x, dequantize(blocks, qtype, 192), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    fallback = GGUFLinear(blocks, qtype, 192, layer.bias.detach(), None)
    torch.testing.assert_close(fallback(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_kernels", [True, False])
def test_embedding_rows(kernels, with_kernels: bool) -> None:  # noqa: ANN001
    blocks = random_blocks(50, 64, Q8_0)
    embedding = GGUFEmbedding(GGUFLinear(blocks, Q8_0, 64, None, kernels if with_kernels else None), torch.float32)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    torch.testing.assert_close(embedding(ids), dequantize(blocks, Q8_0, 64)[ids])


def test_large_batch_path_on_several_threads_in_inference_mode(kernels, engine_threading) -> None:  # noqa: ANN001
    """As the engine calls it: several threads, inference mode (the suite itself runs on one thread)."""
    blocks = random_blocks(300, 192, Q4_1, seed=3)
    x = torch.randn(200, 192)
    out = GGUFLinear(blocks, Q4_1, 192, None, kernels)(x)
    torch.testing.assert_close(out, F.linear(x, dequantize(blocks, Q4_1, 192)), rtol=1e-4, atol=1e-4)
