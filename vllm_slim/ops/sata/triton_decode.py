"""SATA's fused decode as a Triton kernel: `cpu_kernel.fused_decode_sata`'s contract, for CUDA.

One program per (sequence, KV head, tile of M_TILE basis rows): it builds φ(k) and the G query heads'
φ(q) for its rows from `basis.feature_tables` (the [x, 1] entries at each row's indices, multiplied,
times the row's coefficient), loads its rows of the state (zeros on a reset), adds φ(k)·[v, 1], stores
them back in place, and multiplies φ(q) [G, M_TILE] by the updated rows (the token attends itself) into
a float32 partial [G, d_v + 1]. The partials of a head's tiles are summed and the numerator divided by
the normalizer on the host side (two torch ops). Each state byte is read once and written once per step:
a decode step's memory floor, which the whole step is bound by (4.3 MB a KV head at d = 128, order 3).

On CUDA this is compiled; without CUDA it runs under Triton's interpreter, for tests
(`ops/triton_build.py`). No host sync: the launch sizes come from the shapes.
"""

import torch
import triton
import triton.language as tl

from vllm_slim.ops.sata.basis import feature_size, feature_tables, group_queries
from vllm_slim.ops.triton_build import check_device, kernel_definitions, pad

TILE_FLOATS = 8192  # a state tile's numerator: 64 float32 registers a thread at 4 warps


with kernel_definitions():

    @triton.jit
    def decode_kernel(
        q_ptr, k_ptr, v_ptr, pages_ptr, indices_ptr, reset_ptr, index_ptr, coefficient_ptr, partial_ptr,
        page_stride, head_stride, m, num_tiles,
        KV_HEADS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
        DV_PAD: tl.constexpr, WIDTH: tl.constexpr, M_TILE: tl.constexpr,
    ):
        b, h, t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = t * M_TILE + tl.arange(0, M_TILE)
        live = rows < m
        heads = tl.arange(0, G_PAD)
        e = tl.arange(0, DV_PAD)
        kv = (b * KV_HEADS + h).to(tl.int64)  # offsets into the partials can pass 2^31
        q_rows = (kv * G + heads) * D
        # φ over the tile's rows: index D (padding) reads as the constant 1; rows past m get 0.
        phi_k = tl.load(coefficient_ptr + rows, mask=live, other=0.0)
        phi_q = tl.full((G_PAD, M_TILE), 1.0, tl.float32) * phi_k[None, :]
        for i in tl.static_range(WIDTH):
            index = tl.load(index_ptr + rows * WIDTH + i, mask=live, other=D)
            phi_k *= tl.load(k_ptr + kv * D + index, mask=index < D, other=1.0).to(tl.float32)
            phi_q *= tl.load(q_ptr + q_rows[:, None] + index[None, :],
                             mask=(heads[:, None] < G) & (index[None, :] < D), other=1.0).to(tl.float32)
        # The state rows [M_TILE, DV + 1] as the numerator's DV columns and the normalizer's one; a reset
        # state is not read (its page may hold another sequence's).
        stored = tl.where(tl.load(reset_ptr + b) == 0, live, False)  # (`&` with a scalar: the interpreter fails)
        row = pages_ptr + tl.load(indices_ptr + b).to(tl.int64) * page_stride + h * head_stride + rows * (DV + 1)
        numerator = tl.load(row[:, None] + e[None, :], mask=stored[:, None] & (e[None, :] < DV), other=0.0)
        normalizer = tl.load(row + DV, mask=stored, other=0.0)
        v = tl.load(v_ptr + kv * DV + e, mask=e < DV, other=0.0).to(tl.float32)
        numerator += phi_k[:, None] * v[None, :]
        normalizer += phi_k
        tl.store(row[:, None] + e[None, :], numerator, mask=live[:, None] & (e[None, :] < DV))
        tl.store(row + DV, normalizer, mask=live)
        # This tile's share of the G heads' readout; padded heads and rows are dropped or multiply zeros.
        # The normalizer's goes through tl.dot too, as column 0 of 16 (the least tl.dot takes): a reduce
        # over the rows costs the same on a GPU but runs element by element under the interpreter.
        read = tl.dot(phi_q, numerator, input_precision="ieee")
        c = tl.arange(0, 16)
        total = tl.dot(phi_q, tl.where(c[None, :] == 0, normalizer[:, None], 0.0), input_precision="ieee")
        out = partial_ptr + ((kv * num_tiles + t) * G + heads)[:, None] * (DV + 1)
        tl.store(out + e[None, :], read, mask=(heads[:, None] < G) & (e[None, :] < DV))
        tl.store(out + DV + c[None, :], total, mask=(heads[:, None] < G) & (c[None, :] == 0))


def triton_decode_sata(
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
    `cpu_kernel.fused_decode_sata`. Returns [B, H, d_v] in q's dtype."""
    batch, kv_heads, head_size = k.shape
    head_size_v = v.shape[-1]
    index, coefficient = feature_tables(head_size, order, scale, q.device)
    m = feature_size(head_size, order)
    floats = m * (head_size_v + 1)
    if state_pages.dtype != torch.float32 or state_pages.stride(-1) != 1 or state_pages.shape[-1] < floats:
        raise ValueError(f"state pages {tuple(state_pages.shape)} do not hold {m} x {head_size_v + 1} float32 a head")
    check_device(q.device, "sata: the Triton decode")
    queries = group_queries(q, kv_heads).contiguous()
    group = queries.shape[2]
    dv_pad = pad(head_size_v)
    m_tile = min(pad(m), max(16, TILE_FLOATS // dv_pad))
    num_tiles = triton.cdiv(m, m_tile)
    partial = torch.empty(batch, kv_heads, num_tiles, group, head_size_v + 1, dtype=torch.float32, device=q.device)
    decode_kernel[(batch, kv_heads, num_tiles)](
        queries, k.contiguous(), v.contiguous(), state_pages, state_indices.contiguous(), reset.contiguous(),
        index, coefficient, partial,
        state_pages.stride(0), state_pages.stride(1), m, num_tiles,
        KV_HEADS=kv_heads, G=group, G_PAD=pad(group), D=head_size, DV=head_size_v, DV_PAD=dv_pad,
        WIDTH=order - 1, M_TILE=m_tile,
    )
    read = partial.sum(2)
    return (read[..., :-1] / read[..., -1:]).flatten(1, 2).to(q.dtype)
