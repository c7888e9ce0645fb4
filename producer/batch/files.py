"""Batch files: checking the input before anything is sent, resuming from the output, line-atomic writes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO


class BatchInputError(ValueError):
    """The input file cannot be run as it is (nothing was sent)."""


@dataclass(slots=True)
class InputScan:
    lines: int = 0
    custom_ids: set[str] = field(default_factory=set)


def scan_input(path: Path) -> InputScan:
    """One pass over the input: every line a JSON object with a unique string custom_id.

    Keeps only the ids (not the lines) in memory; a duplicate is an error before any request is sent,
    since the output could not tell the two answers apart.
    """
    scan = InputScan()
    with path.open("rb") as source:
        for number, raw in enumerate(source, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise BatchInputError(f"{path}:{number}: not valid JSON ({exc})") from None
            custom_id = record.get("custom_id") if isinstance(record, dict) else None
            if not isinstance(custom_id, str) or not custom_id:
                raise BatchInputError(f"{path}:{number}: custom_id must be a non-empty string")
            if custom_id in scan.custom_ids:
                raise BatchInputError(f"{path}:{number}: duplicate custom_id {custom_id!r}: every line needs its own")
            scan.custom_ids.add(custom_id)
            scan.lines += 1
    return scan


def read_input(path: Path) -> Iterator[dict[str, Any]]:
    """The input's records, one at a time (the file is never held in memory)."""
    with path.open("rb") as source:
        for raw in source:
            if raw.strip():
                yield json.loads(raw)


def done_ids(path: Path) -> set[str]:
    """custom_ids already answered in an output file; a torn last line (a killed run) is cut off first."""
    if not path.exists():
        return set()
    repair_tail(path)
    done = set()
    with path.open("rb") as output:
        for raw in output:
            if raw.strip():
                done.add(json.loads(raw)["custom_id"])
    return done


def repair_tail(path: Path) -> None:
    """Truncates a last line that has no newline: it was being written when the process died."""
    with path.open("rb+") as output:
        output.seek(0, os.SEEK_END)
        size = output.tell()
        if size == 0:
            return
        output.seek(size - 1)
        if output.read(1) == b"\n":
            return
        position = size - 1
        while position > 0:  # back to the previous newline, in blocks
            start = max(0, position - 65536)
            output.seek(start)
            block = output.read(position - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                output.truncate(start + cut + 1)
                return
            position = start
        output.truncate(0)


class ResultWriter:
    """Appends records to the output (and failures to the error file too), one whole line per write."""

    def __init__(self, output: Path, errors: Path) -> None:
        self._output: TextIO = output.open("a", encoding="utf-8")
        self._errors: TextIO = errors.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        if record.get("error") is not None:
            self._errors.write(line)
            self._errors.flush()
        # the output line goes last: once it is there the line counts as done, on any rerun
        self._output.write(line)
        self._output.flush()

    def close(self) -> None:
        for handle in (self._output, self._errors):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
