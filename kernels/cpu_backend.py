"""CPU attention: a C++ kernel reads K/V in place for short queries (decodes); SDPA handles longer chunks."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from kernels.metadata import AttentionMetadata
from kernels.torch_backend import attend_sequence, write_kv

# Sequences with at most this many new tokens go through the kernel; longer chunks amortise a
# gather and are faster through SDPA's blocked kernels.
KERNEL_MAX_QUERY_LEN = 8


@dataclass(slots=True)
class CpuStepState:
    rows: torch.Tensor  # int64 query rows handled by the kernel
    seq_index: torch.Tensor  # int32 sequence of each row
    ctx_lens: torch.Tensor  # int32 keys each row attends (its position + 1)
    block_tables: torch.Tensor  # int32, contiguous
    sdpa_seqs: list[int]  # sequences attended through SDPA


class CpuBackend:
    """Needs the compiled kernel (kernels.cpu_build); float32/float64 only, no sliding window."""

    name = "cpu"

    def __init__(self, module: ModuleType) -> None:
        self._kernel = module.paged_attention
        self._write = module.write_kv_cache

    def prepare(self, meta: AttentionMetadata) -> None:
        rows: list[int] = []
        seq_index: list[int] = []
        ctx_lens: list[int] = []
        sdpa_seqs: list[int] = []
        for i, (start, n, length) in enumerate(zip(meta.query_start, meta.query_lens, meta.seq_lens, strict=True)):
            if n > KERNEL_MAX_QUERY_LEN:
                sdpa_seqs.append(i)
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
            sdpa_seqs=sdpa_seqs,
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
        for i in state.sdpa_seqs:
            attend_sequence(out, query, key, value, cache, meta, i, scale, None)
        return out
