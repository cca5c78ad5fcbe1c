"""SATA's fused CPU decode (`cpu_decode.c`, built by `vllm_slim.ops.cpu_build`): one token per sequence,
each state read and written once in place, where the chunk form gathers, rebuilds and scatters them."""

from pathlib import Path

import torch

from vllm_slim.ops.cpu_build import library, pointer
from vllm_slim.ops.sata.basis import feature_size, feature_tables, group_queries

SOURCE = Path(__file__).with_name("cpu_decode.c")


def supports(state_pages: torch.Tensor, window: int) -> bool:
    """Whether the fused CPU decode serves this step (plain SATA: the hybrid's window runs the chunk form)."""
    return state_pages.device.type == "cpu" and not window and library(SOURCE) is not None


def fused_decode_sata(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state_pages: torch.Tensor,
    state_indices: torch.Tensor,
    reset: torch.Tensor,
    scale: float,
    order: int,
) -> torch.Tensor:
    """One token per sequence: q [B, H, d], k [B, Hkv, d], v [B, Hkv, d_v]; state_pages [N, Hkv, floats]
    float32 updated in place at state_indices [B] (reset [B]: states zeroed first). The contract of
    `chunk.chunk_sata_varlen` with query lengths 1 and no window. Returns [B, H, d_v] in q's dtype."""
    batch, kv_heads, head_size = k.shape
    head_size_v = v.shape[-1]
    index, coefficient = feature_tables(head_size, order, scale, q.device)
    m = feature_size(head_size, order)
    if state_pages.stride(-1) != 1 or state_pages.shape[-1] < m * (head_size_v + 1):
        raise ValueError(f"state pages {tuple(state_pages.shape)} do not hold {m} x {head_size_v + 1} floats a head")
    # Held in locals: the C loop reads them through raw pointers.
    queries = group_queries(q, kv_heads).float().contiguous()
    keys, values = k.float().contiguous(), v.float().contiguous()
    indices, starts = state_indices.long().contiguous(), reset.to(torch.uint8).contiguous()
    index32 = index.to(torch.int32).contiguous()
    out = queries.new_empty(*queries.shape[:-1], head_size_v)
    failed = library(SOURCE).sata_decode(
        pointer(state_pages), state_pages.stride(0), state_pages.stride(1), pointer(indices), pointer(starts),
        pointer(queries), pointer(keys), pointer(values), pointer(index32), index32.shape[1], pointer(coefficient),
        m, batch, kv_heads, queries.shape[2], head_size, head_size_v, pointer(out),
    )
    if failed:
        raise MemoryError("sata: the fused CPU decode could not allocate its buffers")
    return out.flatten(1, 2).to(q.dtype)
