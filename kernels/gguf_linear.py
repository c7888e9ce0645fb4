"""Linear and embedding layers that compute from GGUF quantised blocks (Q4_1, Q8_0) as stored on disk."""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

Q4_1, Q8_0 = 3, 8  # ggml's type codes
BLOCK = 32
BLOCK_BYTES = {Q4_1: 20, Q8_0: 34}


def dequantize(blocks: torch.Tensor, qtype: int, columns: int) -> torch.Tensor:
    """Reference dequantisation in torch: uint8 [rows, columns / 32 * block_bytes] -> float32 [rows, columns]."""
    rows = blocks.shape[0]
    b = blocks.reshape(rows, columns // BLOCK, BLOCK_BYTES[qtype])
    d = b[..., 0:2].contiguous().view(torch.float16).float()
    if qtype == Q4_1:
        m = b[..., 2:4].contiguous().view(torch.float16).float()
        qs = b[..., 4:].to(torch.int32)
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()
        return (d * q + m).reshape(rows, columns)
    q = b[..., 2:].contiguous().view(torch.int8).float()
    return (d * q).reshape(rows, columns)


class GGUFLinear(nn.Module):
    """y = x W^T with W kept as GGUF blocks (Q4_1: 5 bits a weight, Q8_0: 8.5)."""

    blocks: torch.Tensor

    def __init__(
        self,
        blocks: torch.Tensor,
        qtype: int,
        in_features: int,
        bias: torch.Tensor | None,
        cpu_kernels: ModuleType | None,
    ) -> None:
        super().__init__()
        self.register_buffer("blocks", blocks.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.qtype = qtype
        self.in_features = in_features
        self.out_features = blocks.shape[0]
        self._cpu = cpu_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._cpu is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            return self._cpu.gguf_linear(x, self.blocks, self.qtype, self.bias)
        weight = dequantize(self.blocks, self.qtype, self.in_features).to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        kind = {Q4_1: "Q4_1", Q8_0: "Q8_0"}[self.qtype]
        return f"in_features={self.in_features}, out_features={self.out_features}, gguf={kind}"


class GGUFEmbedding(nn.Module):
    """Embedding lookup from GGUF blocks: only the looked-up rows are dequantised."""

    def __init__(self, linear: GGUFLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.source = linear  # the (tied) LM head holding the same matrix
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = linear.out_features, linear.in_features

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        src = self.source
        if src._cpu is not None and input_ids.device.type == "cpu":
            return src._cpu.gguf_rows(src.blocks, src.qtype, input_ids, src.in_features).to(self.dtype)
        rows = src.blocks[input_ids.reshape(-1)]
        out = dequantize(rows, src.qtype, src.in_features).to(self.dtype)
        return out.reshape(*input_ids.shape, src.in_features)
