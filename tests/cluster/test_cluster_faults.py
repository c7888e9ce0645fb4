"""Faults on a real Redis Cluster: a worker killed mid-generation, a master killed under load, a slot resharded
under load. Clients and workers must follow the new topology by themselves."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.config import SamplingParams
from engine.llm import LLM
from producer.client import Client, build_request
from producer.errors import RequestFailed
from producer.protocol import ErrorCode, Keys
from tests.queue_helpers import WorkerProcess, read_events, terminal_count, wait_for
from worker.redis_cluster import RedisClusterServer

pytestmark = pytest.mark.slow
KEYS = Keys("tiny")
PROMPTS = [
    "Explain the benefits of AI in healthcare.",
    "Write a poem about spring.",
    "Tell me about message queues.",
    "What is a paged KV cache?",
]
LONG = 200


@pytest.fixture
def noop(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Starts no-op worker processes for a model on the cluster, ready; kills them at teardown."""
    started: list[WorkerProcess] = []

    def start(url: str, model: str = "tiny") -> WorkerProcess:
        process = WorkerProcess(
            url,
            tmp_path,
            tmp_path / f"{model}.log",
            ["--engine", "noop", "--noop-step-delay", "0.005", "--max-num-seqs", "32"],
            model_name=model,
        )
        started.append(process)
        process.wait_ready()
        return process

    yield start
    for process in started:
        process.kill()


class Producer(threading.Thread):
    """Submits `total` requests one at a time, keeping the ids Redis acknowledged; `when(n)` runs once after n."""

    def __init__(self, client: Client, total: int, at: int, when: Callable[[], None], model: str = "tiny") -> None:
        super().__init__(daemon=True)
        self.client, self.total, self.at, self.when, self.model = client, total, at, when, model
        self.acknowledged: list[str] = []
        self.after_fault: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i in range(self.total):
                if i == self.at:
                    self.when()
                request = build_request(self.model, f"q {i}", max_tokens=20)
                self.client.submit_requests([request])
                (self.after_fault if i >= self.at else self.acknowledged).append(request.request_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def _settle(client: Client, ids: list[str], keys: Keys = KEYS) -> tuple[list[str], list[str]]:
    """(completed with every token and one terminal event, lost as unknown_request)."""
    completed, unknown = [], []
    for request_id in ids:
        try:
            result = client.result(request_id, timeout=120)
        except RequestFailed as exc:
            assert exc.code == ErrorCode.UNKNOWN_REQUEST, exc
            unknown.append(request_id)
            continue
        assert len(result.token_ids) == 20 and result.finish_reason == "length"
        assert terminal_count(read_events(client.redis, keys, request_id)) == 1
        completed.append(request_id)
    return completed, unknown


@pytest.fixture(scope="module")
def expected(tiny_llama: Path) -> dict[str, list[int]]:
    outs = LLM(str(tiny_llama), dtype="float64", num_kv_blocks=256).generate(
        PROMPTS, SamplingParams(max_tokens=LONG, temperature=0.0, ignore_eos=True)
    )
    return {p: o.token_ids for p, o in zip(PROMPTS, outs, strict=True)}


def test_kill_9_a_worker_mid_generation(
    cluster_url: str,
    tiny_llama: Path,
    worker_processes,  # noqa: ANN001
    expected: dict[str, list[int]],
) -> None:
    a = worker_processes(cluster_url, tiny_llama)
    a.wait_ready()
    client = Client(cluster_url, model="tiny")
    requests = [build_request("tiny", p, max_tokens=LONG, temperature=0.0, ignore_eos=True) for p in PROMPTS]
    ids = dict(zip(client.submit_requests(requests), PROMPTS, strict=True))
    wait_for(lambda: all(len(read_events(client.redis, KEYS, i)) > 0 for i in ids), 60, what="all streaming")
    a.kill()
    in_flight = [i for i in ids if terminal_count(read_events(client.redis, KEYS, i)) == 0]
    assert in_flight, "the kill should land mid-generation"
    b = worker_processes(cluster_url, tiny_llama)
    results = client.wait_all(list(ids), timeout=180)
    for request_id, prompt in ids.items():
        assert results[request_id].token_ids == expected[prompt]  # the client's fold equals the engine's
        assert terminal_count(read_events(client.redis, KEYS, request_id)) == 1
    assert all(results[i].restarts == 1 and f"-{b.pid}-" in results[i].worker for i in in_flight)


def test_a_slot_resharded_under_load_loses_and_repeats_nothing(
    redis_cluster: RedisClusterServer, cluster_url: str, noop: Callable[..., WorkerProcess]
) -> None:
    worker = noop(cluster_url)
    client = Client(cluster_url, model="tiny")
    source = redis_cluster.master_of(KEYS.queues[0])
    target = next(n for n in redis_cluster.masters() if n.port != source.port)
    slot = redis_cluster.keyslot(KEYS.queues[0])
    producer = Producer(client, 300, 100, lambda: redis_cluster.move_slot(slot, target.port, batch=10))
    producer.start()
    producer.join(180)
    assert not producer.is_alive() and producer.error is None, producer.error
    assert redis_cluster.master_of(KEYS.queues[0]).port == target.port  # the slot really moved
    completed, unknown = _settle(client, producer.acknowledged + producer.after_fault)
    assert unknown == [] and len(completed) == 300  # MOVED/ASK followed: nothing lost, nothing twice
    assert worker.process.poll() is None


def _replicated_master(cluster: RedisClusterServer) -> str:
    """A model whose master still has a live replica (an earlier test may have killed one)."""
    replicated = {n.master_id for n in cluster.nodes() if not n.master and not n.failed}
    for i in range(1000):
        name = f"f{i}"
        if cluster.master_of(Keys(name).queues[0]).node_id in replicated:
            return name
    raise AssertionError("no master with a replica left")


def test_durable_submits_lose_nothing_when_a_master_dies(
    redis_cluster: RedisClusterServer, cluster_url: str, noop: Callable[..., WorkerProcess]
) -> None:
    model = _replicated_master(redis_cluster)
    worker = noop(cluster_url, model)
    client = Client(cluster_url, model=model, reconnect_s=60, submit_replicas=1)
    dead = redis_cluster.master_of(Keys(model).queues[0])

    def recover() -> None:
        # the promoted replica has no replica of its own: durable submits wait until the old master is back
        redis_cluster.wait_failover(dead.port)
        redis_cluster.restart(dead.port)

    recovery = threading.Thread(target=recover, daemon=True)

    def kill_master() -> None:
        redis_cluster.kill(dead.port)
        recovery.start()

    producer = Producer(client, 300, 150, kill_master, model=model)
    producer.start()
    producer.join(240)
    recovery.join(60)
    assert not producer.is_alive() and producer.error is None, producer.error
    assert redis_cluster.master_of(Keys(model).queues[0]).port != dead.port
    completed, unknown = _settle(client, producer.acknowledged + producer.after_fault, Keys(model))
    assert unknown == [] and len(completed) == 300  # every acknowledged submit survived the failover
    assert worker.process.poll() is None


def test_a_master_killed_under_load_fails_over_and_everyone_follows(
    redis_cluster: RedisClusterServer, cluster_url: str, noop: Callable[..., WorkerProcess]
) -> None:
    model = _replicated_master(redis_cluster)
    keys = Keys(model)
    worker = noop(cluster_url, model)
    client = Client(cluster_url, model=model, reconnect_s=60)
    dead = redis_cluster.master_of(keys.queues[0])
    producer = Producer(client, 300, 150, lambda: redis_cluster.kill(dead.port), model=model)
    producer.start()
    producer.join(240)
    assert not producer.is_alive() and producer.error is None, producer.error
    promoted = redis_cluster.wait_failover(dead.port)
    assert promoted.port != dead.port and redis_cluster.master_of(keys.queues[0]).port == promoted.port
    before, lost = _settle(client, producer.acknowledged, keys)
    # Without durable submits a failover may drop what the old master acknowledged but had not yet sent
    # to its replica: such a request is answered unknown_request (README: what a failover can lose).
    assert len(before) + len(lost) == len(producer.acknowledged)
    after, lost_after = _settle(client, producer.after_fault, keys)
    assert lost_after == [] and len(after) == len(producer.after_fault)  # submitted once the replica took over
    assert worker.process.poll() is None  # the worker followed the new topology by itself
