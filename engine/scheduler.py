"""Token-level scheduler: one token budget per step, running first, chunked prefill, preemption."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from engine.kv_cache import KVCacheManager
from engine.request import FinishReason, Request, RequestStatus
from engine.swap import SwapPolicy


@dataclass(slots=True)
class ScheduledBatch:
    """The work of one step: which requests run and how many of their tokens."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Block copies to run before the forward pass: (device block, host block) and (host, device).
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    """Decides each step's batch. Order is (priority, arrival): lower priority values run first."""

    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        watermark_blocks: int = 0,
        swap: SwapPolicy | None = None,
        max_draft_tokens: int = 32,
    ) -> None:
        self.kv = kv
        self.swap = swap
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_blocks = watermark_blocks
        self.max_draft_tokens = max_draft_tokens  # per step, over all decodes with drafts
        self.waiting: list[tuple[tuple[int, float, int], Request]] = []
        self.running: list[tuple[tuple[int, float, int], Request]] = []
        self.requests: dict[str, Request] = {}
        self._order = itertools.count()
        self._keys: dict[str, tuple[int, float, int]] = {}
        self.num_preemptions = 0

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in the engine")
        key = (request.priority, request.arrival_time, next(self._order))
        self._keys[request.request_id] = key
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, (key, request), key=lambda item: item[0])

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Take a request out of the engine and give its blocks back at once."""
        key = self._keys.pop(request.request_id)
        del self.requests[request.request_id]
        queue = self.running if request.status is RequestStatus.RUNNING else self.waiting
        queue.pop(bisect.bisect_left(queue, key, key=lambda item: item[0]))
        self.kv.free(request)
        if request.host_block_ids and self.swap and self.swap.pool:
            self.swap.pool.release(request.host_block_ids)
            request.host_block_ids = []
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: dict[str, int] = {}

        # Running requests: decodes before prefill chunks, so a long prompt never stalls them.
        decodes = [r for _, r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefills = [r for _, r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        drafting = sum(1 for r in decodes if r.spec_token_ids)
        drafts_each = self.max_draft_tokens // drafting if drafting else 0
        num_decodes = len(decodes)
        for request in decodes + prefills:
            if budget <= 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if request.spec_token_ids and self._schedule_drafts(request, min(budget, 1 + drafts_each), num_decodes):
                scheduled[request.request_id] = 1 + len(request.spec_token_ids)
                budget -= scheduled[request.request_id]
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate(request, num_new):
                victim = self.running[-1][1]
                budget += scheduled.pop(victim.request_id, 0)
                self._preempt(victim, batch)
                batch.preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled[request.request_id] = num_new
                budget -= num_new

        # Waiting requests, unless we just had to preempt (admitting more would only thrash).
        while not batch.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            key, request = self.waiting[0]
            request.spec_token_ids = []  # drafts only ride on a running decode
            # A prompt to be scored must run whole: cached positions would have no logits.
            fresh = request.num_computed_tokens == 0 and request.prompt_logprobs is None
            prefix = self.kv.match_prefix(request) if fresh else None
            num_cached = len(prefix.block_ids) * self.kv.block_size if prefix else 0
            num_new = min(request.num_tokens - request.num_computed_tokens - num_cached, budget)
            # The watermark keeps room for running requests to grow; with none running it would only make
            # a prompt that needs the whole pool (max_model_len allows it) wait forever.
            reserve = self.watermark_blocks if self.running else 0
            if not self.kv.allocate(request, num_new, prefix, reserve=reserve):
                break
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            if request.host_block_ids:
                self._swap_in(request, batch)
            self.waiting.pop(0)
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, (key, request), key=lambda item: item[0])
            scheduled[request.request_id] = num_new
            budget -= num_new

        for request_id, num_new in scheduled.items():
            batch.requests.append(self.requests[request_id])
            batch.num_tokens.append(num_new)
        return batch

    def _schedule_drafts(self, request: Request, budget: int, num_decodes: int) -> bool:
        """Make room for a decode plus as many of its draft tokens as `budget` allows, keeping the
        watermark free: speculation is never worth preempting anyone. False leaves no drafts."""
        drafts = request.spec_token_ids
        assert request.draft_state is not None
        keep = request.draft_state.draft_length(num_decodes, min(len(drafts), budget - 1))
        if (
            keep <= 0
            or request.num_tokens - request.num_computed_tokens != 1
            or not self.kv.allocate(request, 1 + keep, reserve=self.watermark_blocks)
        ):
            request.spec_token_ids = []
            return False
        del drafts[keep:]
        return True

    def _preempt(self, request: Request, batch: ScheduledBatch) -> None:
        """Free the victim's KV blocks and requeue it: its K/V either go to swap space (resumed
        as they were) or are recomputed later (its blocks stay in the prefix cache meanwhile)."""
        key = self._keys[request.request_id]
        self.running.pop(bisect.bisect_left(self.running, key, key=lambda item: item[0]))
        request.spec_token_ids = []
        if self.swap is not None and self.swap.pool is not None and self.swap.should_swap(request):
            request.host_block_ids = self.swap.pool.allocate(len(request.block_ids))
            batch.swap_out.extend(zip(request.block_ids, request.host_block_ids, strict=True))
            self.swap.num_swapped_out += 1
        else:
            request.num_computed_tokens = 0
        self.kv.free(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, (key, request), key=lambda item: item[0])

    def _swap_in(self, request: Request, batch: ScheduledBatch) -> None:
        """Copy a swapped request's K/V back into the device blocks just allocated for it. Admission
        never happens in a step that preempted, so no copy of this step can clobber another."""
        assert self.swap is not None and self.swap.pool is not None
        host = request.host_block_ids
        batch.swap_in.extend(zip(host, request.block_ids[: len(host)], strict=True))
        self.swap.pool.release(host)
        request.host_block_ids = []
        self.swap.num_swapped_in += 1
