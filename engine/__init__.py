"""tokenrelay's inference engine: paged KV cache, token-level scheduling, HF models. Knows nothing of Redis."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine import omp as _omp  # noqa: F401 - OpenMP's settings, read when torch loads it: before any submodule does
from engine.config import EngineConfig, SamplingParams

if TYPE_CHECKING:
    from engine.async_llm import AsyncLLM
    from engine.engine import LLMEngine
    from engine.llm import LLM
    from engine.request import RequestOutput

__all__ = ["LLM", "AsyncLLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput"]

_LAZY = {
    "LLM": "engine.llm",
    "AsyncLLM": "engine.async_llm",
    "LLMEngine": "engine.engine",
    "RequestOutput": "engine.request",
}


def __getattr__(name: str) -> Any:
    # torch and transformers load only when the engine itself is used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
