"""quantization="gguf": a model computes from the quantised blocks of the GGUF file it came from.

The model is built from the converted folder (architecture, norms), then every quantised matrix
is taken from the GGUF file as stored (Q4_1 or Q8_0 blocks) instead of its float32 conversion.
Each replacement is checked against the converted float32 weight, so a wrong name or row order
fails loudly instead of producing nonsense.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from engine.models.gguf_index import all_blocks, read_blocks
from kernels.gguf_linear import BLOCK, BLOCK_BYTES, Q4_1, GGUFEmbedding, GGUFLinear, dequantize

_LLAMA_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp interleaves the two rotary halves of each Q/K head; this order undoes it."""
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, half, 2).transpose(1, 2).reshape(rows)


def _check(name: str, blocks: torch.Tensor, qtype: int, reference: torch.Tensor) -> None:
    got = dequantize(blocks, qtype, reference.shape[1])
    if got.shape != reference.shape or not torch.allclose(got, reference.float(), rtol=1e-3, atol=1e-4):
        raise ValueError(f"quantization: GGUF tensor {name} does not match the converted model's weights")


def load_gguf_weights(model: Any, gguf_file: Path, cpu_kernels: ModuleType | None) -> dict[str, int]:
    """Replace the model's linear layers and embedding with GGUF-backed ones, in place (Llama family)."""
    config = model.config
    if config.model_type not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"quantization: 'gguf' supports Llama-style models, not {config.model_type!r}")
    layers = model.model.layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    tied = head is not None and head.weight.data_ptr() == embeddings.weight.data_ptr()
    dtype = embeddings.weight.dtype
    counts = {"q4_1": 0, "q8_0": 0}
    for name, qtype, array in all_blocks(gguf_file):  # float tensors (norms) are already in the model
        blocks = torch.from_numpy(array)
        counts["q4_1" if qtype == Q4_1 else "q8_0"] += 1
        if name in ("token_embd.weight", "output.weight"):
            target = embeddings if name == "token_embd.weight" else head
            _check(name, blocks, qtype, target.weight)
            linear = GGUFLinear(blocks, qtype, target.weight.shape[1], None, cpu_kernels)
            if name == "token_embd.weight":
                model.set_input_embeddings(GGUFEmbedding(linear, dtype))
                if tied:
                    model.lm_head = linear
            else:
                model.lm_head = linear
            continue
        match = _LAYER.fullmatch(name)
        if match is None or match.group(2) not in _LLAMA_NAMES:
            raise ValueError(f"quantization: unexpected GGUF tensor {name}")
        parent_name, _, attr = _LLAMA_NAMES[match.group(2)].rpartition(".")
        parent = layers[int(match.group(1))].get_submodule(parent_name)
        linear = getattr(parent, attr)
        if match.group(2) in ("attn_q", "attn_k"):
            blocks = blocks[_unpermute_rows(blocks.shape[0], heads if match.group(2) == "attn_q" else kv_heads)]
        _check(name, blocks, qtype, linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        setattr(parent, attr, GGUFLinear(blocks, qtype, linear.in_features, bias, cpu_kernels))
    if model.get_output_embeddings() is head and not tied:
        raise ValueError("quantization: the GGUF file has no output matrix for an untied LM head")
    counts["block"] = BLOCK
    return counts


def embed_from_gguf(model: Any, gguf_file: Path, cpu_kernels: ModuleType | None) -> bool:
    """Look the embedding's rows up from the GGUF blocks it was converted from, freeing its float32 copy.

    For a model whose float32 weights are the dequantised GGUF (the default model), and only when the
    LM head no longer shares that matrix (packed for oneDNN): the default model's 108 MiB of float32
    rows become its 29 MiB of Q8_0 blocks. Every row the lookup produces is first checked, bit for bit,
    against the float32 matrix, so the outputs cannot change; any difference (another conversion, other
    weights) keeps the float32 embedding. Returns whether the swap was made."""
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    head = model.get_output_embeddings()
    if (
        cpu_kernels is None
        or type(embeddings) is not torch.nn.Embedding
        or weight is None
        or weight.dtype != torch.float32
        or getattr(head, "weight", None) is not None
        and head.weight.data_ptr() == weight.data_ptr()
    ):
        return False
    found = read_blocks(gguf_file, "token_embd.weight")
    if found is None:
        return False
    qtype, array = found
    blocks = torch.from_numpy(array)
    if tuple(blocks.shape) != (weight.shape[0], weight.shape[1] // BLOCK * BLOCK_BYTES[qtype]):
        return False
    source = GGUFLinear(blocks, qtype, weight.shape[1], None, cpu_kernels)
    lookup = GGUFEmbedding(source, weight.dtype)
    with torch.inference_mode():
        for start in range(0, weight.shape[0], 4096):  # a few MB at a time, not a second full matrix
            ids = torch.arange(start, min(start + 4096, weight.shape[0]))
            if not torch.equal(lookup(ids), weight[start : start + 4096]):
                return False
    model.set_input_embeddings(lookup)
    return True
