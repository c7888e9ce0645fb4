"""A leaner forward for Llama-family decoder layers: merged projections and fused elementwise steps.

transformers' decoder layer runs some forty small ops per layer (three projections for q, k and v,
two for the MLP's gate and up, RMSNorm as five passes, rotary as six). On a CPU those passes over
memory and the Python between them are a good part of a decode step. This module rewrites, in place
and only for architectures whose layers it knows (Llama, Mistral, Qwen2), each layer to: RMSNorm ->
one q/k/v GEMM -> rotary in place -> paged attention -> o_proj -> residual add + RMSNorm -> one
gate/up GEMM -> SiLU * up -> down_proj -> residual add. The maths is the same; only the order of a
few floating-point reductions changes. Layers it does not recognise keep transformers' forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from kernels.fused_ops import FusedOps

from .adapter import META_KWARG

FUSABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})


def _merged(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear computing the given ones side by side (outputs concatenated in order)."""
    first = linears[0]
    has_bias = first.bias is not None
    out = torch.nn.utils.skip_init(  # no random init: the weights are overwritten at once
        nn.Linear,
        first.in_features,
        sum(lin.out_features for lin in linears),
        bias=has_bias,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    with torch.no_grad():
        out.weight.copy_(torch.cat([lin.weight for lin in linears]))
        if has_bias:
            out.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return out


def _is_silu(module: Any) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"  # transformers' ACT2FN["silu"]


def _is_rms_norm(module: Any) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def _fusable(layer: nn.Module) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return False
    linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(type(lin) is nn.Linear for lin in linears):
        return False
    if (attn.k_proj.bias is None) != (attn.q_proj.bias is None) or (attn.v_proj.bias is None) != (
        attn.q_proj.bias is None
    ):
        return False
    return (
        _is_silu(getattr(mlp, "act_fn", None))
        and (mlp.gate_proj.bias is None) == (mlp.up_proj.bias is None)
        and _is_rms_norm(getattr(layer, "input_layernorm", None))
        and _is_rms_norm(getattr(layer, "post_attention_layernorm", None))
        and _window(attn) is None
        and not hasattr(attn, "q_norm")
        and isinstance(getattr(attn, "scaling", None), float)
        and isinstance(getattr(attn, "head_dim", None), int)
    )


def _window(attn: Any) -> Any:
    """The layer's sliding window: Qwen2 keeps it on the module, Mistral passes its config's at call time."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(getattr(attn, "config", None), "sliding_window", None)


def fuse_decoder_layers(model: nn.Module, ops: FusedOps) -> int:
    """Rewrites the known decoder layers of `model` in place; returns how many were rewritten."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FUSABLE_MODEL_TYPES:
        return 0
    fused = 0
    module: Any
    for module in list(model.modules()):  # a list: the loop replaces submodules
        if _is_rms_norm(module) and not hasattr(module, "_tokenrelay_fused"):
            module.forward = types.MethodType(_norm_forward, module)
            module._tokenrelay_fused = ops
        if not type(module).__name__.endswith("DecoderLayer") or not _fusable(module):
            continue
        attn, mlp = module.self_attn, module.mlp
        attn.qkv_proj = _merged([attn.q_proj, attn.k_proj, attn.v_proj])
        attn.qkv_split = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        del attn.q_proj, attn.k_proj, attn.v_proj  # the merged copy replaces them: no second set of weights
        mlp.gate_up_proj = _merged([mlp.gate_proj, mlp.up_proj])
        del mlp.gate_proj, mlp.up_proj
        module.forward = types.MethodType(_layer_forward, module)
        module._tokenrelay_fused = ops
        fused += 1
    return fused


def _norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    return self._tokenrelay_fused.rms_norm(flat, self.weight, self.variance_epsilon).view(hidden_states.shape)


def _layer_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """[1, tokens, hidden] -> [1, tokens, hidden]: the same computation as transformers' layer."""
    ops: FusedOps = self._tokenrelay_fused
    meta = kwargs[META_KWARG]
    attn, mlp = self.self_attn, self.mlp
    x = hidden_states[0]
    tokens = x.shape[0]
    normed = ops.rms_norm(x, self.input_layernorm.weight, self.input_layernorm.variance_epsilon)
    q, k, v = attn.qkv_proj(normed).split(attn.qkv_split, dim=-1)
    q = q.view(tokens, -1, attn.head_dim)
    k = k.view(tokens, -1, attn.head_dim)
    v = v.view(tokens, -1, attn.head_dim)
    assert position_embeddings is not None, "the model passes rotary cos/sin to its layers"
    cos, sin = position_embeddings
    ops.rotary_(q, k, cos[0], sin[0])
    out = meta.extras["backend"].forward(q, k, v, attn.layer_idx, meta, attn.scaling, None)
    attn_out = attn.o_proj(out.reshape(tokens, -1))
    summed, normed = ops.add_rms_norm(
        attn_out, x, self.post_attention_layernorm.weight, self.post_attention_layernorm.variance_epsilon
    )
    mlp_out = mlp.down_proj(ops.silu_mul(mlp.gate_up_proj(normed)))
    return summed.add_(mlp_out)[None]
