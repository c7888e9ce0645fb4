"""How long torch's OpenMP threads spin before they sleep: set before torch loads libgomp, or never.

torch's CPU build runs its parallel ops on GNU OpenMP, whose idle threads spin for a while (300,000
turns by default) before sleeping on a futex, waiting for the next parallel region. A decode step is
hundreds of short parallel regions with Python between them. On cores nobody else uses, spinning
saves the wake-ups; but when another process wants a core, a thread of ours spinning at a barrier
keeps the core while the thread it waits for sits descheduled, and every region can cost a scheduler
time slice. Measured on two cores (bench/contention.py, contention-20261202-072425.json, two threads,
one and eight requests decoding): quiet, 39 / 49 ms a step with the default, 38 / 49 with 30,000
turns, 45 / 60 with 5,000 (each region then starts with a futex wake); beside one busy process,
375 / 501 ms with the default, 139 / 186 with 30,000, 81 / 105 with 5,000. Serving (gateway, Redis
and the client beside the worker, 2 requests/s) the default was 4-9 ms a token faster than 30,000 or
100,000 turns in four paired diagnostic runs (not saved): spinning rides out the short wake-ups of
those processes.
So the engine keeps libgomp's default and leaves sustained contention to engine.cpu_threads, which
steps on fewer threads while others hold the cores (59 / 81 ms beside the busy process, one thread).
How long a turn takes depends on the processor: an earlier machine ran 5,000 turns at full quiet speed.

libgomp reads its environment once, when the library loads (the first `import torch`), so this
must run before that; the engine package calls it on import. A value the user set is kept.

The same import caps the two shape caches under oneDNN's packed GEMMs (see ONEDNN_CACHE_CAPACITY).
"""

from __future__ import annotations

import os
import sys

# turns of the spin loop before an idle OpenMP thread sleeps: libgomp's own default, written out so
# that the start-up log says what applies and a test can check that libgomp received it
SPIN_COUNT = 300_000


def configure_openmp() -> str | None:
    """Sets GOMP_SPINCOUNT unless the user chose a wait policy; returns the spin count in force, or None
    when torch was imported first (libgomp already read its environment: the default applies)."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return os.environ.get("GOMP_SPINCOUNT", os.environ.get("OMP_WAIT_POLICY"))
    if "torch" in sys.modules:
        return None
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return str(SPIN_COUNT)


# Two LRU caches keyed by shape sit under the packed linears: oneDNN's primitive cache
# (ONEDNN_PRIMITIVE_CACHE_CAPACITY) and ideep's cache of prepared computations (LRU_CACHE_CAPACITY),
# both 1,024 entries by default. Each row count a step runs (the running batch changes most steps) is
# a new entry in each, with its own scratch memory: ~0.5 MB a shape together, never given back. On the
# mixed workload (the default model, 64 requests) they grew peak RSS by ~125 MB: 1,593-1,596 MB with
# the defaults against 1,468-1,470 with 32 entries each, at the same speed (42.6 / 44.3 s against
# 40.1 / 44.0, diagnostic runs alternating). A step needs four or five shapes (the 30 layers share
# them), so 32 entries still hold the last six or seven batch sizes.
ONEDNN_CACHE_CAPACITY = 32
_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def configure_onednn() -> dict[str, str]:
    """Caps both caches unless the user set them; they are read when the first primitive is made, so this
    works after `import torch` too, as long as no packed linear has run yet."""
    return {name: os.environ.setdefault(name, str(ONEDNN_CACHE_CAPACITY)) for name in _CACHE_VARIABLES}


SPIN_SETTING = configure_openmp()
ONEDNN_CACHE_SETTING = configure_onednn()
