"""Reference form of a hybrid beyond the paper: exact exp weights for the sink and recent tokens, the
truncated series for everything older, all under one normalizer.

Key s is exact for query t when s < sink_tokens or t − s < window, so the query itself is exact whenever
window ≥ 1. Numerator and denominator sum over both parts, so the parts must share one scale: the exact
weights are exp(x − c) and the series weights T(x)·exp(−c), with c the log of the row's largest weight. A
served form would keep sink and window keys in a cache and fold a token into the SATA state as it leaves
the window; the read-out there is scaled by the same exp(−c).
"""

import torch

from vllm_slim.ops.sata.basis import DEFAULT_ORDER, group_queries, truncated_exp


def exact_key_mask(tokens: int, sink_tokens: int, window: int, device=None) -> torch.Tensor:
    """[T, T] bool, True where key s gets its exact weight for query t (only causal pairs s ≤ t)."""
    position = torch.arange(tokens, device=device)
    distance = position[:, None] - position[None, :]
    return (distance >= 0) & ((position[None, :] < sink_tokens) | (distance < window))


def hybrid_weights(logits: torch.Tensor, order: int, sink_tokens: int, window: int) -> torch.Tensor:
    """Unnormalized causal weights [..., T, T] for logits [..., T, T] (query t, key s), each row on its own scale."""
    tokens = logits.shape[-1]
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=logits.device).tril()
    exact = exact_key_mask(tokens, sink_tokens, window, logits.device)
    series = truncated_exp(logits, order)
    # Each weight as sign·exp(log-magnitude), so one offset, the row's largest log-magnitude, scales both parts
    # without overflow or a 0/0 row in float32 (the series can be negative for even orders).
    log_magnitude = torch.where(exact, logits, series.abs().log()).masked_fill(~causal, float("-inf"))
    offset = log_magnitude.amax(-1, keepdim=True)
    return torch.where(exact, 1.0, series.sign()) * (log_magnitude - offset).exp()


def naive_hybrid_sata_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    order: int = DEFAULT_ORDER,
    sink_tokens: int = 4,
    window: int = 128,
) -> torch.Tensor:
    """Causal attention weighting key s for query t by exp(x) if it is a sink or recent key, else by
    Σ_{p<order} x^p/p!, x = q_t·k_s·scale; one normalizer over both.

    q [T, H, d], k [T, Hkv, d], v [T, Hkv, d_v]; scale defaults to 1/√d. Returns [T, H, d_v] in q's dtype.
    Computed in at least float32 (float64 inputs stay float64); quadratic in T.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("thgd,shd->hgts", group_queries(q.to(dtype), k.shape[1]), k.to(dtype)) * scale
    weights = hybrid_weights(logits, order, sink_tokens, window)
    out = torch.einsum("hgts,shv->thgv", weights / weights.sum(-1, keepdim=True), v.to(dtype))
    return out.flatten(1, 2).to(q.dtype)
