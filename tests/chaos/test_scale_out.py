"""Adding a worker adds throughput: two no-op workers with a sleeping engine clear a backlog in about
half the time one takes. Ratios of the same run only; the full 1/2/4/8 series is bench/reliability.py's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.scale import scale_point

pytestmark = pytest.mark.slow


def test_two_workers_clear_a_backlog_in_about_half_the_time_of_one(tmp_path: Path) -> None:
    # 24 requests of 10 steps x 50 ms, 4 slots a worker: 6 rounds (3 s) for one worker, 3 for two
    shape = {"slots": 4, "step_s": 0.05, "max_tokens": 10}
    one = scale_point(tmp_path, 1, rounds=6, **shape)
    two = scale_point(tmp_path, 2, rounds=3, **shape)
    assert one.requests == two.requests == 24
    # ideal is 0.5; a queue that serialised the workers (one reader at a time, a shared lock) would be near 1
    assert two.seconds / one.seconds < 0.7, (one, two)
