"""SATA's fused decode as Triton kernels: `cpu_kernel.fused_decode_sata`'s contract for CUDA, and the hybrid's
(`chunk.chunk_sata_varlen` with query length 1 and a window: exact sink and recent keys, the series for older).

`decode_kernel`, one program per (sequence, KV head, tile of M_TILE basis rows), builds the G query heads'
φ(q) for its rows from `basis.feature_tables` (the [x, 1] entries at each row's indices, multiplied, times
the row's coefficient), and φ(k) of the token that enters the series: plain sata's new token, or in the
hybrid the token at p − W that the new one (position p) pushes out of the window, read from the ring slot
the new one is about to take (none while p − W is a sink or before the sequence). It loads its rows of the
state (zeros on a reset), adds φ(k)·[v, 1], stores them back in place, and multiplies φ(q) [G, M_TILE] by
the updated rows into a float32 partial [G, d_v + 1]; the host sums a head's partials. Each state byte is
read once and written once per step: a decode step's memory floor, which the whole step is bound by
(4.3 MB a KV head at d = 128, order 3). Plain sata's output is then the numerator over the normalizer.

The hybrid's `exact_kernel`, one program per (sequence, KV head), launched second (so the slot the new
token takes was read for the fold before it is overwritten): the exact weights exp(x − c) of the new token
and the sink and window keys its page holds, c their largest logit (online over tiles of SLOT_TILE slots),
their weighted [v, 1] sum, combined with the series read on one scale into the output; then it writes the
new key and value into their slot (sinks: slot p; then the ring, S + (p − S) mod W).

On CUDA these are compiled; without CUDA they run under Triton's interpreter, for tests
(`ops/triton_build.py`). No host sync: the launch sizes come from the shapes.
"""

import torch
import triton
import triton.language as tl

from vllm_slim.ops.sata.basis import feature_size, feature_tables, group_queries, state_size
from vllm_slim.ops.triton_build import add, check_device, kernel_definitions, larger, pad

# A state tile's numerator: 32 float32 registers a thread at 4 warps. Compiled for sm_90
# (benchmarks/sm90_compile.py, triton 3.6 and 3.9), tiles of 8,192 spilled 300–4,100 bytes a thread at
# 32 x 128, order 3; 4,096 use no stack under either.
TILE_FLOATS = 4096
SLOT_TILE = 16  # exact slots a step of `exact_kernel` scores: tl.dot's least


with kernel_definitions():

    @triton.jit
    def features(vectors, live, rows, in_m, index_ptr, coefficient_ptr, D: tl.constexpr, WIDTH: tl.constexpr):
        """φ [N, M_TILE] float32 of the N vectors at pointers `vectors` [N] over basis `rows` [M_TILE]: each
        row's coefficient times the vector's entries at its indices (index D, the padding, reads 1).
        Rows not `in_m` get 0; vectors not `live` are not read (their φ is the coefficients)."""
        phi = tl.load(coefficient_ptr + rows, mask=in_m, other=0.0)[None, :] * tl.full(
            (vectors.shape[0], rows.shape[0]), 1.0, tl.float32
        )
        for i in tl.static_range(WIDTH):
            index = tl.load(index_ptr + rows * WIDTH + i, mask=in_m, other=D)
            phi *= tl.load(vectors[:, None] + index[None, :], mask=live[:, None] & (index[None, :] < D),
                           other=1.0).to(tl.float32)
        return phi

    @triton.jit
    def decode_kernel(
        q_ptr, k_ptr, v_ptr, pages_ptr, indices_ptr, reset_ptr, context_ptr, index_ptr, coefficient_ptr,
        partial_ptr, page_stride, head_stride, m, num_tiles,
        KV_HEADS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
        DV_PAD: tl.constexpr, WIDTH: tl.constexpr, M_TILE: tl.constexpr, SINKS: tl.constexpr,
        WINDOW: tl.constexpr,
    ):
        b, h, t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = t * M_TILE + tl.arange(0, M_TILE)
        live = rows < m
        heads = tl.arange(0, G_PAD)
        e = tl.arange(0, DV_PAD)
        kv = (b * KV_HEADS + h).to(tl.int64)  # offsets into the partials can pass 2^31
        q_rows = (kv * G + heads) * D
        # A reset state is not read (its page may hold another sequence's): no series, no exact slots.
        kept = tl.load(reset_ptr + b) == 0
        head = pages_ptr + tl.load(indices_ptr + b).to(tl.int64) * page_stride + h * head_stride
        # The token that enters the series, and the rows its φ(k) and [v, 1] fold into (none: φ(k) = 0).
        if WINDOW == 0:  # plain sata: the new token
            k_in, v_in, folded, v_used = k_ptr + kv * D, v_ptr + kv * DV, live, e < DV
        else:  # the token at p − W, from the ring slot the new token takes (S + (p − S) mod W)
            p = tl.load(context_ptr + b)
            slot = SINKS + (p - SINKS) % WINDOW
            k_in = head + m * (DV + 1) + slot * D
            v_in = head + m * (DV + 1) + (SINKS + WINDOW) * D + slot * DV
            enters = kept & (p - WINDOW >= SINKS)
            folded, v_used = tl.where(enters, live, False), tl.where(enters, e < DV, False)
        one = tl.arange(0, 1)
        phi_k = tl.where(folded, tl.reshape(features(k_in + one, one == 0, rows, live, index_ptr, coefficient_ptr, D,
                                                     WIDTH), (M_TILE,)), 0.0)
        phi_q = features(q_ptr + q_rows, heads < G, rows, live, index_ptr, coefficient_ptr, D, WIDTH)
        # The state rows [M_TILE, DV + 1] as the numerator's DV columns and the normalizer's one.
        stored = tl.where(kept, live, False)  # (`&` with a scalar: the interpreter fails)
        row = head + rows * (DV + 1)
        numerator = tl.load(row[:, None] + e[None, :], mask=stored[:, None] & (e[None, :] < DV), other=0.0)
        normalizer = tl.load(row + DV, mask=stored, other=0.0)
        v = tl.load(v_in + e, mask=v_used, other=0.0).to(tl.float32)
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

    @triton.jit
    def exact_kernel(
        q_ptr, k_ptr, v_ptr, pages_ptr, indices_ptr, reset_ptr, context_ptr, read_ptr, out_ptr,
        page_stride, head_stride, keys_offset, scale,
        KV_HEADS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        DV: tl.constexpr, DV_PAD: tl.constexpr, SINKS: tl.constexpr, WINDOW: tl.constexpr,
        SLOT_TILE: tl.constexpr,
    ):
        b, h = tl.program_id(0), tl.program_id(1)
        heads, d, e = tl.arange(0, G_PAD), tl.arange(0, D_PAD), tl.arange(0, DV_PAD)
        kv = (b * KV_HEADS + h).to(tl.int64)
        head_rows = kv * G + heads
        p = tl.load(context_ptr + b)  # the new token's position
        kept = tl.load(reset_ptr + b) == 0  # a reset page's slots hold another sequence's tokens
        keys = pages_ptr + tl.load(indices_ptr + b).to(tl.int64) * page_stride + h * head_stride + keys_offset
        values = keys + (SINKS + WINDOW) * D
        q = tl.load(q_ptr + head_rows[:, None] * D + d[None, :],
                    mask=(heads[:, None] < G) & (d[None, :] < D), other=0.0).to(tl.float32)
        k = tl.load(k_ptr + kv * D + d, mask=d < D, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv * DV + e, mask=e < DV, other=0.0).to(tl.float32)
        # Start from the new token, exact since W ≥ 1: the running max c is finite from the first tile on.
        peak = tl.reduce(q * k[None, :], 1, add) * scale
        numerator = tl.full((G_PAD, DV_PAD), 1.0, tl.float32) * v[None, :]
        normalizer = tl.full((G_PAD,), 1.0, tl.float32)
        for start in range(0, SINKS + WINDOW, SLOT_TILE):
            slot = start + tl.arange(0, SLOT_TILE)
            # The position each slot holds once the new token has taken its own (a sink's is its slot, the
            # ring's p − (p − slot) mod W, non-negative in C's and Python's modulo alike); the slots before p
            # are the new token's exact keys.
            position = tl.where(slot < SINKS, slot, p - ((p - slot) % WINDOW + WINDOW) % WINDOW)
            held = (slot < SINKS + WINDOW) & (position < p) & ((slot < SINKS) | (position >= SINKS))
            exact = tl.where(kept, held, False)
            key = tl.load(keys + slot[None, :] * D + d[:, None], mask=exact[None, :] & (d[:, None] < D), other=0.0)
            logits = tl.where(exact[None, :], tl.dot(q, key, input_precision="ieee") * scale, float("-inf"))
            top = tl.maximum(peak, tl.reduce(logits, 1, larger))
            rescale = tl.exp(peak - top)
            weights = tl.exp(logits - top[:, None])
            value = tl.load(values + slot[:, None] * DV + e[None, :], mask=exact[:, None] & (e[None, :] < DV),
                            other=0.0)
            numerator = numerator * rescale[:, None] + tl.dot(weights, value, input_precision="ieee")
            normalizer = normalizer * rescale + tl.reduce(weights, 1, add)
            peak = top
        # The series weights T(x)·exp(−c) sum to total·exp(−c), which can be far above the exact part's sum
        # (≤ 1 + S + W) or below float32's range: both parts go on the larger one's scale, the series as its
        # mean times its share. One of the two shares is 1, so the normalizer is ≥ 1. (The series is
        # positive: the policy's odd orders.)
        used = (heads[:, None] < G) & (e[None, :] < DV)
        series = tl.load(read_ptr + head_rows[:, None] * (DV + 1) + e[None, :], mask=used, other=0.0)
        total = tl.load(read_ptr + head_rows * (DV + 1) + DV, mask=heads < G, other=0.0)
        log_total = tl.log(total)  # −inf: no series yet
        offset = tl.maximum(peak, log_total)
        share, exact_share = tl.exp(log_total - offset), tl.exp(peak - offset)
        mean = series / tl.where(total > 0, total, 1.0)[:, None]
        out = mean * share[:, None] + numerator * exact_share[:, None]
        tl.store(out_ptr + head_rows[:, None] * DV + e[None, :], out / (share + normalizer * exact_share)[:, None],
                 mask=used)
        # The new token takes its slot; `decode_kernel` has folded the token that held it.
        slot = tl.where(p < SINKS, p, SINKS + (p - SINKS) % WINDOW)
        tl.store(keys + slot * D + d, k, mask=d < D)
        tl.store(values + slot * DV + e, v, mask=e < DV)


def triton_decode_sata(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state_pages: torch.Tensor,
    state_indices: torch.Tensor,
    reset: torch.Tensor,
    scale: float,
    order: int,
    context_lens: torch.Tensor | None = None,
    sink_tokens: int = 0,
    window: int = 0,
) -> torch.Tensor:
    """One token per sequence: q [B, H, d], k [B, Hkv, d], v [B, Hkv, d_v]; state_pages [N, Hkv, floats]
    float32 updated in place at state_indices [B] (reset [B]: states start empty). Without a window the
    contract of `cpu_kernel.fused_decode_sata`; with one (context_lens [B]: the tokens each state holds, the
    new token's position) `chunk.chunk_sata_varlen`'s with query lengths 1. Returns [B, H, d_v] in q's dtype."""
    batch, kv_heads, head_size = k.shape
    head_size_v = v.shape[-1]
    if sink_tokens and not window:
        raise ValueError("sink tokens need a window of at least 1 token (the query's own)")
    index, coefficient = feature_tables(head_size, order, scale, q.device)
    m = feature_size(head_size, order)
    floats = state_size(head_size, head_size_v, order, sink_tokens + window)
    if state_pages.dtype != torch.float32 or state_pages.stride(-1) != 1 or state_pages.shape[-1] < floats:
        raise ValueError(f"state pages {tuple(state_pages.shape)} do not hold {floats} float32 a head")
    check_device(q.device, "sata: the Triton decode")
    queries, k, v = group_queries(q, kv_heads).contiguous(), k.contiguous(), v.contiguous()
    indices, reset = state_indices.contiguous(), reset.contiguous()
    context = context_lens.contiguous() if window else reset  # not read without a window
    group = queries.shape[2]
    dv_pad = pad(head_size_v)
    m_tile = min(pad(m), max(16, TILE_FLOATS // dv_pad))
    num_tiles = triton.cdiv(m, m_tile)
    shape = dict(KV_HEADS=kv_heads, G=group, G_PAD=pad(group), D=head_size, DV=head_size_v, DV_PAD=dv_pad)
    partial = torch.empty(batch, kv_heads, num_tiles, group, head_size_v + 1, dtype=torch.float32, device=q.device)
    decode_kernel[(batch, kv_heads, num_tiles)](
        queries, k, v, state_pages, indices, reset, context, index, coefficient, partial,
        state_pages.stride(0), state_pages.stride(1), m, num_tiles,
        WIDTH=order - 1, M_TILE=m_tile, SINKS=sink_tokens, WINDOW=window, **shape,
    )
    read = partial.sum(2)
    if not window:
        return (read[..., :-1] / read[..., -1:]).flatten(1, 2).to(q.dtype)
    out = q.new_empty(batch, kv_heads, group, head_size_v)
    exact_kernel[(batch, kv_heads)](
        queries, k, v, state_pages, indices, reset, context, read, out,
        state_pages.stride(0), state_pages.stride(1), m * (head_size_v + 1), scale,
        D_PAD=pad(head_size), SINKS=sink_tokens, WINDOW=window, SLOT_TILE=SLOT_TILE, **shape,
    )
    return out.flatten(1, 2)
