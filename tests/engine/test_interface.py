"""LLMEngine and the worker's NoopEngine both have every member of the Engine protocol, with its parameters.

mypy checks the same statically where worker.service.build_engine returns either as an Engine; this test
catches a member added to the protocol but not to an engine, or a parameter renamed on one side.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.interface import Engine
from worker.noop_engine import NoopEngine

MEMBERS = [name for name in vars(Engine) if not name.startswith("_")]


def test_the_protocol_names_what_the_worker_calls() -> None:
    assert set(MEMBERS) == {"tokenizer", "add_request", "step", "abort", "has_unfinished", "stats"}


@pytest.fixture(scope="module")
def engines(tiny_llama: Path) -> list[object]:
    return [NoopEngine(), LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=8))]


@pytest.mark.parametrize("name", MEMBERS)
def test_both_engines_have_the_member(engines: list[object], name: str) -> None:
    wanted = vars(Engine)[name]
    for engine in engines:
        assert hasattr(engine, name), f"{type(engine).__name__} lacks {name}"
        if callable(wanted):
            have = list(inspect.signature(getattr(engine, name)).parameters)
            want = list(inspect.signature(wanted).parameters)[1:]  # without self
            assert have == want, f"{type(engine).__name__}.{name}{have} != Engine.{name}{want}"
