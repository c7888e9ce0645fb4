"""Weight-only int8 layers: the CPU kernel, the embedding, and quantizing whole models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels.int8_linear import Int8Embedding, Int8Linear, quantize_model_int8, quantize_per_channel


def test_per_channel_quantization_error_is_bounded() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.linspace(0.01, 10, 64)[:, None]  # rows of very different scales
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    error = (q.float() * scale[:, None] - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-6).all()  # at most half a step, per row


# row layout: fused path up to 16 rows, float panels beyond; packed layout: int8 kernel below 24 rows,
# float panels from 24; both with the odd rows of a block of 6 and chunks of rows past what fits in L2
@pytest.mark.parametrize("rows", [1, 3, 8, 16, 17, 23, 24, 300])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("pack", [True, False])
def test_kernel_matches_dequantised_linear(kernels, rows: int, bias: bool, pack: bool) -> None:  # noqa: ANN001
    torch.manual_seed(rows)
    linear = nn.Linear(200, 333, bias=bias)  # sizes that are not multiples of the vector width or tile
    q, scale = quantize_per_channel(linear.weight)
    layer = Int8Linear(q, scale, None if linear.bias is None else linear.bias.detach().clone(), kernels, pack=pack)
    assert layer.packed is pack
    x = torch.randn(2, rows, 200)
    expected = F.linear(x, q.float() * scale[:, None], linear.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    plain_q, plain_scale = layer.plain()
    assert torch.equal(plain_q, q) and torch.equal(plain_scale, scale)  # the packed layout loses nothing


def test_packed_kernel_over_many_row_chunks(kernels) -> None:  # noqa: ANN001
    """K = 2048: 30 rows of x fill the kernel's L2 budget, so 100 rows take four chunks (the last a tail)."""
    torch.manual_seed(1)
    q, scale = quantize_per_channel(torch.randn(40, 2048))
    x = torch.randn(100, 2048)
    got = Int8Linear(q, scale, None, kernels)(x)
    torch.testing.assert_close(got, F.linear(x, q.float() * scale[:, None]), rtol=1e-4, atol=1e-3)


def test_fallback_without_kernels_computes_the_same(kernels) -> None:  # noqa: ANN001
    q, scale = quantize_per_channel(torch.randn(40, 24))
    x = torch.randn(5, 24)
    torch.testing.assert_close(
        Int8Linear(q, scale, None, None)(x), Int8Linear(q, scale, None, kernels)(x), rtol=1e-4, atol=1e-4
    )


def test_embedding_lookup() -> None:
    table = torch.randn(50, 8)
    q, scale = quantize_per_channel(table)
    embedding = Int8Embedding(q, scale, torch.float32)
    ids = torch.tensor([[0, 7, 49]])
    torch.testing.assert_close(embedding(ids), (q.float() * scale[:, None])[ids])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantized_model_stays_close(tiny_models: dict[str, Path], kernels, arch: str) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    ids = torch.randint(3, 40000, (1, 40))
    with torch.no_grad():
        expected = model(ids).logits
        stats = quantize_model_int8(model, kernels)
        got = model(ids).logits
    assert stats["linears"] > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert (got - expected).abs().max() / expected.abs().max() < 0.05
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    if arch == "llama":  # tied: the embedding reads the LM head's int8 matrix, so that one stays unpacked
        assert stats["tied_embedding"] == 1
        assert model.get_input_embeddings().qweight is model.get_output_embeddings().qweight
        assert not model.get_output_embeddings().packed
        assert all(m.packed for m in model.modules() if isinstance(m, Int8Linear) and m is not model.lm_head)


def test_large_batch_paths_on_several_threads_in_inference_mode(kernels, engine_threading) -> None:  # noqa: ANN001
    """As the engine calls them: two threads, inference mode (an earlier tiled path ran tensor ops on OpenMP
    worker threads, which lacked the caller's inference mode, and crashed there)."""
    q, scale = quantize_per_channel(torch.randn(333, 200))
    x = torch.randn(300, 200)
    for pack in (False, True):
        out = Int8Linear(q, scale, None, kernels, pack=pack)(x)
        torch.testing.assert_close(out, F.linear(x, q.float() * scale[:, None]), rtol=1e-4, atol=1e-4)
