"""What chaos runs submit and what comes back: a paced producer, a live reader, and the final audit.

The reader folds result streams as a client does (a `restart` starts a completion over), so the
audit can tell what a client saw from what Redis holds: lost requests, duplicated terminal events,
events written after a terminal one, and client-visible duplicate or missing tokens.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from producer.client import Client, build_request
from producer.protocol import EVENT_FIELD, EventType, Keys, Request, decode_event
from producer.results import Completion

VOCAB = 32_000  # NoopEngine's default vocabulary


@dataclass(slots=True, frozen=True)
class Spec:
    """One request: a prompt of `words` words and `max_tokens`; the no-op engine's answer is known."""

    words: int
    max_tokens: int

    def request(self, model: str) -> Request:
        return build_request(model, " ".join(["w"] * self.words), max_tokens=self.max_tokens)

    @property
    def tokens(self) -> list[int]:
        return [(self.words + i) % VOCAB for i in range(self.max_tokens)]


def random_specs(n: int, seed: int, max_tokens: tuple[int, int] = (4, 40)) -> list[Spec]:
    rng = random.Random(seed)
    return [Spec(rng.randint(1, 12), rng.randint(*max_tokens)) for _ in range(n)]


@dataclass(slots=True)
class Audit:
    """The verdict of a run; lost and duplicated must be zero."""

    submitted: int = 0
    finished: int = 0
    lost: int = 0  # accepted, no terminal event by the end
    duplicated: int = 0  # terminal events beyond the first, over all requests
    after_terminal: int = 0  # any event written after a request's terminal one
    wrong_tokens: int = 0  # the client's folded tokens differ from the engine's (duplicate or missing)
    restarts: int = 0  # restart events: generations started over (re-executions)
    reexecuted: int = 0  # requests with at least one restart
    errors: dict[str, int] = field(default_factory=dict)  # terminal error events by code
    left_in_queues: int = 0  # entries still in a request stream or pending at the end

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


class Ledger:
    """Submits specs at a pace (retrying a batch under the same ids while Redis is away) and reads results."""

    def __init__(
        self,
        redis_url: str,
        model: str,
        specs: list[Spec],
        rate: float,
        batch: int = 20,
        result_ttl_s: int | None = None,
    ) -> None:
        ttl = {"result_ttl_s": result_ttl_s} if result_ttl_s else {}
        self.client = Client(redis_url, model=model, max_queue_depth=0, reconnect_s=120.0, **ttl)
        self.reader = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)
        self.keys = Keys(model)
        self.model, self.specs, self.rate, self.batch = model, specs, rate, batch
        self.accepted: dict[str, Spec] = {}
        self.completions: dict[str, Completion] = {}
        self.positions: dict[str, str] = {}
        self.submit_failures = 0  # submit round trips that raised (Redis away); retried under the same ids
        self.read_failures = 0
        self.submitting_done = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._produce, name="chaos-producer", daemon=True),
            threading.Thread(target=self._read, name="chaos-reader", daemon=True),
        ]

    def start(self) -> Ledger:
        for thread in self._threads:
            thread.start()
        return self

    @property
    def open(self) -> int:
        with self._lock:
            return len(self.positions)

    def wait(self, timeout: float) -> bool:
        """Until everything submitted has its terminal event; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.submitting_done.is_set() and not self.open:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _produce(self) -> None:
        started = time.monotonic()
        for first in range(0, len(self.specs), self.batch):
            chunk = self.specs[first : first + self.batch]
            requests = [spec.request(self.model) for spec in chunk]
            due = started + first / self.rate
            time.sleep(max(0.0, due - time.monotonic()))
            while not self._stop.is_set():
                try:
                    ids = self.client.submit_requests(requests)
                    break
                except (redis.ConnectionError, redis.TimeoutError):
                    self.submit_failures += 1  # not acknowledged: the same ids go again (idempotent)
                    time.sleep(0.2)
            else:
                return
            with self._lock:
                for request_id, spec in zip(ids, chunk, strict=True):
                    self.accepted[request_id] = spec
                    self.completions[request_id] = Completion(request_id)
                    self.positions[self.keys.result(request_id)] = "0-0"
        self.submitting_done.set()

    def _read(self) -> None:
        failures = 0
        prefix = len(self.keys.result_prefix)
        while not self._stop.is_set():
            with self._lock:
                keys = list(self.positions.items())
            if not keys:
                time.sleep(0.02)
                continue
            got = 0
            try:
                for i in range(0, len(keys), 1000):
                    chunk = dict(keys[i : i + 1000])
                    block = 200 if len(keys) <= 1000 else None
                    reply: Any = self.reader.xread(chunk, count=512, block=block)  # type: ignore[arg-type]
                    got += self._fold(reply, prefix)
                failures = 0
            except (redis.ConnectionError, redis.TimeoutError):
                self.read_failures += 1
                failures += 1
                time.sleep(min(2.0, 0.05 * 2**failures))
                continue
            if not got and len(keys) > 1000:
                time.sleep(0.01)

    def _fold(self, reply: Any, prefix: int) -> int:
        got = 0
        for raw_key, entries in reply or []:
            key = raw_key.decode()
            completion = self.completions[key[prefix:]]
            for entry_id, fields in entries:
                got += 1
                with self._lock:
                    self.positions[key] = entry_id.decode()
                if completion.apply(decode_event(fields[EVENT_FIELD.encode()], entry_id.decode())):
                    with self._lock:
                        del self.positions[key]
                    break
        return got

    def audit(self, client: redis.Redis) -> Audit:
        """Reads every result stream whole and checks it against what the engine must have produced."""
        audit = Audit(submitted=len(self.accepted))
        ids = list(self.accepted)
        for first in range(0, len(ids), 500):
            pipe = client.pipeline(transaction=False)
            for request_id in ids[first : first + 500]:
                pipe.xrange(self.keys.result(request_id))
            for request_id, entries in zip(ids[first : first + 500], pipe.execute(), strict=True):
                events = [decode_event(f[EVENT_FIELD.encode()], e.decode()) for e, f in entries]
                self._check(audit, request_id, events)
        for queue in self.keys.queues:
            if client.exists(queue):
                audit.left_in_queues += client.xlen(queue)
        return audit

    def _check(self, audit: Audit, request_id: str, events: list[Any]) -> None:
        terminals = [i for i, e in enumerate(events) if e.type.terminal]
        restarts = sum(e.type is EventType.RESTART for e in events)
        audit.restarts += restarts
        audit.reexecuted += restarts > 0
        if not terminals:
            audit.lost += 1
            return
        audit.finished += 1
        audit.duplicated += len(terminals) - 1
        audit.after_terminal += len(events) - 1 - terminals[0]
        terminal = events[terminals[0]]
        if terminal.type is EventType.ERROR:
            audit.errors[terminal.code or ""] = audit.errors.get(terminal.code or "", 0) + 1
            return
        completion = self.completions[request_id]
        expected = self.accepted[request_id].tokens
        folded = Completion(request_id)
        for event in events[: terminals[0] + 1]:
            folded.apply(event)
        # what the live reader showed its client, and what a reader starting now would get
        if completion.token_ids != expected or folded.token_ids != expected or completion.restarts != restarts:
            audit.wrong_tokens += 1
