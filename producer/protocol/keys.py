"""Redis key names of the wire protocol, the constants every side shares, and id and name checks.

Keys of one model share a Redis Cluster hash tag, `{prefix}:{{model}}:...`, so the Lua scripts
that touch a request's queue entry, its owner record and its result stream stay on one shard.

    {p}:{{m}}:q:high|normal|low   request streams (consumer group `workers`), read in that order
    {p}:{{m}}:req:<id>            hash: state, entry, prio, epoch (fencing token), worker, seq, cancel
    {p}:{{m}}:res:<id>            result stream: delta* ... (restart delta*)* then done | error
    {p}:{{m}}:cancel:<worker>     set: ids the owning worker must cancel (the flag itself is in req:<id>)
    {p}:{{m}}:dead                dead letters
    {p}:{{m}}:dead:cursor         the last dead letter a maintenance report covered
    {p}:{{m}}:workers             hash: worker name -> heartbeat (msgpack)
    {p}:models                    set of model names that workers serve (for `tokenrelay status`)
    {p}:{{m}}:events              webhook outbox: events written where a job ends (producer/webhooks)
    {p}:{{m}}:batch:<batch id>    an HTTP batch's ledger (producer/batches), and its :todo :out :left :live
    {p}:{{m}}:response:<id>       hash: a stored Responses API object of request <id> (producer/gateway/responses_store)
    {p}:{{mux}}:res:doorbell-<hex>  a gateway's wake-up stream for its shared result read (producer/read_mux)

Keys of the HTTP jobs that are not a model's (`JobKeys`): files, the indexes of files and batches,
Idempotency-Key records, disabled webhook endpoints, and which model holds a stored response (its id
names the request, not the model). A file's two keys share its own hash tag.

Partitions: a model's traffic can be split over P partitions (a setting that producers and workers
share; 1 by default). Partition 0 keeps the names above; partition i > 0 uses the hash tag `{m#i}`
(`#` is not allowed in model names), so each partition is a slot of its own and a cluster spreads them
over shards. A request lives wholly in one partition, chosen from its id (`partition_of`): queue entry,
owner record, result stream and the cancel set of its owner share that partition's slot. Heartbeats and
the model's registration stay in partition 0.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from producer.errors import ProtocolError
from producer.protocol.enums import _PRIORITY_ORDER, ErrorCode, Priority

SCHEMA_VERSION = 1
DEFAULT_PREFIX = "tr"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GROUP = "workers"
DEFAULT_RESULT_TTL_S = 86_400
REQUEST_FIELD_ID = "id"  # stream entry fields: the id stays readable to Lua without unpacking the payload
REQUEST_FIELD_BODY = "m"
EVENT_FIELD = "m"

_MODEL_NAME = re.compile(r"^[A-Za-z0-9._:/@+-]{1,128}$")
_PREFIX = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


def check_model_name(model: str) -> str:
    if not isinstance(model, str) or not _MODEL_NAME.match(model):
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST,
            f"model: {str(model)[:64]!r} is not a valid model name (1-128 of letters, digits and ._:/@+-)",
        )
    return model


def is_request_id(value: Any) -> bool:
    return isinstance(value, str) and _REQUEST_ID.match(value) is not None


def new_request_id() -> str:
    """128 random bits, made by the client so that a retried submit names the same request."""
    return secrets.token_hex(16)


def partition_of(request_id: str, partitions: int) -> int:
    """The partition a request lives in: from its id, so a retried submit lands where the first one did."""
    return int(request_id[:8], 16) % partitions if partitions > 1 else 0


def doorbell_key(prefix: str, name: str) -> str:
    """A client's private wake-up stream (producer.read_mux), named like a result stream of the pseudo-model
    `mux` so that a Redis user allowed to read results may use it; `doorbell-` keeps request ids off it."""
    return Keys("mux", prefix).result(f"doorbell-{name}")


@dataclass(slots=True, frozen=True)
class Keys:
    """Key names of one model (one partition of it) under one prefix."""

    model: str
    prefix: str = DEFAULT_PREFIX
    partition: int = 0

    def __post_init__(self) -> None:
        check_model_name(self.model)
        if not _PREFIX.match(self.prefix):
            raise ValueError(f"prefix: {self.prefix!r} must be 1-32 of letters, digits and ._-")
        if not isinstance(self.partition, int) or self.partition < 0:
            raise ValueError(f"partition: must be an integer >= 0, got {self.partition!r}")

    @property
    def base(self) -> str:
        tag = self.model if self.partition == 0 else f"{self.model}#{self.partition}"
        return f"{self.prefix}:{{{tag}}}"

    def of_partition(self, partition: int) -> Keys:
        return Keys(self.model, self.prefix, partition)

    def partitions(self, count: int) -> list[Keys]:
        """The keys of every partition of this model, partition 0 first."""
        return [self.of_partition(p) for p in range(count)]

    def for_request(self, request_id: str, partitions: int) -> Keys:
        """The keys of the partition `request_id` lives in."""
        return self.of_partition(partition_of(request_id, partitions))

    def queue(self, priority: Priority) -> str:
        return f"{self.base}:q:{priority.value}"

    @property
    def queues(self) -> list[str]:
        return [self.queue(p) for p in _PRIORITY_ORDER]

    @property
    def request_prefix(self) -> str:
        """Lua scripts that learn a request id from a stream entry append it to this."""
        return f"{self.base}:req:"

    @property
    def result_prefix(self) -> str:
        return f"{self.base}:res:"

    def request(self, request_id: str) -> str:
        return self.request_prefix + request_id

    def result(self, request_id: str) -> str:
        return self.result_prefix + request_id

    @property
    def cancel_prefix(self) -> str:
        return f"{self.base}:cancel:"

    def cancels(self, worker: str) -> str:
        return self.cancel_prefix + worker

    @property
    def dead(self) -> str:
        return f"{self.base}:dead"

    @property
    def dead_cursor(self) -> str:
        return f"{self.base}:dead:cursor"

    @property
    def workers(self) -> str:
        return f"{self.base}:workers"

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    @property
    def events(self) -> str:
        """The webhook outbox of this partition: scripts that end a job append its event here."""
        return f"{self.base}:events"

    def batch(self, batch_id: str) -> str:
        """The ledger hash of a batch pinned to this partition; its lists and sets append a suffix."""
        return f"{self.base}:batch:{batch_id}"

    @property
    def response_prefix(self) -> str:
        """Lua scripts that end a request append its id to this to find its stored response, if any."""
        return f"{self.base}:response:"

    def response(self, request_id: str) -> str:
        """The record of a stored response (Responses API) whose request is `request_id`: in the request's
        slot, so a script that ends the request can read it beside `req:<id>` and `res:<id>`."""
        return self.response_prefix + request_id


@dataclass(slots=True, frozen=True)
class JobKeys:
    """Keys of the HTTP jobs API that belong to no model: files, indexes, idempotency, webhook state."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX.match(self.prefix):
            raise ValueError(f"prefix: {self.prefix!r} must be 1-32 of letters, digits and ._-")

    @property
    def files(self) -> str:
        """Sorted set of file ids by creation time (listing, newest first)."""
        return f"{self.prefix}:files"

    def file(self, file_id: str) -> str:
        """Hash: a file's object (bytes, filename, purpose, created_at, expires_at, owner)."""
        return f"{self.prefix}:{{{file_id}}}:file"

    def file_data(self, file_id: str) -> str:
        """String: a file's content (same hash tag as its object)."""
        return f"{self.prefix}:{{{file_id}}}:data"

    @property
    def batches(self) -> str:
        """Sorted set of batch ids by creation time."""
        return f"{self.prefix}:batches"

    @property
    def batches_active(self) -> str:
        """Sorted set of the batches not finished yet, by expiry: what the gateways' sweep looks at."""
        return f"{self.prefix}:batches:active"

    @property
    def batch_models(self) -> str:
        """Hash: batch id -> the model whose partition holds its ledger."""
        return f"{self.prefix}:batches:model"

    def idempotency(self, digest: str) -> str:
        """What a create with an Idempotency-Key made (digest of key, route and caller)."""
        return f"{self.prefix}:idem:{digest}"

    def response_model(self, request_id: str) -> str:
        """String: the model whose partition holds the stored response of `request_id` (`resp_<request id>`
        names no model, and any gateway must find it from the id alone)."""
        return f"{self.prefix}:responses:{request_id}"

    @property
    def outboxes(self) -> str:
        """Set: outbox streams a job wrote to that served models do not cover (a batch for a model no worker
        serves still announces that it failed); webhook delivery reads these beside the served models'."""
        return f"{self.prefix}:outboxes"

    @property
    def hooks_disabled(self) -> str:
        """Hash: webhook endpoint name -> why it was disabled (a 410 from the receiver)."""
        return f"{self.prefix}:hooks:disabled"

    @property
    def hooks_dead(self) -> str:
        """Stream (capped): webhook events given up after the last scheduled attempt, for operators."""
        return f"{self.prefix}:hooks:dead"

    def hooks_alive(self, consumer: str) -> str:
        """String with a TTL: a gateway replica's webhook deliverer is alive (value: its endpoint names)."""
        return f"{self.prefix}:hooks:alive:{consumer}"
