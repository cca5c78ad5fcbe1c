"""Slim attention math: V = K·W_KV (arXiv 2503.05840), with spill for safe 16-bit storage.

naive    — reference: rebuild V, plain attention (one head, one query at a time)
parallel — prefill: rebuild V once, fused attention
decode   — reordered (softmax·K)·W_KV, no V materialised
"""

from vllm_slim.ops.slim.decode import decode_slim_attention
from vllm_slim.ops.slim.naive import naive_slim_attention
from vllm_slim.ops.slim.parallel import parallel_slim_attention
from vllm_slim.ops.slim.projection import (
    SlimNotApplicable,
    SlimProjection,
    rebuild_values,
    solve_projection,
    cache_rows,
)
from vllm_slim.ops.slim.rope import Rotary, rotate, unrope

__all__ = [
    "Rotary", "SlimNotApplicable", "SlimProjection", "cache_rows", "decode_slim_attention",
    "naive_slim_attention", "parallel_slim_attention", "rebuild_values", "rotate",
    "solve_projection", "unrope",
]
