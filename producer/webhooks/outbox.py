"""The webhook outbox: one Redis stream per model partition (`Keys.events`), written where a job ends.

A job ends inside a Lua script (a batch's last line, a background response's terminal event), so the
event is appended by that same script, in the same slot: it exists exactly when the job's end does,
whichever process wrote it and whether or not any gateway is alive. Gateways deliver from it
(producer.webhooks.delivery); the entry is all they need to build the body OpenAI sends:

    {"id": <id>, "object": "event", "type": <type>, "created_at": <created_at>, "data": {"id": <data>}}

`id` is derived from the job (`evt_` + the job's id + the event kind), so a retried script or a replayed
emit names the same event and receivers can drop a repeat by its `webhook-id`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

OUTBOX_MAXLEN = 100_000  # approximate: the oldest events go first once a partition holds this many
EVENT_FIELDS = ("id", "type", "data", "created_at")

# Lua: `emit_event(stream, event id, type, object id, created_at)`, for scripts that end a job.
EMIT_LUA = f"""
local function emit_event(stream, event_id, event_type, data_id, created_at)
  redis.call('XADD', stream, 'MAXLEN', '~', {OUTBOX_MAXLEN}, '*', 'id', event_id, 'type', event_type,
             'data', data_id, 'created_at', tostring(created_at))
end
"""


def event_id(job_id: str, kind: str) -> str:
    """The stable id of a job's event of one kind (`batch_1f..` + `completed` -> `evt_batch_1f.._completed`)."""
    return f"evt_{job_id}_{kind}"


@dataclass(slots=True, frozen=True)
class OutboxEvent:
    """One outbox entry, decoded."""

    entry_id: str
    id: str
    type: str
    data: str
    created_at: int

    @classmethod
    def decode(cls, entry_id: str, fields: dict[Any, Any]) -> OutboxEvent:
        get = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()
        }
        return cls(
            entry_id,
            str(get.get("id", "")),
            str(get.get("type", "")),
            str(get.get("data", "")),
            int(float(get.get("created_at") or 0)),
        )

    def body(self) -> bytes:
        """The request body sent to every endpoint, the same bytes on every attempt."""
        payload = {
            "id": self.id,
            "object": "event",
            "type": self.type,
            "created_at": self.created_at,
            "data": {"id": self.data},
        }
        return json.dumps(payload, separators=(",", ":")).encode()


def emit_event(redis: Any, stream: str, job_id: str, kind: str, event_type: str, created_at: int) -> Any:
    """Appends an event from Python (a sync or async client: returns what XADD returns, awaitable or not)."""
    fields = {"id": event_id(job_id, kind), "type": event_type, "data": job_id, "created_at": str(created_at)}
    return redis.xadd(stream, fields, maxlen=OUTBOX_MAXLEN, approximate=True)
