"""Finds and loads a local model folder (never a hub download) and reads the shapes the engine needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.models.default_model import default_model_dir

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@dataclass(slots=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any | None
    path: Path
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    num_params: int


def resolve_model_path(model: str | None) -> Path:
    if model is None:
        return default_model_dir()
    path = Path(model).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(
            f"model: {model!r} is not a local model folder with a config.json "
            "(tokenrelay never downloads models; pass a path, or None for the default model)"
        )
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor] | None:
    """The checkpoint read with plain file reads, not mmap: a mapped checkpoint stays resident beside
    any copy made of it (the packed CPU weights), doubling peak memory. None: not safetensors."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu", backend="pread") as f:
            state_dict.update((key, f.get_tensor(key)) for key in f.keys())
    return state_dict


def _eos_ids(config: Any, generation_config: Any, tokenizer: Any | None) -> frozenset[int]:
    ids: set[int] = set()
    for source in (
        getattr(generation_config, "eos_token_id", None),
        getattr(config, "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(i for i in source if isinstance(i, int))
    return frozenset(ids)


def load_model(
    model: str | None, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False
) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from engine.models.adapter import ATTENTION_NAME

    path = resolve_model_path(model)
    state_dict = _read_safetensors(path) if device.type == "cpu" and not trust_remote_code else None
    if state_dict is not None:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        hf_model = model_class.from_pretrained(
            None, config=config, state_dict=state_dict, dtype=dtype, attn_implementation=ATTENTION_NAME
        )
        del state_dict
    else:
        hf_model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=ATTENTION_NAME,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
        )
    hf_model = hf_model.to(device).eval()
    tokenizer = None
    if any((path / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    config = hf_model.config
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    max_len = getattr(config, "max_position_embeddings", None) or 2048
    return LoadedModel(
        model=hf_model,
        tokenizer=tokenizer,
        path=path,
        num_layers=config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        vocab_size=hf_model.get_output_embeddings().weight.shape[0],
        max_model_len=int(max_len),
        eos_token_ids=_eos_ids(config, getattr(hf_model, "generation_config", None), tokenizer),
        num_params=sum(p.numel() for p in hf_model.parameters()),
    )
