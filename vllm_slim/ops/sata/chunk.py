"""Prefill form: truncated-series attention inside each chunk, the carried state for all earlier tokens.

Per chunk of c tokens: read the state with φ(q), add the causal c×c part computed from the logits
directly, normalize, then fold the chunk in (numerator += φ(K)ᵀV, normalizer += Σ φ(K)). Memory is the
state plus c×c weights and c×m features; no per-token prefix state is ever formed.
"""

import torch

from vllm_slim.ops.sata.basis import DEFAULT_ORDER, SataState, feature_map, group_queries, prepare_state, truncated_exp


def chunk_sata_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: SataState | None = None,
    scale: float | None = None,
    order: int = DEFAULT_ORDER,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, SataState]:
    """Causal SATA over T new tokens that follow the ones `state` has seen (None: none).

    q [T, H, d], k [T, Hkv, d], v [T, Hkv, d_v]; scale defaults to 1/√d. Returns the output [T, H, d_v]
    in q's dtype and the state after the T tokens; the given state is not modified.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = prepare_state(state, k, v, order)
    numerator, normalizer = state.numerator, state.normalizer
    queries, keys, values = group_queries(q.float(), k.shape[1]), k.float(), v.float()
    out = torch.empty(queries.shape[:3] + values.shape[-1:], device=q.device)
    for start in range(0, q.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        q_c, k_c, v_c = queries[chunk], keys[chunk], values[chunk]
        phi_q = feature_map(q_c, order, scale)
        weights = truncated_exp(torch.einsum("thgd,shd->hgts", q_c, k_c) * scale, order).tril()
        num = torch.einsum("thgm,hmv->thgv", phi_q, numerator) + torch.einsum("hgts,shv->thgv", weights, v_c)
        den = torch.einsum("thgm,hm->thg", phi_q, normalizer) + torch.einsum("hgts->thg", weights)
        out[chunk] = num / den[..., None]
        phi_k = feature_map(k_c, order, scale)
        numerator = numerator + torch.einsum("shm,shv->hmv", phi_k, v_c)
        normalizer = normalizer + phi_k.sum(0)
    return out.flatten(1, 2).to(q.dtype), SataState(numerator, normalizer)
