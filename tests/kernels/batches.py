"""Random packed batches over a paged cache, for comparing attention backends."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from kernels.metadata import AttentionMetadata, KVLayer


@dataclass
class Batch:
    meta: AttentionMetadata
    query: torch.Tensor  # [tokens, heads, dim]
    key: torch.Tensor  # [tokens, kv_heads, dim]
    value: torch.Tensor


def random_batch(
    shapes: list[tuple[int, int]],
    heads: int = 6,
    kv_heads: int = 2,
    head_dim: int = 16,
    block_size: int = 16,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> Batch:
    """`shapes` is (query_len, seq_len) per sequence: seq_len - query_len tokens are already cached."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    need = [-(-seq_len // block_size) for _, seq_len in shapes]
    num_blocks = sum(need) + 3
    pad_block = num_blocks  # an extra, never-allocated block for table padding (as the runner does)
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    tables, slots, start, query_start = [], [], 0, []
    for (query_len, seq_len), n in zip(shapes, need, strict=True):
        table, ids = ids[:n], ids[n:]
        tables.append(table)
        query_start.append(start)
        start += query_len
        for pos in range(seq_len - query_len, seq_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    width = max(need)
    block_tables = torch.tensor([t + [pad_block] * (width - len(t)) for t in tables], dtype=torch.int32)
    shape = (num_blocks + 1, block_size, kv_heads, head_dim)
    caches = [KVLayer(torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype))]
    tokens = sum(q for q, _ in shapes)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=block_tables,
        seq_lens=[s for _, s in shapes],
        query_lens=[q for q, _ in shapes],
        query_start=query_start,
        block_size=block_size,
        kv_caches=caches,
    )
    # The query arrives as transformers hands it over: a transposed, non-contiguous view.
    query = torch.randn(1, heads, tokens, head_dim, dtype=dtype).transpose(1, 2)[0]
    return Batch(
        meta,
        query,
        torch.randn(tokens, kv_heads, head_dim, dtype=dtype),
        torch.randn(tokens, kv_heads, head_dim, dtype=dtype),
    )


def dense_reference(batch: Batch, scale: float) -> torch.Tensor:
    """Attention computed the slow, obvious way: per sequence, per query, over explicit positions."""
    meta = batch.meta
    k_cache, v_cache = meta.kv_caches[0].k.clone(), meta.kv_caches[0].v.clone()
    kv_heads, dim = k_cache.shape[2:]
    k_cache.view(-1, kv_heads, dim)[meta.slot_mapping] = batch.key
    v_cache.view(-1, kv_heads, dim)[meta.slot_mapping] = batch.value
    heads = batch.query.shape[1]
    out = torch.empty(batch.query.shape, dtype=batch.query.dtype)
    bs = meta.block_size
    for i in range(meta.num_seqs):
        length, n, start = meta.seq_lens[i], meta.query_lens[i], meta.query_start[i]
        slots = [int(meta.block_tables[i, p // bs]) * bs + p % bs for p in range(length)]
        k = k_cache.view(-1, kv_heads, dim)[slots].repeat_interleave(heads // kv_heads, dim=1)
        v = v_cache.view(-1, kv_heads, dim)[slots].repeat_interleave(heads // kv_heads, dim=1)
        for j in range(n):
            visible = length - n + j + 1
            q = batch.query[start + j]
            scores = torch.einsum("hd,lhd->hl", q, k[:visible]) * scale
            out[start + j] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v[:visible])
    return out


def quantize_cache(batch: Batch) -> Batch:
    """The same batch over an int8 cache (per slot and head scales), as kv_cache_dtype='int8' stores it."""
    from kernels.torch_backend import quantize_heads

    layer = batch.meta.kv_caches[0]
    blocks, block_size, kv_heads, dim = layer.k.shape
    k_q, k_s = quantize_heads(layer.k.reshape(-1, kv_heads, dim))
    v_q, v_s = quantize_heads(layer.v.reshape(-1, kv_heads, dim))
    batch.meta.kv_caches = [
        KVLayer(
            k_q.view(layer.k.shape),
            v_q.view(layer.v.shape),
            k_s.view(blocks, block_size, kv_heads),
            v_s.view(blocks, block_size, kv_heads),
        )
    ]
    return batch


def poison_unused_slots(batch: Batch) -> Batch:
    """NaN in every cache slot outside the sequences' contexts (the rest of their last blocks, the
    padding block, blocks nobody holds): a kernel that reads past a context then returns NaN."""
    meta = batch.meta
    bs = meta.block_size
    used = torch.zeros(meta.kv_caches[0].k.shape[0] * bs, dtype=torch.bool)
    for i, length in enumerate(meta.seq_lens):
        for p in range(length):
            used[int(meta.block_tables[i, p // bs]) * bs + p % bs] = True
    for layer in meta.kv_caches:
        for cache in (layer.k, layer.v):
            cache.view(used.shape[0], -1)[~used] = float("nan")
    return batch


def as_float64(batch: Batch) -> Batch:
    """The same batch in float64 (for references computed from exactly the float32 inputs)."""
    layers = [KVLayer(layer.k.double(), layer.v.double()) for layer in batch.meta.kv_caches]
    meta = replace(batch.meta, kv_caches=layers, backend_state=None)
    return Batch(meta, batch.query.double(), batch.key.double(), batch.value.double())
