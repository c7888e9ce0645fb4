"""How many KV blocks fit in the memory budget."""

from __future__ import annotations

import os

import torch

# Without an explicit budget: this much of what is free, capped (vLLM's CPU build defaults to
# a fixed space too; a pool larger than the work only raises resident memory).
_CPU_FRACTION = 0.25
_CPU_CAP_GB = 1.0
_CUDA_FRACTION = 0.85


def available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def kv_cache_num_blocks(budget_gb: float | None, block_bytes: int, device: torch.device) -> int:
    if budget_gb is not None:
        budget = int(budget_gb * 2**30)
    elif device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = int(free * _CUDA_FRACTION)
    else:
        budget = int(min(available_host_bytes() * _CPU_FRACTION, _CPU_CAP_GB * 2**30))
    num_blocks = budget // block_bytes
    if num_blocks < 2:
        raise ValueError(f"kv_cache_memory_gb: {budget / 2**30:.3f} GiB holds fewer than 2 KV blocks "
                         f"of {block_bytes} bytes")
    return num_blocks
