"""Fuzzing the protocol decoder, request validation and a live worker: nothing escapes, everything is answered.

The worker test feeds a no-op worker process hypothesis-drawn stream entries (and cheap mutants of
them): every entry with a usable id gets exactly one terminal event, an `error` one whenever the
decoder refuses the payload; entries without one are dead-lettered; the worker's memory stays flat.
Short versions run in `make test`; `make chaos` feeds 100,000 entries and runs atheris for 1,000,000.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.client import build_request
from producer.protocol import decode_request
from tests.chaos.fuzz_cases import MODEL, values
from tests.chaos.harness import full_scale
from tests.chaos.worker_fuzz import run_worker_fuzz

pytestmark = pytest.mark.slow


def test_a_worker_answers_every_fuzzed_entry_and_its_memory_stays_flat(redis_url: str, tmp_path: Path) -> None:
    total, chunk, seeds = (100_000, 10_000, 1_000) if full_scale() else (4_000, 1_000, 200)
    report = run_worker_fuzz(redis_url, tmp_path, total, chunk, seeds)
    assert report.violations == []
    assert report.entries == total and min(report.outcomes.values()) > 0, report.as_dict()
    assert report.worker_alive and report.error_log_lines == 0  # no exception escaped the worker
    assert report.rss_growth_mb < 8, report.rss_mb  # flat once warm


_kwargs = st.dictionaries(
    st.sampled_from(
        [
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "stop",
            "logprobs",
            "priority",
            "deadline",
            "timeout",
            "metadata",
            "stream",
            "request_id",
            "messages",
            "prompt_token_ids",
            "min_tokens",
        ]
    ),
    values,
    max_size=4,
)


@settings(
    max_examples=5_000 if full_scale() else 300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(prompt=st.none() | st.text(max_size=16) | values, kwargs=_kwargs)
def test_client_side_validation_raises_value_error_and_nothing_else(prompt: Any, kwargs: dict[str, Any]) -> None:
    try:
        request = build_request(MODEL, prompt, **kwargs)
    except ValueError:
        return
    # what the client accepts, the worker's decoder accepts too
    assert decode_request(request.encode(), expected_id=request.request_id).model == MODEL


def test_atheris_finds_no_crash_in_the_decoder(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    runs = 1_000_000 if full_scale() else 50_000
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.chaos.atheris_decode",
            f"-runs={runs}",
            "-max_len=2048",
            "-seed=1",
            str(tmp_path),
        ],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done {runs} runs" in result.stderr
