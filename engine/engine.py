"""LLMEngine: add requests, step (schedule, run, sample, postprocess), abort."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import structlog
import torch

from engine.config import EngineConfig, SamplingParams
from engine.cpu_threads import ThreadGovernor
from engine.detokenize import IncrementalDetokenizer
from engine.kv_cache import KVCacheManager
from engine.memory import HeapTrimmer
from engine.models.prepare import PreparedModel, prepare_model
from engine.offload import LayerOffloader
from engine.omp import SPIN_SETTING
from engine.request import FinishReason, Request, RequestOutput, RequestStatus, TokenLogprob
from engine.runner import ModelRunner
from engine.sampler import Sampler
from engine.scheduler import Scheduler
from engine.speculative import DraftState, NgramProposer
from engine.structured.compiler import GrammarCompiler, GrammarWaitlist
from engine.structured.constraint import TokenConstraint, accept_token
from engine.structured.spec import check_vocab
from engine.swap import HostBlockPool, PreemptionMode, SwapPolicy, default_costs

log = structlog.get_logger(__name__)

Prompt = str | list[int]


class LLMEngine:
    """The step loop. Not thread-safe: one thread drives it (AsyncLLM and the worker do so)."""

    def __init__(self, config: EngineConfig) -> None:
        started = time.monotonic()
        self.config = config
        self.prepared = prepared = prepare_model(config)
        self.tokenizer = prepared.loaded.tokenizer
        self.eos_token_ids = prepared.loaded.eos_token_ids
        self.vocab_size = prepared.loaded.vocab_size
        self.max_model_len = prepared.max_model_len
        self.kv = KVCacheManager(prepared.num_blocks, config.block_size, config.enable_prefix_caching)
        swap = _swap_policy(config, prepared)
        self.scheduler = Scheduler(
            self.kv,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            watermark_blocks=max(1, prepared.num_blocks // 100),
            swap=swap,
            max_draft_tokens=config.max_speculative_tokens_per_step,
        )
        self.runner = _model_runner(prepared, config.block_size)
        if swap.pool is not None:
            self.runner.allocate_swap_space(swap.pool.num_blocks)
        self.sampler = Sampler(prepared.loaded.vocab_size, config.seed)
        self.proposer = NgramProposer.from_config(config, self.max_model_len)
        # Structured outputs: requests wait here, outside the scheduler, until their grammar compiles.
        compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.grammars = GrammarWaitlist(compiler, config.grammar_compile_timeout_s)
        self.num_generated_tokens = 0
        self.threads: ThreadGovernor | None = None
        if config.adaptive_threads and prepared.device.type == "cpu" and torch.get_num_threads() > 1:
            self.threads = ThreadGovernor(torch.get_num_threads())
        self.heap = HeapTrimmer(config.host_memory_trim_s if prepared.allocator_tuned else 0.0)
        log.info(
            "engine ready",
            **prepared.summary(),
            seconds=round(time.monotonic() - started, 2),
            openmp_spin=SPIN_SETTING or "libgomp's default (torch was imported before engine)",
            config={k: v for k, v in asdict(config).items() if v is not None},
        )

    # -- requests ---------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> Request:
        """Queue a request. Raises ValueError (naming the field) for anything that could not run."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id: must be a non-empty string")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority: must be an integer, got {priority!r}")
        token_ids = self.encode(prompt)
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(token_ids)} tokens leave no room to generate within the context of "
                f"{self.max_model_len} tokens"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer, and this model folder has none")
        if params.structured_outputs is not None and self.tokenizer is None:
            raise ValueError("structured_outputs: needs a tokenizer, and this model folder has none")
        if request_id in self.scheduler.requests or request_id in self.grammars:
            raise ValueError(f"request_id: {request_id!r} is already in the engine")
        check_vocab(params.logit_bias, params.allowed_token_ids, self.vocab_size)
        request = Request(request_id, token_ids, params, priority=priority, eos_token_ids=self.eos_token_ids)
        if arrival_time is not None:
            request.arrival_time = arrival_time
        if params.seed is not None:
            request.generator = torch.Generator().manual_seed(params.seed)
        if self.tokenizer is not None:
            request.detokenizer = IncrementalDetokenizer(
                self.tokenizer, token_ids, params.stop, params.include_stop_str_in_output, params.skip_special_tokens
            )
        if params.logprobs is not None:
            request.logprobs = []
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        if self.proposer is not None and self.proposer.applies_to(params):
            request.draft_state = DraftState()
        if params.constrained:
            request.constraint = TokenConstraint(params, self.vocab_size)
            if params.structured_outputs is not None and not self.grammars.add(request):
                return request  # compiling; step() schedules it once its grammar is ready
        self.scheduler.add(request)
        return request

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: this model folder has no tokenizer; send token ids instead of text")
            token_ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        elif isinstance(prompt, (list, tuple)):
            token_ids = list(prompt)
            bad = next(
                (t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size),
                None,
            )
            if bad is not None:
                raise ValueError(f"prompt: token id {bad!r} is not an integer in [0, {self.vocab_size})")
        else:
            raise ValueError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt: is empty")
        return token_ids

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; its final output, or None if it is not here."""
        request = self.scheduler.requests.get(request_id)
        if request is not None:
            self.scheduler.finish(request, FinishReason.ABORT)
        elif (request := self.grammars.remove(request_id)) is not None:
            request.status, request.finish_reason = RequestStatus.FINISHED, FinishReason.ABORT
        else:
            return None
        return self._output(request, [], None)

    def has_unfinished(self) -> bool:
        return len(self.scheduler) > 0 or len(self.grammars) > 0

    @property
    def num_free_slots(self) -> int:
        """How many more requests the engine would take right now (what a worker may read)."""
        return max(0, self.config.max_num_seqs - len(self.scheduler) - len(self.grammars))

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self.threads is not None:
            self.threads.tick()
        failed = self._admit_compiled() if len(self.grammars) else []
        outputs = self._run_step()
        self.heap.tick()
        return failed + outputs if failed else outputs

    def _admit_compiled(self) -> list[RequestOutput]:
        """Requests whose grammar is ready join the scheduler; those whose compile failed end here."""
        if not self.scheduler.requests:
            self.grammars.wait(0.005)  # nothing else to run: wait a little rather than spin
        ready, failed = self.grammars.poll()
        for request in ready:
            self.scheduler.add(request)
        return [self._output(request, [], None) for request in failed]

    def _run_step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        # Before the forward pass, and even when nothing runs: freed blocks may be reused next step.
        self.runner.copy_blocks(batch.swap_out, batch.swap_in)
        if not batch:
            return []
        result = self.runner.execute(batch)
        for request, n in zip(batch.requests, batch.num_tokens, strict=True):
            # Draft tokens count as computed (and their blocks as cacheable) only once verified.
            request.num_computed_tokens += n - len(request.spec_token_ids)
            self.kv.cache_full_blocks(request)
        for scores in result.prompt_scores:
            scores.append_to_request()
        if not result.sampling_requests:
            return []
        now = time.monotonic()
        outputs = []
        for request, token_ids, logprobs in self._sample(result.logits, result.sampling_requests):
            if request.first_token_time is None:
                request.first_token_time = now
            outputs.append(self._append_tokens(request, token_ids, logprobs))
        return outputs

    def _sample(
        self, logits: torch.Tensor, requests: list[Request]
    ) -> list[tuple[Request, list[int], list[TokenLogprob | None]]]:
        """Each sampling request's new tokens: one, or (verifying drafts) the accepted ones plus one."""
        if not any(r.spec_token_ids for r in requests):
            sampled = self.sampler(logits, requests)
            return [(r, [t], [lp]) for r, t, lp in zip(requests, sampled.token_ids, sampled.logprobs, strict=True)]
        plain: list[Request] = []
        plain_rows: list[int] = []
        speculating: list[Request] = []
        spec_rows: list[int] = []
        row = 0
        for request in requests:
            n = 1 + len(request.spec_token_ids)
            if n == 1:
                plain.append(request)
                plain_rows.append(row)
            else:
                speculating.append(request)
                spec_rows.extend(range(row, row + n))
            row += n
        picked: dict[str, tuple[list[int], list[TokenLogprob | None]]] = {}
        if plain:
            sampled = self.sampler(logits[plain_rows], plain)
            for request, token_id, logprob in zip(plain, sampled.token_ids, sampled.logprobs, strict=True):
                picked[request.request_id] = ([token_id], [logprob])
        assert self.proposer is not None
        for request, verified in zip(speculating, self.sampler.verify(logits[spec_rows], speculating), strict=True):
            self.proposer.record(request, len(request.spec_token_ids), verified.num_accepted)
            picked[request.request_id] = (verified.token_ids, verified.logprobs)
        return [(r, *picked[r.request_id]) for r in requests]

    def _append_tokens(
        self, request: Request, token_ids: list[int], logprobs: list[TokenLogprob | None]
    ) -> RequestOutput:
        """Append in order, each token checked against the stop conditions: nothing past a stop."""
        emitted = 0
        for token_id, logprob in zip(token_ids, logprobs, strict=True):
            emitted += 1
            if self._append_token(request, token_id, logprob):
                break
        self.num_generated_tokens += emitted
        if request.spec_token_ids:
            if not request.is_finished:
                # The accepted drafts' K/V, written this step, are valid; roll back the rest.
                request.num_computed_tokens += emitted - 1
                self.kv.cache_full_blocks(request)
                self.kv.trim(request)
            request.spec_token_ids = []
        if self.proposer is not None and not request.is_finished:
            request.spec_token_ids = self.proposer.propose(request)
        new_logprobs = [lp for lp in logprobs[:emitted] if lp is not None]
        return self._output(request, token_ids[:emitted], new_logprobs or None)

    def _append_token(self, request: Request, token_id: int, logprob: TokenLogprob | None) -> bool:
        """Append one token; True when it ended the request."""
        params = request.params
        request.output_token_ids.append(token_id)
        if request.logprobs is not None and logprob is not None:
            request.logprobs.append(logprob)
        reason: FinishReason | None = None
        if not params.ignore_eos and token_id in request.eos_token_ids:
            reason, request.stop_reason = FinishReason.STOP, None
        elif token_id in params.stop_token_ids:
            reason, request.stop_reason = FinishReason.STOP, token_id
        elif request.detokenizer is not None:
            stop = request.detokenizer.add_token(token_id)
            if stop is not None:
                reason, request.stop_reason = FinishReason.STOP, stop
        if reason is None and request.constraint is not None:
            reason = accept_token(request, token_id)  # the grammar's own end (e.g. a schema's closing brace)
        if reason is None and (
            len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= self.max_model_len
        ):
            reason = FinishReason.LENGTH
        if reason is not None:
            self.scheduler.finish(request, reason)
        return reason is not None

    def _output(
        self, request: Request, new_token_ids: list[int], new_logprobs: list[TokenLogprob] | None
    ) -> RequestOutput:
        finished = request.is_finished
        detok = request.detokenizer
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=list(request.output_token_ids),
            new_token_ids=new_token_ids,
            text=detok.text if detok else "",
            new_text=detok.take_new_text(finished) if detok else "",
            finished=finished,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            logprobs=request.logprobs,
            new_logprobs=new_logprobs,
            prompt_logprobs=request.prompt_logprobs,
            num_cached_tokens=request.num_cached_tokens,
            spec_proposed=request.spec_proposed,
            spec_accepted=request.spec_accepted,
            error=request.error,
        )

    # -- introspection ----------------------------------------------------------------------------

    @property
    def model_path(self) -> Path:
        return self.prepared.loaded.path

    @property
    def device(self) -> torch.device:
        return self.prepared.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prepared.dtype

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.prepared.kv_dtype

    @property
    def attention_backend(self) -> str:
        return self.prepared.backend.name

    @property
    def fused_layers(self) -> int:
        return self.prepared.fused_layers

    @property
    def offloaded(self) -> list[LayerOffloader]:
        return self.prepared.offloaded

    def stats(self) -> dict[str, Any]:
        kv = self.kv
        return {
            "running": self.scheduler.num_running,
            "waiting": self.scheduler.num_waiting,
            "kv_blocks_total": kv.pool.num_blocks,
            "kv_blocks_used": kv.pool.num_used,
            "prefix_cache_hit_rate": kv.prefix_hits / kv.prefix_queries if kv.prefix_queries else 0.0,
            "preemptions": self.scheduler.num_preemptions,
            "swapped_out": self.scheduler.swap.num_swapped_out if self.scheduler.swap else 0,
            "generated_tokens": self.num_generated_tokens,
            "threads": self.threads.threads if self.threads is not None else torch.get_num_threads(),
            "thread_changes": self.threads.changes if self.threads is not None else 0,
            **(self.proposer.stats() if self.proposer is not None else {}),
            # Mask time per step and compile time (ms, p50/p99 over recent windows), grammar cache use.
            "structured": {**self.sampler.constraints.stats(), **self.grammars.stats()},
        }


def _swap_policy(config: EngineConfig, prepared: PreparedModel) -> SwapPolicy:
    loaded = prepared.loaded
    swap_blocks = int(config.swap_space_gb * 2**30) // prepared.block_bytes
    costs = default_costs(
        prepared.device.type,
        loaded.num_params,
        loaded.num_layers,
        loaded.num_heads,
        loaded.head_dim,
        prepared.block_bytes,
    )
    pool = HostBlockPool(swap_blocks) if swap_blocks else None
    return SwapPolicy(PreemptionMode(config.preemption_mode), pool, costs)


def _model_runner(prepared: PreparedModel, block_size: int) -> ModelRunner:
    loaded = prepared.loaded
    return ModelRunner(
        prepared.adapter,
        prepared.backend,
        prepared.num_blocks,
        block_size,
        loaded.num_layers,
        loaded.num_kv_heads,
        loaded.head_dim,
        prepared.dtype,
        prepared.device,
        prepared.kv_dtype,
    )
