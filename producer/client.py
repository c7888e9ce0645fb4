"""Client: submit, stream, result, cancel and generate over Redis (sync; AsyncClient mirrors it)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from producer.errors import ProtocolError, QueueFull, RequestFailed
from producer.protocol import (
    DEFAULT_LIMITS,
    DEFAULT_MODEL_NAME,
    DEFAULT_PREFIX,
    DEFAULT_RESULT_TTL_S,
    EVENT_FIELD,
    Event,
    EventType,
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
from producer.scripts import CANCEL, SUBMIT, cancel_args, cancel_keys, submit_args, submit_batches, submit_keys
from producer.settings import load as load_settings

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_MAX_QUEUE_DEPTH = 10_000
_READ_BLOCK_MS = 1_000
_MAX_KEYS_PER_READ = 1_000
_UNKNOWN_CHECK_S = 2.0  # wait_all: how often it asks whether Redis still knows the requests it waits for


@dataclass(slots=True)
class ClientConfig:
    redis_url: str = DEFAULT_REDIS_URL
    model: str = DEFAULT_MODEL_NAME  # the model a request goes to unless it names one
    prefix: str = DEFAULT_PREFIX
    max_queue_depth: int = DEFAULT_MAX_QUEUE_DEPTH  # 0: no limit
    result_ttl_s: int = DEFAULT_RESULT_TTL_S
    reconnect_s: float = 30.0  # how long submit, stream, result and wait_all keep retrying a lost connection

    @classmethod
    def from_env(cls, **overrides: Any) -> ClientConfig:
        """Defaults, then TOKENRELAY_<FIELD> variables (TOKENRELAY_REDIS_URL, TOKENRELAY_MODEL, ...), then
        explicit overrides (None: not given)."""
        return load_settings(cls, overrides)


def build_request(model: str, prompt: str | list[int] | None = None, *, messages: list[dict[str, str]] | None = None,
                  prompt_token_ids: list[int] | None = None, stream: bool = True,
                  priority: Priority | str = Priority.NORMAL, deadline: float | None = None,
                  timeout: float | None = None, metadata: Any = None, request_id: str | None = None,
                  limits: Limits = DEFAULT_LIMITS, **params: Any) -> Request:
    """A checked Request; raises ProtocolError (a ValueError) naming the bad field."""
    if isinstance(prompt, list):
        prompt, prompt_token_ids = None, prompt
    if timeout is not None:
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not math.isfinite(timeout):
            raise ProtocolError("invalid_request", f"timeout: must be a finite number of seconds, got {timeout!r:.40}")
        if deadline is not None and (not isinstance(deadline, (int, float)) or isinstance(deadline, bool)):
            raise ProtocolError("invalid_request", f"deadline: must be seconds since the epoch, got {deadline!r:.40}")
        deadline = time.time() + timeout if deadline is None else min(deadline, time.time() + timeout)
    request = Request(request_id=request_id or new_request_id(), model=model, prompt=prompt, messages=messages,
                      prompt_token_ids=prompt_token_ids, params=params, stream=stream,
                      priority=Priority(priority), deadline=deadline, submitted_at=time.time(), metadata=metadata)
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


class Client:
    """`Client("redis://...").generate(["Write a poem about spring."], max_tokens=64)` and friends."""

    def __init__(self, redis_url: str | None = None, *, model: str | None = None, prefix: str | None = None,
                 max_queue_depth: int | None = None, client: redis.Redis | None = None, **config: Any) -> None:
        self.config = ClientConfig.from_env(redis_url=redis_url, model=model, prefix=prefix,
                                            max_queue_depth=max_queue_depth, **config)
        self.redis = client if client is not None else redis.Redis.from_url(
            self.config.redis_url, socket_connect_timeout=5, socket_timeout=_READ_BLOCK_MS / 1000 + 10)
        self._submit = self.redis.register_script(SUBMIT)
        self._cancel = self.redis.register_script(CANCEL)
        self._models = _Models(self.config.model)

    def keys(self, model: str | None = None) -> Keys:
        return Keys(model or self.config.model, self.config.prefix)

    # -- submit ---------------------------------------------------------------------------------------

    def submit(self, prompt: str | list[int] | None = None, **kwargs: Any) -> str:
        """Enqueues one request and returns its id. Resubmitting the same `request_id` is a no-op.

        kwargs: messages, prompt_token_ids, model, stream, priority (high|normal|low), deadline (epoch
        seconds) or timeout (seconds from now), metadata, request_id, and any sampling parameter.
        Raises QueueFull when the model's backlog is over `max_queue_depth`.
        """
        model = kwargs.pop("model", None) or self.config.model
        return self.submit_requests([build_request(model, prompt, **kwargs)])[0]

    def submit_requests(self, requests: Sequence[Request]) -> list[str]:
        """Enqueues many in one round trip; on QueueFull, `.accepted` lists those that got in.

        A lost connection is retried (backoff, up to `reconnect_s`) under the same request ids: one that
        did get in before its reply was lost comes back as a duplicate and counts as accepted.
        """
        batches = submit_batches(requests)
        reconnect = Reconnect(self.config.reconnect_s)
        while True:
            pipe = self.redis.pipeline(transaction=False)
            for batch in batches:
                self._submit(keys=submit_keys(self.keys(batch[0].model), batch),
                             args=submit_args(batch, self.config.max_queue_depth, self.config.result_ttl_s),
                             client=pipe)
            try:
                replies: Any = pipe.execute()
                break
            except RETRYABLE as exc:
                time.sleep(reconnect.delay(exc))
        accepted: list[str] = []
        full: QueueFull | None = None
        verdicts = [v for reply in replies for v in reply]
        for request, (verdict, detail) in zip([r for b in batches for r in b], verdicts, strict=True):
            if verdict == b"full":
                full = full or QueueFull(request.model, int(detail), self.config.max_queue_depth)
                continue
            self._models.remember(request.request_id, request.model)
            accepted.append(request.request_id)
        if full is not None:
            full.accepted = accepted
            raise full
        return accepted

    # -- results --------------------------------------------------------------------------------------

    def events(self, request_id: str, *, model: str | None = None, after: str = "0-0",
               timeout: float | None = None) -> Iterator[Event]:
        """Every event from entry `after` on, through the terminal one; survives reconnects."""
        keys = self.keys(self._models.of(request_id, model))
        key = keys.result(request_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        last, reconnect = after, Reconnect(self.config.reconnect_s, deadline)
        while True:
            block = _block_ms(deadline)
            try:
                reply: Any = self.redis.xread({key: last}, count=512, block=block)
                # nothing came: does Redis know the request at all? (else this would wait forever)
                # (one key per EXISTS: the producer's ACL grants it per key pattern)
                known = bool(reply) or bool(self.redis.exists(keys.request(request_id))) or bool(
                    self.redis.exists(key))
                reconnect.ok()
            except RETRYABLE as exc:
                time.sleep(reconnect.delay(exc))
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

    def stream(self, request_id: str, **kwargs: Any) -> Iterator[Event]:
        """Deltas (and any `restart`: drop what you showed) then the `done` event; raises RequestFailed."""
        completion = Completion(request_id)
        for event in self.events(request_id, **kwargs):
            completion.apply(event)
            completion.raise_for_error()
            yield event

    def result(self, request_id: str, timeout: float | None = None, *, model: str | None = None) -> Completion:
        completion = Completion(request_id)
        for event in self.events(request_id, model=model, timeout=timeout):
            completion.apply(event)
        return completion.raise_for_error()

    def cancel(self, request_id: str, *, model: str | None = None) -> CancelOutcome:
        keys = self.keys(self._models.of(request_id, model))
        reply: Any = self._cancel(keys=cancel_keys(keys, request_id),
                             args=cancel_args(keys, request_id, done_event("cancelled", {}), self.config.result_ttl_s))
        return CancelOutcome(reply.decode())

    def generate(self, prompts: Sequence[str | list[int]], timeout: float | None = None,
                 **kwargs: Any) -> list[Completion]:
        """Submits every prompt, waits for all; completions in order. Raises the first RequestFailed."""
        model = kwargs.pop("model", None) or self.config.model
        ids = self.submit_requests([build_request(model, p, **kwargs) for p in prompts])
        done = self.wait_all(ids, model=model, timeout=timeout)
        return [done[i].raise_for_error() for i in ids]

    def wait_all(self, request_ids: Sequence[str], *, model: str | None = None,
                 timeout: float | None = None) -> dict[str, Completion]:
        """Folds many result streams at once (one XREAD over up to 1,000 streams per call)."""
        fold = ResultFold(self.keys(model), request_ids, _MAX_KEYS_PER_READ)
        deadline = None if timeout is None else time.monotonic() + timeout
        reconnect = Reconnect(self.config.reconnect_s, deadline)
        checked = time.monotonic()
        while fold.positions:
            chunks = fold.chunks()
            got = 0
            try:
                if time.monotonic() - checked >= _UNKNOWN_CHECK_S:
                    pipe = self.redis.pipeline(transaction=False)
                    for key in fold.existence_checks():
                        pipe.exists(key)
                    fold.settle_unknown(pipe.execute())
                    checked = time.monotonic()
                for chunk in chunks:
                    block = _block_ms(deadline) if len(chunks) == 1 else None
                    got += fold.feed(self.redis.xread(chunk, count=512, block=block))  # type: ignore[arg-type]
                reconnect.ok()
            except RETRYABLE as exc:
                time.sleep(reconnect.delay(exc))
                continue
            if deadline is not None and time.monotonic() >= deadline and fold.positions:
                raise TimeoutError(f"{len(fold.positions)} of {len(request_ids)} requests unfinished after {timeout} s")
            if not got and len(chunks) > 1:
                time.sleep(0.005)  # nothing anywhere: the single-chunk case blocks in Redis instead
        return fold.completions

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _block_ms(deadline: float | None) -> int:
    if deadline is None:
        return _READ_BLOCK_MS
    return max(1, min(_READ_BLOCK_MS, int((deadline - time.monotonic()) * 1000)))


__all__ = ["Client", "ClientConfig", "build_request", "EventType"]
