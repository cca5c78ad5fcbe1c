"""Find one attention layer's K/V projections and RoPE in a loaded vLLM model.

Slim needs W_K, W_V (+ biases) and the rotation applied to K. vLLM's attention
impl only ever sees the `Attention` module, so these come from its parent
module, read right after the checkpoint is loaded (before the CPU platform
repacks and deletes the qkv weight).
"""

from dataclasses import dataclass

import torch
from torch import nn

from vllm_slim.ops.slim import Rotary, SlimNotApplicable

# Fused q|k|v projections, rows [q | k | v] (vLLM's QKVParallelLinear), by attribute name.
FUSED_QKV_NAMES = ("qkv_proj", "c_attn", "query_key_value", "qkv")
# Per-head q/k normalisation breaks K = X·W_K (one scale per token and head is lost).
QK_NORM_NAMES = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


@dataclass
class AttentionWeights:
    """K = X·w_k + k_bias, V = X·w_v + v_bias (row vectors), and K's rotation."""

    w_k: torch.Tensor  # [hidden, H·D]
    w_v: torch.Tensor  # [hidden, H·Dv]
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    rotary: Rotary | None


def attention_weights(model: nn.Module, layer_name: str, attn: nn.Module) -> AttentionWeights:
    """K/V projections and rotation of the `Attention` module at `layer_name`."""
    parent = model.get_submodule(layer_name.rsplit(".", 1)[0])
    for norm in QK_NORM_NAMES:
        if isinstance(getattr(parent, norm, None), nn.Module):
            raise SlimNotApplicable(
                f"{layer_name}: QK-norm ({type(parent).__name__}.{norm}) normalises each key, "
                "so V is not a linear function of the cached K"
            )
    q_size = attn.num_heads * attn.head_size
    kv_size = attn.num_kv_heads * attn.head_size
    qkv = next((getattr(parent, n) for n in FUSED_QKV_NAMES if hasattr(parent, n)), None)
    if qkv is None:
        raise SlimNotApplicable(
            f"{layer_name}: no fused q/k/v projection found on {type(parent).__name__} "
            f"(looked for {', '.join(FUSED_QKV_NAMES)})"
        )
    weight, bias = _dense_weight(qkv, layer_name), getattr(qkv, "bias", None)
    if weight.shape[0] != q_size + 2 * kv_size:
        raise SlimNotApplicable(
            f"{layer_name}: qkv weight has {weight.shape[0]} rows, expected "
            f"{q_size} + 2x{kv_size} (is the model tensor-parallel or quantized?)"
        )
    k_rows, v_rows = slice(q_size, q_size + kv_size), slice(q_size + kv_size, q_size + 2 * kv_size)
    return AttentionWeights(
        w_k=weight[k_rows].T,
        w_v=weight[v_rows].T,
        k_bias=None if bias is None else bias[k_rows].detach(),
        v_bias=None if bias is None else bias[v_rows].detach(),
        rotary=_rotary(parent, layer_name),
    )


def _dense_weight(linear: nn.Module, layer_name: str) -> torch.Tensor:
    weight = getattr(linear, "weight", None)
    if weight is None or weight.numel() == 0 or not weight.dtype.is_floating_point:
        raise SlimNotApplicable(
            f"{layer_name}: the qkv weight is not a dense float matrix "
            f"({None if weight is None else weight.dtype}); quantized checkpoints are not supported"
        )
    return weight.detach()


def _rotary(parent: nn.Module, layer_name: str) -> Rotary | None:
    rope = getattr(parent, "rotary_emb", None)
    if rope is None:
        return None  # learned or no positions: K is cached as computed
    compute = getattr(rope, "_compute_cos_sin_cache", None)
    if compute is None or not hasattr(rope, "rotary_dim"):
        raise SlimNotApplicable(f"{layer_name}: unsupported rotary embedding {type(rope).__name__}")
    # Recompute in float32: the engine's own cache is stored in the model dtype.
    cos_sin = compute().float()
    if cos_sin.shape[-1] != rope.rotary_dim:
        raise SlimNotApplicable(
            f"{layer_name}: rotary embedding {type(rope).__name__} is not a plain "
            f"cos/sin rotation (cache width {cos_sin.shape[-1]} != rotary_dim {rope.rotary_dim})"
        )
    return Rotary(cos_sin, rope.rotary_dim, bool(rope.is_neox_style))
