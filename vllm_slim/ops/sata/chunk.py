"""Chunked form: truncated-series attention inside each chunk, the carried state for all earlier tokens.

`chunk_sata_varlen` is the served form, batched over a step's sequences (packed varlen tokens, each
sequence's state a page of a paged state buffer, selected by index): chunk j of every sequence is done
together. Per chunk of c tokens: read the state with φ(q), add the causal part over the chunk's keys
(and, for the hybrid, the stored sink and window keys) computed from the logits directly, normalize;
then fold the keys that left the window in (series += φ(K)ᵀ[V, 1]) and store the chunk's keys in their
slots. A decode step is the chunk of one token. Memory is the states plus c × (S + W + c) weights.
`chunk_sata_attention` is the same form on one sequence with its state as tensors.
"""

import torch

from vllm_slim.ops.sata.basis import (
    DEFAULT_ORDER,
    SataState,
    feature_map,
    feature_size,
    group_queries,
    prepare_state,
    truncated_exp,
)
from vllm_slim.ops.varlen import pad_sequences, token_layout


def key_masks(
    query_positions: torch.Tensor, key_positions: torch.Tensor, sink_tokens: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., Tq, Tk] bool masks (causal, exact) for positions [..., Tq] and [..., Tk]: key s counts for
    query t when 0 ≤ s ≤ t (position −1: no key), and gets its exact weight when it also is a sink or
    one of the `window` most recent."""
    keys = key_positions.unsqueeze(-2)
    distance = query_positions.unsqueeze(-1) - keys
    causal = (keys >= 0) & (distance >= 0)
    return causal, causal & ((keys < sink_tokens) | (distance < window))


def slot_positions(seen: torch.Tensor, sink_tokens: int, window: int) -> torch.Tensor:
    """[..., S + W] the position each exact-key slot holds after `seen` [...] tokens, −1 where it holds
    none yet. Slots 0..S−1 hold the sinks (position p in slot p), slots S.. a ring of the W most recent
    later tokens (position p in slot S + (p − S) mod W)."""
    seen = seen.unsqueeze(-1)
    slot = torch.arange(sink_tokens + window, device=seen.device)
    sinks = torch.where(slot[:sink_tokens] < seen, slot[:sink_tokens], -1)
    ring = slot[sink_tokens:] - sink_tokens
    newest = seen - 1 - sink_tokens  # the latest p ≥ S with (p − S) mod W == ring slot and p < seen
    position = sink_tokens + newest - (newest - ring) % max(window, 1)
    return torch.cat((sinks, torch.where((newest >= 0) & (position >= sink_tokens), position, -1)), -1)


def split_state_page(pages: torch.Tensor, m: int, head_size: int, head_size_v: int, exact_tokens: int):
    """Float32 state pages [..., Hkv, floats] as the series [..., Hkv, m, d_v + 1] (Σ φ(k)·[v, 1]ᵀ) and the
    exact keys [..., Hkv, S + W, d] and values [..., Hkv, S + W, d_v] (views)."""
    sizes = (m * (head_size_v + 1), exact_tokens * head_size, exact_tokens * head_size_v)
    series, keys, values = pages.split(sizes, -1)
    lead = pages.shape[:-1]
    return (
        series.unflatten(-1, (m, head_size_v + 1)),
        keys.view(*lead, exact_tokens, head_size),
        values.view(*lead, exact_tokens, head_size_v),
    )


def chunk_sata_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    state_pages: torch.Tensor,
    state_indices: torch.Tensor,
    reset: torch.Tensor | None,
    scale: float,
    order: int = DEFAULT_ORDER,
    sink_tokens: int = 0,
    window: int = 0,
    chunk_size: int = 64,
) -> torch.Tensor:
    """SATA (the hybrid with a window) over a step's sequences, each continuing from its state.

    q [T, H, d], k [T, Hkv, d], v [T, Hkv, d_v] packed (query_start_loc [P + 1]); context_lens [P] the
    tokens each state already holds (the positions of the new ones follow); state_pages [N, Hkv, floats]
    float32, updated in place at state_indices [P]; reset [P] bool (or None): states that start empty
    (their page may hold another sequence's). Returns [T, H, d_v] in q's dtype. No host sync.
    """
    if sink_tokens and not window:
        raise ValueError("sink tokens need a window of at least 1 token (the query's own)")
    num_kv_heads, head_size, head_size_v = k.shape[1], k.shape[2], v.shape[2]
    m, exact_tokens = feature_size(head_size, order), sink_tokens + window
    num_sequences = context_lens.shape[0]
    layout = token_layout(query_start_loc, q.shape[0])
    queries = pad_sequences(group_queries(q, num_kv_heads), layout, num_sequences, max_query_len)
    keys, values = (pad_sequences(x, layout, num_sequences, max_query_len) for x in (k, v))
    ones = keys.new_ones(*keys.shape[:-1], 1)
    values1 = torch.cat((values, ones), -1)  # [v, 1]: numerator and normalizer in one product
    query_lens = query_start_loc[1:] - query_start_loc[:-1]

    pages = state_pages[state_indices]
    if reset is not None:
        pages = pages.masked_fill(reset[:, None, None], 0.0)
    series, stored_k, stored_v = split_state_page(pages, m, head_size, head_size_v, exact_tokens)
    stored_v1 = torch.cat((stored_v, stored_v.new_ones(*stored_v.shape[:-1], 1)), -1)
    out = queries.new_empty(*queries.shape[:-1], head_size_v)
    for start in range(0, max_query_len, chunk_size):
        chunk = slice(start, min(start + chunk_size, max_query_len))
        index = torch.arange(chunk.start, chunk.stop, device=q.device)  # offsets in the sequences' queries
        valid = index < query_lens[:, None]  # [P, c]
        query_pos = context_lens[:, None] + index
        key_pos = torch.cat((slot_positions(context_lens + start, sink_tokens, window), query_pos.where(valid, -1)), 1)
        local_k = torch.cat((stored_k, keys[:, chunk].transpose(1, 2)), 2)  # [P, Hkv, S + W + c, d]
        local_v1 = torch.cat((stored_v1, values1[:, chunk].transpose(1, 2)), 2)
        logits = torch.einsum("pthgd,phsd->phgts", queries[:, chunk], local_k) * scale
        causal, exact = (mask[:, None, None] for mask in key_masks(query_pos, key_pos, sink_tokens, window))
        phi_q = feature_map(queries[:, chunk], order, scale)  # [P, c, Hkv, G, m]
        read = torch.einsum("pthgm,phmv->phgtv", phi_q, series)  # the state's part, unscaled
        series_weights = truncated_exp(logits, order).masked_fill(~causal | exact, 0.0)
        offset, series_scale = torch.zeros_like(logits[..., :1]), 1.0
        if window:
            # One scale c for both parts: the larger of the largest exact logit and the log of the series'
            # total weight (at least 1/2 a token for the odd orders served), so that exp(x − c) and the series
            # times exp(−c) both stay at most 1 whichever part dominates the row; an empty series takes no
            # share (exp(−c) alone overflows when every exact logit is below −88).
            series_total = read[..., -1:] + series_weights.sum(-1, keepdim=True)
            offset = torch.maximum(logits.masked_fill(~exact, float("-inf")).amax(-1, keepdim=True), series_total.log())
            offset = offset.where(offset.isfinite(), 0.0)
            series_scale = torch.where(series_total > 0, (-offset).exp(), 0.0)
        weights = torch.where(exact & causal, (logits - offset).exp(), series_weights * series_scale)
        read = read * series_scale + torch.einsum("phgts,phsv->phgtv", weights, local_v1)
        out[:, chunk] = (read[..., :-1] / read[..., -1:]).permute(0, 3, 1, 2, 4)
        # The token at position p pushes the key at p − W out of the window, into the series: from the
        # chunk itself, or from the ring slot that p takes over (p − W is before this chunk).
        ring_slot = sink_tokens + (query_pos - sink_tokens) % max(window, 1)
        in_chunk = index - chunk.start
        source = torch.where(in_chunk >= window, exact_tokens + in_chunk - window, ring_slot)  # [P, c]
        leaving = (valid & (query_pos - window >= sink_tokens)).float()
        gather = source[:, None, :, None]
        leaving_k = local_k.gather(2, gather.expand(-1, num_kv_heads, -1, head_size))
        leaving_v1 = local_v1.gather(2, gather.expand(-1, num_kv_heads, -1, head_size_v + 1))
        phi_k = feature_map(leaving_k, order, scale) * leaving[:, None, :, None]
        series = series + torch.einsum("phsm,phsv->phmv", phi_k, leaving_v1)
        if exact_tokens:
            # The chunk's sinks and its last W later tokens take their slots; the rest go to a spare one.
            after = context_lens + query_lens.clamp_max(chunk.stop)
            kept = valid & ((query_pos < sink_tokens) | (query_pos >= (after - window).clamp_min(sink_tokens)[:, None]))
            slot = torch.where(query_pos < sink_tokens, query_pos, ring_slot)
            slot = slot.where(kept, exact_tokens)[:, None, :, None]
            stored_k = _store(stored_k, keys[:, chunk].transpose(1, 2), slot)
            stored_v1 = _store(stored_v1, values1[:, chunk].transpose(1, 2), slot)
    pages = torch.cat((series.flatten(-2), stored_k.flatten(-2), stored_v1[..., :-1].flatten(-2)), -1)
    state_pages.index_copy_(0, state_indices, pages)
    return out.flatten(2, 3)[layout].to(q.dtype)


def _store(slots: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`slots` [P, Hkv, E, w] with rows [P, Hkv, c, w] written at slot index [P, 1, c, 1]; index E
    (one past the end) discards a row."""
    spare = torch.cat((slots, slots.new_zeros(*slots.shape[:2], 1, slots.shape[-1])), 2)
    return spare.scatter(2, index.expand(-1, slots.shape[1], -1, slots.shape[-1]), rows)[:, :, :-1]


def chunk_sata_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: SataState | None = None,
    scale: float | None = None,
    order: int = DEFAULT_ORDER,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, SataState]:
    """Causal SATA over T new tokens of one sequence that follow the ones `state` has seen (None: none).

    q [T, H, d], k [T, Hkv, d], v [T, Hkv, d_v]; scale defaults to 1/√d. Returns the output [T, H, d_v]
    in q's dtype and the state after the T tokens; the given state is not modified.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = prepare_state(state, k, v, order)
    page = torch.cat((state.numerator, state.normalizer[..., None]), -1).flatten(-2)[None]
    out = one_sequence(q, k, v, 0, page, scale, order, 0, 0, chunk_size)
    series = page[0].view(*state.numerator.shape[:-1], -1)
    return out, SataState(series[..., :-1], series[..., -1])


def one_sequence(q, k, v, seen: int, page: torch.Tensor, scale, order, sink_tokens, window, chunk_size):
    """`chunk_sata_varlen` on one sequence whose state `page` [1, Hkv, floats] holds `seen` tokens."""
    device = q.device
    return chunk_sata_varlen(
        q, k, v, torch.tensor([0, q.shape[0]], device=device), torch.tensor([seen], device=device),
        q.shape[0], page, torch.zeros(1, dtype=torch.long, device=device), None, scale, order,
        sink_tokens, window, chunk_size,
    )
