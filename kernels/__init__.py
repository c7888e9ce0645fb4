"""The attention backend protocol (write K/V into the paged cache, attend by block table); ops live in submodules."""

from __future__ import annotations

from typing import Protocol

import torch

from kernels.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def prepare(self, meta: AttentionMetadata) -> None:
        """Derive per-step state (index tensors, attention biases) once, before the layers run."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layer: int,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """Write this layer's new K/V and return attention output [tokens, heads, head_dim]."""
        ...


__all__ = ["AttentionBackend", "AttentionMetadata"]
