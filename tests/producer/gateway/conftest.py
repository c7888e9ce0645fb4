"""A module's stack: redis-server, a no-op worker process serving `tiny`, the gateway (all real processes)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.stack_helpers import Stack, start_stack


@pytest.fixture(scope="module")
def noop_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory.mktemp("noop-stack"),
        worker_args=("--noop-step-delay", "0.002"),
        gateway_args=("--max-queue-depth", "50"),
    )
    yield stack
    stack.close()
