"""OpenAI response objects and stream chunks built from tokenrelay completions and events."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

from producer.gateway.requests import Endpoint, GenerationPlan
from producer.gateway.tool_calls import message_fields, parser_for
from producer.protocol import FinishReason, Logprobs
from producer.results import Completion

# tokenrelay finish reasons -> OpenAI's names; a request cancelled elsewhere ends like vLLM's aborts
_FINISH: dict[str, str] = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.CANCELLED: "abort"}


def finish_reason(reason: str | None) -> str:
    return _FINISH.get(reason or FinishReason.STOP, reason or FinishReason.STOP)


def tool_calls_reason(reason: str, called: bool) -> str:
    """OpenAI ends a message that calls tools with `tool_calls`; one cut short stays `length`."""
    return "tool_calls" if called and reason == "stop" else reason


def response_id(endpoint: Endpoint) -> str:
    return ("chatcmpl-" if endpoint is Endpoint.CHAT else "cmpl-") + secrets.token_hex(12)


def token_text(entry: Sequence[Any]) -> str:
    """The text of a wire logprob entry; a worker without a tokenizer sends ids only (vLLM's spelling)."""
    return str(entry[3]) if len(entry) > 3 and entry[3] is not None else f"token_id:{entry[0]}"


def _alternatives(entry: Sequence[Any]) -> list[tuple[str, float]]:
    alts = entry[2] if len(entry) > 2 and entry[2] else []
    return [(str(a[2]) if len(a) > 2 and a[2] is not None else f"token_id:{a[0]}", float(a[1])) for a in alts]


def completion_logprobs(
    entries: Logprobs, offset: int = 0, prompt_entries: Logprobs | None = None, prompt_text: str = ""
) -> dict[str, Any]:
    """The legacy completions shape: parallel lists of tokens, logprobs, top alternatives and offsets."""
    tokens: list[str] = []
    logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if prompt_entries:
        rest = [token_text(e) for e in prompt_entries[1:] if e]
        # the first prompt token has no score and travels as []: its text is what the others leave over
        joined = "".join(rest)
        first = prompt_text[: len(prompt_text) - len(joined)] if prompt_text.endswith(joined) else ""
        tokens.append(first)
        logprobs.append(None)
        tops.append(None)
        for entry in prompt_entries[1:]:
            tokens.append(token_text(entry) if entry else "")
            logprobs.append(float(entry[1]) if entry else None)
            tops.append(dict(_alternatives(entry)) if entry else None)
    for entry in entries:
        tokens.append(token_text(entry))
        logprobs.append(float(entry[1]))
        tops.append(dict(_alternatives(entry)))
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: Logprobs) -> dict[str, Any]:
    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    content = [
        {**item(token_text(e), float(e[1])), "top_logprobs": [item(t, lp) for t, lp in _alternatives(e)]}
        for e in entries
    ]
    return {"content": content, "refusal": None}


def usage(plan: GenerationPlan, completions: Sequence[Completion]) -> dict[str, Any]:
    """Prompt tokens counted once per prompt (its n choices share it), completion tokens summed."""
    prompt = sum(int(c.usage.get("prompt_tokens", 0)) for c in completions[:: plan.n])
    cached = sum(int(c.usage.get("cached_tokens", 0)) for c in completions[:: plan.n])
    generated = sum(int(c.usage.get("completion_tokens", len(c.token_ids))) for c in completions)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _choice_logprobs(plan: GenerationPlan, completion: Completion, prompt_text: str) -> dict[str, Any] | None:
    if plan.logprobs is None:
        return None
    entries = completion.logprobs or []
    if plan.endpoint is Endpoint.CHAT:
        return chat_logprobs(entries)
    if plan.echo:
        return completion_logprobs(entries, 0, completion.prompt_logprobs or [], prompt_text)
    return completion_logprobs(entries, len(prompt_text))


def full_response(plan: GenerationPlan, completions: Sequence[Completion]) -> dict[str, Any]:
    """The non-streamed answer: one choice per (prompt, n) in OpenAI's order."""
    choices = []
    for index, completion in enumerate(completions):
        prompt_text = str(plan.prompts[index // plan.n].get("prompt", ""))
        reason = finish_reason(completion.finish_reason)
        logprobs = _choice_logprobs(plan, completion, prompt_text)
        if plan.endpoint is Endpoint.CHAT:
            message: dict[str, Any] = {"role": "assistant", "content": completion.text, "refusal": None}
            if plan.tools is not None:
                message.update(message_fields(parser_for(plan.tools, plan.model), completion.text))
                reason = tool_calls_reason(reason, "tool_calls" in message)
            choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason})
        else:
            text = prompt_text + completion.text if plan.echo else completion.text
            choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason})
    return {
        "id": response_id(plan.endpoint),
        "object": "chat.completion" if plan.endpoint is Endpoint.CHAT else "text_completion",
        "created": int(time.time()),
        "model": plan.model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage(plan, completions),
    }


class ChunkMaker:
    """Stream chunks of one response: same id and creation time in every chunk."""

    def __init__(self, plan: GenerationPlan) -> None:
        self.plan = plan
        self.id = response_id(plan.endpoint)
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if plan.endpoint is Endpoint.CHAT else "text_completion"

    def _wrap(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.plan.model,
            "system_fingerprint": None,
            "choices": choices,
            **extra,
        }

    def role(self, index: int) -> dict[str, Any]:
        """Chat's first chunk of a choice announces the assistant role."""
        return self._wrap(
            [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
        )

    def text(self, index: int, text: str, logprobs: Logprobs | None, offset: int) -> dict[str, Any]:
        if self.plan.endpoint is Endpoint.CHAT:
            lp = chat_logprobs(logprobs or []) if self.plan.logprobs is not None else None
            return self._wrap([{"index": index, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}])
        lp = completion_logprobs(logprobs or [], offset) if self.plan.logprobs is not None else None
        return self._wrap([{"index": index, "text": text, "logprobs": lp, "finish_reason": None}])

    def deltas(self, index: int, deltas: list[dict[str, Any]], logprobs: Logprobs | None) -> list[dict[str, Any]]:
        """Chat chunks of content and tool-call deltas; the tokens' logprobs ride on the first."""
        chunks = []
        for delta in deltas:
            lp = chat_logprobs(logprobs or []) if self.plan.logprobs is not None and logprobs else None
            chunks.append(self._wrap([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": None}]))
            logprobs = None
        return chunks

    def finish(self, index: int, reason: str | None) -> dict[str, Any]:
        if self.plan.endpoint is Endpoint.CHAT:
            choice: dict[str, Any] = {"index": index, "delta": {}, "logprobs": None}
        else:
            choice = {"index": index, "text": "", "logprobs": None}
        return self._wrap([{**choice, "finish_reason": finish_reason(reason)}])

    def usage(self, completions: Sequence[Completion]) -> dict[str, Any]:
        return self._wrap([], usage=usage(self.plan, completions))
