"""Slim attention math: V = K·W_KV (arXiv 2503.05840), with spill for safe 16-bit storage.

cache    — the paged layout: the rows cached per token, their write at slots (torch, or fused on the CPU)
           and read per sequence
naive    — reference: one sequence, rebuild V, plain attention (one head, one query at a time)
parallel — prefill, batched over packed varlen queries: rebuild V once per sequence, fused attention
decode   — decode, batched: reordered (softmax·K)·W_KV, no V materialised; its fused forms are
           cpu_kernel (C loops, also the cache write) and triton_decode (CUDA)
"""

from vllm_slim.ops.slim.cache import cache_rows, read_rows, store_rows, write_rows
from vllm_slim.ops.slim.decode import paged_decode_slim_attention
from vllm_slim.ops.slim.naive import naive_slim_attention
from vllm_slim.ops.slim.parallel import paged_prefill_slim_attention
from vllm_slim.ops.slim.projection import SlimNotApplicable, SlimProjection, rebuild_values, solve_projection
from vllm_slim.ops.slim.rope import Rotary, rotate, unrope

__all__ = [
    "Rotary", "SlimNotApplicable", "SlimProjection", "cache_rows", "naive_slim_attention",
    "paged_decode_slim_attention", "paged_prefill_slim_attention", "read_rows", "rebuild_values", "rotate",
    "solve_projection", "store_rows", "unrope", "write_rows",
]
