"""Weight offloading: whole decoder layers live in host memory and visit the device for their forward."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the longest ModuleList (how every HF causal LM holds them)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"cpu_offload_gb: {type(model).__name__} has no layer list to offload")
    return max(lists, key=len)


class LayerOffloader:
    """Before a layer runs, its weights are copied to the compute device; after, the copies are dropped.

    On a CPU-only machine host and device are the same memory; the copy still happens (into fresh
    tensors), so the mechanism is exercised exactly as on a GPU, only without saving memory.
    """

    def __init__(self, layer: nn.Module, device: torch.device) -> None:
        self.device = device
        self.params = [p for p in layer.parameters(recurse=True)]
        pin = device.type == "cuda"
        self.host = [p.data.to("cpu").pin_memory() if pin else p.data.to("cpu").clone() for p in self.params]
        for param, host in zip(self.params, self.host, strict=True):
            param.data = host
        layer.register_forward_pre_hook(self._fetch)
        layer.register_forward_hook(self._release)
        self.fetches = 0

    def _fetch(self, module: nn.Module, args: Any) -> None:
        for param, host in zip(self.params, self.host, strict=True):
            param.data = host.to(self.device, non_blocking=True, copy=True)
        self.fetches += 1

    def _release(self, module: nn.Module, args: Any, output: Any) -> None:
        for param, host in zip(self.params, self.host, strict=True):
            param.data = host

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host)


def offload_layers(model: nn.Module, budget_gb: float, device: torch.device) -> list[LayerOffloader]:
    """Offload decoder layers, last first, until `budget_gb` of weights live in host memory."""
    budget = int(budget_gb * 2**30)
    offloaded: list[LayerOffloader] = []
    used = 0
    for layer in reversed(list(decoder_layers(model))):
        size = sum(p.numel() * p.element_size() for p in layer.parameters())
        if used + size > budget:
            break
        offloaded.append(LayerOffloader(layer, device))
        used += size
    return offloaded
