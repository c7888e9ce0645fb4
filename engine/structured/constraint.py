"""Per-request token constraints and their application to a batch of logits (in place, on a copy).

Order within a row (after the penalties, before min_tokens and temperature/top-k/top-p/min-p):
logit_bias, then the grammar's mask, then allowed_token_ids. allowed_token_ids yields to the
grammar: where the two leave nothing in common, the grammar's mask alone applies (a row is never
left with nothing to sample). Speculative decoding must stay off for requests with a constraint:
the matcher advances one sampled token at a time and is never rolled back here.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.request import FinishReason, Request

if TYPE_CHECKING:
    from engine.config import SamplingParams

_WINDOW = 4096  # mask timings kept for the percentiles in stats()
_PARALLEL_ROWS, _PARALLEL_CPUS = 32, 8  # below either, masks are filled in the calling thread


class TokenConstraint:
    """A request's logit_bias and allowed_token_ids as tensors, and its grammar matcher (llguidance's
    LLMatcher; None until its grammar is compiled, or when it has no grammar)."""

    __slots__ = ("bias_ids", "bias_values", "allowed", "matcher")

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.bias_ids: torch.Tensor | None = None
        self.bias_values: torch.Tensor | None = None
        self.allowed: torch.Tensor | None = None
        self.matcher: Any = None
        if params.logit_bias:
            self.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
            self.bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float64)
        if params.allowed_token_ids:
            self.allowed = torch.zeros(vocab_size, dtype=torch.bool)
            self.allowed[params.allowed_token_ids] = True


def accept_token(request: Request, token_id: int) -> FinishReason | None:
    """Advance the request's matcher by its sampled token: STOP when the grammar is complete and
    takes nothing more, ERROR (with `request.error`) if the token broke it (a bug, not user input)."""
    matcher = request.constraint.matcher if request.constraint is not None else None
    if matcher is None:
        return None
    if not matcher.consume_token(token_id) or matcher.is_error():
        request.error = f"structured_outputs: the grammar rejected token {token_id}: {matcher.get_error()[:300]}"
        return FinishReason.ERROR
    return FinishReason.STOP if matcher.is_stopped() else None


class LogitsConstraints:
    """Applies the rows' constraints to a step's logits; owns the reused token bitmask and mask timings."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._words = (vocab_size + 31) // 32
        self._bitmask = np.full((0, self._words), -1, dtype=np.int32)
        self._executor: Any = None
        self.mask_seconds: deque[float] = deque(maxlen=_WINDOW)
        self.masked_rows = 0

    def apply(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        started = time.perf_counter()
        logits = logits.clone()  # the runner's tensor stays as the model produced it
        device = logits.device
        grammar_rows: list[int] = []
        matchers: list[tuple[Any, int]] = []
        for i, r in enumerate(requests):
            c = r.constraint
            if c is None:
                continue
            if c.bias_ids is not None and c.bias_values is not None:
                ids = c.bias_ids.to(device)
                logits[i, ids] += c.bias_values.to(device=device, dtype=logits.dtype)
            if c.matcher is not None:
                matchers.append((c.matcher, len(grammar_rows)))
                grammar_rows.append(i)
        if grammar_rows:
            self._apply_grammar(logits, grammar_rows, matchers, requests)
            self.masked_rows += len(grammar_rows)
        for i, r in enumerate(requests):
            c = r.constraint
            if c is not None and c.allowed is not None:
                restricted = logits[i].masked_fill(~c.allowed.to(device), float("-inf"))
                if torch.isfinite(restricted).any():
                    logits[i] = restricted
        if grammar_rows:
            self.mask_seconds.append(time.perf_counter() - started)
        return logits

    def _apply_grammar(
        self, logits: torch.Tensor, rows: list[int], matchers: list[tuple[Any, int]], requests: list[Request]
    ) -> None:
        import llguidance
        import llguidance.numpy

        if self._bitmask.shape[0] < len(rows):
            self._bitmask = np.full((max(len(rows), 2 * self._bitmask.shape[0]), self._words), -1, dtype=np.int32)
        bitmask = self._bitmask[: len(rows)]
        if len(rows) >= _PARALLEL_ROWS and (os.cpu_count() or 1) >= _PARALLEL_CPUS:
            if self._executor is None:
                self._executor = llguidance.LLExecutor(num_threads=min(8, (os.cpu_count() or 1) // 2))
            llguidance.numpy.fill_next_token_bitmask_par(self._executor, matchers, bitmask)
        else:
            # A mask takes microseconds; on a small host llguidance's worker threads would only
            # contend with torch's (both spin while idle) and slow the forward pass that follows.
            for matcher, row in matchers:
                llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, row)
        # Token t is bit t % 32 of word t // 32: as little-endian bytes, bit t counting low bits first.
        as_bytes = bitmask.astype("<i4", copy=False).view(np.uint8)
        bits = np.unpackbits(as_bytes, axis=1, count=logits.shape[1], bitorder="little")
        banned = torch.from_numpy(bits).view(torch.bool).logical_not_().to(logits.device)
        every_row = len(rows) == logits.shape[0]
        index = torch.tensor(rows, device=logits.device)
        unmasked = logits if every_row else logits[index]
        masked = unmasked.masked_fill(banned, float("-inf"))
        # Only a matcher in its error state allows nothing, and accept_token ends such a request as
        # soon as it breaks; should one get here anyway, EOS stays open so the row can still sample.
        for row in np.flatnonzero(~bitmask.any(axis=1)).tolist():
            eos = sorted(requests[rows[row]].eos_token_ids) or [0]
            masked[row, eos] = unmasked[row, eos]
        if every_row:
            logits.copy_(masked)
        else:
            logits[index] = masked

    def stats(self) -> dict[str, Any]:
        seconds = sorted(self.mask_seconds)
        return {
            "mask_steps": len(seconds),
            "masked_rows": self.masked_rows,
            "mask_ms_p50": percentile_ms(seconds, 50),
            "mask_ms_p99": percentile_ms(seconds, 99),
        }


def percentile_ms(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return round(ordered[rank] * 1000, 4)
