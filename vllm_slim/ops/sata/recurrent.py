"""Decode form: per token, fold its key and value into the state, then read the state with its query.

Each token costs O(m·d_v) per KV head however many tokens came before.
"""

import torch

from vllm_slim.ops.sata.basis import DEFAULT_ORDER, SataState, feature_map, group_queries, prepare_state


def recurrent_sata_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: SataState | None = None,
    scale: float | None = None,
    order: int = DEFAULT_ORDER,
) -> tuple[torch.Tensor, SataState]:
    """Same contract as `chunk_sata_attention`, one token at a time."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = prepare_state(state, k, v, order)
    numerator, normalizer = state.numerator, state.normalizer
    phi_q = feature_map(group_queries(q, k.shape[1]), order, scale)
    phi_k = feature_map(k, order, scale)
    values = v.float()
    out = torch.empty(phi_q.shape[:3] + values.shape[-1:], device=q.device)
    for t in range(q.shape[0]):
        numerator = numerator + phi_k[t, :, :, None] * values[t, :, None, :]
        normalizer = normalizer + phi_k[t]
        num = torch.einsum("hgm,hmv->hgv", phi_q[t], numerator)
        out[t] = num / torch.einsum("hgm,hm->hg", phi_q[t], normalizer)[..., None]
    return out.flatten(1, 2).to(q.dtype), SataState(numerator, normalizer)
