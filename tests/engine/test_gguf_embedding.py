"""embed_from_gguf: the default model's embedding reads the packaged GGUF blocks, bit for bit the same rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine.config import EngineConfig
from engine.memory import model_weight_bytes
from engine.models.default_model import gguf_path
from engine.models.gguf_index import read_blocks
from engine.models.gguf_weights import embed_from_gguf
from engine.models.prepare import prepare_model
from kernels import cpu_build
from kernels.cpu_linear import PackedLinear
from kernels.gguf_linear import BLOCK_BYTES, Q4_1, Q8_0, GGUFEmbedding


def _converted_embedding(model_dir: Path) -> torch.Tensor:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return f.get_tensor("model.embed_tokens.weight")


def _hf_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()


@pytest.mark.slow
def test_the_default_model_looks_rows_up_from_its_gguf_blocks(default_model_dir: Path) -> None:
    prepared = prepare_model(EngineConfig(model=str(default_model_dir), num_kv_blocks=8))
    model = prepared.loaded.model
    assert prepared.gguf_embedding and prepared.summary()["gguf_embedding"] is True
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, GGUFEmbedding) and isinstance(model.get_output_embeddings(), PackedLinear)
    reference = _converted_embedding(default_model_dir)
    ids = torch.tensor([0, 1, 2, 17, 1000, 25_000, reference.shape[0] - 1])
    with torch.inference_mode():
        assert torch.equal(embedding(ids), reference[ids])
        assert torch.equal(embedding(ids.reshape(1, -1)), reference[ids].unsqueeze(0))  # [batch, seq] ids too
    # the float32 matrix is gone; the file's blocks hold it instead (Q8_0 here: 34 bytes a 32-wide block)
    blocks, qtype = embedding.source.blocks, embedding.source.qtype
    assert blocks.dtype == torch.uint8 and blocks.numel() == reference.numel() // 32 * BLOCK_BYTES[qtype]
    assert all(p.data_ptr() != reference.data_ptr() for p in model.parameters())
    # 538 MiB of tied float32 weights; packing gives the LM head its own 108 MiB copy, and the embedding's
    # rows going to the blocks (108 -> 29 MiB) pays for most of it: 542 MiB here, 646 without the swap
    assert model_weight_bytes(model) < 560 * 2**20


@pytest.mark.slow
def test_any_difference_keeps_the_float32_embedding(default_model_dir: Path) -> None:
    model = _hf_model(default_model_dir)
    kernels = cpu_build.load()
    tied = model.get_input_embeddings()
    assert not embed_from_gguf(model, gguf_path(), kernels)  # the LM head still reads this matrix: no saving
    model.lm_head = PackedLinear(model.lm_head)
    with torch.no_grad():
        tied.weight[123, 7] += 1e-6  # one weight off by one ulp or so: the blocks no longer give these rows
    assert not embed_from_gguf(model, gguf_path(), kernels)
    assert model.get_input_embeddings() is tied
    with torch.no_grad():
        tied.weight[123, 7] = _converted_embedding(default_model_dir)[123, 7]
    assert embed_from_gguf(model, gguf_path(), kernels)
    assert isinstance(model.get_input_embeddings(), GGUFEmbedding)


def test_other_models_keep_their_embedding(tiny_llama: Path) -> None:
    prepared = prepare_model(EngineConfig(model=str(tiny_llama), dtype="float32", num_kv_blocks=8))
    assert prepared.packed_linears > 0 and not prepared.gguf_embedding
    assert type(prepared.loaded.model.get_input_embeddings()) is torch.nn.Embedding


@pytest.mark.slow
def test_the_header_walk_finds_what_gguf_reader_finds() -> None:
    """read_blocks against gguf's own reader, on the packaged file: the same bytes for a tensor of each
    type, None for a float tensor and for a name the file lacks."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path()))
    by_name = {t.name: t for t in reader.tensors}
    seen = set()
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight"):
        found = read_blocks(gguf_path(), name)
        assert found is not None
        qtype, blocks = found
        assert qtype == int(by_name[name].tensor_type)
        assert np.array_equal(blocks, np.asarray(by_name[name].data, dtype=np.uint8))
        seen.add(qtype)
    assert seen == {Q4_1, Q8_0}
    assert read_blocks(gguf_path(), "blk.0.attn_norm.weight") is None  # float32: not blocks
    assert read_blocks(gguf_path(), "no.such.tensor") is None
