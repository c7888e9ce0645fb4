"""CPU attention: C++ kernels read K/V in place, one for short queries (decodes), one for prefill chunks.

Longer chunks go through SDPA where the prefill kernel does not apply (float64, int8 KV caches,
head sizes other than 64 and 128, or a build without AVX2/FMA)."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from kernels.metadata import AttentionMetadata, KVLayer
from kernels.torch_backend import attend_sequence, write_kv

# Sequences with at most this many new tokens go through the decode kernel (a work item per query
# token); longer chunks through the prefill kernel (tiles of query tokens that share each K/V block).
KERNEL_MAX_QUERY_LEN = 8


@dataclass(slots=True)
class CpuStepState:
    rows: torch.Tensor  # int64 query rows handled by the kernel
    seq_index: torch.Tensor  # int32 sequence of each row
    ctx_lens: torch.Tensor  # int32 keys each row attends (its position + 1)
    block_tables: torch.Tensor  # int32, contiguous
    long_seqs: list[int]  # sequences with more than KERNEL_MAX_QUERY_LEN new tokens (prefill kernel or SDPA)
    prefill_seqs: torch.Tensor  # int64 [len(long_seqs), 4]: table row, first query row, new tokens, length


class CpuBackend:
    """Needs the compiled kernel (kernels.cpu_build); float32/float64 only, no sliding window.

    `prefill_kernel = False` sends every long chunk through SDPA (for comparisons)."""

    name = "cpu"

    def __init__(self, module: ModuleType) -> None:
        self._kernel = module.paged_attention
        self._write = module.write_kv_cache
        self._prefill = module.prefill_attention
        self._prefill_head_dims = frozenset(module.prefill_head_dims())
        self.prefill_kernel = True

    def prepare(self, meta: AttentionMetadata) -> None:
        rows: list[int] = []
        seq_index: list[int] = []
        ctx_lens: list[int] = []
        long_seqs: list[int] = []
        prefill_seqs: list[tuple[int, int, int, int]] = []
        for i, (start, n, length) in enumerate(zip(meta.query_start, meta.query_lens, meta.seq_lens, strict=True)):
            if n > KERNEL_MAX_QUERY_LEN:
                long_seqs.append(i)
                prefill_seqs.append((i, start, n, length))
                continue
            for j in range(n):
                rows.append(start + j)
                seq_index.append(i)
                ctx_lens.append(length - n + j + 1)
        meta.backend_state = CpuStepState(
            rows=torch.tensor(rows, dtype=torch.int64),
            seq_index=torch.tensor(seq_index, dtype=torch.int32),
            ctx_lens=torch.tensor(ctx_lens, dtype=torch.int32),
            block_tables=meta.block_tables.to(torch.int32).contiguous(),
            long_seqs=long_seqs,
            prefill_seqs=torch.tensor(prefill_seqs, dtype=torch.int64).reshape(-1, 4),
        )

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
            raise NotImplementedError("the cpu backend has no sliding window; use attention_backend='torch'")
        state: CpuStepState = meta.backend_state
        cache = meta.kv_caches[layer]
        if cache.k_scale is None and key.dtype == cache.k.dtype:
            self._write(cache.k, cache.v, key, value, meta.slot_mapping)
        else:
            write_kv(key, value, cache, meta.slot_mapping)
        out = query.new_empty(query.shape)
        if query.stride(2) != 1:
            query = query.contiguous()
        if state.rows.numel():
            self._kernel(
                out,
                query,
                cache.k,
                cache.v,
                cache.k_scale,
                cache.v_scale,
                state.rows,
                state.seq_index,
                state.ctx_lens,
                state.block_tables,
                scale,
            )
        if not state.long_seqs:
            return out
        if self._prefill_applies(query, cache):
            # The step's K/V are in the cache (written above), so the kernel reads every sequence's
            # context in place: no gather for chunked continuations or prefix-cache hits.
            self._prefill(out, query, cache.k, cache.v, state.prefill_seqs, state.block_tables, scale)
        else:
            for i in state.long_seqs:
                attend_sequence(out, query, key, value, cache, meta, i, scale, None)
        return out

    def _prefill_applies(self, query: torch.Tensor, cache: KVLayer) -> bool:
        """float32 queries over a float32 cache (no int8 scales), with a head size the build has."""
        return (
            self.prefill_kernel
            and query.dtype == torch.float32
            and cache.k.dtype == torch.float32
            and cache.k_scale is None
            and query.shape[-1] in self._prefill_head_dims
        )
