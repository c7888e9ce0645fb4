"""LLM: blocking batch generation over LLMEngine, for use without Redis."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, cast

from engine.config import EngineConfig, SamplingParams
from engine.engine import LLMEngine, Prompt
from engine.request import RequestOutput


def make_config(model: str | None = None, model_name: str | None = None, **kwargs: Any) -> EngineConfig:
    """EngineConfig from keyword arguments; `model_name` is the seed's spelling of `model`."""
    if model is not None and model_name is not None and model != model_name:
        raise ValueError("model: pass model or model_name, not both")
    return EngineConfig(model=model if model is not None else model_name, **kwargs)


def as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text or token ids) or many, as a list of prompts."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [cast(Prompt, prompts)]
    return list(cast(Sequence[Prompt], prompts))


class LLM:
    """`LLM(model=None).generate(prompts, params)` -> one finished RequestOutput per prompt, in order."""

    def __init__(self, model: str | None = None, *, model_name: str | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(make_config(model, model_name, **kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        prompts = as_prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params_list = [params or SamplingParams()] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise ValueError(f"params: {len(params_list)} sampling params for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params_list, strict=True):
                request_id = f"llm-{next(self._ids)}"
                self.engine.add_request(request_id, prompt, p)
                ids.append(request_id)
            finished: dict[str, RequestOutput] = {}
            while len(finished) < len(ids):
                if not self.engine.has_unfinished():
                    raise RuntimeError("engine went idle with requests unfinished")
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
        except BaseException:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        return [finished[i] for i in ids]
