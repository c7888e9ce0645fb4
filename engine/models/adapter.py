"""Runs any Hugging Face causal LM on a packed batch, with our paged attention in place of its own."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface

from kernels.metadata import AttentionMetadata

ATTENTION_NAME = "tokenrelay_paged"
META_KWARG = "tokenrelay_attention"


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The transformers attention interface: [1, heads, tokens, dim] in, [1, tokens, heads, dim] out."""
    meta: AttentionMetadata | None = kwargs.get(META_KWARG)
    if meta is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention called without metadata; run the model through ModelAdapter")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention soft-capping and sinks are not supported by tokenrelay's backends")
    backend = meta.extras["backend"]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = backend.forward(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        module.layer_idx,
        meta,
        scale,
        kwargs.get("sliding_window"),
    )
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)


class ModelAdapter:
    """Wraps a loaded model: one call runs a packed step and returns logits of the sampling positions."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        model.config._attn_implementation = ATTENTION_NAME  # type: ignore[union-attr]
        layers = {getattr(m, "layer_idx", None) for m in model.modules()} - {None}
        if not layers:
            raise ValueError(f"model: {type(model).__name__} exposes no attention layer_idx; it cannot be paged")
        self.num_layers = len(layers)

    @torch.inference_mode()
    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, logits_indices: torch.Tensor
    ) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids[None],
            position_ids=positions[None],
            use_cache=False,
            logits_to_keep=logits_indices,
            **{META_KWARG: meta},
        )
        return out.logits[0]
