"""Fixtures of the kernel tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


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
