"""Lua scripts' ARGV by name: one table per script builds both the script's `local` lines and the caller's list.

A script reads its fixed arguments only through the `local` lines generated from its table, and a caller
builds the list only by name, so an argument added, dropped or moved on one side fails loudly (a name the
script never uses, a missing or unknown keyword) instead of shifting every later position by one. Values
the scripts write that Python reads back (error codes, finish reasons, priority names) are formatted in
from the enums: a script body spells them `$name` (string.Template; Lua has no `$` of its own).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from string import Template
from typing import Any

from producer.protocol import ErrorCode, FinishReason, Priority

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")
_LITERAL_ARGV = re.compile(r"ARGV\[\s*\d+\s*\]")
_PRIORITIES = sorted(Priority, key=lambda p: p.rank)  # the order of KEYS[1..3] and of a request's queue index


def priority_table(value: Callable[[int], str]) -> str:
    """A Lua table keyed by priority name, `{high = value(1), normal = value(2), low = value(3)}`."""
    return "{" + ", ".join(f"{p.value} = {value(i)}" for i, p in enumerate(_PRIORITIES, 1)) + "}"


# What every script body may spell as `$name`, beside `$named` and `$tail` (see Argv.script).
CONSTANTS: dict[str, str] = {
    "code_invalid_request": ErrorCode.INVALID_REQUEST.value,
    "code_max_deliveries": ErrorCode.MAX_DELIVERIES.value,
    "finish_cancelled": FinishReason.CANCELLED.value,
    "priority_names": "{" + ", ".join(f"'{p.value}'" for p in _PRIORITIES) + "}",
}


@dataclass(frozen=True, slots=True)
class Argv:
    """The fixed ARGV positions of one script, in order; repeated groups (per request, per claim) follow."""

    names: tuple[str, ...]
    numbers: frozenset[str] = frozenset()  # read with tonumber() in the script

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"Argv: names repeat in {self.names}")
        if bad := [n for n in self.names if not _IDENTIFIER.match(n)]:
            raise ValueError(f"Argv: {bad} are not Lua identifiers")
        if extra := self.numbers - set(self.names):
            raise ValueError(f"Argv: numbers {sorted(extra)} are not among the names")

    @property
    def tail(self) -> int:
        """The first ARGV position after the named ones."""
        return len(self.names) + 1

    def args(self, *tail: Any, **named: Any) -> list[Any]:
        """ARGV for a call: every name exactly once, then the repeated groups."""
        missing = [n for n in self.names if n not in named]
        unknown = sorted(set(named) - set(self.names))
        if missing or unknown:
            raise TypeError(f"script arguments: missing {missing}, unknown {unknown}")
        return [*(named[n] for n in self.names), *tail]

    def script(self, body: str, **constants: str) -> str:
        """The `local` lines of the names, then `body` with `$named`, `$tail` and the constants filled in.

        Refuses a body that leaves a name unused or reads ARGV at a literal position (the names own those).
        """
        if literal := _LITERAL_ARGV.findall(body):
            raise ValueError(f"script: reads {literal[0]} by position; use the names and $tail")
        if unused := [n for n in self.names if not re.search(rf"\b{n}\b", body)]:
            raise ValueError(f"script: never uses {unused}")
        header = "".join(
            f"local {n} = tonumber(ARGV[{i}])\n" if n in self.numbers else f"local {n} = ARGV[{i}]\n"
            for i, n in enumerate(self.names, 1)
        )
        filled = Template(body).substitute(CONSTANTS, named=len(self.names), tail=self.tail, **constants)
        return header + filled
