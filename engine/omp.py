"""How long torch's OpenMP threads spin before they sleep: set before torch loads libgomp, or never.

torch's CPU build runs its parallel ops on GNU OpenMP, whose idle threads spin for a while (300,000
turns by default) before sleeping on a futex, waiting for the next parallel region. A decode step is
hundreds of short parallel regions with Python between them. On cores nobody else uses, spinning
saves the wake-ups; but when another process wants a core, a thread of ours spinning at a barrier
keeps the core while the thread it waits for sits descheduled, and every region can cost a scheduler
time slice. Measured on two cores (bench/contention.py, two threads, one and eight requests
decoding): quiet, 36 / 48 ms a step with 30,000 turns as with the default, 43 / 58 with 5,000 (each
region then starts with a futex wake); beside one busy process, 567 / 670 with the default, 143 / 189
with 30,000, 76 / 104 with 5,000. How long a turn takes depends on the processor (an earlier
machine ran 5,000 turns at full quiet speed), so the spin is set for the quiet case and sustained
contention is left to engine.cpu_threads, which steps on fewer threads while others hold the cores.

libgomp reads its environment once, when the library loads (the first `import torch`), so this
must run before that; the engine package calls it on import. A value the user set is kept.
"""

from __future__ import annotations

import os
import sys

# turns of the spin loop before an idle OpenMP thread sleeps (tens of microseconds here)
SPIN_COUNT = 30_000


def configure_openmp() -> str | None:
    """Sets GOMP_SPINCOUNT unless the user chose a wait policy; returns the spin count in force, or None
    when torch was imported first (libgomp already read its environment: the default applies)."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return os.environ.get("GOMP_SPINCOUNT", os.environ.get("OMP_WAIT_POLICY"))
    if "torch" in sys.modules:
        return None
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return str(SPIN_COUNT)


SPIN_SETTING = configure_openmp()
