"""Find one attention layer's K/V projections and RoPE in a loaded vLLM model.

Slim needs W_K, W_V (+ biases) and the rotation applied to K. vLLM's attention
impl only ever sees the `Attention` module, so these come from its parent
module, read right after the checkpoint is loaded (before the CPU platform
repacks and deletes the qkv weight). Only attention modules whose layout is
known (and proven by the tests) are accepted; anything else is refused.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vllm_slim.ops.slim import Rotary, SlimNotApplicable


@dataclass(frozen=True)
class QKVLayout:
    attr: str  # the fused q/k/v projection on the attention module
    per_head_interleaved: bool  # rows [h0: q k v | h1: q k v | ...] instead of [q | k | v]


# By attention-module class name (subclasses match too).
QKV_LAYOUTS = {
    "LlamaAttention": QKVLayout("qkv_proj", False),
    "GPTJAttention": QKVLayout("qkv_proj", False),
    "OPTAttention": QKVLayout("qkv_proj", False),
    "GPT2Attention": QKVLayout("c_attn", False),
    # Hugging Face's module, run by vLLM's Transformers backend.
    "GPTNeoXAttention": QKVLayout("query_key_value", True),
}
# Per-head q/k normalisation breaks K = X·W_K (one scale per token and head is lost).
QK_NORM_NAMES = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")


@dataclass
class AttentionWeights:
    """K = X·w_k + k_bias, V = X·w_v + v_bias (row vectors), and K's rotation: as a table (on the
    weights' device) for the backend, and as the model's own code for the bind-time check."""

    w_k: torch.Tensor  # [hidden, H·D]
    w_v: torch.Tensor  # [hidden, H·Dv]
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    rotary: Rotary | None
    # keys [T, H, D] at positions [T] -> rotated as the model rotates them (None: no rotation)
    rotate_keys: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


def attention_weights(model: nn.Module, layer_name: str, attn: nn.Module) -> AttentionWeights:
    """K/V projections and rotation of the `Attention` module at `layer_name`."""
    parent = model.get_submodule(layer_name.rsplit(".", 1)[0])
    for norm in QK_NORM_NAMES:
        if isinstance(getattr(parent, norm, None), nn.Module):
            raise SlimNotApplicable(
                f"{layer_name}: QK-norm ({type(parent).__name__}.{norm}) normalises each key, "
                "so V is not a linear function of the cached K"
            )
    layout = next((QKV_LAYOUTS[c.__name__] for c in type(parent).__mro__ if c.__name__ in QKV_LAYOUTS), None)
    if layout is None:
        raise SlimNotApplicable(
            f"{layer_name}: slim does not know where {type(parent).__name__} keeps its q/k/v "
            f"projections (supported: {', '.join(QKV_LAYOUTS)})"
        )
    qkv = getattr(parent, layout.attr)
    weight, bias = _dense_weight(qkv, layer_name), getattr(qkv, "bias", None)
    heads, head_size = attn.num_heads, attn.head_size
    if weight.shape[0] != 3 * heads * head_size:
        raise SlimNotApplicable(
            f"{layer_name}: qkv weight has {weight.shape[0]} rows, expected 3 x {heads} heads x "
            f"{head_size} (is the model tensor-parallel or quantized?)"
        )
    k_rows, v_rows = key_value_rows(heads, head_size, layout.per_head_interleaved)
    rotary, rotate_keys = _rotary(model, parent, layer_name)
    return AttentionWeights(
        w_k=weight[k_rows].T,
        w_v=weight[v_rows].T,
        k_bias=None if bias is None else bias[k_rows].detach(),
        v_bias=None if bias is None else bias[v_rows].detach(),
        # process_weights_after_loading runs outside the loader's device context: the table is
        # built on the CPU, and must live where the weights (and the cache) do.
        rotary=None if rotary is None else rotary.to(weight.device),
        rotate_keys=rotate_keys,
    )


def key_value_rows(heads: int, head_size: int, per_head_interleaved: bool):
    """Row indices of K and V (head-major) in the fused qkv weight."""
    rows = torch.arange(3 * heads * head_size)
    if per_head_interleaved:
        rows = rows.view(heads, 3, head_size).transpose(0, 1)  # [q|k|v, head, dim]
    rows = rows.reshape(3, heads * head_size)
    return rows[1], rows[2]


def _dense_weight(linear: nn.Module, layer_name: str) -> torch.Tensor:
    weight = getattr(linear, "weight", None)
    if weight is None or weight.numel() == 0 or not weight.dtype.is_floating_point:
        raise SlimNotApplicable(
            f"{layer_name}: the qkv weight is not a dense float matrix "
            f"({None if weight is None else weight.dtype}); quantized checkpoints are not supported"
        )
    return weight.detach()


def _rotary(model: nn.Module, parent: nn.Module, layer_name: str):
    """The layer's RoPE as a float32 cos/sin table and as the model's own rotation of keys, or
    (None, None) (learned/no positions)."""
    rope = getattr(parent, "rotary_emb", None)
    if rope is not None:  # vLLM's RotaryEmbedding
        if not hasattr(rope, "_compute_cos_sin_cache") or not hasattr(rope, "rotary_dim"):
            raise SlimNotApplicable(f"{layer_name}: unsupported rotary embedding {type(rope).__name__}")
        # Recompute in float32: the engine's own cache is stored in the model dtype.
        cos_sin = rope._compute_cos_sin_cache().float()
        if cos_sin.shape[-1] != rope.rotary_dim:
            raise SlimNotApplicable(
                f"{layer_name}: rotary embedding {type(rope).__name__} is not a plain "
                f"cos/sin rotation (cache width {cos_sin.shape[-1]} != rotary_dim {rope.rotary_dim})"
            )
        return Rotary(cos_sin, rope.rotary_dim, bool(rope.is_neox_style)), _model_rotation(rope)
    # Hugging Face models (Transformers backend) rotate with one model-level module.
    hf_rope = next((m for n, m in model.named_modules() if n.endswith("rotary_emb") and hasattr(m, "inv_freq")), None)
    if hf_rope is None:
        return None, None
    max_positions = getattr(hf_rope, "max_seq_len_cached", None) or getattr(
        getattr(hf_rope, "config", None), "max_position_embeddings"
    )
    if float(getattr(hf_rope, "attention_scaling", 1.0)) != 1.0:
        raise SlimNotApplicable(f"{layer_name}: scaled rotary embedding ({type(hf_rope).__name__})")
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), hf_rope.inv_freq.float().cpu())
    # Hugging Face's rotate_half pairs dimension i with i + rotary_dim/2: NeoX style.
    rotary = Rotary(torch.cat((freqs.cos(), freqs.sin()), dim=-1), 2 * freqs.shape[1], neox=True)
    # Not checked against the module's own code (its forward is the whole attention block).
    return rotary, None


def _model_rotation(rope: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Keys rotated by vLLM's rotary module itself (its native path, in its table's dtype so that
    the module keeps its table as it is)."""

    def rotate_keys(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        table = rope.cos_sin_cache
        rotated, _ = rope.forward_native(positions.to(table.device), keys.flatten(1).to(table.device, table.dtype))
        return rotated.view_as(keys)

    return rotate_keys
