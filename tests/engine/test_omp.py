"""engine.omp: GOMP_SPINCOUNT is set when the engine package loads before torch, never over the user's choice.

Each case runs a fresh interpreter: libgomp reads its environment once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys

from engine.omp import SPIN_COUNT

PROBE = "import os, sys; {first}; import engine; print(os.environ.get('GOMP_SPINCOUNT'), engine._omp.SPIN_SETTING)"


def _run(code: str, unset: tuple[str, ...], **env: str) -> list[str]:
    """`code` in a fresh interpreter without the variables `unset`, with `env`; its stdout's words."""
    clean = {k: v for k, v in os.environ.items() if k not in unset}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return out.stdout.split()


def _probe(first: str = "pass", **env: str) -> list[str]:
    return _run(PROBE.format(first=first), ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"), **env)


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


CACHE_PROBE = """
import ctypes, torch
import engine
from kernels.cpu_linear import PackedLinear
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in FIELDS.split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
torch.set_num_threads(1)
layer = PackedLinear(torch.nn.Linear(576, 1536, bias=False))
with torch.inference_mode():
    layer(torch.randn(1, 576))
    before = libc.mallinfo2().uordblks
    for rows in range(2, 202):  # a new batch size each call, as the running batch changes step to step
        layer(torch.randn(rows, 576))
print(libc.mallinfo2().uordblks - before)
"""


def _cache_growth(**env: str) -> int:
    return int(_run(CACHE_PROBE, ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"), **env)[-1])


def test_onednn_caches_are_capped_even_after_torch_loads() -> None:
    """Packed linears of 200 batch sizes: with oneDNN's and ideep's default 1,024-entry caches every shape
    stays (~0.5 MB each); with the engine's caps (set on import, here after torch) memory stops growing."""
    capped = _cache_growth()
    user_default = _cache_growth(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", LRU_CACHE_CAPACITY="1024")  # kept
    assert user_default > 60 * 2**20, user_default
    assert capped < user_default / 3, (capped, user_default)
