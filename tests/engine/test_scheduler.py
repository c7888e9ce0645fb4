"""Scheduler: token budget, running before waiting, chunked prefill, preemption, priority, abort."""

from __future__ import annotations

import pytest

from engine.config import SamplingParams
from engine.kv_cache import KVCacheManager
from engine.request import FinishReason, Request, RequestStatus
from engine.scheduler import Scheduler


def _scheduler(num_blocks: int = 64, block_size: int = 4, max_seqs: int = 8, budget: int = 32) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, block_size, enable_prefix_caching=False), max_seqs, budget)


def _add(s: Scheduler, rid: str, prompt_len: int, priority: int = 0, arrival: float = 0.0) -> Request:
    r = Request(
        rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=100), priority=priority, arrival_time=arrival
    )
    s.add(r)
    return r


def _complete(batch_requests: list[Request], tokens: list[int]) -> None:
    """What the engine does after a step: count computed tokens, sample at the end of the prompt."""
    for r, n in zip(batch_requests, tokens, strict=True):
        r.num_computed_tokens += n
        if r.num_computed_tokens == r.num_tokens:
            r.output_token_ids.append(7)


def test_budget_is_respected_and_long_prompts_are_chunked() -> None:
    s = _scheduler(budget=32)
    a = _add(s, "a", 50, arrival=1)
    _add(s, "b", 10, arrival=2)
    batch = s.schedule()
    assert batch.total_tokens <= 32
    assert batch.requests == [a] and batch.num_tokens == [32]  # FCFS: a's first chunk takes it all
    _complete(batch.requests, batch.num_tokens)
    batch = s.schedule()
    assert dict(zip([r.request_id for r in batch.requests], batch.num_tokens, strict=True)) == {"a": 18, "b": 10}


def test_decodes_run_beside_a_long_prefill() -> None:
    s = _scheduler(budget=16, num_blocks=200)
    a = _add(s, "a", 4, arrival=1)
    batch = s.schedule()
    _complete(batch.requests, batch.num_tokens)  # a is now decoding
    _add(s, "long", 100, arrival=2)
    for _ in range(5):
        batch = s.schedule()
        assert a in batch.requests, "a decode was starved by a prefill"
        assert batch.total_tokens <= 16
        _complete(batch.requests, batch.num_tokens)


def test_no_starvation_everyone_finishes() -> None:
    s = _scheduler(num_blocks=12, block_size=4, budget=8, max_seqs=3)
    requests = [_add(s, f"r{i}", 5 + i, arrival=i) for i in range(6)]
    for _ in range(500):
        batch = s.schedule()
        _complete(batch.requests, batch.num_tokens)
        for r in list(batch.requests):
            if len(r.output_token_ids) >= 4:
                s.finish(r, FinishReason.LENGTH)
        if not s.requests:
            break
    assert all(r.status is RequestStatus.FINISHED for r in requests)
    assert s.kv.num_free_blocks == 12


def test_preemption_takes_the_newest_and_frees_its_blocks() -> None:
    s = _scheduler(num_blocks=4, block_size=4, budget=64)
    old = _add(s, "old", 7, arrival=1)
    new = _add(s, "new", 7, arrival=2)
    batch = s.schedule()
    assert batch.requests == [old, new]
    _complete(batch.requests, batch.num_tokens)
    # Both need a third block... then a fourth: only one can keep running.
    for _ in range(2):
        batch = s.schedule()
        _complete(batch.requests, batch.num_tokens)
    assert new in [r for r in s.requests.values() if r.status is RequestStatus.WAITING]
    assert new.num_computed_tokens == 0 and new.block_ids == [] and new.num_preemptions == 1
    assert old.status is RequestStatus.RUNNING


def test_preemption_takes_the_lowest_priority_first() -> None:
    s = _scheduler(num_blocks=4, block_size=4, budget=64)
    important = _add(s, "important", 7, priority=0, arrival=2)
    casual = _add(s, "casual", 7, priority=5, arrival=1)
    batch = s.schedule()
    assert batch.requests == [important, casual]  # priority first, then arrival
    _complete(batch.requests, batch.num_tokens)
    for _ in range(2):
        batch = s.schedule()
        _complete(batch.requests, batch.num_tokens)
    assert casual.num_preemptions == 1 and important.num_preemptions == 0


def test_priority_orders_admission() -> None:
    s = _scheduler(max_seqs=1)
    _add(s, "low", 4, priority=2, arrival=1)
    high = _add(s, "high", 4, priority=0, arrival=2)
    assert s.schedule().requests == [high]


def test_abort_frees_blocks_at_once() -> None:
    s = _scheduler(num_blocks=8)
    r = _add(s, "r", 20)
    s.schedule()
    assert s.kv.num_free_blocks < 8
    s.finish(r, FinishReason.ABORT)
    assert s.kv.num_free_blocks == 8 and r.finish_reason is FinishReason.ABORT and not s.requests
    waiting = _add(s, "w", 4)
    s.finish(waiting, FinishReason.ABORT)  # aborting a waiting request works too
    assert s.num_waiting == 0


def test_duplicate_request_id_is_rejected() -> None:
    s = _scheduler()
    _add(s, "same", 3)
    with pytest.raises(ValueError, match="request_id"):
        _add(s, "same", 3)


def test_max_num_seqs_caps_the_batch() -> None:
    s = _scheduler(max_seqs=2, num_blocks=100, budget=1000)
    for i in range(5):
        _add(s, f"r{i}", 3, arrival=i)
    assert len(s.schedule()) == 2


def test_a_prompt_that_needs_the_whole_pool_is_admitted_when_it_runs_alone() -> None:
    """The admission watermark (room for running requests to grow) must not keep out a request that fits
    the pool: max_model_len allows it, and nothing else could ever make the room (it used to wait forever)."""
    s = Scheduler(KVCacheManager(8, 4, enable_prefix_caching=False), 8, 64, watermark_blocks=1)
    whole = _add(s, "whole", 32)  # 8 blocks of 4
    batch = s.schedule()
    assert batch.requests == [whole] and batch.num_tokens == [32]
    beside = Scheduler(KVCacheManager(9, 4, enable_prefix_caching=False), 8, 64, watermark_blocks=1)
    _add(beside, "a", 28)  # 7 blocks; its next token takes the 8th
    batch = beside.schedule()
    _complete(batch.requests, batch.num_tokens)
    late = _add(beside, "late", 1)
    assert late not in beside.schedule().requests  # beside a running request the watermark still holds one back
