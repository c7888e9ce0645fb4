"""Attention metadata for one packed step: where each sequence's queries and keys live."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(slots=True)
class KVLayer:
    """One layer's paged cache: K and V [blocks, block_size, kv_heads, head_dim], in the model's dtype,
    or int8 with float32 scales [blocks, block_size, kv_heads]."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Everything indexed by block first (what a block copy must move)."""
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]


@dataclass(slots=True)
class AttentionMetadata:
    """Built once per step by the runner and handed down to every attention layer explicitly.

    The batch is one row of `num_tokens` packed tokens: sequence `i` owns query rows
    `query_start[i] : query_start[i] + query_lens[i]`, and after this step holds `seq_lens[i]`
    tokens of KV (its cached prefix plus the new ones), found through `block_tables[i]`.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block_id * block_size + offset) per new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with the runner's spare block (never handed out)
    seq_lens: list[int]
    query_lens: list[int]
    query_start: list[int]
    block_size: int
    kv_caches: list[KVLayer]
    backend_state: Any = None  # what the backend's `prepare` derived for this step
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])
