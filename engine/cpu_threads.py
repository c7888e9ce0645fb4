"""Fewer compute threads while other processes hold the engine's cores, all of them again once they leave.

A decode step is a few hundred short OpenMP parallel regions, and every region ends at a barrier. When
another process runs on one of the cores, the thread of ours that is descheduled there holds up the
other at each barrier, and a step costs several times its quiet time (bench/contention.py, two cores,
one busy process beside the engine, one and eight requests decoding: 375 / 501 ms a step on two
threads with libgomp's default spin, 39 / 49 quiet). One thread has no barriers: it takes the free
core and runs at its own pace (59 / 81 ms there).

Once per `interval_s` the governor reads how much CPU the rest of the machine took on the cores this
process may run on (/proc/stat, steal time included: a hypervisor's other guests are contention too)
and sizes the thread count to the cores left, between 1 and the configured count. A change needs two
readings in a row that agree, so a burst (a gateway answering, a compile) does not flap it; taking a
thread back needs between two and six (drawn afresh each time), so that engines sharing a machine,
which all see the same free cores at once, do not all take them back together and all give them up
again. A reading after a long pause (an idle engine does not tick) only starts a new window: what the
machine did while the engine had nothing to do says little about now.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch

log = structlog.get_logger(__name__)

_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class CpuReading:
    """Cumulative seconds: what the allowed cores were busy with (all processes), what this process used."""

    wall_s: float
    busy_s: float
    own_s: float


def read_cpu(cpus: frozenset[int]) -> CpuReading | None:
    """Busy time of the given cores from /proc/stat (user..steal, less idle and iowait), or None off Linux."""
    wall, own = time.monotonic(), time.process_time()
    try:
        with open("/proc/stat") as f:
            lines = f.readlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        fields = [int(v) for v in rest.split()[:8]]  # user nice system idle iowait irq softirq steal
        busy += sum(fields) - fields[3] - fields[4]
    return CpuReading(wall, busy / _TICKS_PER_S, own)


def threads_for(others_cores: float, num_cpus: int, configured: int) -> int:
    """Threads that fit beside the others: one per core they leave free (half a core rounds up), 1..configured."""
    return max(1, min(configured, int(num_cpus - others_cores + 0.5)))


class ThreadGovernor:
    """Call `tick()` once per engine step; it returns the thread count, changed only when the load did."""

    def __init__(
        self,
        configured: int,
        interval_s: float = 0.5,
        reader: Callable[[frozenset[int]], CpuReading | None] = read_cpu,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        cpus: frozenset[int] | None = None,  # None: the cores this process may run on
        raise_after: tuple[int, int] = (2, 6),  # agreeing readings before a thread is taken back, drawn in this range
        seed: int | None = None,
    ) -> None:
        self.configured = configured
        self.threads = configured
        self.interval_s = interval_s
        self.others_cores = 0.0  # the last reading's share of the cores other processes took
        self.changes = 0
        if cpus is None:
            cpus = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
        self._cpus = cpus
        self._reader = reader
        self._set_threads = set_threads
        self._last = reader(self._cpus) if self._cpus else None
        self._raise_after = raise_after
        self._random = random.Random(seed)
        self._proposal: int | None = None
        self._agreeing = 0  # readings in a row that asked for the proposal
        self._needed = 2

    @property
    def active(self) -> bool:
        """False where there is nothing to govern: one thread, or no /proc/stat to read."""
        return self.configured > 1 and self._last is not None

    def tick(self) -> int:
        if not self.active:
            return self.threads
        assert self._last is not None
        if time.monotonic() - self._last.wall_s < self.interval_s:
            return self.threads
        now = self._reader(self._cpus)
        if now is None:
            return self.threads
        wall = now.wall_s - self._last.wall_s
        others = max(0.0, (now.busy_s - self._last.busy_s) - (now.own_s - self._last.own_s)) / max(wall, 1e-6)
        self._last = now
        if wall > max(4 * self.interval_s, 2.0):  # after a pause: a new window, no decision
            self._proposal = None
            return self.threads
        self.others_cores = others
        wanted = threads_for(others, len(self._cpus), self.configured)
        if wanted == self.threads:
            self._proposal = None
            return self.threads
        if wanted != self._proposal:
            self._proposal, self._agreeing = wanted, 0
            self._needed = 2 if wanted < self.threads else self._random.randint(*self._raise_after)
        self._agreeing += 1
        if self._agreeing >= self._needed:
            log.info("compute threads changed", threads=wanted, was=self.threads, other_cores=round(others, 2))
            self.threads = wanted
            self._set_threads(wanted)
            self.changes += 1
            self._proposal = None
        return self.threads
