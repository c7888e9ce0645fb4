"""Vectorised sampling over the batch: penalties, temperature, top-k/top-p/min-p, seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import Request, TokenLogprob
from engine.structured.constraint import LogitsConstraints


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


@dataclass(slots=True)
class Verified:
    """One speculating request's tokens of a step: its accepted drafts, then one sampled token."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    num_accepted: int


class Sampler:
    """Picks one token per row of `logits` (one row per request that samples this step)."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self._generator = torch.Generator()
        self._generator.manual_seed(seed)
        self.constraints = LogitsConstraints(vocab_size)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if any(r.params.needs_penalties for r in requests):
            logits = apply_penalties(logits.clone(), requests)
        if any(r.constraint is not None for r in requests):
            logits = self.constraints.apply(logits, requests)  # logit_bias, grammar mask, allowed_token_ids
        logits = self._mask_early_stops(logits, requests)

        raw_logprobs = None
        if any(r.params.logprobs is not None for r in requests):
            raw_logprobs = torch.log_softmax(logits, dim=-1)

        greedy = [r.params.greedy for r in requests]
        if all(greedy):
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = self._sample(logits, requests, greedy)
        ids = token_ids.tolist()
        return SampleResult(ids, _gather_logprobs(raw_logprobs, ids, requests))

    def _mask_early_stops(
        self, logits: torch.Tensor, requests: list[Request], num_outputs: list[int] | None = None
    ) -> torch.Tensor:
        """min_tokens: EOS and stop token ids are not allowed before it is reached. Row i would be
        output token `num_outputs[i]` (default: the request's next one)."""
        rows: list[int] = []
        cols: list[int] = []
        for i, r in enumerate(requests):
            if (num_outputs[i] if num_outputs else len(r.output_token_ids)) < r.params.min_tokens:
                banned = set(r.params.stop_token_ids) | (set() if r.params.ignore_eos else set(r.eos_token_ids))
                for token_id in banned:
                    if token_id < self.vocab_size:
                        rows.append(i)
                        cols.append(token_id)
        if rows:
            unbanned, logits = logits, logits.clone()
            logits[rows, cols] = float("-inf")
            if any(requests[i].constraint is not None for i in set(rows)):
                # A grammar that can only end now wins over min_tokens: no row is left with nothing allowed.
                emptied = ~torch.isfinite(logits).any(dim=-1)
                logits[emptied] = unbanned[emptied]
        return logits

    def _sample(self, logits: torch.Tensor, requests: list[Request], greedy: list[bool]) -> torch.Tensor:
        device = logits.device
        probs = self._probs(logits, requests)

        # Exponential race (argmax p/q, q ~ Exp(1)) equals a categorical draw; a seeded request draws
        # from its own generator so its output does not depend on what else is in the batch.
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(requests) if r.generator is None]
        if unseeded:
            noise[unseeded] = (
                torch.empty(len(unseeded), probs.shape[1], dtype=probs.dtype)
                .exponential_(generator=self._generator)
                .to(device)
            )
        for i, r in enumerate(requests):
            if r.generator is not None:
                noise[i] = torch.empty(probs.shape[1], dtype=probs.dtype).exponential_(generator=r.generator).to(device)
        sampled = (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
        if any(greedy):
            sampled = torch.where(torch.tensor(greedy, device=device), logits.argmax(dim=-1), sampled)
        return sampled

    def _probs(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Temperature, top-k/top-p and min-p applied: the distribution a token is drawn from (min-p
        zeroes entries without renormalising)."""
        device = logits.device
        temperature = torch.tensor([r.params.temperature or 1.0 for r in requests], dtype=logits.dtype, device=device)
        scaled = logits / temperature[:, None]
        top_k = [r.params.top_k if r.params.top_k > 0 else 0 for r in requests]
        top_p = [r.params.top_p for r in requests]
        min_p = [r.params.min_p for r in requests]
        if any(top_k) or any(p < 1.0 for p in top_p):
            scaled = apply_top_k_top_p(scaled, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)
        if any(m > 0 for m in min_p):
            threshold = torch.tensor(min_p, dtype=probs.dtype, device=device)[:, None] * probs.amax(-1, keepdim=True)
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs

    def verify(self, logits: torch.Tensor, requests: list[Request]) -> list[Verified]:
        """Speculative decoding: request i owns `1 + len(spec_token_ids)` consecutive rows of `logits`,
        row j scoring the position after its j-th draft token. Accepts the longest agreeing prefix of
        the drafts plus one token, so that the output has the law of plain sampling.

        Greedy: a draft is accepted when it is the argmax. Sampled (the rejection rule for a draft
        that is a point mass): draft x is accepted with probability p(x) under the processed
        distribution p; on rejection a token is drawn from p with x removed, renormalised; after
        all drafts, one more from the last row. Penalties depend on every earlier output token,
        so requests with penalties never speculate (engine.speculative) and are not handled here.
        """
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        rows = [1 + len(r.spec_token_ids) for r in requests]
        row_requests = [r for r, n in zip(requests, rows, strict=True) for _ in range(n)]
        num_outputs = [len(r.output_token_ids) + j for r, n in zip(requests, rows, strict=True) for j in range(n)]
        logits = self._mask_early_stops(logits, row_requests, num_outputs)
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in requests):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        argmax = logits.argmax(dim=-1).tolist()
        sampled_rows = [i for i, r in enumerate(row_requests) if not r.params.greedy]
        probs: torch.Tensor | None = None
        if sampled_rows:
            probs = self._probs(logits[sampled_rows], [row_requests[i] for i in sampled_rows]).cpu()
            probs /= probs.sum(dim=-1, keepdim=True)
        results = []
        row = sampled = 0
        for r, n in zip(requests, rows, strict=True):
            drafts = r.spec_token_ids
            if r.params.greedy:
                accepted = 0
                while accepted < n - 1 and argmax[row + accepted] == drafts[accepted]:
                    accepted += 1
                token_ids = argmax[row : row + accepted + 1]
            else:
                assert probs is not None
                token_ids = _rejection_sample(probs[sampled : sampled + n], drafts, r.generator or self._generator)
                sampled += n
            logprobs: list[TokenLogprob | None] = [None] * len(token_ids)
            if raw_logprobs is not None and r.params.logprobs is not None:
                logprobs = [
                    _token_logprob(raw_logprobs[row + j], t, r.params.logprobs) for j, t in enumerate(token_ids)
                ]
            results.append(Verified(token_ids, logprobs, len(token_ids) - 1))
            row += n
        return results


def _rejection_sample(probs: torch.Tensor, drafts: list[int], generator: torch.Generator) -> list[int]:
    """probs [1 + len(drafts), vocab], normalised rows, on the CPU (where the generators live)."""
    token_ids: list[int] = []
    for j, draft in enumerate(drafts):
        if float(torch.rand((), dtype=probs.dtype, generator=generator)) < float(probs[j, draft]):
            token_ids.append(draft)
            continue
        residual = probs[j].clone()
        residual[draft] = 0.0
        token_ids.append(_draw(residual, generator))
        return token_ids
    token_ids.append(_draw(probs[len(drafts)], generator))
    return token_ids


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """One categorical draw from unnormalised `weights` (the exponential race, as the batch path)."""
    noise = torch.empty_like(weights).exponential_(generator=generator)
    return int((weights / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax())


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Repetition penalty (over prompt and output, as transformers does) and OpenAI presence /
    frequency penalties (over output tokens only). Modifies `logits` in place."""
    vocab = logits.shape[1]
    device = logits.device
    for i, r in enumerate(requests):
        p = r.params
        if not p.needs_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({t for t in r.all_token_ids if t < vocab}), dtype=torch.long, device=device)
            if len(seen):
                row = logits[i, seen]
                logits[i, seen] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and r.output_token_ids:
            out = torch.tensor([t for t in r.output_token_ids if t < vocab], dtype=torch.long, device=device)
            counts = torch.zeros(vocab, dtype=logits.dtype, device=device).scatter_add_(
                0, out, torch.ones_like(out, dtype=logits.dtype)
            )
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask everything outside each row's top-k, then outside the smallest set whose mass reaches top-p."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    device = logits.device
    k = torch.tensor([kk if 0 < kk < vocab else vocab for kk in top_k], device=device)
    ranks = torch.arange(vocab, device=device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    p = torch.tensor(top_p, dtype=logits.dtype, device=device)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill((mass_before >= p[:, None]) & (p[:, None] < 1.0), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits)


def _gather_logprobs(
    logprobs: torch.Tensor | None, token_ids: list[int], requests: list[Request]
) -> list[TokenLogprob | None]:
    if logprobs is None:
        return [None] * len(requests)
    result: list[TokenLogprob | None] = []
    for i, r in enumerate(requests):
        n = r.params.logprobs
        if n is None:
            result.append(None)
            continue
        result.append(_token_logprob(logprobs[i], token_ids[i], n))
    return result


def _token_logprob(logprobs: torch.Tensor, token_id: int, top_n: int) -> TokenLogprob:
    top: dict[int, float] = {}
    if top_n > 0:
        values, indices = logprobs.topk(top_n)
        top = dict(zip(indices.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id, float(logprobs[token_id]), top)
