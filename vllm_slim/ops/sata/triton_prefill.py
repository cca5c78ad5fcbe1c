"""Plain sata's prefill and chunked prefill as Triton kernels: `chunk.chunk_sata_varlen`'s contract with
no sinks and no window, for CUDA.

A step's new tokens of a sequence form ONE chunk, so nothing inside the step is sequential. With S_0 the
sequence's state before the step (zero on a reset) and T(x) = Σ_{p<order} x^p/p!:
    out_t = [φ(q_t)·S_0 + Σ_{s ≤ t, s new} T(q_t·k_s·scale)·[v_s, 1]] → numerator / normalizer,
    S_1   = S_0 + Σ_{s new} φ(k_s)·[v_s, 1]ᵀ.
Two launches, the readout first (it reads S_0, which the update then overwrites in place):

`readout_kernel`, one program per (query block of BLOCK_T tokens, KV head, sequence): its rows are the
block's tokens × the G query heads of the KV head (ROWS = BLOCK_T·G, token-major). It loops over S_0's
basis tiles, building φ(q) [ROWS, M_TILE] in registers from `basis.feature_tables` and multiplying it by the
tile [M_TILE, d_v] (tl.dot) and its normalizer column (a row reduce); then over the sequence's new key
blocks up to the block's last query (the causal limit), weighting [v, 1] by T(q·k·scale) computed from the
logits, masked causally. It normalises and writes [T, H, d_v] in q's dtype. A reset state skips the tile
loop (its page may hold another sequence's); query blocks past a sequence's new tokens return at once.
φ(Q)·S_0 is T·m·(d_v + 1) multiply-adds per query head, the bulk of the step (m = 8,385 at d = 128, order
3): each query block reads its KV head's whole S_0 (4.3 MB at d = 128, order 3), the blocks of one head
share it through L2. The causal part is T²/2·(d + d_v + 1) per query head; no T × T buffer is made.

`update_kernel`, one program per (basis tile, KV head, sequence): its rows of S (zero on a reset) plus
φ(K_new)[:, tile]ᵀ·[V_new, 1] over the sequence's new tokens, in blocks of BLOCK_S (tl.dot), stored in
place: each state byte read once and written once per step, the memory floor. T·m·(d_v + 1) multiply-adds
per KV head; each program re-reads the sequence's K and V (from L2).

Precision: all arithmetic is float32 (tl.dot with input_precision="ieee", no TF32). The whole step as one
chunk is exact math: the same sums as the chunk form's, in a different order, so the two agree to float32
rounding. The logits' series weights are positive for odd orders (`basis.is_positive_order`), so the
normalizer cannot vanish there; even orders can make it cross zero, as in every form. Memory: the output
O(T·H·d_v) plus registers.

On CUDA this is compiled; without CUDA it runs under Triton's interpreter, for tests
(`ops/triton_build.py`). No host sync: the launch sizes come from host numbers (max_query_len, shapes).
Output rows past query_start_loc[-1] (padding tokens) are left unwritten.
"""

import torch
import triton
import triton.language as tl

from vllm_slim.ops.sata.basis import feature_size, feature_tables
from vllm_slim.ops.sata.triton_decode import features
from vllm_slim.ops.triton_build import add, check_device, kernel_definitions, pad

# Register budget, float32 at d = d_v = 128, order 3 (m = 8,385), 8 warps (256 threads), per thread:
# readout: accumulator [64, 128] 32, φ(q) [64, 32] 8 and the S_0 tile [32, 128] 16 in the tile loop; then
# the query block [64, 128] 32, keys [128, 32] 16, weights [64, 32] 8 and values [32, 128] 16 in the key
# loop: ~100 at the peak before tl.dot's operand copies. Update: the S tile [64, 128] 32, φ(K)ᵀ [64, 32] 8,
# values [32, 128] 16: ~60.
READ_ROWS = 64  # query rows (tokens × query heads of a KV head) a readout program holds
READ_TILE_FLOATS = 4096  # floats of an S_0 tile the readout multiplies at once: 32 basis rows at d_v = 128
KEY_BLOCK = 32  # new keys per step of the readout's causal loop, and of the update's token loop
UPDATE_TILE_FLOATS = 8192  # floats of the S tile an update program owns: 64 basis rows at d_v = 128
NUM_WARPS = 8


with kernel_definitions():

    @triton.jit
    def readout_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, starts_ptr, pages_ptr, indices_ptr, reset_ptr, index_ptr, coefficient_ptr,
        q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, o_stride_t, o_stride_h,
        page_stride, head_stride, m, num_tiles, scale,
        G: tl.constexpr, G_P2: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        DV: tl.constexpr, DV_PAD: tl.constexpr, WIDTH: tl.constexpr, ORDER: tl.constexpr, M_TILE: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        block, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        first = tl.load(starts_ptr + b)
        length = tl.load(starts_ptr + b + 1) - first
        start = block * BLOCK_T
        if start >= length:
            return
        r = tl.arange(0, BLOCK_T * G_P2)
        t = start + r // G_P2  # each row's token (offset in the sequence's new tokens) and query head
        g = r % G_P2
        live = (t < length) & (g < G)
        token = (first + t).to(tl.int64)
        head = h * G + g
        q_rows = q_ptr + token * q_stride_t + head * q_stride_h
        e = tl.arange(0, DV_PAD)
        acc = tl.full((BLOCK_T * G_P2, DV_PAD), 0.0, tl.float32)
        total = tl.full((BLOCK_T * G_P2,), 0.0, tl.float32)

        # φ(q)·S_0, tile by tile; a reset state holds nothing (and is not read).
        tiles = tl.where(tl.load(reset_ptr + b) == 0, num_tiles, 0)
        page = pages_ptr + tl.load(indices_ptr + b).to(tl.int64) * page_stride + h * head_stride
        for tile in range(0, tiles):
            rows = tile * M_TILE + tl.arange(0, M_TILE)
            in_m = rows < m
            phi = features(q_rows, live, rows, in_m, index_ptr, coefficient_ptr, D, WIDTH)
            state = page + rows * (DV + 1)
            numerator = tl.load(state[:, None] + e[None, :], mask=in_m[:, None] & (e[None, :] < DV), other=0.0)
            normalizer = tl.load(state + DV, mask=in_m, other=0.0)
            acc += tl.dot(phi, numerator, input_precision="ieee")
            total += tl.reduce(phi * normalizer[None, :], 1, add)

        # The new keys s ≤ t, weighted by the series of their logits.
        c = tl.arange(0, D_PAD)
        queries = tl.load(q_rows[:, None] + c[None, :], mask=live[:, None] & (c[None, :] < D), other=0.0)
        queries = queries.to(tl.float32)
        end = tl.minimum(start + BLOCK_T, length)  # one past the block's last query
        for s0 in range(0, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            key = (first + s).to(tl.int64)
            keys = tl.load(k_ptr + key[None, :] * k_stride_t + h * k_stride_h + c[:, None],
                           mask=(s[None, :] < end) & (c[:, None] < D), other=0.0).to(tl.float32)  # [D_PAD, BLOCK_S]
            x = tl.dot(queries, keys, input_precision="ieee") * scale
            weight = tl.full(x.shape, 1.0, tl.float32)
            for p in tl.static_range(ORDER - 1, 0, -1):  # Horner, as `basis.truncated_exp`
                weight = 1.0 + x * weight / p
            weight = tl.where(s[None, :] <= t[:, None], weight, 0.0)  # causal (and the keys past `end`)
            values = tl.load(v_ptr + key[:, None] * v_stride_t + h * v_stride_h + e[None, :],
                             mask=(s[:, None] < end) & (e[None, :] < DV), other=0.0).to(tl.float32)
            acc += tl.dot(weight, values, input_precision="ieee")
            total += tl.reduce(weight, 1, add)

        out = acc / total[:, None]
        tl.store(out_ptr + token[:, None] * o_stride_t + head[:, None] * o_stride_h + e[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=live[:, None] & (e[None, :] < DV))

    @triton.jit
    def update_kernel(
        k_ptr, v_ptr, starts_ptr, pages_ptr, indices_ptr, reset_ptr, index_ptr, coefficient_ptr,
        k_stride_t, k_stride_h, v_stride_t, v_stride_h, page_stride, head_stride, m,
        D: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, WIDTH: tl.constexpr, M_TILE: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        tile, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        first = tl.load(starts_ptr + b)
        length = tl.load(starts_ptr + b + 1) - first
        rows = tile * M_TILE + tl.arange(0, M_TILE)
        in_m = rows < m
        e = tl.arange(0, DV_PAD)
        # The tile's rows [M_TILE, DV + 1] as the numerator's DV columns and the normalizer's one; a reset
        # state is not read (its page may hold another sequence's).
        stored = tl.where(tl.load(reset_ptr + b) == 0, in_m, False)  # (`&` with a scalar: the interpreter fails)
        state = pages_ptr + tl.load(indices_ptr + b).to(tl.int64) * page_stride + h * head_stride + rows * (DV + 1)
        numerator = tl.load(state[:, None] + e[None, :], mask=stored[:, None] & (e[None, :] < DV), other=0.0)
        normalizer = tl.load(state + DV, mask=stored, other=0.0)
        for s0 in range(0, length, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            valid = s < length
            key = (first + s).to(tl.int64)
            phi = features(k_ptr + key * k_stride_t + h * k_stride_h, valid, rows, in_m, index_ptr,
                           coefficient_ptr, D, WIDTH)
            phi = tl.trans(tl.where(valid[:, None], phi, 0.0))  # [M_TILE, BLOCK_S]: tokens past the end add 0
            values = tl.load(v_ptr + key[:, None] * v_stride_t + h * v_stride_h + e[None, :],
                             mask=valid[:, None] & (e[None, :] < DV), other=0.0).to(tl.float32)
            numerator += tl.dot(phi, values, input_precision="ieee")
            normalizer += tl.reduce(phi, 1, add)
        tl.store(state[:, None] + e[None, :], numerator, mask=in_m[:, None] & (e[None, :] < DV))
        tl.store(state + DV, normalizer, mask=in_m)


def triton_prefill_sata(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    state_pages: torch.Tensor,
    state_indices: torch.Tensor,
    reset: torch.Tensor,
    scale: float,
    order: int,
) -> torch.Tensor:
    """Plain sata (no sinks, no window) over a step's sequences, each continuing from its state: the
    contract of `chunk.chunk_sata_varlen` with sink_tokens = window = 0 (context_lens are not needed).

    q [T, H, d], k [T, Hkv, d], v [T, Hkv, d_v] packed (query_start_loc [P + 1], max_query_len ≥ every
    sequence's new tokens); state_pages [N, Hkv, floats] float32, the series Σ φ(k)·[v, 1]ᵀ [m, d_v + 1]
    first in each head's row (floats past it untouched), updated in place at state_indices [P]; reset [P]
    bool: states that start empty (their page may hold another sequence's). Returns [T, H, d_v] in q's
    dtype. No host sync."""
    num_tokens, heads, head_size = q.shape
    kv_heads, head_size_v = k.shape[1], v.shape[-1]
    num_sequences = query_start_loc.shape[0] - 1
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    m = feature_size(head_size, order)
    floats = m * (head_size_v + 1)
    if state_pages.dtype != torch.float32 or state_pages.stride(-1) != 1 or state_pages.shape[-1] < floats:
        raise ValueError(f"state pages {tuple(state_pages.shape)} do not hold {m} x {head_size_v + 1} float32 a head")
    check_device(q.device, "sata: the Triton prefill")
    index, coefficient = feature_tables(head_size, order, scale, q.device)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(num_tokens, heads, head_size_v, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_sequences == 0:
        return out
    starts, indices, reset = (x.contiguous() for x in (query_start_loc, state_indices, reset))
    group = heads // kv_heads
    group_p2 = triton.next_power_of_2(group)
    block_t = max(1, READ_ROWS // group_p2)
    dv_pad = pad(head_size_v)
    read_tile = min(pad(m), max(16, READ_TILE_FLOATS // dv_pad))
    update_tile = min(pad(m), max(16, UPDATE_TILE_FLOATS // dv_pad))
    common = dict(D=head_size, DV=head_size_v, DV_PAD=dv_pad, WIDTH=order - 1, BLOCK_S=KEY_BLOCK, num_warps=NUM_WARPS)
    readout_kernel[(triton.cdiv(max(max_query_len, 1), block_t), kv_heads, num_sequences)](
        q, k, v, out, starts, state_pages, indices, reset, index, coefficient,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        state_pages.stride(0), state_pages.stride(1), m, triton.cdiv(m, read_tile), float(scale),
        G=group, G_P2=group_p2, BLOCK_T=block_t, D_PAD=pad(head_size), ORDER=order, M_TILE=read_tile, **common,
    )
    update_kernel[(triton.cdiv(m, update_tile), kv_heads, num_sequences)](
        k, v, starts, state_pages, indices, reset, index, coefficient,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), state_pages.stride(0), state_pages.stride(1), m,
        M_TILE=update_tile, **common,
    )
    return out
