"""Reference attention backend in plain torch: correct for every case, on any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.metadata import AttentionMetadata, KVLayer


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 with one float32 scale per (token, head): x [tokens, heads, dim] ~= q * scale[..., None]."""
    scale = (x.abs().amax(dim=-1).float() / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(x.float() / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def write_kv(key: torch.Tensor, value: torch.Tensor, layer: KVLayer, slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' K/V ([tokens, kv_heads, head_dim]) at their cache slots."""
    kv_heads, head_dim = layer.k.shape[-2:]
    for cache, scales, new in ((layer.k, layer.k_scale, key), (layer.v, layer.v_scale, value)):
        if scales is None:
            cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, new.to(cache.dtype))
        else:
            q, s = quantize_heads(new)
            cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, q)
            scales.view(-1, kv_heads).index_copy_(0, slot_mapping, s)


def gather_kv(
    cache: torch.Tensor, scales: torch.Tensor | None, block_table: torch.Tensor, length: int, dtype: torch.dtype
) -> torch.Tensor:
    """One sequence's first `length` cached tokens, [length, kv_heads, head_dim] in `dtype` (a copy)."""
    block_size = cache.shape[1]
    blocks = block_table[: -(-length // block_size)]
    rows = cache.index_select(0, blocks).flatten(0, 1)[:length].to(dtype)
    if scales is not None:
        rows *= scales.index_select(0, blocks).flatten(0, 1)[:length, :, None].to(dtype)
    return rows


def causal_mask(query_len: int, seq_len: int, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [query_len, seq_len] mask: query j sits at position seq_len - query_len + j."""
    if sliding_window is None and query_len == 1:
        return None
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def attend_sequence(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layer: KVLayer,
    meta: AttentionMetadata,
    i: int,
    scale: float,
    sliding_window: int | None,
) -> None:
    """Attention for sequence `i` of the batch, written into its rows of `out` ([tokens, heads, dim])."""
    start, n, length = meta.query_start[i], meta.query_lens[i], meta.seq_lens[i]
    q = query[start : start + n].transpose(0, 1)
    if n == length:  # nothing cached before this step: the new K/V are the whole sequence
        k, v = key[start : start + n], value[start : start + n]
    else:
        table = meta.block_tables[i]
        k = gather_kv(layer.k, layer.k_scale, table, length, q.dtype)
        v = gather_kv(layer.v, layer.v_scale, table, length, q.dtype)
    k, v = k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype)
    fresh_causal = n == length and sliding_window is None
    mask = None if fresh_causal else causal_mask(n, length, sliding_window, q.device)
    # 4-D inputs: with 3-D ones SDPA on CPU falls back to its slow "math" kernel.
    o = F.scaled_dot_product_attention(
        q[None],
        k[None],
        v[None],
        attn_mask=mask,
        is_causal=fresh_causal and n > 1,
        scale=scale,
        enable_gqa=q.shape[0] != k.shape[0],
    )
    out[start : start + n] = o[0].transpose(0, 1)


class TorchBackend:
    """Writes K/V with index_copy_ and attends sequence by sequence through SDPA."""

    name = "torch"

    def prepare(self, meta: AttentionMetadata) -> None:
        meta.backend_state = None

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
        """query [tokens, heads, dim], key/value [tokens, kv_heads, dim] -> [tokens, heads, dim]."""
        cache = meta.kv_caches[layer]
        write_kv(key, value, cache, meta.slot_mapping)
        out = query.new_empty(query.shape)
        for i in range(meta.num_seqs):
            attend_sequence(out, query, key, value, cache, meta, i, scale, sliding_window)
        return out
