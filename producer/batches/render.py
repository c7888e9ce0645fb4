"""A finished batch's output and error files, rendered from its ledger's recorded terminal events.

Each request line becomes exactly one output line, in input order: answered lines go to the output file
(OpenAI's `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}`), the rest
to the error file (a failed request keeps its status and error body; a line the batch never ran or cut
short says why in `error.code`: `batch_cancelled` or `batch_expired`). The bodies are what the gateway
would have answered for the same request, built by the same code from the same plan.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from producer.batches.validate import line_request_id
from producer.errors import RequestFailed
from producer.gateway.errors import APIError, from_request_failed
from producer.gateway.requests import GenerationPlan
from producer.gateway.responses import full_response
from producer.protocol import ErrorCode, FinishReason, decode_event
from producer.results import Completion

_CUT_SHORT = {
    "cancelled": "This request was not executed: the batch was cancelled.",
    "expired": "This request could not be executed before the completion window expired.",
}


@dataclass(slots=True)
class Rendered:
    output: list[bytes] = field(default_factory=list)
    errors: list[bytes] = field(default_factory=list)


def output_line_id(batch_id: str, index: int) -> str:
    return "batch_req_" + hashlib.sha256(f"{batch_id}:{index}".encode()).hexdigest()[:24]


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def render_line(
    batch_id: str,
    batch_hex: str,
    index: int,
    custom_id: str,
    plan: GenerationPlan,
    payloads: Sequence[bytes | None],
    closing: str | None,
) -> tuple[bool, bytes]:
    """(answered, the output line) of request line `index`, from its choices' terminal events."""
    completions = []
    for choice, payload in enumerate(payloads):
        completion = Completion(line_request_id(batch_hex, index, choice))
        if payload is not None:
            completion.apply(decode_event(payload))
        completions.append(completion)
    base = {"id": output_line_id(batch_id, index), "custom_id": custom_id}
    # a request whose deadline (the batch's expiry) passed while it ran was cut short by the window too
    expired = closing == "expired"
    cut = [
        c
        for c in completions
        if not c.finished
        or c.finish_reason == FinishReason.CANCELLED
        or (expired and c.error is not None and c.error[0] == ErrorCode.DEADLINE)
    ]
    if cut:
        code = f"batch_{closing}" if closing in _CUT_SHORT else "cancelled"
        message = _CUT_SHORT.get(closing or "", "The request was cancelled.")
        return False, _line({**base, "response": None, "error": {"code": code, "message": message}})
    for completion in completions:
        if completion.error is not None:
            failed = RequestFailed(completion.request_id, completion.error[0], completion.error[1], None)
            error: APIError = from_request_failed(failed)
            response = {"status_code": error.status, "request_id": completion.request_id, "body": error.body()}
            return False, _line({**base, "response": response, "error": {"code": error.code, "message": error.message}})
    body = full_response(plan, completions)
    response = {"status_code": 200, "request_id": completions[0].request_id, "body": body}
    return True, _line({**base, "response": response, "error": None})
