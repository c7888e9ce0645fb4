"""Shared fixtures: tiny random models (built once per session) and the default model folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_models import ARCHITECTURES, build_tiny_model

# Tests share two cores with whatever else runs; one intra-op thread keeps them predictable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from engine.models.default_model import default_model_dir as resolve

    return resolve()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> dict[str, Path]:
    """Float64 tiny models of each architecture, with the default model's tokenizer."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, root / arch, tokenizer_from=default_model_dir) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]
