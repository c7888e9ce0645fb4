"""The compiled fused ops compute what their torch references compute, and the references what
transformers' own modules compute."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from kernels import cpu_build
from kernels.fused_ops import FusedOps, rms_norm_reference, rotary_reference

TOLERANCE = {torch.float32: {"rtol": 2e-6, "atol": 2e-6}, torch.float64: {"rtol": 1e-13, "atol": 1e-13}}


@pytest.fixture(scope="module")
def compiled() -> FusedOps:
    module = cpu_build.load()
    if module is None:
        pytest.skip("no C++ compiler: the compiled CPU kernels cannot be built here")
    return FusedOps(module)


def _merged_qkv(tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [tokens, 4, 16] and k [tokens, 2, 16] as views into one q/k/v projection output, as in a layer."""
    qkv = torch.randn(tokens, 4 * 16 + 2 * 2 * 16, dtype=dtype)
    q, k, _ = qkv.split([64, 32, 32], dim=-1)
    return qkv, q.view(tokens, 4, 16), k.view(tokens, 2, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: transformers' float32 maths, in torch
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_rms_norm_and_residual_add(compiled: FusedOps, dtype: torch.dtype, rows: int) -> None:
    torch.manual_seed(rows)
    x, residual = torch.randn(rows, 576, dtype=dtype), torch.randn(rows, 576, dtype=dtype)
    weight = torch.rand(576, dtype=dtype)
    expected = rms_norm_reference(x, weight, 1e-5)
    torch.testing.assert_close(compiled.rms_norm(x, weight, 1e-5), expected, **TOLERANCE[dtype])
    summed, normed = compiled.add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(summed, residual + x, rtol=0, atol=0)
    torch.testing.assert_close(normed, rms_norm_reference(residual + x, weight, 1e-5), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_silu_mul_over_the_whole_range(compiled: FusedOps, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    gate = torch.cat([torch.linspace(-100, 100, 999, dtype=dtype), torch.randn(1049, dtype=dtype) * 4])
    gate_up = torch.stack([torch.cat([gate.roll(i), torch.randn(2048, dtype=dtype)]) for i in range(7)])
    g, u = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(compiled.silu_mul(gate_up), ACT2FN["silu"](g) * u, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tokens", [1, 37])
def test_rotary_in_place_on_strided_views(compiled: FusedOps, dtype: torch.dtype, tokens: int) -> None:
    torch.manual_seed(tokens)
    qkv, q, k = _merged_qkv(tokens, dtype)
    angles = torch.rand(tokens, 8, dtype=dtype) * 50
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    expected_q, expected_k = rotary_reference(q, cos, sin), rotary_reference(k, cos, sin)
    untouched = qkv[:, 96:].clone()
    compiled.rotary_(q, k, cos, sin)
    torch.testing.assert_close(q, expected_q, **TOLERANCE[dtype])
    torch.testing.assert_close(k, expected_k, **TOLERANCE[dtype])
    assert torch.equal(qkv[:, 96:], untouched)  # v, beside them in memory, is left alone


def test_references_match_transformers() -> None:
    torch.manual_seed(0)
    x = torch.randn(9, 64, dtype=torch.float64)
    norm = LlamaRMSNorm(64, eps=1e-6).to(torch.float64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    torch.testing.assert_close(rms_norm_reference(x, norm.weight, 1e-6), norm(x), rtol=0, atol=0)
    ops = FusedOps(cpu_build.load(build=False))  # whichever path a float64 model takes, bit for bit
    torch.testing.assert_close(ops.rms_norm(x, norm.weight, 1e-6), norm(x), rtol=0, atol=0)
    _, q, k = _merged_qkv(9, torch.float64)
    angles = torch.rand(9, 8, dtype=torch.float64)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    torch.testing.assert_close(rotary_reference(q, cos, sin), hf_q[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(rotary_reference(k, cos, sin), hf_k[0].transpose(0, 1), rtol=0, atol=0)


def test_torch_fallback_is_used_without_the_compiled_module() -> None:
    ops = FusedOps(None)
    gate_up = torch.randn(3, 8)
    torch.testing.assert_close(ops.silu_mul(gate_up), torch.nn.functional.silu(gate_up[:, :4]) * gate_up[:, 4:])
    x, r, w = torch.randn(3, 8), torch.randn(3, 8), torch.rand(8)
    summed, normed = ops.add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(normed, rms_norm_reference(r + x, w, 1e-6))
