"""Weight-only int8 quantization: per-output-channel int8 weights, activations kept in float.

On CPU the compiled kernel (kernels/csrc/int8_linear_cpu.cpp) runs it; on CUDA, torch's
`_weight_int8pack_mm` where it exists, else dequantise-and-matmul. A tied embedding and LM head
share one int8 matrix (its per-row scales serve both), so the vocabulary is stored once.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float32 scale per row (output channel): w ~= q * scale[:, None]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class Int8Linear(nn.Module):
    qweight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, cpu_kernels: ModuleType | None
    ) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.out_features, self.in_features = qweight.shape
        self._cpu = cpu_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self._cpu is not None and x.dtype == torch.float32:
            return self._cpu.int8_linear(x, self.qweight, self.scale, self.bias)
        if x.device.type == "cuda" and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            rows = x.reshape(-1, self.in_features)
            y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scale.to(x.dtype))
            y = y if self.bias is None else y + self.bias.to(x.dtype)
            return y.reshape(*x.shape[:-1], self.out_features)
        weight = self.qweight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Embedding(nn.Module):
    """Embedding lookup from an int8 table with per-row scales (possibly the LM head's own)."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(
        self, qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, padding_idx: int | None = None
    ) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.dtype = dtype
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = qweight.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids, self.qweight).to(self.dtype)
        return rows * F.embedding(input_ids, self.scale[:, None]).to(self.dtype)


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of an nn.Linear, or of transformers' Conv1D (GPT-2), which stores it transposed."""
    weight: Any = getattr(module, "weight", None)
    bias: Any = getattr(module, "bias", None)
    if type(module) is nn.Linear:
        return weight, bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return weight.t(), bias
    return None


def quantize_model_int8(model: Any, cpu_kernels: ModuleType | None) -> dict[str, int]:
    """Swap every linear layer (and the embedding) for its int8 form, in place."""
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embeddings.weight.data_ptr()
    dtype = embeddings.weight.dtype
    slots = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if _linear_weight(child) is not None
    ]
    head_q: tuple[torch.Tensor, torch.Tensor] | None = None
    for parent, name in slots:
        child = getattr(parent, name)
        found = _linear_weight(child)
        assert found is not None
        weight, bias = found
        q, scale = quantize_per_channel(weight)
        if child is head:
            head_q = (q, scale)
        bias_copy = None if bias is None else bias.detach().float().clone()
        setattr(parent, name, Int8Linear(q, scale, bias_copy, cpu_kernels))
    q, scale = head_q if tied and head_q is not None else quantize_per_channel(embeddings.weight)
    model.set_input_embeddings(Int8Embedding(q, scale, dtype, getattr(embeddings, "padding_idx", None)))
    return {"linears": len(slots), "tied_embedding": int(tied)}
