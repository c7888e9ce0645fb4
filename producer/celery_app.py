"""Celery tasks for apps that already run Celery: generate, run_batch, and beat-driven maintenance.

    celery -A producer.celery_app worker -Q tokenrelay --concurrency 4
    celery -A producer.celery_app beat

Settings come from the environment: TOKENRELAY_CELERY_BROKER_URL and TOKENRELAY_CELERY_RESULT_BACKEND
(default: TOKENRELAY_REDIS_URL), TOKENRELAY_REDIS_URL (where requests go), TOKENRELAY_MAINTENANCE_REDIS_URL
(the maintenance user; default TOKENRELAY_REDIS_URL), TOKENRELAY_CELERY_VISIBILITY_TIMEOUT (seconds).
Only JSON crosses the broker. Tasks are acked late and are safe to run twice: a redelivered generate
task finds the request its first delivery made (the request id derives from the task id), and a
redelivered batch resumes from its output file.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

from celery import Celery, signals

from producer import maintenance
from producer.batch.runner import BatchOptions, run_batch
from producer.client import DEFAULT_REDIS_URL, Client
from producer.connection import SyncRedis, connect
from producer.errors import RequestFailed
from producer.logs import configure_logging
from producer.protocol import DEFAULT_PREFIX
from producer.results import Completion

QUEUE = "tokenrelay"
# A batch can run for hours; the broker must not hand a running task to another worker meanwhile.
VISIBILITY_TIMEOUT_S = int(os.environ.get("TOKENRELAY_CELERY_VISIBILITY_TIMEOUT", 12 * 3600))
GENERATE_TIMEOUT_S = 600.0
REDIS_URL = os.environ.get("TOKENRELAY_REDIS_URL", DEFAULT_REDIS_URL)
PREFIX = os.environ.get("TOKENRELAY_PREFIX", DEFAULT_PREFIX)
PARTITIONS = int(os.environ.get("TOKENRELAY_PARTITIONS") or 1)  # the workers' --partitions


def _interval(name: str, default: float) -> float:
    return float(os.environ.get(f"TOKENRELAY_{name.upper()}_INTERVAL_S", default))


app = Celery("tokenrelay")
app.conf.update(
    broker_url=os.environ.get("TOKENRELAY_CELERY_BROKER_URL", REDIS_URL),
    result_backend=os.environ.get(
        "TOKENRELAY_CELERY_RESULT_BACKEND", os.environ.get("TOKENRELAY_CELERY_BROKER_URL", REDIS_URL)
    ),
    task_serializer="json",
    result_serializer="json",
    accept_content={"json"},  # never pickle: a broker message must not be able to run code
    result_accept_content={"json"},
    task_acks_late=True,  # acked when done: a worker killed mid-task leaves it for another
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,  # a long batch must not sit on tasks another worker could run
    broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
    result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
    task_default_queue=QUEUE,
    result_expires=86_400,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    beat_schedule={
        "tokenrelay-reclaim-sweep": {
            "task": "tokenrelay.maintenance.reclaim_sweep",
            "schedule": _interval("reclaim", 30.0),
        },
        "tokenrelay-trim-acked": {"task": "tokenrelay.maintenance.trim_acked", "schedule": _interval("trim", 300.0)},
        "tokenrelay-expire-results": {
            "task": "tokenrelay.maintenance.expire_results",
            "schedule": _interval("expire", 3600.0),
        },
        "tokenrelay-dead-letter-report": {
            "task": "tokenrelay.maintenance.dead_letter_report",
            "schedule": _interval("dead_letter", 900.0),
        },
    },
)


@signals.setup_logging.connect
def _logging(**_: Any) -> None:
    """Celery's own log lines in tokenrelay's format (structlog JSON when not on a terminal)."""
    configure_logging()


@functools.cache
def _client() -> Client:
    return Client(REDIS_URL, prefix=PREFIX)


@functools.cache
def _maintenance_redis() -> SyncRedis:
    return connect(
        os.environ.get("TOKENRELAY_MAINTENANCE_REDIS_URL", REDIS_URL), socket_connect_timeout=5, socket_timeout=60
    )


def completion_dict(completion: Completion) -> dict[str, Any]:
    return {
        "request_id": completion.request_id,
        "text": completion.text,
        "token_ids": completion.token_ids,
        "finish_reason": completion.finish_reason,
        "usage": completion.usage,
        "logprobs": completion.logprobs,
        "metadata": completion.metadata,
        "worker": completion.worker,
    }


class GenerationFailed(RuntimeError):
    """The request ended with an error event; the message is `code: message`."""


@app.task(name="tokenrelay.generate", bind=True)
def generate(
    self: Any, prompt: str | list[int] | None = None, *, timeout: float = GENERATE_TIMEOUT_S, **kwargs: Any
) -> dict[str, Any]:
    """Submit and wait: returns the completion dict; raises RequestFailed (code, message) on an error event.

    kwargs: messages, model, priority, metadata and any sampling parameter, as Client.submit takes them.
    """
    client = _client()
    request_id = kwargs.pop("request_id", None) or hashlib.sha256(f"celery:{self.request.id}".encode()).hexdigest()
    request_id = request_id[:32]
    client.submit(prompt, request_id=request_id, stream=False, timeout=timeout, **kwargs)
    try:
        return completion_dict(client.result(request_id, timeout=timeout + 30, model=kwargs.get("model")))
    except RequestFailed as exc:
        # one plain message: the JSON result backend rebuilds exceptions from their args
        raise GenerationFailed(f"{exc.code}: {exc.message}") from None


@app.task(name="tokenrelay.run_batch")
def run_batch_task(
    input_path: str,
    output_path: str,
    errors_path: str | None = None,
    window: int = 256,
    request_timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Runs an OpenAI Batch JSONL file (paths the Celery worker can read and write); returns the counts."""
    summary = run_batch(
        input_path,
        output_path,
        REDIS_URL,
        errors_path=errors_path,
        prefix=PREFIX,
        options=BatchOptions(window=window, request_timeout_s=request_timeout_s),
    )
    return {name: getattr(summary, name) for name in summary.__slots__}


@app.task(name="tokenrelay.maintenance.reclaim_sweep")
def reclaim_sweep() -> dict[str, Any]:
    return maintenance.reclaim_sweep(_maintenance_redis(), PREFIX, partitions=PARTITIONS)


@app.task(name="tokenrelay.maintenance.trim_acked")
def trim_acked() -> dict[str, int]:
    return maintenance.trim_acked(_maintenance_redis(), PREFIX, partitions=PARTITIONS)


@app.task(name="tokenrelay.maintenance.expire_results")
def expire_results() -> int:
    return maintenance.expire_results(_maintenance_redis(), PREFIX)


@app.task(name="tokenrelay.maintenance.dead_letter_report")
def dead_letter_report() -> dict[str, Any]:
    return maintenance.dead_letter_report(_maintenance_redis(), PREFIX, partitions=PARTITIONS)
