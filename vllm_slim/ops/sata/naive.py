"""Reference forms: quadratic causal attention with truncated-series weights, and with exact softmax.

They never touch the feature basis, so they check the basis-based forms independently. Computed in
at least float32 (float64 inputs stay float64); quadratic in T, meant to be read, not to be fast.
"""

import torch

from vllm_slim.ops.sata.basis import DEFAULT_ORDER, group_queries, truncated_exp


def _causal_logits(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits q·k·scale [Hkv, G, T, T] and the causal mask [T, T] (True where key s ≤ query t)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    queries = group_queries(q.to(dtype), k.shape[1])
    logits = torch.einsum("thgd,shd->hgts", queries, k.to(dtype)) * scale
    return logits, torch.ones(q.shape[0], q.shape[0], dtype=torch.bool, device=q.device).tril()


def _attend(weights: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row-normalized weights [Hkv, G, T, T] applied to v [T, Hkv, d_v] → [T, H, d_v] in `dtype`."""
    out = torch.einsum("hgts,shv->thgv", weights / weights.sum(-1, keepdim=True), v.to(weights.dtype))
    return out.flatten(1, 2).to(dtype)


def naive_sata_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, order: int = DEFAULT_ORDER
) -> torch.Tensor:
    """Causal attention weighting key s for query t by Σ_{p<order} x^p/p!, x = q_t·k_s·scale.

    q [T, H, d], k [T, Hkv, d], v [T, Hkv, d_v]; scale defaults to 1/√d. Returns [T, H, d_v] in q's dtype.
    """
    logits, causal = _causal_logits(q, k, scale)
    return _attend(truncated_exp(logits, order).masked_fill(~causal, 0), v, q.dtype)


def naive_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Exact causal softmax attention, same contract as `naive_sata_attention`."""
    logits, causal = _causal_logits(q, k, scale)
    return _attend(logits.masked_fill(~causal, float("-inf")).softmax(-1), v, q.dtype)
