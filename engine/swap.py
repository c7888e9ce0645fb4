"""Preemption by swapping: a host-memory block pool, and the cost model that picks swap or recompute."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from engine.request import Request


class PreemptionMode(enum.StrEnum):
    AUTO = "auto"  # whichever the cost model says is cheaper (recompute when there is no swap space)
    RECOMPUTE = "recompute"
    SWAP = "swap"  # swap whenever host space allows, else recompute


@dataclass(slots=True, frozen=True)
class PreemptionCosts:
    """Rough per-device figures; only their ratio decides, so order-of-magnitude accuracy is enough."""

    flops_per_token: float  # about 2 x parameters
    attention_flops_per_token_pair: float  # 4 x layers x heads x head_dim
    block_bytes: int  # K and V of one block, all layers
    device_flops: float  # sustained matmul throughput
    copy_bytes_per_s: float  # device <-> host

    def recompute_seconds(self, tokens: int) -> float:
        attention = self.attention_flops_per_token_pair * tokens * tokens / 2
        return (self.flops_per_token * tokens + attention) / self.device_flops

    def swap_seconds(self, blocks: int) -> float:
        return 2 * blocks * self.block_bytes / self.copy_bytes_per_s  # out now, in later


def default_costs(
    device_type: str, params: int, layers: int, heads: int, head_dim: int, block_bytes: int
) -> PreemptionCosts:
    # Measured orders of magnitude: ~1e11 FLOP/s and ~1e10 B/s on a 2-core CPU; an H100/H200 class
    # GPU sustains ~4e14 FLOP/s of bf16 matmul against ~2.5e10 B/s over PCIe.
    flops, link = (1e11, 1e10) if device_type == "cpu" else (4e14, 2.5e10)
    return PreemptionCosts(2.0 * params, 4.0 * layers * heads * head_dim, block_bytes, flops, link)


class HostBlockPool:
    """Block ids of the host-side swap space; swapped-out K/V wait there until the request resumes."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"swap space: {count} blocks asked, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def release(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)


class SwapPolicy:
    """Decides, per victim, between swapping its blocks out and recomputing it later."""

    def __init__(self, mode: PreemptionMode, pool: HostBlockPool | None, costs: PreemptionCosts | None) -> None:
        self.mode = mode
        self.pool = pool
        self.costs = costs
        self.num_swapped_out = 0
        self.num_swapped_in = 0

    def should_swap(self, request: Request) -> bool:
        blocks = len(request.block_ids)
        if self.pool is None or blocks == 0 or blocks > self.pool.num_free or self.mode is PreemptionMode.RECOMPUTE:
            return False
        if self.mode is PreemptionMode.SWAP or self.costs is None:
            return True
        return self.costs.swap_seconds(blocks) < self.costs.recompute_seconds(request.num_computed_tokens)
