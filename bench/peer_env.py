"""Where the peers' environments live (../shared/peers/) and the environment vLLM-CPU runs under."""

from __future__ import annotations

import os
from pathlib import Path

PEERS_DIR = Path(os.environ.get("PEERS_DIR", Path.home() / ".cache" / "peers"))
VLLM_PYTHON = PEERS_DIR / "vllmenv" / "bin" / "python"


def vllm_installed() -> bool:
    return VLLM_PYTHON.exists()


def vllm_env(threads: int) -> dict[str, str]:
    """As our reference figures were taken: 1 GiB of KV cache, OpenMP bound to every core we use (the
    default `auto` keeps one for its scheduler, ~35 % slower here), tcmalloc and vLLM's libiomp preloaded."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}")
    env.pop("GOMP_SPINCOUNT", None)  # engine.omp's setting for our processes, not part of vLLM's run
    preload = [
        PEERS_DIR / "tcm/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
        PEERS_DIR / "vllmenv/lib/libiomp5.so",
    ]
    env["LD_PRELOAD"] = ":".join(str(p) for p in preload if p.exists())
    return env
