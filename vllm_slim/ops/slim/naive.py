"""Reference slim attention: rebuild every V from the cached rows, then plain causal softmax attention.

One sequence, contiguous rows, one head and one query at a time; meant to be read
and trusted, not to be fast. The batched paged forms are tested against this one.
"""

import torch

from vllm_slim.ops.slim.projection import SlimProjection, rebuild_values
from vllm_slim.ops.slim.rope import Rotary, unrope


def naive_slim_attention(
    q: torch.Tensor,
    rows: torch.Tensor,
    proj: SlimProjection,
    rotary: Rotary | None,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of the last Lq positions of a sequence over its cached rows.

    q [Lq, H, D] is post-RoPE; rows [L, H, D + r_h] are what slim cached for positions 0..L-1
    (`cache.cache_rows`), the queries' own tokens last; window: a sliding window of that many keys
    (vLLM's: the query at position p sees the keys at p - window < k <= p), None: every earlier key.
    Returns [Lq, H, Dv] float32.
    """
    q_len, kv_len, head_size = q.shape[0], rows.shape[0], q.shape[-1]
    keys = rows[..., :head_size]
    spill = rows[..., head_size:].flatten(1)
    v = rebuild_values(unrope(keys, torch.arange(kv_len, device=q.device), rotary), spill, proj)
    out = torch.empty(q_len, proj.num_heads, v.shape[-1], device=q.device)
    for h in range(proj.num_heads):
        for i in range(q_len):
            position = kv_len - q_len + i
            seen = slice(0 if window is None else max(0, position - window + 1), position + 1)
            scores = (keys[seen, h].float() @ q[i, h].float()) * scale
            out[i, h] = torch.softmax(scores, dim=0) @ v[seen, h]
    return out
