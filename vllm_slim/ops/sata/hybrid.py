"""A hybrid beyond the paper: exact exp weights for the sink and recent tokens, the truncated series for
everything older, all under one normalizer. `naive_hybrid_sata_attention` is the quadratic reference;
`chunk_hybrid_sata_attention` the served form (prefill and decode) over a fixed-size state.

Key s is exact for query t when s < sink_tokens or t − s < window, so the query itself is exact whenever
window ≥ 1. Numerator and denominator sum over both parts, so the parts must share one scale: the exact
weights are exp(x − c) and the series weights T(x)·exp(−c), with c the log of the row's largest weight. The
served form keeps the sink and window keys in its state and folds a token into the series state as it leaves
the window; its read-out is scaled by the same exp(−c), c from the exact weights alone.
"""

from dataclasses import dataclass

import torch

from vllm_slim.ops.sata.basis import (
    DEFAULT_ORDER,
    SataState,
    feature_size,
    group_queries,
    initial_state,
    prepare_state,
    truncated_exp,
)
from vllm_slim.ops.sata.chunk import key_masks, one_sequence, split_state_page


def hybrid_weights(logits: torch.Tensor, order: int, sink_tokens: int, window: int) -> torch.Tensor:
    """Unnormalized causal weights [..., T, T] for logits [..., T, T] (query t, key s), each row on its own scale."""
    position = torch.arange(logits.shape[-1], device=logits.device)
    causal, exact = key_masks(position, position, sink_tokens, window)
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


@dataclass(frozen=True)
class HybridSataState:
    """One sequence's hybrid state per KV head: the series state of the old keys, and the exact keys.

    `keys`/`values` [Hkv, S + W, ·]: slots 0..S−1 hold the sink tokens (position p in slot p), slots
    S..S+W−1 a ring of the W most recent later tokens (position p in slot S + (p − S) mod W). After n
    tokens the series state holds positions S..n−1−W: a token enters it when it leaves the window.
    """

    series: SataState
    keys: torch.Tensor
    values: torch.Tensor


def initial_hybrid_state(
    num_kv_heads: int, head_size: int, head_size_v: int, order: int, sink_tokens: int, window: int, device=None
) -> HybridSataState:
    slots = sink_tokens + window
    return HybridSataState(
        initial_state(num_kv_heads, head_size, head_size_v, order, device),
        torch.zeros(num_kv_heads, slots, head_size, device=device),
        torch.zeros(num_kv_heads, slots, head_size_v, device=device),
    )


def chunk_hybrid_sata_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: HybridSataState | None = None,
    seen: int = 0,
    scale: float | None = None,
    order: int = DEFAULT_ORDER,
    sink_tokens: int = 4,
    window: int = 128,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, HybridSataState]:
    """The hybrid over T new tokens of one sequence at positions seen..seen+T−1, after the `seen` tokens
    `state` holds (`chunk.chunk_sata_varlen` on one sequence). q [T, H, d], k [T, Hkv, d], v [T, Hkv, d_v].
    Returns [T, H, d_v] in q's dtype and the new state; the given one is not modified.
    """
    if window < 1:
        raise ValueError(f"the hybrid needs a window of at least 1 token (the query's own), got {window}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if state is None:
        state = initial_hybrid_state(k.shape[1], k.shape[2], v.shape[2], order, sink_tokens, window, k.device)
    series = prepare_state(state.series, k, v, order)
    page = torch.cat((
        torch.cat((series.numerator, series.normalizer[..., None]), -1).flatten(-2),
        state.keys.flatten(-2), state.values.flatten(-2),
    ), -1)[None]
    out = one_sequence(q, k, v, seen, page, scale, order, sink_tokens, window, chunk_size)
    m = feature_size(k.shape[2], order)
    new_series, keys, values = split_state_page(page[0], m, k.shape[2], v.shape[2], sink_tokens + window)
    return out, HybridSataState(SataState(new_series[..., :-1], new_series[..., -1]), keys, values)
