"""Builds the packed batch for a step, runs the model and returns the logits that sample."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.models.adapter import ModelAdapter
from engine.request import Request, TokenLogprob
from engine.scheduler import ScheduledBatch
from kernels import AttentionBackend
from kernels.metadata import AttentionMetadata, KVLayer


@dataclass(slots=True)
class PromptScores:
    """Logits that score a request's own prompt tokens: row i predicts the token at `first + 1 + i`."""

    request: Request
    first: int
    logits: torch.Tensor

    def append_to_request(self) -> None:
        """Each scored prompt token's logprob (and its top `prompt_logprobs` alternatives) onto the request."""
        request = self.request
        assert request.prompt_logprobs is not None and request.params.prompt_logprobs is not None
        first, count, logits = self.first, self.logits.shape[0], self.logits
        targets = torch.tensor(request.prompt_token_ids[first + 1 : first + 1 + count], device=logits.device)
        logprobs = torch.log_softmax(
            logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1
        )
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        top_n = request.params.prompt_logprobs
        tops: list[dict[int, float]] = [{} for _ in range(count)]
        if top_n:
            values, indices = logprobs.topk(top_n, dim=-1)
            tops = [dict(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
        for token, value, top in zip(targets.tolist(), chosen, tops, strict=True):
            request.prompt_logprobs.append(TokenLogprob(token, value, top))


@dataclass(slots=True)
class StepResult:
    sampling_requests: list[Request]  # requests whose last scheduled token was their last token
    # One row per sampling request, or 1 + len(spec_token_ids) consecutive rows for one with drafts
    # (its last real token, then each draft token: row j scores the position after draft j).
    logits: torch.Tensor
    prompt_scores: list[PromptScores]


def kv_cache_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, kv_dtype: torch.dtype
) -> int:
    element = torch.iinfo(kv_dtype).bits // 8 if kv_dtype == torch.int8 else torch.finfo(kv_dtype).bits // 8
    scales = 4 if kv_dtype == torch.int8 else 0  # one float32 per (token, kv head)
    return 2 * num_layers * block_size * num_kv_heads * (head_dim * element + scales)


class ModelRunner:
    """Owns the KV cache tensors; one `execute` per engine step."""

    def __init__(
        self,
        adapter: ModelAdapter,
        backend: AttentionBackend,
        num_blocks: int,
        block_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        kv_dtype = kv_dtype or dtype
        self.adapter = adapter
        self.backend = backend
        self.block_size = block_size
        self.device = device
        # One extra block that is never handed out: block-table padding points at it.
        self.pad_block = num_blocks
        self.kv_caches = [
            _allocate_layer(num_blocks + 1, block_size, num_kv_heads, head_dim, dtype, kv_dtype, device)
            for _ in range(num_layers)
        ]
        self.host_caches: list[KVLayer] = []

    def allocate_swap_space(self, num_blocks: int) -> None:
        """Host-memory twin of the KV pool for swapped-out blocks (pinned when the device is a GPU)."""
        pin = self.device.type == "cuda"
        self.host_caches = [
            KVLayer(*(torch.empty((num_blocks, *t.shape[1:]), dtype=t.dtype, pin_memory=pin) for t in layer.tensors()))
            for layer in self.kv_caches
        ]

    def copy_blocks(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Move preempted requests' K/V to swap space and back, before this step overwrites anything."""
        if swap_out:
            _copy_between(self.kv_caches, self.host_caches, swap_out)
        if swap_in:
            _copy_between(self.host_caches, self.kv_caches, swap_in)

    def execute(self, batch: ScheduledBatch) -> StepResult:
        meta, input_ids, positions, sampling, logits_indices, spans = self._prepare(batch)
        self.backend.prepare(meta)
        logits = self.adapter(input_ids, positions, meta, logits_indices)
        scores, row = [], 0
        for request, first, count in spans:
            scores.append(PromptScores(request, first, logits[row : row + count]))
            row += count
        return StepResult(sampling, logits[row:], scores)

    def _prepare(
        self, batch: ScheduledBatch
    ) -> tuple[
        AttentionMetadata, torch.Tensor, torch.Tensor, list[Request], torch.Tensor, list[tuple[Request, int, int]]
    ]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        seq_lens: list[int] = []
        query_start: list[int] = []
        sampling: list[Request] = []
        logits_indices: list[int] = []
        prompt_indices: list[int] = []
        spans: list[tuple[Request, int, int]] = []  # prompt positions scored: (request, first, count)
        max_blocks = max(len(r.block_ids) for r in batch.requests)
        tables = np.full((len(batch), max_blocks), self.pad_block, dtype=np.int32)
        offset = 0
        for row, (request, n) in enumerate(zip(batch.requests, batch.num_tokens, strict=True)):
            start = request.num_computed_tokens
            end = start + n
            drafts = request.spec_token_ids  # the scheduler leaves drafts only on a decode: n == 1 + drafts
            if n == 1:
                ids.append(request.token_at(start))
            elif drafts:
                ids.append(request.token_at(start))
                ids.extend(drafts)
            else:
                ids.extend(_token_slice(request, start, end))
            pos = np.arange(start, end, dtype=np.int64)
            blocks = np.asarray(request.block_ids, dtype=np.int64)
            positions.append(pos)
            slots.append(blocks[pos // bs] * bs + pos % bs)
            tables[row, : len(request.block_ids)] = request.block_ids
            seq_lens.append(end)
            query_start.append(offset)
            if request.prompt_logprobs is not None:
                # Positions whose next token is a prompt token not scored yet (a recompute re-runs them).
                first = max(start, len(request.prompt_logprobs) - 1)
                stop = min(end, request.num_prompt_tokens - 1)
                if first < stop:
                    spans.append((request, first, stop - first))
                    prompt_indices.extend(range(offset + first - start, offset + stop - start))
            offset += n
            if end == request.num_tokens + len(drafts):
                sampling.append(request)
                logits_indices.extend(range(offset - 1 - len(drafts), offset))
        device = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(device),
            block_tables=torch.from_numpy(tables).to(device),
            seq_lens=seq_lens,
            query_lens=list(batch.num_tokens),
            query_start=query_start,
            block_size=bs,
            kv_caches=self.kv_caches,
        )
        meta.extras["backend"] = self.backend
        return (
            meta,
            torch.tensor(ids, dtype=torch.int64, device=device),
            torch.from_numpy(np.concatenate(positions)).to(device),
            sampling,
            torch.tensor(prompt_indices + logits_indices, dtype=torch.int64, device=device),
            spans,
        )


def _allocate_layer(
    num_blocks: int,
    block_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    kv_dtype: torch.dtype,
    device: torch.device,
) -> KVLayer:
    # On CPU, uninitialised: our backends never read a slot before it is written, and untouched
    # pages of a large host pool then cost no resident memory. GPU kernels may multiply masked
    # garbage by zero (NaN * 0 = NaN), so there the pool starts zeroed.
    alloc = torch.empty if device.type == "cpu" else torch.zeros
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k, v = alloc(shape, dtype=kv_dtype, device=device), alloc(shape, dtype=kv_dtype, device=device)
    if kv_dtype != torch.int8:
        return KVLayer(k, v)
    scales = (num_blocks, block_size, kv_heads)
    return KVLayer(
        k, v, alloc(scales, dtype=torch.float32, device=device), alloc(scales, dtype=torch.float32, device=device)
    )


def _copy_between(sources: list[KVLayer], targets: list[KVLayer], pairs: list[tuple[int, int]]) -> None:
    """Copy blocks `pairs[i][0]` of every source layer into blocks `pairs[i][1]` of the target layer."""
    src_ids, dst_ids = zip(*pairs, strict=True)
    for source_layer, target_layer in zip(sources, targets, strict=True):
        for source, target in zip(source_layer.tensors(), target_layer.tensors(), strict=True):
            rows = source.index_select(0, torch.tensor(src_ids, device=source.device))
            target.index_copy_(0, torch.tensor(dst_ids, device=target.device), rows.to(target.device))


def _token_slice(request: Request, start: int, end: int) -> list[int]:
    prompt = request.prompt_token_ids
    if end <= len(prompt):
        return prompt[start:end]
    return request.all_token_ids[start:end]
