"""Fuzzing the protocol decoder, request validation and a live worker: nothing escapes, everything is answered.

The worker test feeds a no-op worker process hypothesis-drawn stream entries (and cheap mutants of
them): every entry with a usable id gets exactly one terminal event, an `error` one whenever the
decoder refuses the payload; entries without one are dead-lettered; the worker's memory stays flat.
Short versions run in `make test`; `make chaos` feeds 100,000 entries and runs atheris for 1,000,000.
"""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.client import build_request
from producer.errors import ProtocolError
from producer.protocol import GROUP, EventType, Keys, decode_request
from tests.chaos.fuzz_cases import MODEL, generate, mutants, values
from tests.chaos.harness import full_scale
from tests.queue_helpers import WorkerProcess, read_events, wait_for

pytestmark = pytest.mark.slow
KEYS = Keys(MODEL)
PROTOCOL_CODES = {"invalid_request", "unsupported_version", "unknown_model"}


def _expected(fields: dict[str, Any], request_id: str | None) -> str:
    """'dead' (no reply address), 'refused' (the decoder says no: an error event), or 'decodable'."""
    if request_id is None:
        return "dead"
    try:
        request = decode_request(fields["m"], expected_id=request_id)
    except ProtocolError:
        return "refused"
    if request.model != MODEL:
        return "refused"
    if request.params.get("max_tokens", 16) > 64:  # a mutant asking for a million tokens: keep the run short
        fields["m"] = dataclasses.replace(request, params={**request.params, "max_tokens": 64}).encode()
    return "decodable"


def _drained(client: redis.Redis) -> bool:
    pending = sum(client.xpending(k, GROUP)["pending"] for k in KEYS.queues if client.exists(k))
    return pending == 0 and sum(client.xlen(k) for k in KEYS.queues) == 0


def _check_chunk(client: redis.Redis, cases: list[tuple[dict[str, Any], str | None, str, str]]) -> dict[str, int]:
    """Every addressed entry's result stream, read whole; returns counts by outcome."""
    counts = {"dead": 0, "refused": 0, "decodable": 0}
    dead_entries = {f[b"entry"].decode() for _, f in client.xrange(KEYS.dead) if b"entry" in f}
    for fields, request_id, expected, entry_id in cases:
        counts[expected] += 1
        if expected == "dead":
            assert entry_id in dead_entries, fields
            continue
        assert request_id is not None
        events = read_events(client, KEYS, request_id)
        terminals = [e for e in events if e.type.terminal]
        assert len(terminals) == 1 and events[-1] is terminals[0], (fields, events)
        if expected == "refused":
            assert [e.type for e in events] == [EventType.ERROR] and events[0].code in PROTOCOL_CODES, events
            assert entry_id in dead_entries
    client.delete(KEYS.dead, *(KEYS.result(r) for _, r, _, _ in cases if r), *(KEYS.request(r) for _, r, _, _ in cases
                                                                              if r))
    return counts


def test_a_worker_answers_every_fuzzed_entry_and_its_memory_stays_flat(redis_url: str, tmp_path: Path) -> None:
    total, chunk = (100_000, 10_000) if full_scale() else (4_000, 1_000)
    seeds = generate(1_000 if full_scale() else 200)
    rng = random.Random(5)
    worker = WorkerProcess(redis_url, Path("no-model"), tmp_path / "worker.log",
                           ["--engine", "noop", "--max-num-seqs", "64"],
                           env={"TOKENRELAY_LOG_LEVEL": "warning", "TOKENRELAY_DEAD_LETTER_MAXLEN": "1000000"})
    try:
        worker.wait_ready()
        client = redis.Redis.from_url(redis_url)
        rss_mb, totals = [], {"dead": 0, "refused": 0, "decodable": 0}
        for first in range(0, total, chunk):
            batch = seeds if first == 0 else []  # the hypothesis draws themselves, then their mutants
            batch = batch + mutants(seeds, chunk - len(batch), rng)
            cases = []
            pipe = client.pipeline(transaction=False)
            for fields, request_id in batch:
                expected = _expected(fields, request_id)
                cases.append((fields, request_id, expected))
                pipe.xadd(KEYS.queues[rng.randrange(3)], fields)
            entry_ids = [e.decode() for e in pipe.execute()]
            wait_for(lambda: _drained(client), 300, 0.1, "the worker to answer the chunk")
            for name, n in _check_chunk(client, [(*c, e) for c, e in zip(cases, entry_ids, strict=True)]).items():
                totals[name] += n
            rss_mb.append(psutil.Process(worker.pid).memory_info().rss / 2**20)
        assert worker.process.poll() is None  # no exception escaped the worker
        assert not [line for line in worker.logs() if line.get("level") in ("error", "critical")]
    finally:
        worker.kill()
    assert sum(totals.values()) == total and min(totals.values()) > 0, totals
    # flat: after the first chunk (imports, caches, allocator pools), growth stays within a few MiB
    assert max(rss_mb[1:]) - rss_mb[1] < 8, rss_mb


_kwargs = st.dictionaries(st.sampled_from(["max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                                           "logprobs", "priority", "deadline", "timeout", "metadata", "stream",
                                           "request_id", "messages", "prompt_token_ids", "min_tokens"]),
                          values, max_size=4)


@settings(max_examples=20_000 if full_scale() else 300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(prompt=st.none() | st.text(max_size=16) | values, kwargs=_kwargs)
def test_client_side_validation_raises_value_error_and_nothing_else(prompt: Any, kwargs: dict[str, Any]) -> None:
    try:
        request = build_request(MODEL, prompt, **kwargs)
    except ValueError:
        return
    # what the client accepts, the worker's decoder accepts too
    assert decode_request(request.encode(), expected_id=request.request_id).model == MODEL


def test_atheris_finds_no_crash_in_the_decoder(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    runs = 1_000_000 if full_scale() else 50_000
    result = subprocess.run([sys.executable, "-m", "tests.chaos.atheris_decode", f"-runs={runs}", "-max_len=2048",
                             "-seed=1", str(tmp_path)], cwd=Path(__file__).parents[2], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done {runs} runs" in result.stderr
