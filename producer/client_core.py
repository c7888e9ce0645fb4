"""What Client and AsyncClient decide, with no I/O: requests built, and each call as an Operation.

Each operation (submit, events, cancel, wait_all, generate) is a generator of the commands of
producer.client_commands and of the `Event`s it hands to its caller; the two clients only carry the
commands out. So a new client behaviour (another key layout, another retry rule) is written once, here.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from producer.client_commands import Exists, Operation, Read, RunScript, RunScripts, RunScriptsDurably, Sleep, Steps
from producer.errors import NotReplicated, ProtocolError, QueueFull, RequestFailed
from producer.params import validate_params
from producer.protocol import (
    DEFAULT_LIMITS,
    EVENT_FIELD,
    ErrorCode,
    FinishReason,
    Keys,
    Limits,
    Priority,
    Request,
    decode_event,
    done_event,
    new_request_id,
)
from producer.reconnect import RETRYABLE, Reconnect
from producer.results import UNKNOWN, CancelOutcome, Completion, ResultFold
from producer.scripts import (
    CANCEL,
    SUBMIT,
    cancel_args,
    cancel_keys,
    partition_depth,
    submit_args,
    submit_batches,
    submit_keys,
)

if TYPE_CHECKING:
    from producer.client import ClientConfig

READ_BLOCK_MS = 1_000
MAX_KEYS_PER_READ = 1_000
UNKNOWN_CHECK_S = 2.0  # wait_all: how often it asks whether Redis still knows the requests it waits for
IDLE_POLL_S = 0.005  # wait_all over several chunks: the pause after a round that brought nothing
SCRIPTS = (SUBMIT, CANCEL)  # the Lua sources a client registers; RunScript names one by its source
# the socket timeout outlasts the longest blocking read, so a quiet XREAD is never taken for a dead link
CONNECTION_OPTIONS: dict[str, float] = {"socket_connect_timeout": 5, "socket_timeout": READ_BLOCK_MS / 1000 + 10}


def build_request(
    model: str,
    prompt: str | list[int] | None = None,
    *,
    messages: list[dict[str, str]] | None = None,
    prompt_token_ids: list[int] | None = None,
    tools: list[dict[str, Any]] | None = None,
    stream: bool = True,
    priority: Priority | str = Priority.NORMAL,
    deadline: float | None = None,
    timeout: float | None = None,
    metadata: Any = None,
    request_id: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    **params: Any,
) -> Request:
    """A checked Request; raises ProtocolError (a ValueError) naming the bad field.

    `tools` (OpenAI's function tools) are rendered into the prompt by the model's chat template, on the worker.
    """
    if isinstance(prompt, list):
        prompt, prompt_token_ids = None, prompt
    if timeout is not None:
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not math.isfinite(timeout):
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST, f"timeout: must be a finite number of seconds, got {timeout!r:.40}"
            )
        if deadline is not None and (not isinstance(deadline, (int, float)) or isinstance(deadline, bool)):
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST, f"deadline: must be seconds since the epoch, got {deadline!r:.40}"
            )
        deadline = time.time() + timeout if deadline is None else min(deadline, time.time() + timeout)
    request = Request(
        request_id=request_id or new_request_id(),
        model=model,
        prompt=prompt,
        messages=messages,
        prompt_token_ids=prompt_token_ids,
        tools=tools,
        # normalised before encoding: logit_bias may come with int keys, which the wire's msgpack maps refuse
        params=validate_params(params),
        stream=stream,
        priority=Priority(priority),
        deadline=deadline,
        submitted_at=time.time(),
        metadata=metadata,
    )
    return request.validate(limits)


class _Models:
    """Remembers which model recent requests went to, so stream(id) needs no model argument."""

    def __init__(self, default: str, size: int = 100_000) -> None:
        self.default, self.size = default, size
        self._by_id: OrderedDict[str, str] = OrderedDict()

    def remember(self, request_id: str, model: str) -> None:
        if model != self.default:
            self._by_id[request_id] = model
            if len(self._by_id) > self.size:
                self._by_id.popitem(last=False)

    def of(self, request_id: str, model: str | None) -> str:
        return model or self._by_id.get(request_id, self.default)


class ClientCore:
    """The client's state (config, which model each request went to) and its operations."""

    __slots__ = ("config", "_models")

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._models = _Models(config.model)

    def keys(self, model: str | None = None) -> Keys:
        return Keys(model or self.config.model, self.config.prefix)

    def request_keys(self, request_id: str, model: str | None) -> Keys:
        """The keys of a request: the partition it lives in, of the model it named or was last submitted to."""
        return self.keys(self._models.of(request_id, model)).for_request(request_id, self.config.partitions)

    def requests(self, prompts: Sequence[str | list[int] | None], kwargs: dict[str, Any]) -> list[Request]:
        """One checked request a prompt, from submit's or generate's kwargs (their `model` or the default)."""
        model = kwargs.pop("model", None) or self.config.model
        return [build_request(model, prompt, **kwargs) for prompt in prompts]

    def submit(self, requests: Sequence[Request]) -> Operation[list[str]]:
        return Operation(self._submit(requests))

    def events(self, request_id: str, model: str | None, after: str, timeout: float | None) -> Operation[None]:
        return Operation(self._events(request_id, model, after, timeout))

    def cancel(self, request_id: str, model: str | None) -> Operation[CancelOutcome]:
        return Operation(self._cancel(request_id, model))

    def wait_all(
        self, request_ids: Sequence[str], model: str | None, timeout: float | None
    ) -> Operation[dict[str, Completion]]:
        return Operation(self._wait_all(request_ids, model, timeout))

    def generate(
        self, prompts: Sequence[str | list[int]], timeout: float | None, kwargs: dict[str, Any]
    ) -> Operation[list[Completion]]:
        return Operation(self._generate(prompts, timeout, kwargs))

    def _generate(
        self, prompts: Sequence[str | list[int]], timeout: float | None, kwargs: dict[str, Any]
    ) -> Steps[list[Completion]]:
        model = kwargs.get("model") or self.config.model
        ids = yield from self._submit(self.requests(prompts, kwargs))
        done = yield from self._wait_all(ids, model, timeout)
        return [done[i].raise_for_error() for i in ids]

    def _submit(self, requests: Sequence[Request]) -> Steps[list[str]]:
        partitions = self.config.partitions
        batches = submit_batches(requests, partitions)
        depth = partition_depth(self.config.max_queue_depth, partitions)
        calls = [
            RunScript(
                SUBMIT,
                submit_keys(self.request_keys(batch[0].request_id, batch[0].model), batch),
                submit_args(batch, depth, self.config.result_ttl_s),
            )
            for batch in batches
        ]
        reconnect = Reconnect(self.config.reconnect_s)
        while True:
            try:
                replies = yield from self._run_submits(calls)
                break
            except RETRYABLE as exc:
                yield Sleep(reconnect.delay(exc))
        accepted: list[str] = []
        full: QueueFull | None = None
        verdicts = [v for reply in replies for v in reply]
        for request, (verdict, detail) in zip([r for b in batches for r in b], verdicts, strict=True):
            if verdict == b"full":
                full = full or QueueFull(request.model, int(detail), depth)
                continue
            self._models.remember(request.request_id, request.model)
            accepted.append(request.request_id)
        if full is not None:
            full.accepted = accepted
            raise full
        return accepted

    def _run_submits(self, calls: list[RunScript]) -> Steps[list[Any]]:
        """The submit scripts; with durable submits (submit_replicas), only done once replicas have them."""
        replicas, wait_ms = self.config.submit_replicas, self.config.submit_wait_ms
        if not replicas:
            if len(calls) == 1:  # no pipeline for one call: redis-py's asks SCRIPT EXISTS before every execute
                return [(yield calls[0])]
            return (yield RunScripts(calls))
        replies, acked = yield RunScriptsDurably(calls, replicas, wait_ms)
        if acked < replicas:
            raise NotReplicated(acked, replicas, wait_ms)
        return list(replies)

    def _events(self, request_id: str, model: str | None, after: str, timeout: float | None) -> Steps[None]:
        keys = self.request_keys(request_id, model)
        key = keys.result(request_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        last, reconnect = after, Reconnect(self.config.reconnect_s, deadline)
        while True:
            try:
                reply = yield Read({key: last}, block_ms(deadline))
                # nothing came: does Redis know the request at all? (else this would wait forever)
                known = bool(reply) or any((yield Exists([keys.request(request_id)]))) or any((yield Exists([key])))
                reconnect.ok()
            except RETRYABLE as exc:
                yield Sleep(reconnect.delay(exc))
                continue
            if not known:
                raise RequestFailed(request_id, *UNKNOWN)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    event = decode_event(fields.get(EVENT_FIELD.encode()), last)
                    yield event
                    if event.type.terminal:
                        return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"request {request_id}: no terminal event within {timeout} s")

    def _cancel(self, request_id: str, model: str | None) -> Steps[CancelOutcome]:
        keys = self.request_keys(request_id, model)
        cancelled = done_event(FinishReason.CANCELLED, {})
        reply = yield RunScript(
            CANCEL, cancel_keys(keys, request_id), cancel_args(keys, request_id, cancelled, self.config.result_ttl_s)
        )
        return CancelOutcome(reply.decode())

    def _wait_all(
        self, request_ids: Sequence[str], model: str | None, timeout: float | None
    ) -> Steps[dict[str, Completion]]:
        fold = ResultFold({i: self.request_keys(i, model) for i in request_ids}, MAX_KEYS_PER_READ)
        deadline = None if timeout is None else time.monotonic() + timeout
        reconnect = Reconnect(self.config.reconnect_s, deadline)
        checked = time.monotonic()
        while fold.positions:
            chunks = fold.chunks()
            got = 0
            try:
                if time.monotonic() - checked >= UNKNOWN_CHECK_S:
                    fold.settle_unknown((yield Exists(fold.existence_checks())))
                    checked = time.monotonic()
                for chunk in chunks:
                    block = block_ms(deadline) if len(chunks) == 1 else None
                    got += fold.feed((yield Read(chunk, block)))
                reconnect.ok()
            except RETRYABLE as exc:
                yield Sleep(reconnect.delay(exc))
                continue
            if deadline is not None and time.monotonic() >= deadline and fold.positions:
                raise TimeoutError(f"{len(fold.positions)} of {len(request_ids)} requests unfinished after {timeout} s")
            if not got and len(chunks) > 1:
                yield Sleep(IDLE_POLL_S)  # nothing anywhere: the single-chunk case blocks in Redis instead
        return fold.completions


def block_ms(deadline: float | None) -> int:
    """How long a read may block: READ_BLOCK_MS, or less when the deadline (time.monotonic()) is nearer."""
    if deadline is None:
        return READ_BLOCK_MS
    return max(1, min(READ_BLOCK_MS, int((deadline - time.monotonic()) * 1000)))
