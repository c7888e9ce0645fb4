"""What a client operation asks its I/O shell to do (read, check, run a script, sleep), and how it is stepped.

An operation is a generator: it yields a command, the shell carries it out with its own Redis client
(redis.Redis or redis.asyncio) and sends back the reply or throws in the exception it raised. It may
also yield an `Event`, which the shell passes on to its caller.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from producer.protocol import Event

READ_COUNT = 512  # entries per stream per XREAD

T = TypeVar("T")


@dataclass(slots=True, frozen=True)
class Read:
    """XREAD COUNT `count` BLOCK `block` (None: do not block) over stream key -> last entry id seen."""

    streams: dict[str, str]
    block: int | None
    count: int = READ_COUNT


@dataclass(slots=True, frozen=True)
class Exists:
    """One single-key EXISTS per key, pipelined (the producer's ACL grants EXISTS per key pattern)."""

    keys: list[str]


@dataclass(slots=True, frozen=True)
class RunScript:
    """One call of a registered Lua script (`source` is one of client_core.SCRIPTS)."""

    source: str
    keys: list[str]
    args: list[Any]


@dataclass(slots=True, frozen=True)
class RunScripts:
    """Several script calls in one pipeline; the reply is the list of their replies."""

    calls: list[RunScript]


@dataclass(slots=True, frozen=True)
class Sleep:
    seconds: float


@dataclass(slots=True, frozen=True)
class RunScriptsDurably:
    """RunScripts, then WAIT for `replicas` replicas (up to `wait_ms`) on each connection that wrote; the
    reply is (the script replies, the fewest replicas any WAIT confirmed)."""

    calls: list[RunScript]
    replicas: int
    wait_ms: int


Command = Read | Exists | RunScript | RunScripts | RunScriptsDurably | Sleep
Steps = Generator[Command | Event, Any, T]


class Operation(Generic[T]):
    """Iterate it for the next command or event; after a command, `reply` or `fail` with what Redis said.

    Once iteration stops, `value` holds the result. An error the operation does not handle (anything but
    a lost connection, mostly) comes back out of the iteration unchanged.
    """

    __slots__ = ("_steps", "_reply", "_error", "value")
    value: T

    def __init__(self, steps: Steps[T]) -> None:
        self._steps = steps
        self._reply: Any = None
        self._error: Exception | None = None

    def __iter__(self) -> Operation[T]:
        return self

    def __next__(self) -> Command | Event:
        reply, error = self._reply, self._error
        self._reply = self._error = None
        try:
            return self._steps.send(reply) if error is None else self._steps.throw(error)
        except StopIteration as stop:
            self.value = stop.value
            raise

    def reply(self, reply: Any) -> None:
        self._reply = reply

    def fail(self, error: Exception) -> None:
        self._error = error
