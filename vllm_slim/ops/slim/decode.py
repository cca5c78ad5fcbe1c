"""Decode form, batched over a step's decodes: the reordered product (softmax·K)·W_KV of the paper's §2.

For B sequences with one query each: scores from the post-RoPE keys; Z = P·K_raw, one (H × L)·(L × d)
product per sequence over the key row (shared by all heads); then each head maps its d-wide Z row
through its own W_KV block, one batched product per layer for the whole batch (W_KV read once).
No V is ever materialised: (1 + H)·L·d multiply-adds per query where stock attention does 2·L·d.

Z comes from one of three forms with one contract (`decode_rows`):
- torch: a split of pages at a time (flash-decoding: each split keeps its own softmax statistics,
  the splits are merged by log-sum-exp), so the working set is one split, never the whole context;
- fused on the CPU (`cpu_kernel`, the default when a C compiler is there): each row read in place;
- fused on CUDA (`triton_decode`: two passes, or one that reads K once); VLLM_SLIM_TRITON=1 makes them
  the CPU's fused form too, under Triton's interpreter (for tests: the interpreter gives no speed).
"""

import torch

from vllm_slim.ops.dispatch import uses_triton
from vllm_slim.ops.slim import cpu_kernel
from vllm_slim.ops.slim.cache import page_positions, read_rows
from vllm_slim.ops.slim.projection import SlimProjection
from vllm_slim.ops.slim.rope import Rotary, unrope

# Float32 elements one split's keys may occupy (256 MiB): bounds the step's working set.
SPLIT_ELEMENTS = 1 << 26


def pages_per_split(num_sequences: int, block_size: int, num_heads: int, row_size: int) -> int:
    """How many pages one split reads for `num_sequences` sequences (at least 1)."""
    return max(1, SPLIT_ELEMENTS // max(1, num_sequences * block_size * num_heads * row_size))


def paged_decode_slim_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    num_pages: int,
    proj: SlimProjection,
    rotary: Rotary | None,
    scale: float,
    split_pages: int | None = None,
    fused: bool | None = None,
    one_pass: bool = False,
    window: int | None = None,
) -> torch.Tensor:
    """One query per sequence over its cached rows (the query's own row included).

    q [B, H, D] post-RoPE; kv_cache [num_blocks, H, block_size, D + r_h]; block_table [B, >= num_pages];
    seq_lens [B] cached tokens per sequence, at most num_pages·block_size (a padded row may give 0:
    its output is finite and meaningless); split_pages: pages per split of the torch and Triton forms
    (default: all in one); fused: the device's fused form (default: on CUDA, and on the CPU where the C
    loop can run); one_pass: the Triton form's kernel that reads K once, else its two passes (the
    default until a GPU has timed both: `triton_decode`'s docstring says why the one pass may lose);
    window: a sliding window of that many keys (`visible`; None: all): what the pages wholly before it
    hold (vLLM's null block, once freed) never reaches the output, and the fused forms skip them.
    Returns [B, H, Dv] float32. The torch and Triton forms do no host sync.
    """
    triton = uses_triton(kv_cache.device)
    if fused is None:
        fused = triton or cpu_kernel.supports(kv_cache, q.shape[1])
    if fused and triton:
        from vllm_slim.ops.slim.triton_decode import triton_decode_rows  # imports triton: only when used

        z, z_spill = triton_decode_rows(
            q, kv_cache, block_table, seq_lens, num_pages, rotary, scale, split_pages, one_pass, window=window
        )
    elif fused:
        z, z_spill = cpu_kernel.fused_decode_rows(q, kv_cache, block_table, seq_lens, rotary, scale, window)
    else:
        z, z_spill = decode_rows(q, kv_cache, block_table, seq_lens, num_pages, rotary, scale, split_pages, window)
    # Σ_l P_l·(K_raw,l − b_K) = Z − b_K, since each row of P sums to 1.
    if proj.k_bias is not None:
        z = z - proj.k_bias
    out = per_head_product(z, proj.w_kv)
    if proj.spill:
        out = out + per_head_product(z_spill, proj.w_sv)
    if proj.v_bias is not None:
        out = out + proj.v_bias.view(proj.num_heads, -1)
    return out


def per_head_product(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[B, H, Dv]: head h's row z[:, h] times head h's columns of weight [n, H·Dv], one batched product
    (a strided view of the weight, no copy)."""
    heads = z.shape[1]
    per_head = weight.view(weight.shape[0], heads, -1).transpose(0, 1)  # [H, n, Dv]
    return torch.bmm(z.transpose(0, 1), per_head).transpose(0, 1)


def visible(positions: torch.Tensor, query_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Whether a query sees a key, for key and query positions that broadcast: the earlier keys and its
    own, and with a window only the last `window` of them (vLLM's sliding window: p - window < k <= p)."""
    seen = positions <= query_positions
    return seen if window is None else seen & (positions > query_positions - window)


def decode_rows(q, kv_cache, block_table, seq_lens, num_pages, rotary, scale, split_pages=None, window=None):
    """Normalised Z [B, H, H·D] = Σ_l P_l·K_raw,l and spill Z [B, H, H·R] (torch form, by splits) over the
    keys `visible` to each sequence's query."""
    split_pages = max(1, split_pages or num_pages)
    # The query's own position always counts, so every row (padding too: position 0) has a finite softmax.
    seq_lens = seq_lens.clamp_min(1)
    splits = [
        _decode_split(q, kv_cache, block_table[:, first : first + split_pages], seq_lens, first, rotary, scale, window)
        for first in range(0, max(num_pages, 1), split_pages)
    ]
    return merge_splits(splits)


def _decode_split(q, kv_cache, block_table, seq_lens, first_page, rotary, scale, window):
    """One split's unnormalised Z [B, H, d] and spill Z [B, H, r], with its softmax max and sum [B, H]."""
    head_size, block_size = q.shape[-1], kv_cache.shape[2]
    num_pages = block_table.shape[1]
    positions = page_positions(num_pages, block_size, q.device).flatten() + first_page * block_size
    seen = visible(positions, seq_lens[:, None] - 1, window)  # [B, L]
    rows = read_rows(kv_cache, block_table, num_pages).flatten(1, 2)  # [B, L, H, C], a gathered copy
    # Rows out of sight are zeroed, not only masked out of the softmax: a window's freed pages are the null
    # block, whatever it holds, and a weight of 0 times NaN is NaN.
    rows.masked_fill_(~seen[..., None, None], 0)
    keys = rows[..., :head_size].float()
    scores = torch.einsum("bhd,blhd->bhl", q.float(), keys) * scale
    scores = scores.masked_fill(~seen[:, None], float("-inf"))
    peak = scores.amax(-1)  # −inf for a split past a sequence's end or before its window
    weights = (scores - peak.where(peak.isfinite(), 0.0)[..., None]).exp()
    z = torch.bmm(weights, unrope(keys, positions, rotary).flatten(-2))
    z_spill = torch.bmm(weights, rows[..., head_size:].float().flatten(-2))
    return z, z_spill, peak, weights.sum(-1)


def merge_splits(splits):
    """Normalised Z and spill Z from per-split partials: each rescaled to the largest max (finite: one
    split holds the query's own position), summed."""
    if len(splits) == 1:
        z, z_spill, _, total = splits[0]
        return z / total[..., None], z_spill / total[..., None]
    peak = torch.stack([s[2] for s in splits]).amax(0)
    z = z_spill = total = 0.0
    for part_z, part_spill, part_peak, part_total in splits:
        factor = (part_peak - peak).exp()
        z = z + part_z * factor[..., None]
        z_spill = z_spill + part_spill * factor[..., None]
        total = total + part_total * factor
    return z / total[..., None], z_spill / total[..., None]
