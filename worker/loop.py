"""The worker's step loop: admit -> step -> publish -> ack. Redis I/O runs on the Relay's thread."""

from __future__ import annotations

import heapq
import queue
import threading
import time
from typing import Any

import structlog

from engine.interface import Engine
from engine.request import FinishReason as EngineFinishReason
from engine.request import RequestOutput
from producer.batches.ledger import Outcome, outcome
from producer.connection import SyncRedis
from producer.errors import ProtocolError
from producer.protocol import DEFAULT_LIMITS, ErrorCode, FinishReason, decode_request, done_event, error_event
from worker.convert import build_prompt, connect, sampling_params, wire_finish_reason, wire_logprobs
from worker.jobs import Job, Note, NoteKind, Outbox
from worker.metrics import LoopTiming, WorkerMetrics
from worker.relay import Relay
from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)
# A dead letter keeps the start of the payload, enough to see what it was: 10,000 dead letters of 4 MiB
# each would be 40 GiB of Redis memory, and an oversize payload would defeat the very cap it broke.
DEAD_LETTER_RAW_BYTES = 65_536


def _field(message: str) -> str:
    """The field an error names (`params.stop: must be ..., got [...]` -> `params.stop`): error messages may
    quote what the client sent, which may be prompt text, so info logs carry only the field."""
    head = message.split(":", 1)[0]
    return head if len(head) <= 64 and head.replace(".", "").replace("_", "").isalnum() else "?"


# how a done event ends a batch line or a job (producer.batches.ledger)
_ENDINGS = {
    FinishReason.STOP: Outcome.COMPLETED,
    FinishReason.LENGTH: Outcome.INCOMPLETE,
    FinishReason.CANCELLED: Outcome.CANCELLED,
}


class EngineFailed(RuntimeError):
    """engine.step() raised; the worker handed its requests back and stopped."""


class Worker:
    """Serves one engine from the model's request streams until stopped."""

    def __init__(
        self,
        engine: Engine,
        settings: WorkerSettings,
        client: SyncRedis | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics or WorkerMetrics(settings.served_model, settings.max_num_seqs)
        self.tokenizer = engine.tokenizer  # token texts beside logprobs, for producers without one
        self.settings = settings
        self.name = settings.consumer
        self.redis = client if client is not None else connect(settings.redis_url)
        self.outbox = Outbox()
        self.inbox: queue.SimpleQueue[Note] = queue.SimpleQueue()
        self.relay = Relay(self.redis, settings, self.outbox, self.inbox, self._stats_snapshot)
        self.jobs: dict[str, Job] = {}
        self.deadlines: list[tuple[float, str, int]] = []
        self.timing = LoopTiming()
        self._stop = threading.Event()
        self.failure: Exception | None = None
        self.signalled: tuple[str, bool] | None = None  # (signal name, drain) left by a signal handler
        self._drain_until = float("inf")
        self._stats: dict[str, Any] = {}
        self._stats_at = 0.0
        self._tokens_at_stats = 0

    def run(self) -> None:
        self._refresh_stats(time.monotonic())  # the first heartbeat already carries stats
        self.relay.start()
        log.info("worker serving", worker=self.name, model=self.settings.served_model, slots=self.settings.max_num_seqs)
        try:
            while not self._finished():
                self._admit()
                outputs = self._step()
                self._publish(outputs)
                self._ack(outputs)
        finally:
            self._close()
        if self.failure is not None:
            raise EngineFailed("the engine failed a step; in-flight requests were handed back") from self.failure

    def stop(self, drain: bool = True) -> None:
        """Stop reading new requests; finish in-flight ones within the grace period (or now, drain=False)."""
        grace = self.settings.drain_grace_s if drain else 0.0
        self._drain_until = min(self._drain_until, time.monotonic() + grace)
        self.relay.reading = False
        self._stop.set()
        log.info("worker stopping", worker=self.name, in_flight=len(self.jobs), grace_s=grace)

    # -- the four phases ----------------------------------------------------------------------------

    def _admit(self) -> None:
        """Take in what the Redis thread claimed; apply cancels, lost ownership and deadlines."""
        try:
            idle = not self.engine.has_unfinished()
            note: Note | None = self.inbox.get(timeout=0.05) if idle else self.inbox.get_nowait()
        except queue.Empty:
            note = None
        started = time.perf_counter()
        while note is not None:
            self._apply(note)
            try:
                note = self.inbox.get_nowait()
            except queue.Empty:
                note = None
        self._expire_deadlines()
        now = time.monotonic()
        if now - self._stats_at > 0.5:
            self._refresh_stats(now)
        self.timing.overhead_s += time.perf_counter() - started

    def _step(self) -> list[RequestOutput]:
        if not self.engine.has_unfinished():
            return []
        started = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - re-raised from run() once the work is handed back
            # A broken engine must not drain the queue into errors: hand everything back and stop. Other
            # workers restart the requests; one that breaks every engine reaches max_deliveries and is
            # dead-lettered.
            log.exception("engine step failed: handing in-flight requests back and stopping", in_flight=len(self.jobs))
            self.failure = exc
            self.stop(drain=False)
            return []
        self.timing.step_s += time.perf_counter() - started
        self.timing.steps += 1
        return outputs

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """Hand each request's new tokens to the Redis thread (it coalesces and writes them)."""
        started = time.perf_counter()
        for out in outputs:
            job = self.jobs.get(out.request_id)
            if job is None:
                continue
            if job.first_token_at is None and out.new_token_ids:
                job.first_token_at, job.first_token_wall = time.monotonic(), time.time()
            job.completion_tokens = len(out.token_ids)
            if job.request.stream and (out.new_text or out.new_token_ids):
                self.outbox.add_delta(
                    out.request_id,
                    job.epoch,
                    out.new_text,
                    out.new_token_ids,
                    wire_logprobs(out.new_logprobs, self.tokenizer),
                )
        self.timing.overhead_s += time.perf_counter() - started

    def _ack(self, outputs: list[RequestOutput]) -> None:
        """Queue the terminal event of each finished request; the Redis thread writes it and XACKs in one script."""
        started = time.perf_counter()
        for out in outputs:
            if not out.finished or out.request_id not in self.jobs:
                continue
            job = self.jobs.pop(out.request_id)
            if out.finish_reason is EngineFinishReason.ERROR:  # e.g. its structured output would not compile
                log.info("request failed in the engine", request_id=out.request_id, field=_field(out.error or ""))
                self._send_error(job, ErrorCode.INVALID_REQUEST, out.error or "the engine could not run it")
            else:
                self._send_done(job, wire_finish_reason(out.finish_reason), out)
        self.timing.overhead_s += time.perf_counter() - started

    # -- notes from the Redis thread ------------------------------------------------------------------

    def _apply(self, note: Note) -> None:
        if note.kind is NoteKind.JOB:
            job = self._decode(note)
            if job is not None:
                self._start(job)
            return
        job = self.jobs.get(note.request_id)
        if job is None or job.epoch != note.epoch:
            return
        self._drop(job)
        if note.kind is NoteKind.CANCEL:
            log.info("request cancelled", request_id=job.request.request_id, tokens=job.completion_tokens)
            self._send_done(job, FinishReason.CANCELLED, None)
        else:
            log.info("request dropped: taken over elsewhere", request_id=job.request.request_id)

    def _decode(self, note: Note) -> Job | None:
        """The claimed payload as a Job, or None after answering it with an error (and a dead letter)."""
        try:
            request = decode_request(note.payload, DEFAULT_LIMITS, expected_id=note.request_id)
            if request.model != self.settings.served_model:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_MODEL,
                    f"model: this stream serves {self.settings.served_model!r}, not {request.model!r}",
                )
        except ProtocolError as exc:
            log.info(
                "request rejected",
                request_id=note.request_id,
                code=exc.code,
                field=_field(exc.message),
                bytes=len(note.payload),
            )
            log.debug("request rejected: reason", request_id=note.request_id, reason=exc.message)
            dead = [
                "reason",
                exc.code,
                "message",
                exc.message,
                "id",
                note.request_id,
                "entry",
                note.entry_id,
                "worker",
                self.name,
                "bytes",
                len(note.payload),
                "raw",
                note.payload[:DEAD_LETTER_RAW_BYTES],
            ]
            self.outbox.add_terminal(
                note.request_id, note.epoch, error_event(exc.code, exc.message, worker=self.name), dead
            )
            self.metrics.failed(exc.code)
            return None
        return Job(request=request, epoch=note.epoch, raw=note.payload, admitted_at=time.time())

    def _start(self, job: Job) -> None:
        request = job.request
        if request.deadline is not None and request.deadline <= time.time():
            log.info(
                "request expired in the queue",
                request_id=request.request_id,
                late_s=round(time.time() - request.deadline, 3),
            )
            self._send_error(job, ErrorCode.DEADLINE, "deadline passed before the request reached the engine")
            return
        try:
            prompt = build_prompt(self.engine, request)
            params = sampling_params(request.params)
            waited = max(0.0, time.time() - request.submitted_at) if request.submitted_at else 0.0
            self.engine.add_request(
                request.request_id,
                prompt,
                params,
                priority=request.priority.rank,
                arrival_time=time.monotonic() - waited,
            )
        except Exception as exc:  # noqa: BLE001 - ValueError from the engine, template errors from chat input
            log.info("request refused by the engine", request_id=request.request_id, field=_field(str(exc)))
            log.debug("request refused by the engine: reason", request_id=request.request_id, reason=str(exc))
            dead = [
                "reason",
                ErrorCode.INVALID_REQUEST,
                "message",
                str(exc),
                "id",
                request.request_id,
                "worker",
                self.name,
                "bytes",
                len(job.raw),
                "raw",
                job.raw[:DEAD_LETTER_RAW_BYTES],
            ]
            self._send_error(job, ErrorCode.INVALID_REQUEST, str(exc), dead)
            return
        job.added_at = time.monotonic()
        self.jobs[request.request_id] = job
        if request.deadline is not None:
            heapq.heappush(self.deadlines, (request.deadline, request.request_id, job.epoch))
        log.info(
            "request admitted",
            request_id=request.request_id,
            priority=request.priority.value,
            attempt=job.epoch,
            prompt_chars=len(prompt) if isinstance(prompt, str) else None,
            prompt_tokens=len(prompt) if isinstance(prompt, list) else None,
            max_tokens=params.max_tokens,
            queue_wait_s=round(job.admitted_at - request.submitted_at, 4),
        )
        log.debug("request prompt", request_id=request.request_id, prompt=prompt)

    def _expire_deadlines(self) -> None:
        now = time.time()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, request_id, epoch = heapq.heappop(self.deadlines)
            job = self.jobs.get(request_id)
            if job is not None and job.epoch == epoch:
                self._drop(job)
                log.info("request past its deadline: aborted", request_id=request_id, tokens=job.completion_tokens)
                self._send_error(job, ErrorCode.DEADLINE, "deadline passed during generation")

    # -- terminal events ------------------------------------------------------------------------------

    def _drop(self, job: Job) -> None:
        self.jobs.pop(job.request.request_id, None)
        self.engine.abort(job.request.request_id)  # frees its KV blocks now

    def _usage(self, job: Job, out: RequestOutput | None) -> dict[str, Any]:
        submitted = job.request.submitted_at or job.admitted_at
        usage: dict[str, Any] = {
            "prompt_tokens": len(out.prompt_token_ids) if out is not None else 0,
            "completion_tokens": job.completion_tokens,
            "cached_tokens": out.num_cached_tokens if out is not None else 0,
            "queue_wait_s": round(max(0.0, job.admitted_at - submitted), 6),
            "total_s": round(time.time() - submitted, 6),
            "attempt": job.epoch,
        }
        if job.first_token_at is not None and job.first_token_wall is not None:
            usage["ttft_s"] = round(job.first_token_wall - submitted, 6)
            usage["engine_ttft_s"] = round(job.first_token_at - job.added_at, 6)
        if out is not None and out.spec_proposed:  # speculative decoding: drafts verified and accepted
            usage["spec_proposed_tokens"] = out.spec_proposed
            usage["spec_accepted_tokens"] = out.spec_accepted
        return usage

    def _send_done(self, job: Job, finish_reason: FinishReason, out: RequestOutput | None) -> None:
        """`out` is None when the request ends without a last output from the engine (cancelled)."""
        request = job.request
        full = out if out is not None and not request.stream else None  # the whole output rides in the event
        usage = self._usage(job, out)
        payload = done_event(
            finish_reason,
            usage,
            stop_reason=out.stop_reason if out is not None else None,
            metadata=request.metadata,
            worker=self.name,
            text=full.text if full is not None else None,
            token_ids=list(full.token_ids) if full is not None else None,
            logprobs=wire_logprobs(full.logprobs, self.tokenizer) if full is not None else None,
            prompt_logprobs=wire_logprobs(out.prompt_logprobs if out is not None else None, self.tokenizer),
        )
        self.outbox.add_terminal(request.request_id, job.epoch, payload, ending=outcome(_ENDINGS[finish_reason], usage))
        self.metrics.finished(finish_reason, usage, job.first_token_at)
        log.info(
            "request finished",
            request_id=request.request_id,
            finish_reason=finish_reason.value,
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            ttft_s=usage.get("ttft_s"),
            total_s=usage["total_s"],
        )

    def _send_error(self, job: Job, code: ErrorCode, message: str, dead: list[Any] | None = None) -> None:
        payload = error_event(code, message, job.request.metadata, self.name)
        self.outbox.add_terminal(job.request.request_id, job.epoch, payload, dead)
        self.metrics.failed(code.value)

    # -- lifecycle ------------------------------------------------------------------------------------

    def _finished(self) -> bool:
        if self.signalled is not None:
            name, drain = self.signalled
            self.signalled = None
            log.info("signal received", signal=name, drain=drain)
            self.stop(drain)
        if not self._stop.is_set():
            return False
        if time.monotonic() >= self._drain_until:
            return True
        return not self.jobs and self.inbox.empty() and self.relay.held == 0

    def _close(self) -> None:
        hand_back = bool(self.jobs) or self.relay.held > 0
        for job in list(self.jobs.values()):
            try:
                self._drop(job)
            except Exception:  # noqa: BLE001 - a failed engine may fail this too; the hand-back matters more
                log.warning("could not abort in the engine", request_id=job.request.request_id)
        self.relay.close(hand_back=hand_back)
        log.info(
            "worker stopped",
            worker=self.name,
            handed_back=hand_back,
            round_trips=self.relay.round_trips,
            **self.timing.summary(),
        )

    def _refresh_stats(self, now: float) -> None:
        stats = dict(self.engine.stats())
        generated = int(stats.get("generated_tokens", 0))
        elapsed = now - self._stats_at if self._stats_at else 0.0
        stats["tokens_per_s"] = round((generated - self._tokens_at_stats) / elapsed, 1) if elapsed else 0.0
        stats.update(self.timing.summary())
        self._stats, self._stats_at, self._tokens_at_stats = stats, now, generated
        self.metrics.engine_stats(stats)

    def _stats_snapshot(self) -> dict[str, Any]:
        return self._stats
