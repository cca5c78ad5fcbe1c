"""Prefill form, batched over a step's prefills (packed varlen queries): rebuild each sequence's V once
from its cached rows (left form), then fused causal softmax attention over the padded batch.

The rebuild costs L·d² per sequence, so it wins over the reordered form of
`decode.py` once a sequence has many queries (about head_size or more).
"""

import torch
import torch.nn.functional as F

from vllm_slim.ops.dispatch import uses_triton
from vllm_slim.ops.slim.cache import page_positions, read_rows
from vllm_slim.ops.slim.decode import visible
from vllm_slim.ops.slim.projection import SlimProjection, rebuild_values
from vllm_slim.ops.slim.rope import Rotary, unrope
from vllm_slim.ops.varlen import pad_sequences, token_layout


def paged_prefill_slim_attention(
    q: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    num_pages: int,
    max_query_len: int,
    proj: SlimProjection,
    rotary: Rotary | None,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's last query_len positions over its cached rows.

    q [T, H, D] post-RoPE, packed: sequence i's queries are q[query_start_loc[i]:query_start_loc[i+1]]
    (query_start_loc [P + 1] from 0, T = query_start_loc[-1]); seq_lens [P] cached tokens, the
    queries' own included; block_table [P, >= num_pages]; max_query_len >= every query length;
    window: a sliding window of that many keys (`decode.visible`; None: all), the pages wholly before
    every query's window may be anything (vLLM puts its null block there). Returns [T, H, Dv] float32.
    No host sync.

    On CUDA (and with VLLM_SLIM_TRITON=1) the Triton kernels of `triton_prefill` (V rebuilt once, then flash
    attention over the paged keys, V held in the query's dtype); otherwise the torch form below, in float32.
    """
    if uses_triton(kv_cache.device):
        from vllm_slim.ops.slim.triton_prefill import triton_prefill_slim_attention  # imports triton: only when used

        return triton_prefill_slim_attention(
            q, query_start_loc, seq_lens, kv_cache, block_table, num_pages, max_query_len, proj, rotary, scale,
            window,
        )
    head_size, block_size = q.shape[-1], kv_cache.shape[2]
    positions = page_positions(num_pages, block_size, q.device)
    layout = token_layout(query_start_loc, q.shape[0])
    padded = pad_sequences(q, layout, seq_lens.shape[0], max_query_len)
    # Query i of a sequence sits at position seq_len − query_len + i.
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    offsets = torch.arange(max_query_len, device=q.device)
    asked = (offsets < query_lens[:, None])[..., None]  # [P, max_query_len, 1]: not a padded query row
    seen = visible(positions.flatten(), (seq_lens - query_lens)[:, None, None] + offsets[:, None], window) & asked
    # The rows no query sees are zeroed before V is rebuilt, not only masked: a window's freed pages are the
    # null block, whatever it holds, and SDPA turns a masked NaN key or value into NaN all the same.
    rows = read_rows(kv_cache, block_table, num_pages)  # [P, pages, bs, H, C], a gathered copy
    rows.masked_fill_(~seen.any(1).view(seq_lens.shape[0], num_pages, block_size, 1, 1), 0)
    keys = rows[..., :head_size]
    values = rebuild_values(unrope(keys, positions, rotary), rows[..., head_size:].flatten(-2), proj)
    seen |= ~asked  # padded query rows see every key: any finite answer (they are dropped)
    out = F.scaled_dot_product_attention(
        padded.transpose(1, 2),
        keys.float().flatten(1, 2).transpose(1, 2),
        values.flatten(1, 2).transpose(1, 2),
        attn_mask=seen[:, None],
        scale=scale,
    )
    return out.transpose(1, 2)[layout]
