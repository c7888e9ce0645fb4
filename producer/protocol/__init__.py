"""The wire protocol: every Redis key name and message shape, msgpack maps with a schema version.

Split by concept: `enums` (priorities, event types, error codes, finish reasons), `keys` (key names,
shared constants, id and name checks), `requests` (the Request message and its decode) and `events`
(result-stream events and their decode). Import from here; the modules are the layout, not the API.
"""

from producer.protocol.enums import ErrorCode, EventType, FinishReason, Priority
from producer.protocol.events import (
    Event,
    Logprobs,
    decode_event,
    delta_event,
    done_event,
    error_event,
    restart_event,
)
from producer.protocol.keys import (
    DEFAULT_MODEL_NAME,
    DEFAULT_PREFIX,
    DEFAULT_RESULT_TTL_S,
    EVENT_FIELD,
    GROUP,
    REQUEST_FIELD_BODY,
    REQUEST_FIELD_ID,
    SCHEMA_VERSION,
    JobKeys,
    Keys,
    check_model_name,
    doorbell_key,
    is_request_id,
    new_request_id,
    partition_of,
)
from producer.protocol.requests import DEFAULT_LIMITS, Limits, Request, decode_request, unpack

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_PREFIX",
    "DEFAULT_RESULT_TTL_S",
    "EVENT_FIELD",
    "GROUP",
    "REQUEST_FIELD_BODY",
    "REQUEST_FIELD_ID",
    "SCHEMA_VERSION",
    "ErrorCode",
    "Event",
    "EventType",
    "FinishReason",
    "JobKeys",
    "Keys",
    "partition_of",
    "Limits",
    "Logprobs",
    "Priority",
    "Request",
    "check_model_name",
    "doorbell_key",
    "decode_event",
    "decode_request",
    "delta_event",
    "done_event",
    "error_event",
    "is_request_id",
    "new_request_id",
    "restart_event",
    "unpack",
]
