"""NoopEngine: the engine contract with no model, one token per request per step (queue load tests)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from engine.config import SamplingParams
from engine.request import FinishReason, RequestOutput

# engine.request imports torch only for type checking; this module stays torch-free at run time.


@dataclass(slots=True)
class _Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    arrival_time: float
    token_ids: list[int] = field(default_factory=list)


class NoopEngine:
    """Costs (almost) nothing per step, so a benchmark measures the queue, not the model.

    Text prompts count one token per whitespace-separated word. Token i of a request is
    `(prompt length + i) % vocab_size` and its text is `token_text`; it never stops early.
    To stay O(1) per token, `token_ids` in an output is the live list (not a copy) and `text`
    is filled in only when the request finishes.
    """

    tokenizer = None

    def __init__(
        self, max_num_seqs: int = 64, vocab_size: int = 32_000, step_delay_s: float = 0.0, token_text: str = " x"
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.vocab_size = vocab_size
        self.step_delay_s = step_delay_s
        self.token_text = token_text
        self.sequences: dict[str, _Sequence] = {}
        self.generated_tokens = 0

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        params = params if params is not None else SamplingParams()
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id: must be a non-empty string")
        if request_id in self.sequences:
            raise ValueError(f"request_id: {request_id!r} is already running")
        if isinstance(prompt, str):
            token_ids = [sum(map(ord, word)) % self.vocab_size for word in prompt.split()]
        elif isinstance(prompt, list) and all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            token_ids = list(prompt)
        else:
            raise ValueError(f"prompt: expected a string or token ids in [0, {self.vocab_size})")
        if not token_ids:
            raise ValueError("prompt: is empty")
        self.sequences[request_id] = _Sequence(
            request_id, token_ids, params, priority, arrival_time if arrival_time is not None else time.monotonic()
        )

    def step(self) -> list[RequestOutput]:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        outputs = []
        for seq in list(self.sequences.values()):
            token = (len(seq.prompt_token_ids) + len(seq.token_ids)) % self.vocab_size
            seq.token_ids.append(token)
            finished = len(seq.token_ids) >= seq.params.max_tokens
            if finished:
                del self.sequences[seq.request_id]
            text = self.token_text * len(seq.token_ids) if finished else ""
            outputs.append(
                RequestOutput(
                    seq.request_id,
                    seq.prompt_token_ids,
                    seq.token_ids,
                    [token],
                    text,
                    self.token_text,
                    finished,
                    FinishReason.LENGTH if finished else None,
                )
            )
        self.generated_tokens += len(outputs)
        return outputs

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return None
        return RequestOutput(
            seq.request_id,
            seq.prompt_token_ids,
            seq.token_ids,
            [],
            self.token_text * len(seq.token_ids),
            "",
            True,
            FinishReason.ABORT,
        )

    def has_unfinished(self) -> bool:
        return bool(self.sequences)

    @property
    def num_free_slots(self) -> int:
        return max(0, self.max_num_seqs - len(self.sequences))

    def stats(self) -> dict[str, Any]:
        return {
            "running": len(self.sequences),
            "waiting": 0,
            "kv_blocks_total": 0,
            "kv_blocks_used": 0,
            "prefix_cache_hit_rate": 0.0,
            "preemptions": 0,
            "generated_tokens": self.generated_tokens,
        }
