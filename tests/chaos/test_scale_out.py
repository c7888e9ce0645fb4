"""Adding a worker adds capacity: two no-op workers serve one backlog side by side, each with all its
slots busy at the same time as the other's. No timing is asserted here; how close the throughput comes
to linear (1/2/4/8 workers, as ratios of one run) is bench/reliability.py's to measure."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.scale import scale_point

pytestmark = pytest.mark.slow


def test_two_workers_serve_one_backlog_at_once(tmp_path: Path) -> None:
    shape = {"slots": 4, "step_s": 0.05, "max_tokens": 10}
    one = scale_point(tmp_path, 1, rounds=3, **shape)
    two = scale_point(tmp_path, 2, rounds=3, **shape)
    assert one.requests == 12 and two.requests == 24  # each got all its tokens (scale_point checks)
    assert (one.workers_used, two.workers_used) == (1, 2)
    # one worker never runs more than its 4 slots; two that share the queue run more than that at once
    # (up to 8), where a queue that handed work to one worker at a time would show 4
    assert one.peak_in_flight == 4 and 4 < two.peak_in_flight <= 8, (one, two)
