"""Stored responses in Redis: the record beside the request, the model locator, and reads of the results.

A response is an ordinary queued request (streamed, so its deltas are in the result stream); the result
stream is the store of what was generated. What the stream does not hold (the model, the input, the echoed
request fields, the owner, a cancel) is the record: a hash in the request's own partition slot
(`Keys.response`), so a script ending the request can read it there. The id `resp_<request id>` names no
model, so a locator (`JobKeys.response_model`) says which model's partition holds it; both expire together.

Lifetime: created with the retention plus the request's deadline (it cannot end later than that); the
first gateway that sees the terminal event pins both keys to expire `retention_s` after that event (the
result stream's own TTL, the workers' `--result-ttl-s`, runs from the same moment).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from producer.async_client import AsyncClient
from producer.connection import as_text
from producer.protocol import EVENT_FIELD, Event, JobKeys, Keys, decode_event, is_request_id

RESPONSE_ID_PREFIX = "resp_"
READ_COUNT = 1_000  # result entries a read brings back


def response_id(request_id: str) -> str:
    return RESPONSE_ID_PREFIX + request_id


def request_id_of(response_id: str) -> str | None:
    """The request a response id names, or None when it is not one of ours (`resp_` + 32 hex digits)."""
    request_id = response_id.removeprefix(RESPONSE_ID_PREFIX)
    return request_id if response_id.startswith(RESPONSE_ID_PREFIX) and is_request_id(request_id) else None


@dataclass(slots=True)
class StoredResponse:
    """A response's record: what its result stream does not say."""

    request_id: str
    model: str
    created_at: int
    background: bool
    owner: str = ""
    echo: dict[str, Any] = field(default_factory=dict)  # request fields the response object repeats
    history: list[dict[str, str]] = field(default_factory=list)  # earlier turns (previous_response_id)
    input: list[dict[str, str]] = field(default_factory=list)
    stored: bool = True  # store: false keeps no record; the object lives only for its own HTTP call
    cancelled: bool = False  # a cancel was accepted; the worker's cancelled event may not be written yet

    @property
    def id(self) -> str:
        return response_id(self.request_id)

    @property
    def message_id(self) -> str:
        """The id of its one output message: fixed, so every replay of the events names the same item."""
        return "msg_" + self.request_id

    def to_hash(self) -> dict[str, str]:
        return {
            "model": self.model,
            "created_at": str(self.created_at),
            "background": "1" if self.background else "0",
            "owner": self.owner,
            "echo": json.dumps(self.echo),
            "history": json.dumps(self.history),
            "input": json.dumps(self.input),
        }

    @classmethod
    def from_hash(cls, request_id: str, fields: dict[Any, Any]) -> StoredResponse:
        got = {as_text(k): as_text(v) for k, v in fields.items()}
        return cls(
            request_id,
            got["model"],
            int(got.get("created_at") or 0),
            got.get("background") == "1",
            got.get("owner", ""),
            json.loads(got.get("echo") or "{}"),
            json.loads(got.get("history") or "[]"),
            json.loads(got.get("input") or "[]"),
            cancelled=got.get("cancelled") == "1",
        )


class ResponseStore:
    """The Redis side of stored responses, over the gateway's AsyncClient connection."""

    def __init__(self, client: AsyncClient, retention_s: int) -> None:
        self.client = client
        self.retention_s = retention_s
        self.jobs = JobKeys(client.config.prefix)

    def keys(self, record: StoredResponse) -> Keys:
        return Keys(record.model, self.client.config.prefix).for_request(
            record.request_id, self.client.config.partitions
        )

    async def create(self, record: StoredResponse, lifetime_s: float) -> None:
        ttl = int(self.retention_s + lifetime_s) + 1
        key = self.keys(record).response(record.request_id)
        pipe = self.client.redis.pipeline(transaction=False)
        pipe.hset(key, mapping=record.to_hash())  # type: ignore[arg-type]
        pipe.expire(key, ttl)
        pipe.set(self.jobs.response_model(record.request_id), record.model, ex=ttl)
        await pipe.execute()

    async def load(self, request_id: str) -> StoredResponse | None:
        model = await self.client.redis.get(self.jobs.response_model(request_id))
        if model is None:
            return None
        keys = Keys(as_text(model), self.client.config.prefix).for_request(request_id, self.client.config.partitions)
        fields = await self.client.redis.hgetall(keys.response(request_id))
        return StoredResponse.from_hash(request_id, fields) if fields else None

    async def mark_cancelled(self, record: StoredResponse) -> None:
        await self.client.redis.hset(self.keys(record).response(record.request_id), "cancelled", "1")
        record.cancelled = True

    async def delete(self, record: StoredResponse, finished: bool) -> None:
        """Forgets the record; a finished response's result stream goes too (a running one's is rewritten
        by its worker's cancelled event, and expires with the workers' result TTL)."""
        keys = self.keys(record)
        pipe = self.client.redis.pipeline(transaction=False)
        pipe.delete(keys.response(record.request_id))
        pipe.delete(self.jobs.response_model(record.request_id))
        if finished:
            pipe.expire(keys.result(record.request_id), 1)
        await pipe.execute()

    async def state(self, record: StoredResponse) -> str | None:
        """The owner record's state (queued, running, done), None once it expired."""
        value = await self.client.redis.hget(self.keys(record).request(record.request_id), "state")
        return None if value is None else as_text(value)

    async def results(self, record: StoredResponse) -> list[Event]:
        """Every entry of the result stream so far, decoded, in order."""
        key = self.keys(record).result(record.request_id)
        events: list[Event] = []
        last = "0-0"
        while True:
            reply: Any = await self.client.redis.xread({key: last}, count=READ_COUNT)
            entries = [entry for _, stream_entries in reply or [] for entry in stream_entries]
            for entry_id, fields in entries:
                last = as_text(entry_id)
                events.append(decode_event(fields.get(EVENT_FIELD.encode()), last))
            if len(entries) < READ_COUNT:
                return events

    async def settle(self, record: StoredResponse, terminal_entry_id: str) -> None:
        """Pins the record and its locator to expire `retention_s` after the terminal event (the same
        instant for every gateway that sees it, so settling twice changes nothing)."""
        expires_ms = entry_ms(terminal_entry_id) + self.retention_s * 1000
        pipe = self.client.redis.pipeline(transaction=False)
        pipe.pexpireat(self.keys(record).response(record.request_id), expires_ms)
        pipe.pexpireat(self.jobs.response_model(record.request_id), expires_ms)
        await pipe.execute()


def entry_ms(entry_id: str) -> int:
    """When Redis wrote a stream entry (its id's first half), in ms since the epoch; now when unknown."""
    head = entry_id.partition("-")[0]
    return int(head) if head.isdigit() else int(time.time() * 1000)
