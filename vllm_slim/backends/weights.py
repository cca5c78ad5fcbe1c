"""Find one attention layer's K/V projections and RoPE in a loaded vLLM model.

Slim needs W_K, W_V (+ biases) and the rotation applied to K. vLLM's attention
impl only ever sees the `Attention` module, so these come from its parent
module, read right after the checkpoint is loaded (before the CPU platform
repacks and deletes the qkv weight). Only attention modules whose layout is
known (and proven by the tests) are accepted; anything else is refused.
"""

from collections.abc import Callable
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch
from torch import nn

from vllm_slim.ops.slim import Rotary, SlimNotApplicable


@dataclass(frozen=True)
class QKVLayout:
    attr: str  # the fused q/k/v projection on the attention module
    per_head_interleaved: bool = False  # rows [h0: q k v | h1: q k v | ...] instead of [q | k | v]


# By attention-module class name (subclasses match too): vLLM's own modules, then Hugging Face's, which
# vLLM's Transformers backend runs (GPT-NeoX/Pythia, Phi-2, OLMo in vLLM 0.32 and 0.33).
QKV_LAYOUTS = {
    "LlamaAttention": QKVLayout("qkv_proj"),  # Llama-1/2, CodeLlama, Phi-3 (a Llama subclass model)
    "Qwen2Attention": QKVLayout("qkv_proj"),  # Qwen1.5 (q/k/v biases)
    "GemmaAttention": QKVLayout("qkv_proj"),  # Gemma-7B: heads x head_dim wider than hidden
    "StablelmAttention": QKVLayout("qkv_proj"),
    "GPTJAttention": QKVLayout("qkv_proj"),
    "OPTAttention": QKVLayout("qkv_proj"),
    "GPT2Attention": QKVLayout("c_attn"),
    "GPTNeoXAttention": QKVLayout("query_key_value", per_head_interleaved=True),
    # The Transformers backend fuses a module's q_proj/k_proj/v_proj into one qkv_proj [q | k | v]
    # (vLLM 0.32 and 0.33, models/transformers/fusers/qkv.py).
    "PhiAttention": QKVLayout("qkv_proj"),
    "OlmoAttention": QKVLayout("qkv_proj"),
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
    clip = getattr(parent, "clip_qkv", None) or getattr(getattr(parent, "config", None), "clip_qkv", None)
    if clip:
        raise SlimNotApplicable(
            f"{layer_name}: {type(parent).__name__} clamps q, k and v to ±{clip} (clip_qkv): a clamped K no "
            "longer determines V"
        )
    heads, head_size = attn.num_heads, attn.head_size
    qkv = getattr(parent, layout.attr, None)
    if qkv is None:
        raise SlimNotApplicable(
            f"{layer_name}: {type(parent).__name__} has no fused {layout.attr} (vLLM's Transformers backend "
            "fuses q/k/v where it can; slim reads the fused projection only)"
        )
    weight, bias = _projection(qkv, layer_name)
    if weight.shape[0] != 3 * heads * head_size:
        raise SlimNotApplicable(
            f"{layer_name}: qkv weight has {weight.shape[0]} rows, expected 3 x {heads} heads x "
            f"{head_size} (is the model tensor-parallel or quantized?)"
        )
    k_rows, v_rows = key_value_rows(heads, head_size, layout.per_head_interleaved)
    w_k, w_v = weight[k_rows], weight[v_rows]
    k_bias, v_bias = (None, None) if bias is None else (bias[k_rows], bias[v_rows])
    rotary, rotate_keys = _rotary(model, parent, layer_name, w_k.device)
    return AttentionWeights(w_k=w_k.T, w_v=w_v.T, k_bias=k_bias, v_bias=v_bias, rotary=rotary, rotate_keys=rotate_keys)


def key_value_rows(heads: int, head_size: int, per_head_interleaved: bool):
    """Row indices of K and V (head-major) in the fused qkv weight."""
    rows = torch.arange(3 * heads * head_size)
    if per_head_interleaved:
        rows = rows.view(heads, 3, head_size).transpose(0, 1)  # [q|k|v, head, dim]
    rows = rows.reshape(3, heads * head_size)
    return rows[1], rows[2]


def _projection(linear: nn.Module, layer_name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear layer's dense float weight [out, in] and bias (or None), detached."""
    weight = getattr(linear, "weight", None)
    if weight is None or weight.numel() == 0 or not weight.dtype.is_floating_point:
        raise SlimNotApplicable(
            f"{layer_name}: the qkv weight is not a dense float matrix "
            f"({None if weight is None else weight.dtype}); quantized checkpoints are not supported"
        )
    bias = getattr(linear, "bias", None)
    return weight.detach(), None if bias is None else bias.detach()


def _rotary(model: nn.Module, parent: nn.Module, layer_name: str, device: torch.device):
    """The layer's RoPE as a float32 cos/sin table on `device` (the weights' and the cache's) and as the
    model's own rotation of keys, or (None, None) (learned/no positions)."""
    rope = getattr(parent, "rotary_emb", None)
    if rope is not None:  # vLLM's rotary embeddings
        return _shared(rope, device, lambda: _vllm_rotary(rope, layer_name, device)), _model_rotation(rope)
    # Hugging Face models (Transformers backend) rotate with one model-level module.
    hf_rope = next((m for n, m in model.named_modules() if n.endswith("rotary_emb") and hasattr(m, "inv_freq")), None)
    if hf_rope is None:
        return None, None
    # Not checked against the module's own code (its forward is the whole attention block).
    return _shared(hf_rope, device, lambda: _hf_rotary(hf_rope, device)), None


# One rotary module serves every layer of a model (vLLM's get_rope caches them; Hugging Face's is
# model-level): one table (and its inverse) per module, not per layer (Phi-3-128k's is 50 MiB).
_ROTARIES: "WeakKeyDictionary[nn.Module, Rotary]" = WeakKeyDictionary()


def _shared(rope: nn.Module, device: torch.device, build: Callable[[], Rotary]) -> Rotary:
    """`rope`'s Rotary on `device`, built once."""
    rotary = _ROTARIES.get(rope)
    if rotary is None or rotary.cos_sin.device != device:
        rotary = _ROTARIES[rope] = build()
    return rotary


def _hf_rotary(hf_rope: nn.Module, device: torch.device) -> Rotary:
    """The table a Hugging Face rotary module rotates with, float32, on `device`."""
    max_positions = getattr(hf_rope, "max_seq_len_cached", None) or getattr(
        getattr(hf_rope, "config", None), "max_position_embeddings"
    )
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), hf_rope.inv_freq.float().cpu())
    # Its cos and sin carry the scaling's magnitude (YaRN's, longrope's), as vLLM's tables do.
    magnitude = float(getattr(hf_rope, "attention_scaling", 1.0))
    # Hugging Face's rotate_half pairs dimension i with i + rotary_dim/2: NeoX style.
    table = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * magnitude
    return Rotary(table.to(device), 2 * freqs.shape[1], neox=True)


def _vllm_rotary(rope: nn.Module, layer_name: str, device: torch.device) -> Rotary:
    """The table a vLLM rotary module rotates with, recomputed in float32 (the module keeps its own in the
    model dtype), on `device` (process_weights_after_loading runs outside the loader's device context:
    the table is computed on the CPU)."""
    if hasattr(rope, "long_short_cos_sin_cache"):
        # Phi-3's longrope: the short table then the long one; the module picks one for good at start-up
        # (max_model_len past original_max_position_embeddings: the long one). NeoX style only.
        if rope.use_long_rope:
            table = rope._compute_cos_sin_cache(rope.max_position_embeddings, rope.long_factor, rope.long_mscale)
        else:
            table = rope._compute_cos_sin_cache(
                rope.original_max_position_embeddings, rope.short_factor, rope.short_mscale
            )
        return Rotary(table.float().to(device), rope.rotary_dim, neox=True)
    if not all(hasattr(rope, a) for a in ("_compute_cos_sin_cache", "rotary_dim", "is_neox_style")):
        raise SlimNotApplicable(f"{layer_name}: unsupported rotary embedding {type(rope).__name__}")
    cos_sin = rope._compute_cos_sin_cache().float()
    if cos_sin.shape[-1] != rope.rotary_dim:
        raise SlimNotApplicable(
            f"{layer_name}: rotary embedding {type(rope).__name__} is not a plain "
            f"cos/sin rotation (cache width {cos_sin.shape[-1]} != rotary_dim {rope.rotary_dim})"
        )
    return Rotary(cos_sin.to(device), rope.rotary_dim, bool(rope.is_neox_style))


def _model_rotation(rope: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Keys rotated by vLLM's rotary module itself (its native path, in its table's dtype so that
    the module keeps its table as it is)."""
    table = rope.long_short_cos_sin_cache if hasattr(rope, "long_short_cos_sin_cache") else rope.cos_sin_cache
    # Phi-3's longrope has no forward_native: its forward is torch code.
    native = getattr(rope, "forward_native", rope.forward)

    def rotate_keys(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        flat = keys.flatten(1).to(table.device, table.dtype)
        _, rotated = native(positions.to(table.device), flat.clone(), flat)
        return rotated.view_as(keys)

    return rotate_keys
