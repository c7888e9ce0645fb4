"""How long torch's OpenMP threads spin before they sleep: set before torch loads libgomp, or never.

torch's CPU build runs its parallel ops on GNU OpenMP, whose idle threads spin for a while (300,000
turns by default) before sleeping on a futex, waiting for the next parallel region. A decode step is
hundreds of short parallel regions. On cores nobody else uses, spinning saves the wake-up; but when
another process wants a core, a thread of ours spinning at a barrier keeps the core while the thread
it waits for sits descheduled, and every region can cost a scheduler time slice. Measured on two
cores (bench/decode_step.py, two threads, one and eight requests decoding), with one busy process
beside the engine: 1,038 / 229 ms a step with the default spin in one run, 62 / 163 in another;
79 / 98 with 5,000 turns, 55 / 70 with 1,000. Quiet: 32 / 35 default, 28 / 35 with 5,000, 37 / 47
with 1,000 (the wake-ups cost at small batches). 5,000 keeps the quiet speed and bounds the collapse.

libgomp reads its environment once, when the library loads (the first `import torch`), so this
must run before that; the engine package calls it on import. A value the user set is kept.
"""

from __future__ import annotations

import os
import sys

# turns of the spin loop before an idle OpenMP thread sleeps (a few microseconds here)
SPIN_COUNT = 5000


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
