"""Conversions between the wire and the engine: prompts, sampling params, logprobs, finish reasons; the Redis
connection."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, assert_never

from engine.config import SamplingParams
from engine.interface import Engine, Tokenizer
from engine.request import FinishReason as EngineFinishReason
from engine.request import TokenLogprob
from producer.connection import SyncRedis
from producer.connection import connect as connect_url
from producer.protocol import FinishReason, Logprobs, Request


def build_prompt(engine: Engine, request: Request) -> str | list[int]:
    """Text or token ids for engine.add_request; chat messages go through the model's chat template."""
    if request.messages is not None:
        tokenizer = engine.tokenizer
        if tokenizer is None or not tokenizer.chat_template:
            raise ValueError("messages: this model has no chat template; send a prompt instead")
        # tools go to the template as OpenAI spells them (transformers' convention); one that does not use them
        # renders the messages alone
        return str(
            tokenizer.apply_chat_template(
                request.messages, tools=request.tools, tokenize=False, add_generation_prompt=True
            )
        )
    if request.prompt is not None:
        return request.prompt
    assert request.prompt_token_ids is not None  # decode_request guarantees exactly one prompt form
    return request.prompt_token_ids


def sampling_params(wire: dict[str, Any]) -> SamplingParams:
    """The engine's SamplingParams, shared between requests that ask for the same thing.

    Building one validates every field (~15 us); bulk traffic repeats a handful of settings.
    The engine only reads a request's params, so sharing the object is safe.
    """
    if any(isinstance(v, dict) for v in wire.values()):
        # A schema or logit_bias: not hashable as it is; the engine caches compiled grammars itself.
        return SamplingParams.from_dict(wire)
    key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in wire.items()))
    return _sampling_params(key)


@functools.lru_cache(maxsize=1024)
def _sampling_params(key: tuple[tuple[str, Any], ...]) -> SamplingParams:
    return SamplingParams.from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in key})


def connect(url: str) -> SyncRedis:
    # No read timeout below the idle XREADGROUP block; a dead server still fails within 30 s.
    return connect_url(url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)


def wire_finish_reason(reason: EngineFinishReason | None) -> FinishReason:
    """The wire's name for why the engine ended a request; the worker aborts a request only when it is
    cancelled (a deadline or a lost claim sends no done event), so an abort goes out as `cancelled`."""
    match reason:
        case EngineFinishReason.STOP | None:
            return FinishReason.STOP
        case EngineFinishReason.LENGTH:
            return FinishReason.LENGTH
        case EngineFinishReason.ABORT:
            return FinishReason.CANCELLED
        case EngineFinishReason.ERROR:  # the worker sends these as error events, never as a done event
            raise AssertionError("an engine error has no wire finish reason")
        case _:
            assert_never(reason)


def wire_logprobs(
    logprobs: Sequence[TokenLogprob | None] | None, tokenizer: Tokenizer | None = None
) -> Logprobs | None:
    """Engine TokenLogprobs -> [[token_id, logprob, [[alt_id, alt_logprob, alt_text], ...], text], ...].

    The texts (present when the engine has a tokenizer) let producers without one, like the HTTP
    gateway, show tokens as OpenAI does; readers that know only the first three fields are unaffected.
    """
    if logprobs is None:
        return None
    if tokenizer is None:
        # prompt logprobs start with None (the first token has no context): [] keeps positions aligned
        return [
            [lp.token_id, lp.logprob, [[k, v] for k, v in lp.top.items()]] if lp is not None else [] for lp in logprobs
        ]
    text = functools.partial(_token_text, tokenizer)
    return [
        [lp.token_id, lp.logprob, [[k, v, text(k)] for k, v in lp.top.items()], text(lp.token_id)]
        if lp is not None
        else []
        for lp in logprobs
    ]


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return str(tokenizer.decode([token_id], skip_special_tokens=False))
