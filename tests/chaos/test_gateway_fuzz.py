"""The gateway under schemathesis (its OpenAPI schema, bodies filled in): no 500s, nothing logged as an error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.gateway_fuzz import run_gateway_fuzz
from tests.chaos.harness import full_scale
from tests.stack_helpers import Stack, start_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Stack]:
    # the tiny model, so chat requests go through a real chat template; a short request deadline, since
    # negative cases may ask for a million tokens (they end in 504)
    stack = start_stack(
        tmp_path_factory.mktemp("fuzz-stack"), gateway_env={"TOKENRELAY_REQUEST_TIMEOUT_S": "0.5"}, model_dir=tiny_llama
    )
    yield stack
    stack.close()


def test_no_generated_request_gets_a_500(stack: Stack) -> None:
    report = run_gateway_fuzz(stack.gateway.url, 1_000 if full_scale() else 30)
    assert report.server_errors == [], report.as_dict()
    assert report.statuses[200] > 0 and report.statuses[400] > 0  # both valid and refused bodies were reached
    logs = [Path(stack.gateway.log_path).read_text(), Path(stack.worker.log_path).read_text()]
    assert not [
        line for text in logs for line in text.splitlines() if '"level": "error"' in line or "Traceback" in line
    ]
