"""Weight-only int8 quantization: per-output-channel int8 weights, activations kept in float.

On CPU the compiled kernels (kernels/csrc/int8_linear_cpu.cpp) run it, over weights repacked once for
them; on CUDA, torch's `_weight_int8pack_mm` where it exists, else dequantise-and-matmul. A tied
embedding and LM head share one int8 matrix (its per-row scales serve both), so the vocabulary is
stored once.
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
    """`qweight` is int8 [out, in]; with the CPU kernels and `pack`, it is stored instead in their
    interleaved layout [ceil(out / 16), in, 16] (one register-blocked kernel at every batch size, about
    fp32's speed from 24 rows up and faster below). A matrix shared with the embedding stays [out, in]."""

    qweight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        cpu_kernels: ModuleType | None,
        pack: bool = True,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.packed = pack and cpu_kernels is not None and qweight.device.type == "cpu"
        if self.packed:
            assert cpu_kernels is not None
            qweight, scale = cpu_kernels.int8_pack(qweight, scale)  # scales padded to the 16-channel blocks
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self._cpu = cpu_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self._cpu is not None and x.dtype == torch.float32:
            if self.packed:
                return self._cpu.int8_linear_packed(x, self.qweight, self.scale, self.out_features, self.bias)
            return self._cpu.int8_linear(x, self.qweight, self.scale, self.bias)
        qweight, scale = self.plain()
        if x.device.type == "cuda" and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            rows = x.reshape(-1, self.in_features)
            y = torch.ops.aten._weight_int8pack_mm(rows, qweight, scale.to(x.dtype))
            y = y if self.bias is None else y + self.bias.to(x.dtype)
            return y.reshape(*x.shape[:-1], self.out_features)
        weight = qweight.to(x.dtype) * scale.to(x.dtype)[:, None]
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def plain(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 [out, in], scale [out]) whatever the stored layout."""
        if not self.packed:
            return self.qweight, self.scale
        blocks, k, width = self.qweight.shape
        rows = self.qweight.permute(0, 2, 1).reshape(blocks * width, k)
        return rows[: self.out_features], self.scale[: self.out_features]

    def extra_repr(self) -> str:
        layout = ", packed for the CPU kernel" if self.packed else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel{layout}"


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
        # a tied LM head's matrix is the embedding's too: it keeps the row layout that lookups read
        shared = child is head and tied
        setattr(parent, name, Int8Linear(q, scale, bias_copy, cpu_kernels, pack=not shared))
    q, scale = head_q if tied and head_q is not None else quantize_per_channel(embeddings.weight)
    model.set_input_embeddings(Int8Embedding(q, scale, dtype, getattr(embeddings, "padding_idx", None)))
    return {"linears": len(slots), "tied_embedding": int(tied)}
