"""Tiny random-weight models built from configs (no downloads), for exact parity tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = ("llama", "qwen2", "gpt2", "opt")
# Small, but with GQA where the architecture has it, several layers and a real vocabulary size so
# the default model's tokenizer can be copied in for text prompts.
VOCAB = 49152
MAX_POSITIONS = 1024


def tiny_config(arch: str):  # noqa: ANN201 - a transformers config
    from transformers import GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=MAX_POSITIONS,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            tie_word_embeddings=True,
        )
    if arch == "qwen2":
        return Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=MAX_POSITIONS,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            tie_word_embeddings=False,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_positions=MAX_POSITIONS,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )
    if arch == "opt":
        return OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=MAX_POSITIONS,
            word_embed_proj_dim=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )
    raise ValueError(f"unknown architecture {arch!r}")


def build_tiny_model(
    arch: str, directory: Path, seed: int = 0, dtype: torch.dtype = torch.float64, tokenizer_from: Path | None = None
) -> Path:
    """Random weights (fixed seed), saved as an HF folder; optionally with a tokenizer copied in."""
    save_random_model(tiny_config(arch), directory, seed, dtype)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (tokenizer_from / name).is_file():
                shutil.copy(tokenizer_from / name, directory / name)
    return directory


def save_random_model(
    config: Any, directory: Path, seed: int = 0, dtype: torch.dtype = torch.float64, std: float = 0.08
) -> Path:
    """A model of `config` (a transformers config) with N(0, std) matrices, seeded, saved as an HF folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Larger-than-default weights give peaked, well-separated logits: greedy ties are unlikely.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, std)
    model.save_pretrained(directory)
    return directory
