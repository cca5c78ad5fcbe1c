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
    feature_map,
    group_queries,
    initial_state,
    prepare_state,
    truncated_exp,
)


def key_masks(
    query_positions: torch.Tensor, key_positions: torch.Tensor, sink_tokens: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[Tq, Tk] bool masks (causal, exact): key s counts for query t when 0 ≤ s ≤ t (position −1: no key),
    and gets its exact weight when it also is a sink or one of the `window` most recent."""
    distance = query_positions[:, None] - key_positions[None, :]
    causal = (key_positions[None, :] >= 0) & (distance >= 0)
    return causal, causal & ((key_positions[None, :] < sink_tokens) | (distance < window))


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


def slot_positions(seen: int, sink_tokens: int, window: int, device=None) -> torch.Tensor:
    """[S + W] the position each slot holds after `seen` tokens, −1 where it holds none yet."""
    slot = torch.arange(sink_tokens + window, device=device)
    sinks = torch.where(slot < seen, slot, -1)[:sink_tokens]
    ring = slot[sink_tokens:] - sink_tokens
    # the latest p ≥ S with (p − S) mod W == ring slot and p < seen
    newest = seen - 1 - sink_tokens
    position = sink_tokens + newest - (newest - ring) % window
    return torch.cat((sinks, torch.where((newest >= 0) & (position >= sink_tokens), position, -1)))


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
    """The hybrid over T new tokens at positions seen..seen+T−1, after the `seen` tokens `state` holds.

    Per chunk: each query weighs the stored sink and window keys and the chunk's own keys exactly or by
    the series (as `naive_hybrid_sata_attention` decides by position) and reads the series state, all on
    the scale of its largest exact weight (the query's own key is always exact); then tokens that left the
    window are folded into the series state and the chunk's keys take their slots. The same step serves
    decode (T = 1). q [T, H, d], k [T, Hkv, d], v [T, Hkv, d_v]. Returns [T, H, d_v] in q's dtype and the
    new state; the given one is not modified.
    """
    if window < 1:
        raise ValueError(f"the hybrid needs a window of at least 1 token (the query's own), got {window}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if state is None:
        state = initial_hybrid_state(k.shape[1], k.shape[2], v.shape[2], order, sink_tokens, window, k.device)
    series = prepare_state(state.series, k, v, order)
    numerator, normalizer = series.numerator, series.normalizer
    stored_k, stored_v = state.keys, state.values
    queries, keys, values = group_queries(q.float(), k.shape[1]), k.float(), v.float()
    out = torch.empty(queries.shape[:3] + values.shape[-1:], device=q.device)
    for start in range(0, q.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        first = seen + start
        q_c, k_c, v_c = queries[chunk], keys[chunk], values[chunk]
        query_pos = torch.arange(first, first + q_c.shape[0], device=q.device)
        key_pos = torch.cat((slot_positions(first, sink_tokens, window, q.device), query_pos))
        local_k = torch.cat((stored_k, k_c.transpose(0, 1)), 1)  # [Hkv, L, d]
        local_v = torch.cat((stored_v, v_c.transpose(0, 1)), 1)
        logits = torch.einsum("thgd,hsd->hgts", q_c, local_k) * scale
        causal, exact = key_masks(query_pos, key_pos, sink_tokens, window)
        offset = logits.masked_fill(~exact, float("-inf")).amax(-1, keepdim=True)
        weights = torch.where(exact, (logits - offset).exp(), truncated_exp(logits, order) * (-offset).exp())
        weights = weights.masked_fill(~causal, 0.0)
        phi_q = feature_map(q_c, order, scale)
        series_scale = (-offset).squeeze(-1).permute(2, 0, 1).exp()  # [c, Hkv, G]
        num = torch.einsum("thgm,hmv->thgv", phi_q, numerator) * series_scale[..., None]
        num = num + torch.einsum("hgts,hsv->thgv", weights, local_v)
        den = torch.einsum("thgm,hm->thg", phi_q, normalizer) * series_scale + torch.einsum("hgts->thg", weights)
        out[chunk] = num / den[..., None]
        # Tokens the next query no longer sees exactly join the series state.
        after = first + q_c.shape[0]
        leaving = (key_pos >= sink_tokens) & (key_pos <= after - 1 - window)
        phi_k = feature_map(local_k[:, leaving], order, scale)
        numerator = numerator + torch.einsum("hsm,hsv->hmv", phi_k, local_v[:, leaving])
        normalizer = normalizer + phi_k.sum(1)
        # The chunk's sinks and its last W later tokens take their slots.
        kept = (query_pos < sink_tokens) | (query_pos >= max(sink_tokens, after - window))
        slots = torch.where(
            query_pos < sink_tokens, query_pos, sink_tokens + (query_pos - sink_tokens) % window
        )[kept]
        stored_k, stored_v = stored_k.clone(), stored_v.clone()
        stored_k[:, slots] = k_c.transpose(0, 1)[:, kept]
        stored_v[:, slots] = v_c.transpose(0, 1)[:, kept]
    return out.flatten(1, 2).to(q.dtype), HybridSataState(SataState(numerator, normalizer), stored_k, stored_v)
