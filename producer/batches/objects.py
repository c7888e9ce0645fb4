"""The batch object as OpenAI shapes it, from a ledger hash, and the checks of a create's fields."""

from __future__ import annotations

import json
import re
from typing import Any

from producer.gateway.errors import APIError, invalid

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_WINDOW = re.compile(r"^([1-9][0-9]{0,6})(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at")


def output_file_id(batch_id: str, kind: str) -> str:
    return f"file-{batch_id}-{kind}"


def parse_window(value: Any, longest: int) -> int:
    if not isinstance(value, str) or not (match := _WINDOW.match(value)):
        raise invalid("completion_window", "must be a duration such as '24h' (digits, then s, m, h or d)")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds > longest:
        raise invalid("completion_window", f"must be at most {longest} seconds")
    return seconds


def check_metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > 16
        or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in value.items()
        )
    ):
        raise invalid("metadata", "must map at most 16 keys of up to 64 characters to strings of up to 512")
    return value


def batch_object(fields: dict[str, str]) -> dict[str, Any]:
    """OpenAI's batch object from a ledger hash."""

    def number(name: str) -> int:
        return int(fields.get(name) or 0)

    def moment(name: str) -> int | None:
        return int(fields[name]) if fields.get(name) else None

    status = fields.get("status", "validating")
    completed, failed = number("completed"), number("failed")
    finished = status in TERMINAL and status != "failed"
    errors = json.loads(fields["errors"]) if fields.get("errors") else None
    input_tokens, output_tokens = number("input_tokens"), number("output_tokens")
    return {
        "id": fields["id"],
        "object": "batch",
        "endpoint": fields.get("endpoint"),
        "model": fields.get("model") or None,
        "errors": {"object": "list", "data": errors} if errors is not None else None,
        "input_file_id": fields.get("input_file_id"),
        "completion_window": fields.get("completion_window"),
        "status": status,
        "output_file_id": output_file_id(fields["id"], "output") if finished and completed else None,
        "error_file_id": output_file_id(fields["id"], "errors") if finished and failed else None,
        "created_at": number("created_at"),
        "expires_at": moment("expires_at"),
        **{name: moment(name) for name in _TIMES},
        "request_counts": {"total": number("total"), "completed": completed, "failed": failed},
        "metadata": json.loads(fields["metadata"]) if fields.get("metadata") else None,
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": number("cached_tokens")},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }


def not_found(batch_id: str) -> APIError:
    return APIError(404, f"No batch found with id '{batch_id[:80]}'.", param="batch_id", code="batch_not_found")
