"""prepare_model: the preparation steps run in their order and report what the engine is built from."""

from __future__ import annotations

from pathlib import Path

from engine.config import EngineConfig
from engine.models.prepare import prepare_model
from kernels.cpu_linear import PackedLinear
from kernels.int8_linear import Int8Linear


def test_fusing_comes_before_int8_quantization(tiny_llama: Path) -> None:
    """The merged q/k/v and gate/up projections are what gets quantized."""
    prepared = prepare_model(EngineConfig(model=str(tiny_llama), dtype="float32", quantization="int8", num_kv_blocks=8))
    layer = prepared.loaded.model.model.layers[0]
    assert prepared.fused_layers == 3 and prepared.packed_linears == 0
    assert isinstance(layer.self_attn.qkv_proj, Int8Linear) and isinstance(layer.mlp.gate_up_proj, Int8Linear)


def test_offloading_skips_packing_and_the_pool_caps_the_context(tiny_llama: Path) -> None:
    prepared = prepare_model(EngineConfig(model=str(tiny_llama), dtype="float32", cpu_offload_gb=0.01, num_kv_blocks=8))
    assert prepared.offloaded and prepared.packed_linears == 0
    assert not any(isinstance(m, PackedLinear) for m in prepared.loaded.model.modules())
    # 8 blocks of 16 tokens hold less than the model's 1,024 positions: a request must fit the pool alone.
    assert (prepared.num_blocks, prepared.max_model_len) == (8, 128)
    assert prepared.summary()["offloaded_layers"] == len(prepared.offloaded)


def test_packing_on_cpu_float32(tiny_llama: Path) -> None:
    prepared = prepare_model(EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=8))
    assert prepared.packed_linears > 0 and not prepared.offloaded
    assert prepared.adapter.model is prepared.loaded.model
