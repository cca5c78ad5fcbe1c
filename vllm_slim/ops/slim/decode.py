"""Decode form: the reordered product (softmax·K)·W_KV of the paper's §2.

Z = P·K_raw is one (h × L)·(L × d) product over the whole key row, shared by
all heads; each head then maps its d-wide Z row through its own W_KV block.
No V is ever materialised, so the cost is Lq·h·L·d + Lq·h·d·Dv: cheaper than
rebuilding V (L·d²) while Lq < head_size.
"""

import torch

from vllm_slim.ops.slim.parallel import causal_mask
from vllm_slim.ops.slim.projection import SlimProjection
from vllm_slim.ops.slim.rope import Rotary, unrope


def decode_slim_attention(
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
    heads = proj.num_heads
    scores = torch.einsum("qhd,lhd->hql", q.float(), k.float()) * scale
    scores.masked_fill_(~causal_mask(q_len, kv_len, k.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)

    # Tokens whose V the engine handed over are weighted directly; the rest
    # (the cached context) go through the reordered product.
    ctx_len = kv_len - q_len if v_new is not None else kv_len
    p_ctx = probs[..., :ctx_len]
    k_raw = unrope(k[:ctx_len], torch.arange(ctx_len, device=k.device), rotary).flatten(1)
    if proj.k_bias is not None:
        k_raw = k_raw - proj.k_bias
    z = torch.einsum("hql,ld->qhd", p_ctx, k_raw)
    w_kv = proj.w_kv.view(k_raw.shape[1], heads, -1).transpose(0, 1)  # [H, d, Dv]
    out = torch.einsum("qhd,hde->qhe", z, w_kv)
    if proj.spill:
        zs = torch.einsum("hql,lr->qhr", p_ctx, spill[:ctx_len].float())
        w_sv = proj.w_sv.view(proj.spill, heads, -1).transpose(0, 1)  # [H, r, Dv]
        out = out + torch.einsum("qhr,hre->qhe", zs, w_sv)
    if proj.v_bias is not None:
        out = out + p_ctx.sum(-1).transpose(0, 1)[..., None] * proj.v_bias.view(heads, -1)
    if v_new is not None:
        out = out + torch.einsum("hql,lhe->qhe", probs[..., ctx_len:], v_new.float())
    return out
