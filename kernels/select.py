"""Chooses the attention backend from the device, the dtype and what is installed."""

from __future__ import annotations

import torch

from kernels import AttentionBackend
from kernels.torch_backend import TorchBackend
from kernels.xformers_backend import XformersBackend, xformers_available


def select_backend(
    requested: str, device: torch.device, dtype: torch.dtype, block_size: int, kv_dtype: torch.dtype | None = None
) -> tuple[AttentionBackend, str]:
    """The backend and why it was chosen. `requested` is auto, torch, cpu or xformers."""
    if requested == "torch":
        return TorchBackend(), "forced by config"
    if kv_dtype == torch.int8 and device.type == "cuda":
        if requested == "xformers":
            raise ValueError("attention_backend: xformers reads float KV caches only; kv_cache_dtype int8 needs torch")
        return TorchBackend(), "int8 KV cache on CUDA: the torch backend dequantises as it gathers"
    if requested == "xformers" or (requested == "auto" and device.type == "cuda"):
        if device.type != "cuda":
            raise ValueError("attention_backend: xformers runs only on CUDA devices")
        if xformers_available() and dtype in (torch.float16, torch.bfloat16):
            return XformersBackend(block_size), "CUDA device with xformers installed"
        if requested == "xformers":
            raise ValueError("attention_backend: xformers needs the xformers package and dtype float16 or bfloat16")
        return TorchBackend(), "CUDA without xformers (or a dtype it does not take)"
    if device.type == "cpu" and dtype in (torch.float32, torch.float64):
        from kernels import cpu_build
        from kernels.cpu_backend import CpuBackend

        try:
            module = cpu_build.load()
        except Exception as exc:  # noqa: BLE001 - no compiler, odd platform: fall back, say why
            if requested == "cpu":
                raise ValueError(f"attention_backend: the cpu kernel could not be built: {exc}") from exc
            return TorchBackend(), f"cpu kernel unavailable ({type(exc).__name__}: {exc})"
        if module is not None:
            return CpuBackend(module), "CPU with the compiled paged-attention kernel"
    if requested == "cpu":
        raise ValueError("attention_backend: cpu needs a CPU device and dtype float32 or float64")
    return TorchBackend(), "no specialised backend for this device/dtype"
