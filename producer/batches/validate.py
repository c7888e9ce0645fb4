"""A batch input file, line by line: each line checked as the gateway would check it, and turned into the
wire requests its choices become. Nothing is queued unless every line passes (OpenAI's rule: a batch with
a bad line fails as a whole, and its `errors` name each bad line with its number and reason).

Line numbers in errors are the file's, counting from 1; blank lines are skipped (and not numbered as
requests): the ledger counts requests from 0 in the order they appear.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from producer.batch.runner import BatchOptions, plan_line
from producer.errors import ProtocolError
from producer.gateway.errors import APIError, from_protocol_error
from producer.gateway.requests import GenerationPlan
from producer.protocol import Request

MAX_ERRORS = 100  # errors listed on a failed batch (the first ones, by line)


@dataclass(slots=True)
class LineError:
    line: int
    code: str
    message: str
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(slots=True)
class Checked:
    """What validation made of a file: the model, each request line's wire requests, or the errors."""

    model: str | None = None
    lines: list[list[Request]] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0

    def fail(self, error: LineError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(error)


def line_request_id(batch_hex: str, line: int, choice: int) -> str:
    """The request id of one choice of one line: it starts with the batch's first 8 hex digits, so it lives in
    the batch's partition (partition_of reads them), and it is the same whoever validates the file."""
    digest = hashlib.sha256(f"{batch_hex}:{line}:{choice}".encode()).hexdigest()
    return batch_hex[:8] + digest[:24]


def first_model(raw_lines: Iterable[bytes]) -> str | None:
    """The model the first parseable line names: where the batch's ledger goes, before the whole file is read."""
    for raw in raw_lines:
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        body = record.get("body") if isinstance(record, dict) else None
        model = body.get("model") if isinstance(body, dict) else None
        if isinstance(model, str) and model:
            return model
    return None


def check_lines(
    raw_lines: Iterable[bytes],
    endpoint: str,
    batch_hex: str,
    served: set[str],
    options: BatchOptions,
    max_lines: int,
    deadline: float,
) -> Checked:
    """Every line parsed, planned and encoded; `served` is the set of models some worker serves."""
    checked = Checked()
    custom_ids: set[str] = set()
    number = 0
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        if len(checked.lines) + checked.error_count >= max_lines:
            checked.fail(LineError(number, "too_many_lines", f"a batch holds at most {max_lines} requests"))
            break
        index = len(checked.lines)
        try:
            record = _record(raw, number, custom_ids)
            plan = _plan(record, endpoint, number, checked, served, options)
            checked.lines.append(_requests(plan, batch_hex, index, number, options, deadline))
        except LineProblem as problem:
            checked.fail(problem.error)
            checked.lines.append([])  # keeps later lines' numbering; a failed batch queues nothing anyway
    if number == 0 or not checked.lines:
        checked.fail(LineError(max(number, 1), "empty_file", "the input file has no request lines"))
    return checked


class LineProblem(Exception):
    def __init__(self, error: LineError) -> None:
        super().__init__(error.message)
        self.error = error


def _record(raw: bytes, number: int, custom_ids: set[str]) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LineProblem(LineError(number, "invalid_json", f"the line is not valid JSON: {exc}"[:300])) from None
    if not isinstance(record, dict):
        raise LineProblem(LineError(number, "invalid_json", "the line must be a JSON object"))
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
        raise LineProblem(
            LineError(number, "missing_custom_id", "custom_id must be a string of 1-512 characters", "custom_id")
        )
    if custom_id in custom_ids:
        raise LineProblem(
            LineError(number, "duplicate_custom_id", f"custom_id {custom_id!r:.80} appears twice", "custom_id")
        )
    custom_ids.add(custom_id)
    return record


def _plan(
    record: dict[str, Any], endpoint: str, number: int, checked: Checked, served: set[str], options: BatchOptions
) -> GenerationPlan:
    if record.get("url") != endpoint:
        message = f"url {str(record.get('url'))[:80]!r} is not the batch's endpoint {endpoint!r}"
        raise LineProblem(LineError(number, "mismatched_endpoint", message, "url"))
    try:
        plan = plan_line(record, options)
    except APIError as exc:
        param = f"body.{exc.param}" if exc.param and exc.param not in ("method", "url") else exc.param
        raise LineProblem(LineError(number, exc.code or "invalid_request", exc.message, param)) from None
    if checked.model is None:
        checked.model = plan.model
    elif plan.model != checked.model:
        message = f"model {plan.model!r:.80} differs from the batch's {checked.model!r:.80}: one model per batch"
        raise LineProblem(LineError(number, "mismatched_model", message, "body.model"))
    if plan.model not in served:
        message = f"the model {plan.model!r:.80} does not exist or no worker serves it"
        raise LineProblem(LineError(number, "model_not_found", message, "body.model"))
    if plan.choices > options.window:
        message = f"the line asks for {plan.choices} choices; a batch line may ask for at most {options.window}"
        raise LineProblem(LineError(number, "too_many_choices", message, "body.n"))
    return plan


def _requests(
    plan: GenerationPlan, batch_hex: str, index: int, number: int, options: BatchOptions, deadline: float
) -> list[Request]:
    ids = [line_request_id(batch_hex, index, choice) for choice in range(plan.choices)]
    try:
        return plan.requests(ids, stream=False, priority=options.priority, deadline=deadline)
    except ProtocolError as exc:
        error = from_protocol_error(exc)
        param = f"body.{error.param}" if error.param else None
        raise LineProblem(LineError(number, error.code or "invalid_request", error.message, param)) from None
