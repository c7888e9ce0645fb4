"""The retry schedule: parsing, attempts, and jitter that every replica computes alike."""

from __future__ import annotations

import pytest

from producer.webhooks.schedule import STANDARD_SCHEDULE, RetrySchedule


def test_the_standard_schedule_is_standard_webhooks() -> None:
    schedule = RetrySchedule.parse(STANDARD_SCHEDULE)
    assert schedule.delays_s == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    assert schedule.attempts == 8 and not schedule.exhausted(7) and schedule.exhausted(8)


def test_jitter_is_bounded_and_the_same_for_the_same_entry_and_attempt() -> None:
    schedule = RetrySchedule.parse("0,5,300")
    assert schedule.wait_before(1, "app|1-0") == 0
    waits = {schedule.wait_before(2, f"app|{i}-0") for i in range(200)}
    assert all(5 <= w <= 5.5 for w in waits) and len(waits) > 150
    assert schedule.wait_before(3, "app|1-0") == schedule.wait_before(3, "app|1-0")
    assert 300 <= schedule.wait_before(3, "app|1-0") <= 330


@pytest.mark.parametrize("text", ["", "5,x", "-1,2", "nan"])
def test_bad_schedules_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="webhook_retry_schedule"):
        RetrySchedule.parse(text)
