"""engine.cpu_threads: the thread count follows the CPU other processes take, and only on agreeing readings."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import LLM
from engine.cpu_threads import CpuReading, ThreadGovernor, read_cpu, threads_for


def test_threads_for_leaves_the_cores_others_take() -> None:
    assert threads_for(0.0, num_cpus=2, configured=2) == 2
    assert threads_for(0.4, num_cpus=2, configured=2) == 2
    assert threads_for(0.6, num_cpus=2, configured=2) == 1
    assert threads_for(1.9, num_cpus=2, configured=2) == 1  # never below one
    assert threads_for(10.0, num_cpus=16, configured=4) == 4  # six cores left: the configured four fit
    assert threads_for(14.0, num_cpus=16, configured=4) == 2


TWO_CORES = frozenset({0, 1})


class Script:
    """Readings of a machine where others take `others[i]` cores in window i (each window 1 s)."""

    def __init__(self, others: list[float]) -> None:
        self.others = others
        self.i = 0
        self.busy = self.own = 0.0

    def __call__(self, cpus: frozenset[int]) -> CpuReading:
        if self.i:
            self.busy += self.others[self.i - 1] + 0.5  # this process took half a core as well
            self.own += 0.5
        self.i += 1
        return CpuReading(wall_s=float(self.i), busy_s=self.busy, own_s=self.own)


def test_a_change_needs_two_readings_in_a_row() -> None:
    script = Script([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    calls: list[int] = []
    governor = ThreadGovernor(
        2, interval_s=0.0, reader=script, set_threads=calls.append, cpus=TWO_CORES, raise_after=(2, 2)
    )
    seen = [governor.tick() for _ in range(7)]
    # one busy window is a burst; two in a row are load; quiet again after two quiet readings
    assert seen == [2, 2, 2, 1, 1, 2, 2]
    assert calls == [1, 2] and governor.changes == 2


def test_a_reading_after_a_pause_only_starts_a_new_window() -> None:
    # others took one of the two cores throughout; the engine sat idle from second 1 to 11
    readings = iter([CpuReading(t, busy_s=1.5 * t, own_s=0.5 * t) for t in (0.0, 1.0, 11.0, 12.0, 13.0)])
    governor = ThreadGovernor(2, 0.0, lambda cpus: next(readings), lambda n: None, cpus=TWO_CORES)
    assert [governor.tick() for _ in range(2)] == [2, 2]  # a first busy reading, then the pause: no decision
    assert [governor.tick() for _ in range(2)] == [2, 1]  # two busy readings after it: one thread


class SharedMachine:
    """Engines of two threads each on a few cores, shared fairly: each engine's reader sees the others' use."""

    def __init__(self, engines: int, cores: int) -> None:
        self.cores = cores
        self.threads = [2] * engines
        self.own = [0.0] * engines
        self.busy = 0.0
        self.clock = 0.0

    def second(self) -> None:
        self.clock += 1.0
        self.busy += min(self.cores, sum(self.threads))
        for i, n in enumerate(self.threads):
            self.own[i] += n * min(1.0, self.cores / sum(self.threads))

    def run(self, raise_after: tuple[int, int], seconds: int = 80) -> list[int]:
        governors = [
            ThreadGovernor(
                2,
                interval_s=0.0,
                reader=lambda cpus, i=i: CpuReading(self.clock, self.busy, self.own[i]),
                set_threads=lambda n, i=i: self.threads.__setitem__(i, n),
                cpus=frozenset(range(self.cores)),
                raise_after=raise_after,
                seed=i,
            )
            for i in range(len(self.threads))
        ]
        history = []
        for _ in range(seconds):
            self.second()
            for governor in governors:
                governor.tick()
            history.append(sum(self.threads))
        return history


def test_engines_sharing_cores_settle_instead_of_moving_together() -> None:
    # six engines of two threads on eight cores: each gets 1.33 cores and gives a thread up
    history = SharedMachine(engines=6, cores=8).run(raise_after=(2, 6))
    assert history[-30:] == [history[-1]] * 30, history  # settled
    assert 8 <= history[-1] <= 10, history  # about the cores there are: not 12, not 6
    # the same engines taking threads back after a fixed two readings move as one herd
    herd = SharedMachine(engines=6, cores=8).run(raise_after=(2, 2))
    assert {6, 12} <= set(herd[-30:]), herd


def test_one_thread_or_no_reading_is_left_alone() -> None:
    calls: list[int] = []
    assert not ThreadGovernor(1, 0.0, Script([5.0] * 4), calls.append, cpus=TWO_CORES).active
    assert not ThreadGovernor(2, 0.0, lambda cpus: None, calls.append, cpus=TWO_CORES).active
    assert calls == []


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc/stat: Linux only")
def test_real_busy_processes_take_a_thread_and_give_it_back() -> None:
    cpus = len(os.sched_getaffinity(0))
    calls: list[int] = []
    governor = ThreadGovernor(2, interval_s=0.2, set_threads=calls.append)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(min(cpus, 16))]
    try:
        deadline = time.monotonic() + 20
        while governor.threads == 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            governor.tick()
        assert governor.threads == 1, f"others took {governor.others_cores:.2f} of {cpus} cores"
    finally:
        for p in busy:
            p.kill()
            p.wait()
    deadline = time.monotonic() + 20
    while governor.threads == 1 and time.monotonic() < deadline:
        time.sleep(0.1)
        governor.tick()
    assert governor.threads == 2, f"others still take {governor.others_cores:.2f} of {cpus} cores"
    assert calls == [1, 2]
    assert read_cpu(frozenset(os.sched_getaffinity(0))) is not None


def test_the_engine_governs_its_cpu_threads_unless_told_not_to(tiny_llama: Path) -> None:
    before = torch.get_num_threads()
    try:
        adaptive = LLM(model=str(tiny_llama), dtype="float64", num_kv_blocks=16, num_threads=2)
        assert adaptive.engine.threads is not None and adaptive.engine.stats()["threads"] in (1, 2)
        fixed = LLM(model=str(tiny_llama), dtype="float64", num_kv_blocks=16, num_threads=2, adaptive_threads=False)
        assert fixed.engine.threads is None and fixed.engine.stats()["threads"] == 2
        single = LLM(model=str(tiny_llama), dtype="float64", num_kv_blocks=16, num_threads=1)
        assert single.engine.threads is None
    finally:
        torch.set_num_threads(before)


def test_results_do_not_depend_on_the_thread_count(default_model_dir: Path) -> None:
    """What lets the governor change threads mid-run: GEMMs and kernels split rows, not reductions (the
    default model in float32: packed GEMMs, the prefill and decode kernels, all on two threads or one)."""
    from engine import SamplingParams

    before = torch.get_num_threads()
    llm = LLM(
        model=str(default_model_dir),
        dtype="float32",
        num_kv_blocks=128,
        enable_prefix_caching=False,  # a second run must compute what the first did, not reuse it
        adaptive_threads=False,  # the thread count is this test's to set
    )
    prompts = [[(97 * i + 31 * j) % 40000 + 100 for j in range(5 + 57 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
    try:
        runs = []
        for threads in (2, 1):
            torch.set_num_threads(threads)
            runs.append([(out.token_ids, out.logprobs) for out in llm.generate(prompts, params)])
    finally:
        torch.set_num_threads(before)
    assert runs[0] == runs[1]
