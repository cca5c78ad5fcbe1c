"""Prefill form: rebuild the sequence's V once (left form), then fused softmax attention.

Cost is L·d² for the rebuild plus ordinary attention, so it wins when many
queries share the rebuilt values (Lq ≥ head_size; see `decode.py` otherwise).
"""

import torch
import torch.nn.functional as F

from vllm_slim.ops.slim.projection import SlimProjection, rebuild_values
from vllm_slim.ops.slim.rope import Rotary, unrope


def causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """[Lq, L] bool, True where query i (position L-Lq+i) may attend key j."""
    rows = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return torch.arange(kv_len, device=device)[None, :] <= rows


def parallel_slim_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    spill: torch.Tensor | None,
    proj: SlimProjection,
    rotary: Rotary | None,
    scale: float,
    v_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `naive_slim_attention`; returns [Lq, H, Dv] float32."""
    q_len, kv_len = q.shape[0], k.shape[0]
    positions = torch.arange(kv_len, device=k.device)
    v = rebuild_values(unrope(k, positions, rotary), spill, proj)
    if v_new is not None:
        v[kv_len - q_len :] = v_new.float()
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1),
        k.float().transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=causal_mask(q_len, kv_len, k.device),
        scale=scale,
    )
    return out.transpose(0, 1)
