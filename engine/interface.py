"""The Engine protocol: what a serving loop calls on an engine (LLMEngine and the worker's NoopEngine)."""

from __future__ import annotations

from typing import Any, Protocol

from engine.config import SamplingParams
from engine.request import RequestOutput

# engine.request imports torch only for type checking, so this module stays torch-free at run time.


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer a serving loop uses: chat templates and token texts."""

    @property
    def chat_template(self) -> str | None: ...

    def apply_chat_template(
        self,
        conversation: list[dict[str, str]],
        *,
        tools: list[dict[str, Any]] | None = None,
        tokenize: bool,
        add_generation_prompt: bool,
    ) -> Any: ...

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool) -> Any: ...


class Engine(Protocol):
    """An engine driven by one thread: add requests, step, abort; outputs are RequestOutputs."""

    @property
    def tokenizer(self) -> Tokenizer | None:
        """None for an engine without one: prompts must then be token ids, and logprobs carry no texts."""
        ...

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> object:
        """Queue a request (priority: lower runs first); raises ValueError naming the field it refuses."""
        ...

    def step(self) -> list[RequestOutput]:
        """One scheduling step: an output for every request that advanced or finished."""
        ...

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free what it holds; its last output, or None if it is not here."""
        ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> dict[str, Any]:
        """Counters for heartbeats and metrics: running, waiting, kv_blocks_*, generated_tokens, ..."""
        ...
