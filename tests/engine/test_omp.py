"""engine.omp: GOMP_SPINCOUNT is set when the engine package loads before torch, never over the user's choice.

Each case runs a fresh interpreter: libgomp reads its environment once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys

from engine.omp import SPIN_COUNT

PROBE = "import os, sys; {first}; import engine; print(os.environ.get('GOMP_SPINCOUNT'), engine._omp.SPIN_SETTING)"


def _probe(first: str = "pass", **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(first=first)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_sets_the_spin_count_before_torch_loads() -> None:
    assert _probe() == [str(SPIN_COUNT), str(SPIN_COUNT)]


def test_keeps_what_the_user_set() -> None:
    assert _probe(GOMP_SPINCOUNT="250000") == ["250000", "250000"]
    assert _probe(OMP_WAIT_POLICY="ACTIVE") == ["None", "ACTIVE"]


def test_torch_first_is_reported_not_pretended() -> None:
    # libgomp has read its environment already: setting the variable now would change nothing
    assert _probe(first="import torch") == ["None", "None"]


def test_the_setting_reaches_libgomp() -> None:
    """libgomp reports its settings with OMP_DISPLAY_ENV: the spin count must be ours, not its default."""
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run(
        [sys.executable, "-c", "import engine, torch; torch.ones(4).sum()"],
        env={**clean, "OMP_DISPLAY_ENV": "VERBOSE"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"GOMP_SPINCOUNT = '{SPIN_COUNT}'" in out.stderr, out.stderr[-2000:]
