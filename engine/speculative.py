"""Speculative decoding's drafts: n-gram prompt lookup over a request's own tokens, with back-off.

After a request samples, the proposer looks for the most recent earlier occurrence of its last
n tokens (n from `ngram_prompt_lookup_max` down to `..._min`) in its prompt and output and
proposes the k tokens that followed it. The next step verifies them in the same forward pass
as everything else (Sampler.verify); the engine then rolls back what was rejected.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.config import EngineConfig, SamplingParams
from engine.request import Request

# Back-off: over the last WINDOW rounds with drafts, if fewer than MIN_ACCEPT_RATE of the draft
# tokens were accepted, stop proposing for a pause that doubles (up to MAX_PAUSE steps) for as
# long as the request keeps refusing its drafts. A draft costs a token of compute: on text that
# never repeats, speculation must switch itself off.
WINDOW = 4
MIN_ACCEPT_RATE = 0.125
MIN_PAUSE = 8
MAX_PAUSE = 256
# Earlier occurrences of the shortest n-gram examined for a longer match (bounds the work per step).
MAX_CANDIDATES = 8
# A step's fixed cost (reading the weights, Python) in rows of compute: ~30 ms against ~2.4 ms a row,
# measured by thread CPU time for the default model on this machine's CPUs (fp32). A GPU's would be
# far larger (decode stays memory-bound for hundreds of rows); it is a constant, not measured online.
FIXED_COST_ROWS = 12.0
# How fast the per-request acceptance estimate forgets (weight of the past per round).
ACCEPTANCE_DECAY = 0.8


@dataclass(slots=True)
class DraftState:
    """One request's lookup index and back-off state."""

    tokens: list[int] = field(default_factory=list)  # prompt and output so far, as indexed
    # shortest n-gram -> positions of the token that followed each occurrence, oldest first
    index: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    recent: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=WINDOW))
    paused_for: int = 0
    next_pause: int = MIN_PAUSE
    # P(a draft token is accepted | the one before it was), as decayed counts (prior: one in two)
    accepted_weight: float = 1.0
    tried_weight: float = 2.0

    def draft_length(self, num_decodes: int, limit: int) -> int:
        """How many drafts pay for themselves in a step of `num_decodes` decodes. Draft j costs a
        row; it saves, if accepted (probability a**j), a share of a step: FIXED_COST_ROWS /
        num_decodes rows plus its own. The more decodes share a step, the surer a draft must be."""
        rate = self.accepted_weight / self.tried_weight
        threshold = 1.0 / (1.0 + FIXED_COST_ROWS / max(1, num_decodes))
        length, reach = 0, rate
        while length < limit and reach > threshold:
            length += 1
            reach *= rate
        return length


class NgramProposer:
    """Proposes drafts for requests that speculate and keeps the engine-wide counts."""

    def __init__(self, num_tokens: int, lookup_min: int, lookup_max: int, max_model_len: int) -> None:
        self.num_tokens = num_tokens
        self.lookup_min = lookup_min
        self.lookup_max = lookup_max
        self.max_model_len = max_model_len
        self.num_proposed = 0  # draft tokens verified
        self.num_accepted = 0
        self.num_rounds = 0  # request-steps that verified drafts

    @classmethod
    def from_config(cls, config: EngineConfig, max_model_len: int) -> NgramProposer | None:
        if config.speculative is None:
            return None
        return cls(
            config.num_speculative_tokens, config.ngram_prompt_lookup_min, config.ngram_prompt_lookup_max, max_model_len
        )

    @staticmethod
    def applies_to(params: SamplingParams) -> bool:
        # Penalties make each position's distribution depend on the drafts before it; the verifier
        # does not model that, so such requests decode one token at a time. A constrained request's drafts
        # would not pass through its grammar's mask: it does not speculate either.
        return params.speculative is not False and not params.needs_penalties and not params.constrained

    def propose(self, request: Request) -> list[int]:
        """Drafts for the request's next step (it must be decoding: one token left to compute)."""
        state = request.draft_state
        if state is None:
            return []
        if state.paused_for > 0:
            state.paused_for -= 1
            return []
        # Never draft past max_tokens (the step emits up to drafts + 1 tokens) or the context.
        limit = min(
            self.num_tokens,
            request.params.max_tokens - len(request.output_token_ids) - 1,
            self.max_model_len - request.num_tokens,
        )
        if limit <= 0:
            return []
        self._index(state, request)
        tokens, n = state.tokens, self.lookup_min
        end = len(tokens)
        if end <= n:
            return []
        positions = state.index.get(tuple(tokens[end - n :]))
        if not positions:
            return []
        best, best_len = positions[-1], 0
        for follow in reversed(positions[-MAX_CANDIDATES:]):
            length = n
            while (
                length < self.lookup_max
                and follow - length > 0
                and tokens[follow - length - 1] == tokens[end - length - 1]
            ):
                length += 1
            if length > best_len:
                best, best_len = follow, length
                if length == self.lookup_max:
                    break
        # A match close to the end overlaps what it predicts (a loop of period end - best): the
        # continuation runs on into the draft itself.
        drafts = tokens[best : best + limit]
        while len(drafts) < limit:
            drafts.append(drafts[len(drafts) - (end - best)])
        return drafts

    def _index(self, state: DraftState, request: Request) -> None:
        """Bring the index up to the request's tokens (only what was added since the last call)."""
        tokens, n = state.tokens, self.lookup_min
        start = len(tokens)
        num_prompt = request.num_prompt_tokens
        if start < num_prompt:
            tokens.extend(request.prompt_token_ids[start:])
        tokens.extend(request.output_token_ids[max(0, len(tokens) - num_prompt) :])
        index = state.index
        for follow in range(max(n, start), len(tokens)):
            key = tuple(tokens[follow - n : follow])
            found = index.get(key)
            if found is None:
                index[key] = [follow]
            else:
                found.append(follow)

    def record(self, request: Request, num_proposed: int, num_accepted: int) -> None:
        """Count a verification round and decide whether the request should keep drafting."""
        request.spec_proposed += num_proposed
        request.spec_accepted += num_accepted
        self.num_proposed += num_proposed
        self.num_accepted += num_accepted
        self.num_rounds += 1
        state = request.draft_state
        assert state is not None
        state.accepted_weight = ACCEPTANCE_DECAY * state.accepted_weight + num_accepted
        state.tried_weight = ACCEPTANCE_DECAY * state.tried_weight + num_accepted + (num_accepted < num_proposed)
        state.recent.append((num_proposed, num_accepted))
        if len(state.recent) < WINDOW:
            return
        proposed = sum(p for p, _ in state.recent)
        accepted = sum(a for _, a in state.recent)
        if accepted < MIN_ACCEPT_RATE * proposed:
            state.paused_for = state.next_pause
            state.next_pause = min(2 * state.next_pause, MAX_PAUSE)
            state.recent.clear()
        else:
            state.next_pause = MIN_PAUSE

    def stats(self) -> dict[str, float | int]:
        return {
            "spec_proposed_tokens": self.num_proposed,
            "spec_accepted_tokens": self.num_accepted,
            "spec_acceptance_rate": self.num_accepted / self.num_proposed if self.num_proposed else 0.0,
            "spec_rounds": self.num_rounds,
        }
