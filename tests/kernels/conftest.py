"""Fixtures of the kernel tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kernels import cpu_build


@pytest.fixture(scope="session")
def kernels():  # noqa: ANN201 - the compiled module
    """The compiled CPU kernels (the suite's setup builds them: their absence is a failure here)."""
    module = cpu_build.load()
    assert module is not None
    return module


@pytest.fixture
def engine_threading() -> Iterator[None]:
    """As the engine calls kernels: two threads (the suite runs on one) and inference mode. OpenMP worker
    threads do not inherit the caller's thread-local state, so one-thread runs miss a class of bugs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(threads)
