"""The step loop in-process (worker on a thread): parity, cancellation, deadlines, priorities, refusals."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from engine.config import EngineConfig, SamplingParams
from engine.engine import LLMEngine
from engine.llm import LLM
from engine.request import FinishReason as EngineFinishReason
from engine.request import RequestOutput
from producer.client import Client
from producer.errors import RequestFailed
from producer.protocol import EventType, Keys
from producer.status import gather
from tests.queue_helpers import WorkerThread, read_events, wait_for
from worker.noop_engine import NoopEngine

PROMPTS = [
    "Explain the benefits of AI in healthcare.",
    "Write a poem about spring.",
    "Summarize the latest AI research trends.",
    "Why queue requests?",
]


def _tiny_engine(model_dir: Path, **overrides: object) -> LLMEngine:
    config = {"model": str(model_dir), "dtype": "float64", "max_num_seqs": 8, "num_kv_blocks": 128, **overrides}
    return LLMEngine(EngineConfig(**config))  # type: ignore[arg-type]


@pytest.mark.slow
def test_greedy_outputs_through_the_queue_equal_the_in_process_engine(redis_url: str, tiny_llama: Path) -> None:
    reference = LLM(str(tiny_llama), dtype="float64")
    chat = [{"role": "user", "content": "Write a poem about spring."}]
    chat_prompt = reference.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    expected = reference.generate(PROMPTS + [chat_prompt], SamplingParams(max_tokens=24, temperature=0.0))
    client = Client(redis_url, model="tiny")
    with WorkerThread(_tiny_engine(tiny_llama), redis_url, model_name="tiny"):
        got = client.generate(PROMPTS, max_tokens=24, temperature=0.0, timeout=120)
        got.append(client.result(client.submit(messages=chat, max_tokens=24, temperature=0.0), timeout=120))
    for want, have in zip(expected, got, strict=True):
        assert have.token_ids == want.token_ids
        assert have.text == want.text
        assert have.finish_reason == want.finish_reason


def test_cancel_aborts_the_request_and_frees_its_kv_blocks(redis_url: str, tiny_llama: Path) -> None:
    engine = _tiny_engine(tiny_llama)
    client = Client(redis_url, model="tiny")
    with WorkerThread(engine, redis_url, model_name="tiny"):
        request_id = client.submit("a long story", max_tokens=900, ignore_eos=True, temperature=0.0)
        stream = client.stream(request_id, timeout=60)
        first = next(e for e in stream if e.type is EventType.DELTA)
        assert engine.kv.pool.num_used > 0
        client.cancel(request_id)
        done = [e for e in stream if e.type is EventType.DONE][-1]
        assert done.finish_reason == "cancelled"
        assert len(first.token_ids) <= done.usage["completion_tokens"] < 900
        wait_for(lambda: engine.kv.pool.num_used == 0 and not engine.has_unfinished(), 10, what="blocks freed")


def test_expired_deadline_is_answered_before_any_compute(redis_url: str, tiny_llama: Path) -> None:
    engine = _tiny_engine(tiny_llama)
    client = Client(redis_url, model="tiny")
    with WorkerThread(engine, redis_url, model_name="tiny"):
        request_id = client.submit("late", deadline=time.time() - 1)
        with pytest.raises(RequestFailed) as info:
            client.result(request_id, timeout=30)
        assert client.result(client.submit("on time", max_tokens=2), timeout=30).token_ids
    assert info.value.code == "deadline"
    assert engine.num_generated_tokens == 2  # only the second request ran


def test_running_request_past_its_deadline_is_aborted_and_freed(redis_url: str, tiny_llama: Path) -> None:
    engine = _tiny_engine(tiny_llama)
    client = Client(redis_url, model="tiny")
    with WorkerThread(engine, redis_url, model_name="tiny"):
        request_id = client.submit("tick tock", max_tokens=900, ignore_eos=True, timeout=1.5)
        events = list(client.events(request_id, timeout=60))
        wait_for(lambda: engine.kv.pool.num_used == 0 and not engine.has_unfinished(), 10, what="blocks freed")
    assert events[-1].type is EventType.ERROR and events[-1].code == "deadline"
    assert events[-1].message == "deadline passed during generation"
    assert 0 < sum(len(e.token_ids) for e in events) < 900


def test_engine_refusal_is_an_error_and_a_dead_letter(redis_url: str, tiny_llama: Path) -> None:
    client = Client(redis_url, model="tiny")
    with WorkerThread(_tiny_engine(tiny_llama), redis_url, model_name="tiny"):
        bad = client.submit([49_152 + 5], max_tokens=2)  # valid on the wire, out of this model's vocabulary
        with pytest.raises(RequestFailed) as info:
            client.result(bad, timeout=30)
        assert client.result(client.submit("fine", max_tokens=2), timeout=30).finish_reason == "length"
    assert info.value.code == "invalid_request" and "token id" in info.value.message
    dead = client.redis.xrange(Keys("tiny").dead)
    assert len(dead) == 1 and dead[0][1][b"id"] == bad.encode()


def test_priority_classes_are_served_high_first(redis_url: str) -> None:
    client = Client(redis_url, model="noop")
    ids = {p: client.submit(p, priority=p, max_tokens=3) for p in ("low", "normal", "high")}
    with WorkerThread(NoopEngine(max_num_seqs=1, step_delay_s=0.01), redis_url, model_name="noop", max_num_seqs=1):
        results = client.wait_all(list(ids.values()), timeout=30)
    finished_ms = {
        p: int(read_events(client.redis, Keys("noop"), i)[-1].entry_id.split("-")[0]) for p, i in ids.items()
    }
    assert finished_ms["high"] < finished_ms["normal"] < finished_ms["low"]
    assert all(r.finish_reason == "length" for r in results.values())


def test_heartbeats_publish_worker_stats(redis_url: str) -> None:
    with WorkerThread(NoopEngine(), redis_url, model_name="noop", max_num_seqs=7) as thread:
        client = Client(redis_url, model="noop")
        client.result(client.submit("x", max_tokens=3), timeout=10)

        def live() -> list:
            statuses = gather(redis.Redis.from_url(redis_url))
            return statuses[0].workers if statuses and statuses[0].workers else []

        worker = wait_for(live, 10, what="a heartbeat")[0]
        wait_for(lambda: thread.worker.timing.steps >= 3, 10)
    assert worker["name"] == thread.settings.consumer and worker["slots_total"] == 7
    assert {"kv_blocks_used", "tokens_per_s", "model"} <= set(worker)
    assert gather(redis.Redis.from_url(redis_url))[0].workers == []  # deregistered on stop


def test_logprobs_travel_with_the_tokens(redis_url: str, tiny_llama: Path) -> None:
    client = Client(redis_url, model="tiny")
    with WorkerThread(_tiny_engine(tiny_llama), redis_url, model_name="tiny"):
        streamed = client.result(client.submit("odds", max_tokens=5, temperature=0.0, logprobs=2), timeout=60)
        whole = client.result(
            client.submit("odds", max_tokens=5, temperature=0.0, logprobs=2, stream=False), timeout=60
        )
    for completion in (streamed, whole):
        assert completion.logprobs is not None and len(completion.logprobs) == 5
        for token_id, (sampled, logprob, top, _text) in zip(completion.token_ids, completion.logprobs, strict=True):
            assert sampled == token_id and logprob <= 0.0 and len(top) >= 2
            assert max(alt[1] for alt in top) == pytest.approx(logprob)  # greedy: the sampled token is the top one
    assert streamed.logprobs == whole.logprobs


def test_the_step_loop_thread_never_touches_redis(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """While serving, Redis I/O lives on the relay's threads; the loop only moves data through memory."""
    from redis.connection import Connection

    senders: set[str] = set()
    serving = threading.Event()  # start-up and shutdown talk to Redis from the loop's thread: not counted
    original = Connection.send_packed_command

    def recording(self, command, check_health=True):  # noqa: ANN001, ANN202
        if serving.is_set():
            senders.add(threading.current_thread().name)
        return original(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", recording)
    client = Client(redis_url, model="noop")
    with WorkerThread(NoopEngine(step_delay_s=0.001), redis_url, model_name="noop") as thread:
        client.generate(["warm"], max_tokens=2)
        serving.set()
        results = client.generate(["a b"] * 20, max_tokens=30)
        client.cancel(client.submit("c", max_tokens=10_000))
        time.sleep(0.2)
        serving.clear()
        steps = thread.worker.timing.steps
    assert all(len(r.token_ids) == 30 for r in results) and steps >= 30
    assert "test-worker" not in senders and {"tokenrelay-read", "tokenrelay-write"} <= senders


class _BrokenEngine(NoopEngine):
    def step(self) -> list:
        raise RuntimeError("kernel exploded")


def test_a_failing_engine_hands_its_work_back_and_stops(redis_url: str) -> None:
    client = Client(redis_url, model="noop")
    request_id = client.submit("a b", max_tokens=3)
    broken = WorkerThread(_BrokenEngine(), redis_url, model_name="noop")
    with broken:
        broken.thread.join(10)  # it stops by itself
        assert not broken.thread.is_alive() and isinstance(broken.worker.failure, RuntimeError)
        assert broken.error is not None  # run() raised EngineFailed (the CLI exits 1 on it)
    with WorkerThread(NoopEngine(), redis_url, model_name="noop"):
        completion = client.result(request_id, timeout=30)
    assert completion.token_ids == [2, 3, 4] and completion.restarts == 1  # handed back, not failed


def test_prompt_logprobs_come_back_in_the_done_event(redis_url: str, tiny_llama: Path) -> None:
    client = Client(redis_url, model="tiny")
    with WorkerThread(_tiny_engine(tiny_llama), redis_url, model_name="tiny"):
        completion = client.result(client.submit([5, 6, 7, 8], max_tokens=2, prompt_logprobs=1), timeout=60)
    scores = completion.prompt_logprobs
    assert scores is not None and len(scores) == 4 and scores[0] == []  # the first token has no context
    assert [s[0] for s in scores[1:]] == [6, 7, 8] and all(s[1] <= 0.0 for s in scores[1:])


class _FailingGrammarEngine(NoopEngine):
    """The no-op engine, except that a request prompted "grammar" fails the way a grammar that will not
    compile does in the LLMEngine: finished, finish_reason ERROR, a message (engine/structured/compiler.py)."""

    def step(self) -> list[RequestOutput]:
        outputs = super().step()
        for out in outputs:
            if len(out.prompt_token_ids) == 1 and out.prompt_token_ids[0] == sum(map(ord, "grammar")) % 32_000:
                out.finished, out.finish_reason = True, EngineFinishReason.ERROR
                out.error = "structured_outputs: grammar compilation took over 30.0 s"
                self.sequences.pop(out.request_id, None)
        return outputs


def test_an_engine_error_is_an_error_event_and_serving_goes_on(redis_url: str) -> None:
    client = Client(redis_url, model="noop")
    with WorkerThread(_FailingGrammarEngine(), redis_url, model_name="noop"):
        failed = client.submit("grammar", max_tokens=5)
        with pytest.raises(RequestFailed) as info:
            client.result(failed, timeout=30)
        assert client.result(client.submit("fine", max_tokens=2), timeout=30).finish_reason == "length"
    assert info.value.code == "invalid_request" and "grammar compilation" in info.value.message
    events = read_events(client.redis, Keys("noop"), failed)
    assert [e.type for e in events if e.type.terminal] == [EventType.ERROR]  # one terminal: the error, no done
