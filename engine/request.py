"""Per-request state inside the engine, and the outputs the engine hands back each step."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.config import SamplingParams

if TYPE_CHECKING:
    import torch

    from engine.detokenize import IncrementalDetokenizer
    from engine.speculative import DraftState
    from engine.structured.constraint import TokenConstraint


class RequestStatus(enum.Enum):
    COMPILING = "compiling"  # its grammar is being compiled; not in the scheduler yet
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # could not run (its grammar failed to compile or timed out): see `error`


@dataclass(slots=True)
class TokenLogprob:
    """Log-probability of the sampled token and of the top alternatives at one position."""

    token_id: int
    logprob: float
    top: dict[int, float]


@dataclass(slots=True)
class Request:
    """A request as the scheduler sees it: tokens, computed prefix, KV blocks, status."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0  # lower runs first (vLLM's convention)
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of this request's full blocks
    host_block_ids: list[int] = field(default_factory=list)  # swap space holding its K/V while preempted
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token; the first is None
    first_token_time: float | None = None
    eos_token_ids: frozenset[int] = frozenset()
    # Speculative decoding: draft tokens to verify in the next step (never part of the token ids above
    # until accepted), the proposer's state (None: this request does not speculate), and counts.
    spec_token_ids: list[int] = field(default_factory=list)
    draft_state: DraftState | None = None
    spec_proposed: int = 0  # draft tokens verified
    spec_accepted: int = 0  # of those, the ones the target model agreed with
    constraint: TokenConstraint | None = None  # logit_bias, allowed_token_ids and the grammar's matcher
    error: str | None = None  # why it finished with FinishReason.ERROR

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request: the new tokens and text, and whether it ended.

    `token_ids` and `text` hold everything generated so far; `new_token_ids` and `new_text`
    only what this step added (what a streaming consumer publishes).
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    new_token_ids: list[int]
    text: str
    new_text: str
    finished: bool
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    new_logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0
    spec_proposed: int = 0  # speculative draft tokens verified for this request so far
    spec_accepted: int = 0  # of those, accepted (each one a forward pass saved)
    error: str | None = None  # set when finish_reason is "error": a message for the client

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)
