"""Response objects and Responses API stream events, derived from a record and its result stream (no I/O).

The events are a pure function of the record and the result stream's entries in order, numbered from 0
(`sequence_number`), so every gateway replica derives the same numbered sequence and `starting_after=N`
resumes exactly after event N, wherever the first connection was served:

    response.created                       at once (status queued when background, else in_progress)
    response.queued                        at once, background only
    response.in_progress                   at the first entry of the result stream
    response.output_item.added             at the first text (or at the end, when there was none):
    response.content_part.added              one message with one output_text part
    response.output_text.delta             one per delta entry that brings new text
    response.output_text.done              at the terminal entry: the whole text,
    response.content_part.done               then the part and the item (status completed, incomplete
    response.output_item.done                when cut short),
    response.completed | response.incomplete | response.failed    with the whole response object

A `restart` entry (a worker was lost and generation starts over) yields no event: what the new attempt
regenerates is compared with the text already sent, the repeat is skipped, and deltas resume once it
passes that point. The gateway seeds every sampled response (responses_service), so the new attempt
draws the same tokens and a client sees one uninterrupted text. Should it still differ (workers whose
arithmetic differs), an `error` event with code `restart_diverged` says so, no more deltas follow, and
the `.done` events and the final response carry the text actually generated.

A response cancelled ends with `response.incomplete` carrying status `cancelled` (the stream has no
event of its own for it), an error with `response.failed`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from producer.gateway.responses_store import StoredResponse, entry_ms
from producer.gateway.streaming import Replay
from producer.protocol import ErrorCode, Event, EventType, FinishReason
from producer.results import Completion


class Status(enum.StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INCOMPLETE = "incomplete"

    @property
    def terminal(self) -> bool:
        return self not in (Status.QUEUED, Status.IN_PROGRESS)


def ended_status(completion: Completion) -> Status:
    """The status of a finished request, from its terminal event."""
    if completion.error is not None:
        return Status.FAILED
    if completion.finish_reason == FinishReason.CANCELLED:
        return Status.CANCELLED
    if completion.finish_reason == FinishReason.LENGTH:
        return Status.INCOMPLETE
    return Status.COMPLETED


def live_status(completion: Completion, state: str | None, cancelled: bool) -> Status:
    """The status now: the terminal event's when there is one, else a cancel accepted, else the owner
    record's state (`queued` until a worker claims it)."""
    if completion.finished:
        return ended_status(completion)
    if cancelled:
        return Status.CANCELLED
    return Status.QUEUED if state == "queued" and not completion.text else Status.IN_PROGRESS


def _error(completion: Completion) -> dict[str, Any] | None:
    if completion.error is None:
        return None
    code, message = completion.error
    # OpenAI's codes for a response that failed; ours travels in the message
    public = "invalid_prompt" if code == ErrorCode.INVALID_REQUEST else "server_error"
    return {"code": public, "message": f"[{code}] {message}"[:2000]}


def usage(completion: Completion) -> dict[str, Any]:
    prompt = int(completion.usage.get("prompt_tokens", 0))
    generated = int(completion.usage.get("completion_tokens", len(completion.token_ids)))
    return {
        "input_tokens": prompt,
        # the cache writes are OpenAI's billing (prompt-cache storage); this server's cache costs nothing
        "input_tokens_details": {
            "cached_tokens": int(completion.usage.get("cached_tokens", 0)),
            "cache_write_tokens": 0,
        },
        "output_tokens": generated,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + generated,
    }


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(record: StoredResponse, status: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": record.message_id, "type": "message", "status": status, "role": "assistant", "content": parts}


def response_object(
    record: StoredResponse, status: Status, completion: Completion | None = None, completed_at: int | None = None
) -> dict[str, Any]:
    """The response as OpenAI shapes it; `completion` (folded from the result stream) gives the output."""
    output: list[dict[str, Any]] = []
    if completion is not None and (completion.text or status in (Status.COMPLETED, Status.INCOMPLETE)):
        item_status = {Status.COMPLETED: "completed", Status.IN_PROGRESS: "in_progress"}.get(status, "incomplete")
        output.append(message_item(record, item_status, [text_part(completion.text)]))
    return {
        "id": record.id,
        "object": "response",
        "created_at": record.created_at,
        "status": status.value,
        "background": record.background,
        "completed_at": completed_at if status is Status.COMPLETED else None,
        "error": _error(completion) if completion is not None else None,
        "incomplete_details": {"reason": "max_output_tokens"} if status is Status.INCOMPLETE else None,
        "model": record.model,
        "output": output,
        "usage": usage(completion) if completion is not None and completion.finished else None,
        "store": record.stored,
        "tools": [],
        "truncation": "disabled",
        "top_logprobs": 0,
        "max_tool_calls": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "metadata": {},
        **record.echo,
    }


@dataclass(slots=True)
class ResponseEvents:
    """Feeds result-stream events in order, returns the stream events each one yields, numbered."""

    record: StoredResponse
    sequence: int = 0
    started: bool = False  # response.in_progress sent
    opened: bool = False  # the message item and its part announced
    diverged: bool = False  # a restarted attempt wrote other text than the one sent
    ended: bool = False
    completion: Completion = field(init=False)  # the result stream folded: the text and how it ended
    replay: Replay = field(init=False, default_factory=Replay)  # what was sent, against a restarted attempt

    def __post_init__(self) -> None:
        self.completion = Completion(self.record.request_id)

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _snapshot(self, kind: str, status: Status) -> dict[str, Any]:
        return self._event(kind, response=response_object(self.record, status))

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.record.message_id, "output_index": 0, "content_index": 0}

    def opening(self) -> list[dict[str, Any]]:
        """The events that need no entry: the response exists (and waits in the queue, when background)."""
        if not self.record.background:
            return [self._snapshot("response.created", Status.IN_PROGRESS)]
        return [self._snapshot("response.created", Status.QUEUED), self._snapshot("response.queued", Status.QUEUED)]

    def feed(self, event: Event) -> list[dict[str, Any]]:
        assert not self.ended, "events after the terminal one"
        out = [] if self.started else [self._snapshot("response.in_progress", Status.IN_PROGRESS)]
        self.started = True
        self.completion.apply(event)
        if event.type is EventType.RESTART:
            self.replay.restart()
        elif event.type is EventType.DELTA or (event.type is EventType.DONE and event.full_output):
            out += self._text(event.text, len(event.token_ids))
        if event.type.terminal:
            out += self._end(event)
        return out

    def _open(self) -> list[dict[str, Any]]:
        if self.opened:
            return []
        self.opened = True
        return [
            self._event(
                "response.output_item.added", output_index=0, item=message_item(self.record, "in_progress", [])
            ),
            self._event("response.content_part.added", **self._where(), part=text_part("")),
        ]

    def _text(self, text: str, tokens: int) -> list[dict[str, Any]]:
        if self.diverged:
            return []
        fresh = self.replay.fresh(text, tokens)
        if fresh is None:
            return self._diverge()
        new_text, _ = fresh
        if not new_text:
            return []
        return [*self._open(), self._event("response.output_text.delta", **self._where(), delta=new_text, logprobs=[])]

    def _diverge(self) -> list[dict[str, Any]]:
        self.diverged = True
        return [
            self._event(
                "error",
                code="restart_diverged",
                message="a worker was lost and the restarted generation differs from the text already streamed; "
                "the final response holds the text generated",
                param=None,
            )
        ]

    def lost(self, message: str) -> dict[str, Any]:
        """The last event of a connection whose result stream could not be read (Redis lost it or is down):
        outside the derived sequence, it takes the next number and ends this connection only."""
        return self._event("error", code="stream_lost", message=message, param=None)

    def _end(self, event: Event) -> list[dict[str, Any]]:
        self.ended = True
        completion = self.completion
        status = ended_status(completion)
        out: list[dict[str, Any]] = []
        if not self.diverged and self.replay.sent_text != completion.text and completion.error is None:
            out += self._diverge()  # the new attempt ended short of what had been sent
        if self.opened or status in (Status.COMPLETED, Status.INCOMPLETE):
            out += self._open()
            item_status = "completed" if status is Status.COMPLETED else "incomplete"
            part = text_part(completion.text)
            out += [
                self._event("response.output_text.done", **self._where(), text=completion.text, logprobs=[]),
                self._event("response.content_part.done", **self._where(), part=part),
                self._event(
                    "response.output_item.done", output_index=0, item=message_item(self.record, item_status, [part])
                ),
            ]
        final = response_object(self.record, status, completion, entry_ms(event.entry_id) // 1000)
        kind = {Status.COMPLETED: "response.completed", Status.FAILED: "response.failed"}.get(
            status, "response.incomplete"
        )
        out.append(self._event(kind, response=final))
        return out
