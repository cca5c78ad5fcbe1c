"""SATA attention math: exp(q·k·scale) as a truncated Taylor series over the minimal basis of symmetric
tensor products (arXiv 2602.00294), so each KV head keeps a fixed-size state instead of a KV cache.

basis     — index tables, multinomial weights, feature map φ, sizes, and the state built on φ
naive     — reference: quadratic truncated-series attention, and exact softmax beside it
chunk     — the served form (prefill and decode, batched over a step's sequences and their paged states):
            quadratic inside each chunk, carried state between chunks; the hybrid's sinks and window too
recurrent — decode: per token, fold k and v into the state, then read it with q
hybrid    — beyond the paper: exact weights for sink and recent keys, the series for older ones (reference,
            and the chunk form on one sequence's state)
"""

from vllm_slim.ops.sata.basis import (
    DEFAULT_ORDER,
    SataState,
    basis_indices,
    basis_size,
    feature_map,
    feature_size,
    initial_state,
    is_positive_order,
    multinomial_weights,
    state_bytes,
    state_size,
    truncated_exp,
)
from vllm_slim.ops.sata.chunk import chunk_sata_attention, chunk_sata_varlen
from vllm_slim.ops.sata.hybrid import (
    HybridSataState,
    chunk_hybrid_sata_attention,
    initial_hybrid_state,
    naive_hybrid_sata_attention,
)
from vllm_slim.ops.sata.naive import naive_sata_attention, naive_softmax_attention
from vllm_slim.ops.sata.recurrent import recurrent_sata_attention

__all__ = [
    "DEFAULT_ORDER", "HybridSataState", "SataState", "basis_indices", "basis_size", "chunk_hybrid_sata_attention",
    "chunk_sata_attention", "chunk_sata_varlen", "feature_map", "initial_hybrid_state",
    "feature_size", "initial_state", "is_positive_order", "multinomial_weights", "naive_hybrid_sata_attention",
    "naive_sata_attention", "naive_softmax_attention", "recurrent_sata_attention", "state_bytes", "state_size",
    "truncated_exp",
]
