"""The elementwise steps of a Llama-style decoder layer, fused: compiled on CPU, plain torch elsewhere.

Each function computes what the transformers modules compute (RMSNorm, residual add, SiLU-gated MLP
activation, rotary embedding); the torch versions are the reference the compiled ones are tested
against, and run wherever the compiled module does not (CUDA, bf16, no compiler).
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F


class FusedOps:
    """One set of ops bound to a compiled module (or None for the torch versions)."""

    def __init__(self, compiled: ModuleType | None) -> None:
        self.compiled = compiled

    def _native(self, x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)) -> bool:
        return self.compiled is not None and x.device.type == "cpu" and x.dtype in dtypes

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x: [rows, hidden]."""
        if self._native(x, (torch.float32,)) and x.stride(-1) == 1:
            return self.compiled.rms_norm(x, weight, eps)  # type: ignore[union-attr]
        return rms_norm_reference(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + x, rms_norm(residual + x))."""
        if self._native(x, (torch.float32,)) and x.stride(-1) == 1 and residual.stride(-1) == 1:
            summed, normed = self.compiled.add_rms_norm(x, residual, weight, eps)  # type: ignore[union-attr]
            return summed, normed
        summed = residual + x
        return summed, rms_norm_reference(summed, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[rows, 2 * inter] (gate, then up) -> silu(gate) * up."""
        if self._native(gate_up) and gate_up.stride(-1) == 1:
            return self.compiled.silu_mul(gate_up)  # type: ignore[union-attr]
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotary_(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """In place on q [tokens, heads, dim] and k [tokens, kv_heads, dim]; cos, sin: [tokens, dim]."""
        if self._native(q) and q.stride(-1) == 1 and k.stride(-1) == 1:
            self.compiled.rotary_(q, k, cos.contiguous(), sin.contiguous())  # type: ignore[union-attr]
            return
        q.copy_(rotary_reference(q, cos, sin))
        k.copy_(rotary_reference(k, cos, sin))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalised in float32 whatever the input (float64 too), then the weight
    applied in the input dtype. The compiled version takes float32 only; float64 runs this, bit for bit."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with cos/sin broadcast over heads."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]
