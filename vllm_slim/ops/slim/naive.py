"""Reference slim attention: rebuild every V, then plain causal softmax attention.

One sequence, contiguous tensors, one head at a time; meant to be read and
trusted, not to be fast. Every other form is tested against this one.
"""

import torch

from vllm_slim.ops.slim.projection import SlimProjection, rebuild_values
from vllm_slim.ops.slim.rope import Rotary, unrope


def naive_slim_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    spill: torch.Tensor | None,
    proj: SlimProjection,
    rotary: Rotary | None,
    scale: float,
    v_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the last Lq positions of a sequence.

    q [Lq, H, D] and k [L, H, D] are post-RoPE; k holds the whole sequence
    (positions 0..L-1) with the queries' own keys last; spill [L, r]. If given,
    v_new [Lq, H, Dv] replaces the rebuilt values of the last Lq tokens (the
    engine hands those over directly). Returns [Lq, H, Dv] float32.
    """
    q_len, kv_len = q.shape[0], k.shape[0]
    v = rebuild_values(unrope(k, torch.arange(kv_len), rotary), spill, proj)
    if v_new is not None:
        v[kv_len - q_len :] = v_new.float()
    out = torch.empty(q_len, proj.num_heads, v.shape[-1])
    for h in range(proj.num_heads):
        for i in range(q_len):
            visible = kv_len - q_len + i + 1
            scores = (k[:visible, h].float() @ q[i, h].float()) * scale
            out[i, h] = torch.softmax(scores, dim=0) @ v[:visible, h]
    return out
