"""Slim's prefill (`parallel.paged_prefill_slim_attention`) as two Triton kernels around cuBLAS's products.

1. `raw_kernel`, one program per (RAW_ROWS rows of (position, head), sequence): each row read from the cache
   through the block table, the key un-RoPE'd in registers from the cos/sin table (NeoX or GPT-J pairs,
   partial rotary; the halves loaded and stored by `triton_store`'s helpers) minus b_K, the spill beside it:
   float32 [P, L, H·D + r], L = num_pages·block_size. Past a sequence's length, and before its first query's
   sliding window, nothing is read (the row is −b_K: finite, and the attention never loads it).
2. torch: V = K0·W_KV + S·W_SV + b_V, two products on cuBLAS, stored in the query's (the model's) dtype as
   [P, L, H, Dv]: the stock cache holds V in that dtype, rounding to it is stock's own error.
3. `attention_kernel`, flash attention: one program per (query block of BLOCK_M queries, head, sequence), the
   Q block loaded once; key tiles of BLOCK_N positions up to the causal limit of the block's last query
   (query i of a sequence sits at seq_len − query_len + i), from the first key its first query's sliding window
   holds (0 without one: the pages before it, vLLM's null block once freed, are never read), K as stored
   (post-RoPE) through the block table, scores on tl.dot, causal and window mask, online softmax, P·V from the
   dense V buffer; writes [T, H, Dv] float32.

Why V is rebuilt once per step and not per (query block, key tile) inside the attention kernel: one head's V
row needs the token's whole key row, H·D·Dv multiply-adds a token for each query block, where that block's
attention costs 2·BLOCK_M·D a token: H·Dv / (2·BLOCK_M), 32× at Llama-7B's 32 × 128 with BLOCK_M = 64, and
each program would stream its head's H·D × Dv slice of W_KV (2 MiB float32) per key tile. Once per step the
rebuild is one GEMM of L·(H·D + r)·H·Dv multiply-adds a sequence, like the layer's own V projection, and
costs L·(H·D + r)·4 bytes written then read (the raw buffer) plus L·H·Dv stored in the model's dtype, which
the attention then reads as stock reads its V cache. The rows of a sequence shorter than the longest are
padding in both buffers (P·L rows, not Σ seq_len: the sizes come from host numbers, with no sync).

tl.dot precision: float32 operands (a float32 query or cache) take input_precision="ieee", so a float32 model
stays exact against stock; 16-bit operands take the default (tensor cores, float32 accumulation): the query
is rounded to the cache's dtype (exact for a bfloat16 query into a float16 cache within float16's range), P
(float32) to V's dtype for the P·V product only.

On CUDA these kernels are slim's prefill; without CUDA they run under Triton's interpreter, for tests
(`ops/triton_build.py`). No host sync: the launch sizes are the caller's host numbers (pages, longest query).
"""

import torch
import triton
import triton.language as tl

from vllm_slim.ops.slim.projection import SlimProjection
from vllm_slim.ops.slim.rope import Rotary
from vllm_slim.ops.slim.triton_decode import NO_WINDOW, softmax_step, tile_rows, window_start
from vllm_slim.ops.slim.triton_store import load_key, rotation_constants, row_angles, store_key
from vllm_slim.ops.triton_build import INTERPRETED, check_device, kernel_definitions, pad

BLOCK_M = 64  # queries a program holds (fewer when the step's longest query is shorter)
BLOCK_N = 64  # key positions a tile
RAW_ROWS = 32  # (position, head) rows a `raw_kernel` program un-RoPEs: [32, D / 2] halves, `triton_store`'s size
NUM_WARPS = 4


with kernel_definitions():

    @triton.jit
    def raw_kernel(
        cache_ptr, table_ptr, lens_ptr, starts_ptr, cos_sin_ptr, k_bias_ptr, raw_ptr,
        stride_block, stride_head, stride_token, table_stride, length, window,
        H: tl.constexpr, HEADS_POW2: tl.constexpr, D: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
        ROT: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr, NEOX: tl.constexpr,
        K_BIAS: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr,
    ):
        t, b = tl.program_id(0), tl.program_id(1)
        # ROWS rows of (position, head), heads fastest: whole cache rows in, whole raw rows out.
        n = tl.arange(0, ROWS)
        lane, head = t * (ROWS // HEADS_POW2) + n // HEADS_POW2, n % HEADS_POW2
        inside = ((lane < length) & (head < H))[:, None]
        seq_len = tl.load(lens_ptr + b)
        lo = window_start(seq_len - (tl.load(starts_ptr + b + 1) - tl.load(starts_ptr + b)), window)
        valid = (lane >= lo) & (lane < seq_len) & (head < H)
        at = tile_rows(table_ptr, b, table_stride, lane, valid, stride_block, stride_token, BLOCK_SIZE)
        rows = cache_ptr + (at + head * stride_head)[:, None]
        # Before every query's window and past the sequence nothing is read (position 0's angles: the table may end
        # before the last page).
        first, second, pair, cos, sin = row_angles(cos_sin_ptr, tl.where(valid, lane, 0), ROT, HALF_PAD, NEOX)
        tail = ROT + tl.arange(0, TAIL_PAD)[None, :]
        read = valid[:, None]
        x1, x2, rest = load_key(rows, first, second, tail, read & pair, read & (tail < D))
        x1, x2 = x1 * cos + x2 * sin, x2 * cos - x1 * sin
        if K_BIAS:
            bias = k_bias_ptr + (head * D)[:, None]
            b1, b2, b_rest = load_key(bias, first, second, tail, inside & pair, inside & (tail < D))
            x1, x2, rest = x1 - b1, x2 - b2, rest - b_rest
        out = raw_ptr + (b * length + lane).to(tl.int64)[:, None] * (H * D + H * R)
        store_key(out + (head * D)[:, None], x1, x2, rest, first, second, tail, inside & pair, inside & (tail < D))
        if R > 0:
            r = tl.arange(0, R_PAD)[None, :]
            spill = tl.load(rows + D + r, mask=read & (r < R), other=0.0)
            tl.store(out + H * D + (head * R)[:, None] + r, spill.to(tl.float32), mask=inside & (r < R))

    @triton.jit
    def dot(a, b, EXACT: tl.constexpr):
        """a·b accumulated in float32: EXACT on the operands' float32 values (ieee), else on tensor cores."""
        if EXACT:
            c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            c = tl.dot(a, b)
        return c

    @triton.jit
    def attention_kernel(
        q_ptr, cache_ptr, table_ptr, lens_ptr, starts_ptr, values_ptr, out_ptr,
        q_stride_t, q_stride_h, stride_block, stride_head, stride_token, table_stride, length, scale, window,
        H: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        ROUND_Q: tl.constexpr, EXACT_QK: tl.constexpr, EXACT_PV: tl.constexpr,
    ):
        # The last query blocks first: they have the most key tiles, so the launch ends with short programs.
        m = tl.num_programs(0) - 1 - tl.program_id(0)
        h, b = tl.program_id(1), tl.program_id(2)
        start = tl.load(starts_ptr + b)
        query_len = tl.load(starts_ptr + b + 1) - start
        if m * BLOCK_M >= query_len:
            return
        seq_len = tl.load(lens_ptr + b)
        i = m * BLOCK_M + tl.arange(0, BLOCK_M)
        asked = i < query_len
        position = seq_len - query_len + i
        d = tl.arange(0, D_PAD)
        token = (start + i).to(tl.int64)
        q = tl.load(q_ptr + token[:, None] * q_stride_t + h * q_stride_h + d[None, :],
                    mask=asked[:, None] & (d[None, :] < D), other=0.0)
        if ROUND_Q:  # 16-bit operands: the query in the cache's dtype
            q = q.to(cache_ptr.dtype.element_ty)
        j = tl.arange(0, DV_PAD)
        peak = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        total = tl.full((BLOCK_M,), 0.0, tl.float32)
        acc = tl.full((BLOCK_M, DV_PAD), 0.0, tl.float32)
        # The block's keys: from its first query's window start to its last query's own position. A row whose
        # window starts later sees nothing in the first tiles (`softmax_step` adds nothing for it); every
        # asked row sees its own key, so its sum ends positive.
        end = seq_len - query_len + tl.minimum((m + 1) * BLOCK_M, query_len)
        for l0 in range(window_start(seq_len - query_len + m * BLOCK_M, window), end, BLOCK_N):
            lane = l0 + tl.arange(0, BLOCK_N)
            valid = lane < end
            at = tile_rows(table_ptr, b, table_stride, lane, valid, stride_block, stride_token, BLOCK_SIZE)
            k = tl.load(cache_ptr + (at + h * stride_head)[None, :] + d[:, None],
                        mask=valid[None, :] & (d[:, None] < D), other=0.0)  # [D_PAD, BLOCK_N], K transposed
            seen = (lane[None, :] <= position[:, None]) & (lane[None, :] > position[:, None] - window)
            score = tl.where(seen, dot(q, k, EXACT_QK) * scale, float("-inf"))
            peak, total, rescale, p = softmax_step(peak, total, score)
            v = tl.load(values_ptr + ((b * length + lane).to(tl.int64) * H + h)[:, None] * DV + j[None, :],
                        mask=valid[:, None] & (j[None, :] < DV), other=0.0)
            acc = acc * rescale[:, None] + dot(p.to(v.dtype), v, EXACT_PV)
        tl.store(out_ptr + token[:, None] * (H * DV) + h * DV + j[None, :], acc / total[:, None],
                 mask=asked[:, None] & (j[None, :] < DV))


def triton_prefill_slim_attention(
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
    """`parallel.paged_prefill_slim_attention`'s contract by the kernels above: q [T, H, D] post-RoPE, packed
    (a row stride of its own is fine), sequence i's queries at query_start_loc[i]:query_start_loc[i + 1];
    seq_lens [P] cached tokens, the queries' own included; window: a sliding window of that many keys (None:
    all). Returns [T, H, Dv] float32."""
    tokens, heads, head_size = q.shape
    num_sequences = seq_lens.shape[0]
    spill = kv_cache.shape[-1] - head_size
    value_size = proj.w_kv.shape[1] // heads
    block_size = kv_cache.shape[2]
    length = num_pages * block_size
    stride_block, stride_head, stride_token, last = kv_cache.stride()
    if last != 1:
        raise ValueError("slim: the Triton prefill reads cache rows with unit stride")
    check_device(q.device, "slim: the Triton prefill")
    q = q if q.stride(-1) == 1 else q.contiguous()
    table, lens = block_table.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous()
    starts = query_start_loc.to(torch.int32).contiguous()
    window = window or NO_WINDOW
    rotary_dim = 0 if rotary is None else rotary.rotary_dim
    anything = proj.w_kv  # a float32 pointer for the arguments a launch never reads
    cos_sin = anything if rotary is None else rotary.inverse_cos_sin
    raw = torch.empty(num_sequences, length, heads * head_size + spill * heads, dtype=torch.float32, device=q.device)
    heads_pow2 = 1 << (heads - 1).bit_length()
    rows = max(RAW_ROWS, heads_pow2)
    raw_kernel[(triton.cdiv(length, rows // heads_pow2), num_sequences)](
        kv_cache, table, lens, starts, cos_sin, anything if proj.k_bias is None else proj.k_bias, raw,
        stride_block, stride_head, stride_token, table.stride(0), length, window,
        H=heads, HEADS_POW2=heads_pow2, D=head_size, R=spill, R_PAD=pad(spill), K_BIAS=proj.k_bias is not None,
        BLOCK_SIZE=block_size, ROWS=rows, **rotation_constants(rotary_dim, head_size, rotary is None or rotary.neox),
    )
    raw = raw.view(num_sequences * length, -1)
    keys, spills = raw[:, : heads * head_size], raw[:, heads * head_size :]
    values = keys @ proj.w_kv if proj.v_bias is None else torch.addmm(proj.v_bias, keys, proj.w_kv)
    if proj.spill:
        values.addmm_(spills, proj.w_sv)
    values = values.to(q.dtype).view(num_sequences, length, heads, value_size)
    out = torch.empty(tokens, heads, value_size, dtype=torch.float32, device=q.device)
    block_m = min(BLOCK_M, pad(max_query_len))
    float_qk = torch.float32 in (q.dtype, kv_cache.dtype)
    # The interpreter's tl.dot multiplies bfloat16's raw bits (triton 3.9 holds them as uint16): there the
    # 16-bit products take their float32 values, which tensor cores multiply exactly too.
    widen = INTERPRETED and torch.bfloat16 in (q.dtype, kv_cache.dtype)
    attention_kernel[(triton.cdiv(max(max_query_len, 1), block_m), heads, num_sequences)](
        q, kv_cache, table, lens, starts, values, out,
        q.stride(0), q.stride(1), stride_block, stride_head, stride_token, table.stride(0), length, scale, window,
        H=heads, D=head_size, D_PAD=pad(head_size), DV=value_size, DV_PAD=pad(value_size), BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, ROUND_Q=not float_qk, EXACT_QK=float_qk or widen,
        EXACT_PV=values.dtype == torch.float32 or widen,
        num_warps=NUM_WARPS,
    )
    return out
