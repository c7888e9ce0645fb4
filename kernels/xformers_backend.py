"""CUDA attention through xformers' memory-efficient kernels and its paged attention biases.

Decodes (one new token per sequence) attend the paged cache in place with
`PagedBlockDiagonalCausalWithOffsetPaddedKeysMask` (triton split-K: needs fp16/bf16 and a page
size that is a multiple of 64, and equal query lengths). Prefill chunks (any lengths) attend a
per-step gathered copy of their keys with `BlockDiagonalCausalWithOffsetPaddedKeysMask`. With a
block size that is not a multiple of 64, decodes take the gathered path too. A decode verifying
speculative drafts (query length 1 + k over its cached sequence) is a chunk like any other: the
gathered path's causal-with-offset bias puts query j at position seq_len - query_len + j.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kernels.metadata import AttentionMetadata
from kernels.torch_backend import write_kv

PAGED_PAGE_MULTIPLE = 64


def xformers_available() -> bool:
    try:
        from xformers.ops.fmha import attn_bias  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install is as good as none
        return False
    return True


@dataclass(slots=True)
class Group:
    """A set of sequences attended by one kernel call."""

    seqs: list[int]
    rows: torch.Tensor  # query rows of these sequences, in order
    bias: Any
    gather_index: torch.Tensor | None = None  # cache slots to copy into the padded key buffer (gathered path)
    kv_padding: int = 0


@dataclass(slots=True)
class XformersStepState:
    groups: list[Group]


def _query_rows(meta: AttentionMetadata, seqs: list[int], device: torch.device) -> torch.Tensor:
    rows = [r for i in seqs for r in range(meta.query_start[i], meta.query_start[i] + meta.query_lens[i])]
    return torch.tensor(rows, dtype=torch.int64, device=device)


def build_groups(meta: AttentionMetadata, paged_decodes: bool, device: torch.device) -> list[Group]:
    """The biases and index tensors for one step (pure metadata: testable on CPU via materialize())."""
    from xformers.ops.fmha.attn_bias import (
        BlockDiagonalCausalWithOffsetPaddedKeysMask,
        PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
    )

    bs = meta.block_size
    decode = [i for i in range(meta.num_seqs) if paged_decodes and meta.query_lens[i] == 1]
    gathered = [i for i in range(meta.num_seqs) if not (paged_decodes and meta.query_lens[i] == 1)]
    groups = []
    if decode:
        tables = meta.block_tables[decode].to(device=device, dtype=torch.int32)
        bias = PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
            q_seqlen=[1] * len(decode),
            kv_seqlen=[meta.seq_lens[i] for i in decode],
            block_tables=tables,
            page_size=bs,
            device=device,
        )
        groups.append(Group(decode, _query_rows(meta, decode, device), bias))
    if gathered:
        padding = max(meta.seq_lens[i] for i in gathered)
        slots = torch.zeros(len(gathered), padding, dtype=torch.int64)
        for row, i in enumerate(gathered):
            length = meta.seq_lens[i]
            pos = torch.arange(length)
            slots[row, :length] = meta.block_tables[i, pos // bs].to(torch.int64) * bs + pos % bs
        bias = BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
            q_seqlen=[meta.query_lens[i] for i in gathered],
            kv_padding=padding,
            kv_seqlen=[meta.seq_lens[i] for i in gathered],
            device=device,
        )
        groups.append(Group(gathered, _query_rows(meta, gathered, device), bias, slots.flatten().to(device), padding))
    return groups


class XformersBackend:
    """memory_efficient_attention over the paged cache; CUDA only (xformers' kernels have no CPU path)."""

    name = "xformers"

    def __init__(self, block_size: int) -> None:
        self.paged_decodes = block_size % PAGED_PAGE_MULTIPLE == 0

    def prepare(self, meta: AttentionMetadata) -> None:
        device = meta.slot_mapping.device
        meta.backend_state = XformersStepState(build_groups(meta, self.paged_decodes, device))

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
        if sliding_window is not None:
            raise NotImplementedError("the xformers backend has no sliding window; use attention_backend='torch'")
        from xformers.ops import memory_efficient_attention_forward

        cache = meta.kv_caches[layer]
        if cache.k_scale is not None:
            raise NotImplementedError("the xformers backend reads float caches only; int8 KV runs on cpu/torch")
        k_cache, v_cache = cache.k, cache.v
        write_kv(key, value, cache, meta.slot_mapping)
        num_heads, head_dim = query.shape[1:]
        kv_heads = k_cache.shape[2]
        per_group = num_heads // kv_heads
        out = query.new_empty(query.shape)
        state: XformersStepState = meta.backend_state
        for group in state.groups:
            q = query.index_select(0, group.rows).view(1, -1, kv_heads, per_group, head_dim)
            if group.gather_index is None:
                k = k_cache.view(1, -1, kv_heads, 1, head_dim)
                v = v_cache.view(1, -1, kv_heads, 1, head_dim)
            else:
                k = (
                    k_cache.view(-1, kv_heads, head_dim)
                    .index_select(0, group.gather_index)
                    .view(1, -1, kv_heads, 1, head_dim)
                )
                v = (
                    v_cache.view(-1, kv_heads, head_dim)
                    .index_select(0, group.gather_index)
                    .view(1, -1, kv_heads, 1, head_dim)
                )
            k = k.expand(-1, -1, -1, per_group, -1)
            v = v.expand(-1, -1, -1, per_group, -1)
            o = memory_efficient_attention_forward(q, k, v, attn_bias=group.bias, scale=scale)
            out.index_copy_(0, group.rows, o.reshape(-1, num_heads, head_dim))
        return out
