"""Model preparation: load, fuse, quantize or pack, offload, and size the KV cache the engine is built on."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import structlog
import torch

from engine.config import EngineConfig
from engine.memory import kv_cache_num_blocks, release_free_host_memory, tune_host_allocator
from engine.models.adapter import ModelAdapter
from engine.models.default_model import gguf_path, is_default_model_dir
from engine.models.fused_layers import fuse_decoder_layers
from engine.models.gguf_weights import embed_from_gguf, load_gguf_weights
from engine.models.loader import LoadedModel, load_model, resolve_device, resolve_dtype
from engine.offload import LayerOffloader, offload_layers
from engine.omp import ONEDNN_CACHE_SETTING
from engine.runner import kv_cache_bytes_per_block
from kernels import AttentionBackend, cpu_build
from kernels.cpu_linear import pack_linears, packing_available
from kernels.fused_ops import FusedOps
from kernels.int8_linear import quantize_model_int8
from kernels.select import select_backend

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class PreparedModel:
    """A model made ready to serve, and the facts the engine is wired from."""

    loaded: LoadedModel  # its model has been rewritten in place by the steps below
    adapter: ModelAdapter
    device: torch.device
    dtype: torch.dtype
    kv_dtype: torch.dtype
    backend: AttentionBackend
    backend_reason: str
    block_bytes: int  # K and V of one block, all layers
    num_blocks: int
    max_model_len: int
    allocator_tuned: bool
    packed_linears: int
    fused_layers: int  # decoder layers given the fused forward (engine/models/fused_layers.py)
    gguf_embedding: bool  # the embedding looks its rows up from the GGUF blocks (embed_from_gguf)
    offloaded: list[LayerOffloader]

    def summary(self) -> dict[str, Any]:
        """What the engine's start-up log line says about the model, in that order."""
        return {
            "model": str(self.loaded.path),
            "device": str(self.device),
            "dtype": str(self.dtype).split(".")[-1],
            "attention_backend": self.backend.name,
            "backend_reason": self.backend_reason,
            "num_kv_blocks": self.num_blocks,
            "kv_cache_mib": round(self.num_blocks * self.block_bytes / 2**20),
            "max_model_len": self.max_model_len,
            "threads": torch.get_num_threads(),
            "allocator_tuned": self.allocator_tuned,
            "packed_linears": self.packed_linears,
            "onednn_cache_entries": ONEDNN_CACHE_SETTING,  # engine.omp: what caps memory of packed GEMMs
            "fused_layers": self.fused_layers,
            "gguf_embedding": self.gguf_embedding,
            "offloaded_layers": len(self.offloaded),
        }


def prepare_model(config: EngineConfig) -> PreparedModel:
    """Load `config.model` and make it ready: the order of the steps matters (see the comments)."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    allocator_tuned = device.type == "cpu" and tune_host_allocator()
    loaded = load_model(config.model, device, dtype, config.trust_remote_code)
    kv_dtype = torch.int8 if config.kv_cache_dtype == "int8" else dtype
    backend, reason = select_backend(config.attention_backend, device, dtype, config.block_size, kv_dtype)
    block_bytes = kv_cache_bytes_per_block(
        loaded.num_layers, config.block_size, loaded.num_kv_heads, loaded.head_dim, kv_dtype
    )
    # Sized here, before the weights are rewritten: on CUDA without a budget this is a share of the
    # memory free now (after loading, before quantization or offloading frees any).
    num_blocks = config.num_kv_blocks or kv_cache_num_blocks(config.kv_cache_memory_gb, block_bytes, device)
    # A request must always fit in the pool on its own, or preemption could never make room.
    max_model_len = min(
        config.max_model_len or loaded.max_model_len, loaded.max_model_len, num_blocks * config.block_size
    )
    packed = 0
    fused = 0
    gguf_embedding = False
    if config.fused_layers and device.type == "cpu" and config.quantization != "gguf":
        # before quantization and packing: those then see the merged q/k/v and gate/up projections
        compiled = _cpu_kernels(device, dtype, (torch.float32, torch.float64))
        fused = fuse_decoder_layers(loaded.model, FusedOps(compiled))
        if device.type == "cpu":
            release_free_host_memory()  # the unmerged projections' memory, before packing allocates more
    if config.quantization == "int8":
        quantize_model_int8(loaded.model, _cpu_kernels(device, dtype))
    elif config.quantization == "gguf":
        load_gguf_weights(loaded.model, gguf_path(), _cpu_kernels(device, dtype))
    elif config.cpu_weight_packing and not config.cpu_offload_gb and packing_available(device, dtype):
        packed = pack_linears(loaded.model)
        if is_default_model_dir(loaded.path):  # the packed head holds its own copy: the embedding's can go
            release_free_host_memory()  # the fp32 weights the packing replaced, before the check allocates
            gguf_embedding = embed_from_gguf(loaded.model, gguf_path(), _cpu_kernels(device, dtype))
    # last: offloading moves the weights as the steps above left them
    offloaded = offload_layers(loaded.model, config.cpu_offload_gb, device) if config.cpu_offload_gb else []
    if device.type == "cpu":
        release_free_host_memory()
    return PreparedModel(
        loaded=loaded,
        adapter=ModelAdapter(loaded.model),
        device=device,
        dtype=dtype,
        kv_dtype=kv_dtype,
        backend=backend,
        backend_reason=reason,
        block_bytes=block_bytes,
        num_blocks=num_blocks,
        max_model_len=max_model_len,
        allocator_tuned=allocator_tuned,
        packed_linears=packed,
        fused_layers=fused,
        gguf_embedding=gguf_embedding,
        offloaded=offloaded,
    )


def _cpu_kernels(
    device: torch.device, dtype: torch.dtype, dtypes: tuple[torch.dtype, ...] = (torch.float32,)
) -> ModuleType | None:
    """The compiled CPU kernels when they apply (CPU, one of `dtypes`), else None (a slower fallback runs)."""
    if device.type != "cpu" or dtype not in dtypes:
        return None
    try:
        return cpu_build.load()
    except Exception as exc:  # noqa: BLE001 - no compiler: the fallback still computes the same thing
        log.warning("cpu kernels unavailable; torch fallbacks run instead", error=str(exc))
        return None
