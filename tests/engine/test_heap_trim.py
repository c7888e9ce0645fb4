"""engine.memory.HeapTrimmer: freed heap pages go back to the OS between steps, on its interval."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM
from engine.config import EngineConfig
from engine.memory import HeapTrimmer, tune_host_allocator


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS: Linux only")
def test_trimming_returns_the_freed_heap() -> None:
    if not tune_host_allocator():
        pytest.skip("glibc's mallopt is not available")
    blocks = [torch.ones(256, 1024) for _ in range(300)]  # 1 MiB each: below the mmap threshold, in the heap
    del blocks
    kept = _rss_mb()  # the tuned thresholds keep the freed pages resident
    trimmer = HeapTrimmer(interval_s=1e-9)
    trimmer.tick()
    assert trimmer.trims == 1
    assert kept - _rss_mb() > 150, f"{kept:.0f} MB before the trim, {_rss_mb():.0f} after"


def test_the_interval_paces_it_and_zero_turns_it_off() -> None:
    slow = HeapTrimmer(interval_s=3600)
    off = HeapTrimmer(interval_s=0)
    for _ in range(5):
        slow.tick()
        off.tick()
    assert slow.trims == 0 and off.trims == 0


def test_the_engine_trims_on_cpu_and_checks_its_setting(tiny_llama: Path) -> None:
    llm = LLM(model=str(tiny_llama), dtype="float32", num_kv_blocks=16, host_memory_trim_s=1e-9)
    llm.generate([[1, 2, 3]])
    assert llm.engine.heap.trims > 0
    with pytest.raises(ValueError, match="host_memory_trim_s"):
        EngineConfig(host_memory_trim_s=-1)
