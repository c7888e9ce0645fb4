"""Client: submit, stream, result, cancel and generate over Redis (the sync I/O shell over producer.client_core)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from producer.client_commands import Command, Exists, Operation, Read, RunScript, RunScriptsDurably, Sleep
from producer.client_core import CONNECTION_OPTIONS, SCRIPTS, ClientCore, build_request
from producer.connection import SyncRedis, connect, register_script, run_durably
from producer.protocol import (
    DEFAULT_MODEL_NAME,
    DEFAULT_PREFIX,
    DEFAULT_RESULT_TTL_S,
    Event,
    EventType,
    Keys,
    Request,
)
from producer.results import CancelOutcome, Completion
from producer.settings import load as load_settings

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_MAX_QUEUE_DEPTH = 10_000
T = TypeVar("T")


class _Scripting(Protocol):
    def register_script(self, script: str) -> Any: ...


R = TypeVar("R", bound=_Scripting)  # redis.Redis or redis.asyncio.Redis


@dataclass(slots=True)
class ClientConfig:
    redis_url: str = DEFAULT_REDIS_URL
    model: str = DEFAULT_MODEL_NAME  # the model a request goes to unless it names one
    prefix: str = DEFAULT_PREFIX
    max_queue_depth: int = DEFAULT_MAX_QUEUE_DEPTH  # 0: no limit
    result_ttl_s: int = DEFAULT_RESULT_TTL_S
    reconnect_s: float = 30.0  # how long submit, stream, result and wait_all keep retrying a lost connection
    partitions: int = 1  # request streams per model (producers and workers must agree; see protocol.keys)
    # Durable submits: a submit returns once this many replicas of its master have it (WAIT), so a failover
    # cannot lose it; 0: once the master has it. Costs a replication round trip per submit.
    submit_replicas: int = 0
    submit_wait_ms: int = 1000  # how long each WAIT may take before the submit is retried
    # AsyncClient on one Redis: the blocking reads of all its open result streams share one XREAD and one
    # connection (producer.read_mux); off: each stream blocks in its own XREAD on a pool connection
    multiplex_reads: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.partitions, int) or self.partitions < 1:
            raise ValueError(f"partitions: must be an integer >= 1, got {self.partitions!r}")

    @classmethod
    def from_env(cls, **overrides: Any) -> ClientConfig:
        """Defaults, then TOKENRELAY_<FIELD> variables (TOKENRELAY_REDIS_URL, TOKENRELAY_MODEL, ...), then
        explicit overrides (None: not given)."""
        return load_settings(cls, overrides)


class ClientBase(Generic[R]):
    """What Client and AsyncClient hold alike: settings, connection, scripts, core; each adds only its I/O."""

    connect: Callable[..., R]  # how a client of this kind reaches Redis from a URL (set by each subclass)

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        model: str | None = None,
        prefix: str | None = None,
        max_queue_depth: int | None = None,
        client: R | None = None,
        **config: Any,
    ) -> None:
        self.config = ClientConfig.from_env(
            redis_url=redis_url, model=model, prefix=prefix, max_queue_depth=max_queue_depth, **config
        )
        self.redis = client if client is not None else type(self).connect(self.config.redis_url, **CONNECTION_OPTIONS)
        self._scripts = {source: register_script(self.redis, source) for source in SCRIPTS}
        self._core = ClientCore(self.config)

    def keys(self, model: str | None = None) -> Keys:
        return self._core.keys(model)


class Client(ClientBase[SyncRedis]):
    """`Client("redis://...").generate(["Write a poem about spring."], max_tokens=64)` and friends.

    Client(redis_url=None, *, model=None, prefix=None, max_queue_depth=None, client=None, **config): any
    ClientConfig field by name (partitions, submit_replicas, reconnect_s, ...); unset ones come from
    TOKENRELAY_* variables, then the defaults.
    """

    connect = staticmethod(connect)

    # -- submit ---------------------------------------------------------------------------------------

    def submit(self, prompt: str | list[int] | None = None, **kwargs: Any) -> str:
        """Enqueues one request and returns its id. Resubmitting the same `request_id` is a no-op.

        kwargs: messages, prompt_token_ids, model, stream, priority (high|normal|low), deadline (epoch
        seconds) or timeout (seconds from now), metadata, request_id, and any sampling parameter.
        Raises QueueFull when the model's backlog is over `max_queue_depth`.
        """
        return self.submit_requests(self._core.requests([prompt], kwargs))[0]

    def submit_requests(self, requests: Sequence[Request]) -> list[str]:
        """Enqueues many in one round trip; on QueueFull, `.accepted` lists those that got in.

        A lost connection is retried (backoff, up to `reconnect_s`) under the same request ids: one that
        did get in before its reply was lost comes back as a duplicate and counts as accepted.
        """
        return self._run(self._core.submit(requests))

    # -- results --------------------------------------------------------------------------------------

    def events(
        self, request_id: str, *, model: str | None = None, after: str = "0-0", timeout: float | None = None
    ) -> Iterator[Event]:
        """Every event from entry `after` on, through the terminal one; survives reconnects."""
        return self._drive(self._core.events(request_id, model, after, timeout))

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
        return self._run(self._core.cancel(request_id, model))

    def generate(
        self, prompts: Sequence[str | list[int]], timeout: float | None = None, **kwargs: Any
    ) -> list[Completion]:
        """Submits every prompt, waits for all; completions in order. Raises the first RequestFailed."""
        return self._run(self._core.generate(prompts, timeout, kwargs))

    def wait_all(
        self, request_ids: Sequence[str], *, model: str | None = None, timeout: float | None = None
    ) -> dict[str, Completion]:
        """Folds many result streams at once (one XREAD over up to 1,000 streams per call)."""
        return self._run(self._core.wait_all(request_ids, model, timeout))

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- I/O: what the core decides, carried out --------------------------------------------------------

    def _run(self, operation: Operation[T]) -> T:
        for event in self._drive(operation):
            raise AssertionError(f"{event} from an operation that returns a value")
        return operation.value

    def _drive(self, operation: Operation[Any]) -> Iterator[Event]:
        for step in operation:
            if isinstance(step, Event):
                yield step
                continue
            try:
                operation.reply(self._send(step))
            except Exception as exc:  # the operation retries what it can and raises the rest
                operation.fail(exc)

    def _send(self, command: Command) -> Any:
        if isinstance(command, Read):
            return self.redis.xread(command.streams, count=command.count, block=command.block)  # type: ignore[arg-type]
        if isinstance(command, RunScript):
            return self._scripts[command.source](keys=command.keys, args=command.args)
        if isinstance(command, Sleep):
            return time.sleep(command.seconds)
        if isinstance(command, RunScriptsDurably):
            calls = [(c.source, c.keys, c.args) for c in command.calls]
            return run_durably(self.redis, calls, command.replicas, command.wait_ms)
        pipe = self.redis.pipeline(transaction=False)
        if isinstance(command, Exists):
            for key in command.keys:
                pipe.exists(key)
            return pipe.execute()
        for call in command.calls:
            self._scripts[call.source](keys=call.keys, args=call.args, client=pipe)
        return pipe.execute()


__all__ = ["Client", "ClientConfig", "build_request", "EventType"]
