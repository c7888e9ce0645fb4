"""Grammar compilation off the step loop: a small thread pool, an LRU cache, and the requests that wait.

A constrained request waits here (status COMPILING, not in the scheduler) until its grammar is
ready, so a slow compile never stalls the batch. Compiled matchers are cached by the constraint's
canonical JSON; each request gets its own copy (`deep_copy`), so `n` requests asking the same thing
share one compile and never share a matcher state.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from engine.request import FinishReason, Request, RequestStatus
from engine.structured.constraint import percentile_ms
from engine.structured.spec import StructuredOutputs

COMPILE_THREADS = 2
CACHE_SIZE = 256
_WINDOW = 4096


class GrammarCompiler:
    """Compiles constraints into llguidance matchers, with the model's tokenizer (built once, lazily)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._inflight: dict[str, Future[Any]] = {}
        self.compile_seconds: deque[float] = deque(maxlen=_WINDOW)
        self.cache_hits = 0
        self.cache_misses = 0

    def submit(self, spec: StructuredOutputs) -> Future[Any]:
        """A future of the compiled matcher (a template: copy it before use); done already on a cache hit."""
        key = spec.cache_key()
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                done: Future[Any] = Future()
                done.set_result(template)
                return done
            future = self._inflight.get(key)
            if future is not None:
                self.cache_hits += 1  # joins the compile in flight
            else:
                self.cache_misses += 1
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="tokenrelay-grammar")
                future = self._pool.submit(self._compile, key, spec)
                self._inflight[key] = future
            return future

    def tokenizer(self) -> Any:
        """llguidance's view of the model's tokenizer (~1 s to build, so once per engine)."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=self._eos or None
                )
            return self._tokenizer

    def _compile(self, key: str, spec: StructuredOutputs) -> Any:
        import llguidance

        try:
            tokenizer = self.tokenizer()
            started = time.perf_counter()
            matcher = llguidance.LLMatcher(tokenizer, spec.grammar_text(), log_level=0)
            if matcher.is_error():
                raise ValueError(f"structured_outputs.{spec.kind}: {' '.join(matcher.get_error().split())[:600]}")
            self.compile_seconds.append(time.perf_counter() - started)
            with self._lock:
                self._cache[key] = matcher
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            return matcher
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class GrammarWaitlist:
    """Requests whose grammar is compiling. `poll` hands back those ready to schedule and those that
    failed (finished with FinishReason.ERROR and a message in `request.error`)."""

    def __init__(self, compiler: GrammarCompiler, timeout_s: float) -> None:
        self.compiler = compiler
        self.timeout_s = timeout_s
        self._waiting: dict[str, tuple[Request, Future[Any], float]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._waiting

    def add(self, request: Request) -> bool:
        """Start compiling; True when the grammar was cached and the request may be scheduled now."""
        spec = request.params.structured_outputs
        assert spec is not None and request.constraint is not None
        future = self.compiler.submit(spec)
        if future.done() and future.exception() is None:
            request.constraint.matcher = future.result().deep_copy()
            return True
        request.status = RequestStatus.COMPILING
        self._waiting[request.request_id] = (request, future, time.monotonic())
        return False

    def stats(self) -> dict[str, Any]:
        compiler = self.compiler
        compiles = sorted(compiler.compile_seconds)
        return {
            "compiles": len(compiles),
            "compile_ms_p50": percentile_ms(compiles, 50),
            "compile_ms_p99": percentile_ms(compiles, 99),
            "grammar_cache_hits": compiler.cache_hits,
            "grammar_cache_misses": compiler.cache_misses,
            "waiting_for_grammar": len(self._waiting),
        }

    def remove(self, request_id: str) -> Request | None:
        item = self._waiting.pop(request_id, None)
        return item[0] if item else None

    def wait(self, timeout_s: float) -> None:
        """Block until some compile finishes (or the timeout): for a step with nothing else to do."""
        if self._waiting:
            wait([f for _, f, _ in self._waiting.values()], timeout=timeout_s, return_when="FIRST_COMPLETED")

    def poll(self) -> tuple[list[Request], list[Request]]:
        ready: list[Request] = []
        failed: list[Request] = []
        now = time.monotonic()
        for request_id, (request, future, since) in list(self._waiting.items()):
            if future.done():
                error = future.exception()
                if error is None:
                    assert request.constraint is not None
                    request.constraint.matcher = future.result().deep_copy()
                    request.status = RequestStatus.WAITING
                    ready.append(request)
                else:
                    message = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
                    failed.append(_fail(request, message))
            elif now - since > self.timeout_s:
                failed.append(_fail(request, f"structured_outputs: grammar compilation took over {self.timeout_s} s"))
            else:
                continue
            del self._waiting[request_id]
        return ready, failed


def _fail(request: Request, message: str) -> Request:
    request.status = RequestStatus.FINISHED
    request.finish_reason = FinishReason.ERROR
    request.error = message if message.startswith("structured_outputs") else f"structured_outputs: {message}"
    return request
