"""SATA's prefill and chunked prefill as Triton kernels, for CUDA: `chunk.chunk_sata_varlen`'s contract,
plain (no sinks, no window) and the hybrid's (window W ≥ 1, S ≥ 0 sink tokens).

A step's new tokens of a sequence form ONE chunk, so nothing inside the step is sequential. With S_0 the
sequence's series state before the step (zero on a reset) and T(x) = Σ_{p<order} x^p/p!, plain sata is
    out_t = [φ(q_t)·S_0 + Σ_{s ≤ t, s new} T(q_t·k_s·scale)·[v_s, 1]] → numerator / normalizer,
    S_1   = S_0 + Σ_{s new} φ(k_s)·[v_s, 1]ᵀ.
The hybrid weights key s for the query at position t by exp(x − c) when s is exact for t (a sink, s < S,
or in its window, t − W < s ≤ t) and by T(x)·exp(−c) otherwise; its state page per KV head holds the series
[m, d_v + 1] of the keys that have left the window, then S + W exact key slots and S + W value slots (sink
p in slot p, later tokens in the ring slot S + (p − S) mod W). Before a step that starts at position n0
(context_lens), S_0 holds the positions S..n0 − W − 1, the slots the sinks < n0 and the positions
max(S, n0 − W)..n0 − 1. A query at t ≥ n0 therefore sees its series keys in three places: S_0 (φ(q)·S_0),
stored ring slots that its own window has passed (s ≤ t − W: T(x) from the stored key, S_0 lacks them),
and new keys outside its window (T(x) from the step's keys).

Three launches, in this order (each reads only what no earlier one has written):

`readout_kernel` (plain) / `hybrid_readout_kernel`, one program per (query block of BLOCK_T tokens, KV
head, sequence): its rows are the block's tokens × the G query heads of the KV head (ROWS = BLOCK_T·G,
token-major). Both start with `read_series`: S_0's basis tiles, φ(q) [ROWS, M_TILE] built in registers
from `basis.feature_tables` times the tile [M_TILE, d_v] (tl.dot) and its normalizer column (a row reduce).
Plain then adds the new keys up to the block's last query (the causal limit), T(q·k·scale)·[v, 1], and
divides. The hybrid also scores the stored exact slots (tiles of KEY_BLOCK; none on a reset) and weighs
each key per row as exact or series (above); it carries ONE scale per row online: c = max(largest exact
logit so far, log of the series weight so far, S_0's included), the exact and series weights of a key
block both taken on the new c and the accumulator rescaled by exp(c_old − c_new), as flash attention does
for its max. At the end c is the chunk form's (max(largest exact logit, log of the row's total series
weight)), so exp(x − c) ≤ 1 and the series' share total·exp(−c) ≤ 1: nothing overflows whichever part
dominates, and an empty series (total 0) takes no share (exp(−c) alone overflows when every exact logit is
below −88). One accumulator [ROWS, d_v] rather than one per part: fewer registers, one tl.dot a key block.
The series' running total is kept unscaled, as the chunk form's (T(x) ≤ x^{order−1}, no overflow at any
logit float32 attention can give). The series weights must be positive (odd orders, as the policy
enforces): the running log needs a positive total.

`update_kernel`, one program per (basis tile, KV head, sequence): its rows of S (zero on a reset) plus
φ(K)[:, tile]ᵀ·[V, 1] over the keys that leave the series' complement during the step, in blocks of
BLOCK_S (tl.dot), stored in place: each state byte read once and written once per step, the memory floor.
Plain: every new token. Hybrid: the token at p pushes out the key at p − W if p − W ≥ S, so the keys at
max(S, n0 − W)..n0 + L − W − 1 (L new tokens) fold: first those held in ring slots (p − W < n0; read from
the page before the store overwrites them), then the new ones. It runs after the readout, which reads S_0.

`store_kernel` (hybrid), one program per (tile of exact slots, KV head, sequence): after the step each slot
holds the position `chunk.slot_positions` gives for n0 + L tokens; where that is a new token (a sink of the
step, or one of its last W), the slot takes its key and value. Gathering per slot, no two writes collide.
It runs last: both kernels before it read the slots' old keys.

Why one chunk, and not the chunk form's 64-token chunks: the state is read and written once per step (the
bulk of the bytes at d = 128: 4.3 MB a KV head at order 3), and the in-step work is the causal T² part that
the chunk form also has. φ(Q)·S_0 is T·m·(d_v + 1) multiply-adds per query head; each query block reads its
KV head's whole S_0, the blocks of one head share it through L2. The causal part is T²/2·(d + d_v + 1) per
query head; no T × T buffer is made. Query blocks run last-first: the late blocks have the most keys.

Precision: all arithmetic is float32 (tl.dot with input_precision="ieee", no TF32). The whole step as one
chunk is exact math: the same sums as the chunk form's, in a different order, so the two agree to float32
rounding. Plain's series weights are positive for odd orders (`basis.is_positive_order`), so the normalizer
cannot vanish there; even orders can make it cross zero, as in every form. Memory: the output O(T·H·d_v)
plus registers.

A reset state is not read (its page may hold another sequence's): no series, no stored slots, whatever
n0, the decode kernel's rule (the backend resets exactly the states at n0 = 0, where the chunk form agrees;
at n0 > 0 it would score its zeroed slots as keys). Slots the step leaves without a token keep what the
page held (the chunk form zeroes them on a reset): no form reads them.

On CUDA this is compiled; without CUDA it runs under Triton's interpreter, for tests
(`ops/triton_build.py`). No host sync: the launch sizes come from host numbers (max_query_len, shapes).
Output rows past query_start_loc[-1] (padding tokens) are left unwritten.
"""

import torch
import triton
import triton.language as tl

from vllm_slim.ops.sata.basis import feature_size, feature_tables, state_size
from vllm_slim.ops.sata.triton_decode import features
from vllm_slim.ops.triton_build import add, check_device, kernel_definitions, larger, pad

# Register budget, float32 at d = d_v = 128, order 3 (m = 8,385), 8 warps (256 threads), per thread:
# readout: accumulator [64, 128] 32, φ(q) [64, 32] 8 and the S_0 tile [32, 128] 16 in the tile loop; then
# the query block [64, 128] 32, keys [128, 32] 16, weights [64, 32] 8 and values [32, 128] 16 in the key
# loop: ~100 at the peak before tl.dot's operand copies (the hybrid's masks and row scales add ~20). Update:
# the S tile [32, 128] 16, φ(K)ᵀ [32, 32] 4, values [32, 128] 16: ~40.
READ_ROWS = 64  # query rows (tokens × query heads of a KV head) a readout program holds
READ_TILE_FLOATS = 4096  # floats of an S_0 tile the readout multiplies at once: 32 basis rows at d_v = 128
KEY_BLOCK = 32  # keys per step of the readouts' key loops (new keys, stored slots) and the update's folds
# Floats of the S tile an update program owns: 32 basis rows at d_v = 128 (8,192 spilled 660–3,000 bytes a
# thread compiled for sm_90; 4,096 at most 32 bytes, under triton 3.9's hybrid). Each tile is still read
# and written once; the readouts still spill (1.4–6.9 KB a thread), which fewer READ_ROWS would cut at the
# price of reading S_0 more often: for a device to decide.
UPDATE_TILE_FLOATS = 4096
SLOT_TILE = 32  # exact slots a store program writes
NUM_WARPS = 8
NO_SCALE = tl.constexpr(-1e30)  # a row's scale before any weight: exp(NO_SCALE − c) is 0 for every real c


with kernel_definitions():

    @triton.jit
    def block_rows(q_ptr, first, start, length, h, q_stride_t, q_stride_h, G: tl.constexpr, G_P2: tl.constexpr,
                   BLOCK_T: tl.constexpr):
        """A readout program's rows, token-major: each row's token t (offset in the sequence's new tokens),
        whether it is live, its token index and query head, and the pointers to its query."""
        r = tl.arange(0, BLOCK_T * G_P2)
        t = start + r // G_P2
        g = r % G_P2
        live = (t < length) & (g < G)
        token = (first + t).to(tl.int64)
        head = h * G + g
        return t, live, token, head, q_ptr + token * q_stride_t + head * q_stride_h

    @triton.jit
    def series_weight(x, ORDER: tl.constexpr):
        """T(x) = Σ_{p<ORDER} x^p/p! elementwise (Horner, as `basis.truncated_exp`)."""
        weight = tl.full(x.shape, 1.0, tl.float32)
        for p in tl.static_range(ORDER - 1, 0, -1):
            weight = 1.0 + x * weight / p
        return weight

    @triton.jit
    def read_series(q_rows, live, page, m, tiles, index_ptr, coefficient_ptr,
                    D: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, WIDTH: tl.constexpr,
                    M_TILE: tl.constexpr):
        """φ(q)·S_0 for the queries at pointers `q_rows` [ROWS] over the first `tiles` tiles of the series at
        `page` (m rows of [d_v numerator, 1 normalizer]): ([ROWS, DV_PAD] numerators, [ROWS] normalizers)."""
        e = tl.arange(0, DV_PAD)
        acc = tl.full((q_rows.shape[0], DV_PAD), 0.0, tl.float32)
        total = tl.full((q_rows.shape[0],), 0.0, tl.float32)
        for tile in range(0, tiles):
            rows = tile * M_TILE + tl.arange(0, M_TILE)
            in_m = rows < m
            phi = features(q_rows, live, rows, in_m, index_ptr, coefficient_ptr, D, WIDTH)
            state = page + rows * (DV + 1)
            numerator = tl.load(state[:, None] + e[None, :], mask=in_m[:, None] & (e[None, :] < DV), other=0.0)
            normalizer = tl.load(state + DV, mask=in_m, other=0.0)
            acc += tl.dot(phi, numerator, input_precision="ieee")
            total += tl.reduce(phi * normalizer[None, :], 1, add)
        return acc, total

    @triton.jit
    def load_keys(k_ptr, v_ptr, key, used, h, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                  D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr):
        """The keys [D_PAD, N] (transposed) and values [N, DV_PAD] float32 of KV head h at tokens `key` [N]
        (int64), zeros where not `used`."""
        c, e = tl.arange(0, D_PAD), tl.arange(0, DV_PAD)
        keys = tl.load(k_ptr + key[None, :] * k_stride_t + h * k_stride_h + c[:, None],
                       mask=used[None, :] & (c[:, None] < D), other=0.0).to(tl.float32)
        values = tl.load(v_ptr + key[:, None] * v_stride_t + h * v_stride_h + e[None, :],
                         mask=used[:, None] & (e[None, :] < DV), other=0.0).to(tl.float32)
        return keys, values

    @triton.jit
    def held_positions(slot, seen, SINKS: tl.constexpr, WINDOW: tl.constexpr):
        """The position each exact slot [N] holds after `seen` tokens, −1 where it holds none
        (`chunk.slot_positions`): sink slot p holds p; ring slot S + r the latest p ≥ S with
        (p − S) mod W = r before `seen` (modulo taken non-negative: C's and Python's differ)."""
        newest = seen - 1 - SINKS
        ring = SINKS + newest - ((newest - (slot - SINKS)) % WINDOW + WINDOW) % WINDOW  # < S when newest < 0
        return tl.where(slot < SINKS, tl.where(slot < seen, slot, -1), tl.where(ring >= SINKS, ring, -1))

    @triton.jit
    def on_one_scale(acc, norm, series_total, c, x, exact, series, values, ORDER: tl.constexpr):
        """Add a block of keys (logits x [ROWS, N], values [N, DV_PAD]) to the hybrid's rows: exact weights
        exp(x − c) where `exact`, series weights T(x)·exp(−c) where `series`, on the row scale c raised to
        cover the block (the accumulator and normalizer rescaled with it). `series_total` is unscaled."""
        weight = tl.where(series, series_weight(x, ORDER), 0.0)
        series_total += tl.reduce(weight, 1, add)
        counted = series_total > 0
        log_total = tl.log(tl.where(counted, series_total, 1.0))
        top = tl.maximum(tl.maximum(c, tl.reduce(tl.where(exact, x, NO_SCALE), 1, larger)),
                         tl.where(counted, log_total, NO_SCALE))
        rescale = tl.exp(c - top)
        share = tl.exp(tl.where(counted, -top, NO_SCALE))  # ≤ 1/series_total: finite
        weight = tl.where(exact, tl.exp(tl.where(exact, x - top[:, None], NO_SCALE)), weight * share[:, None])
        acc = acc * rescale[:, None] + tl.dot(weight, values, input_precision="ieee")
        norm = norm * rescale + tl.reduce(weight, 1, add)
        return acc, norm, series_total, top

    @triton.jit
    def fold(numerator, normalizer, key_rows, value_rows, valid, rows, in_m, index_ptr, coefficient_ptr,
             D: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, WIDTH: tl.constexpr):
        """A state tile (numerator [M_TILE, DV_PAD], normalizer [M_TILE]) plus φ(k)[:, rows]ᵀ·[v, 1] over the
        keys at pointers `key_rows` [N] and values at `value_rows` [N] that are `valid` (the rest add 0)."""
        e = tl.arange(0, DV_PAD)
        phi = features(key_rows, valid, rows, in_m, index_ptr, coefficient_ptr, D, WIDTH)
        phi = tl.trans(tl.where(valid[:, None], phi, 0.0))  # [M_TILE, N]
        values = tl.load(value_rows[:, None] + e[None, :], mask=valid[:, None] & (e[None, :] < DV),
                         other=0.0).to(tl.float32)
        return numerator + tl.dot(phi, values, input_precision="ieee"), normalizer + tl.reduce(phi, 1, add)

    @triton.jit
    def readout_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, starts_ptr, pages_ptr, indices_ptr, reset_ptr, index_ptr, coefficient_ptr,
        q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, o_stride_t, o_stride_h,
        page_stride, head_stride, m, num_tiles, scale,
        G: tl.constexpr, G_P2: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        DV: tl.constexpr, DV_PAD: tl.constexpr, WIDTH: tl.constexpr, ORDER: tl.constexpr, M_TILE: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        block, h, b = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1), tl.program_id(2)
        first = tl.load(starts_ptr + b)
        length = tl.load(starts_ptr + b + 1) - first
        start = block * BLOCK_T
        if start >= length:
            return
        t, live, token, head, q_rows = block_rows(q_ptr, first, start, length, h, q_stride_t, q_stride_h, G, G_P2,
                                                  BLOCK_T)
        e = tl.arange(0, DV_PAD)

        # φ(q)·S_0; a reset state holds nothing (and is not read).
        tiles = tl.where(tl.load(reset_ptr + b) == 0, num_tiles, 0)
        page = pages_ptr + tl.load(indices_ptr + b).to(tl.int64) * page_stride + h * head_stride
        acc, total = read_series(q_rows, live, page, m, tiles, index_ptr, coefficient_ptr, D, DV, DV_PAD, WIDTH,
                                 M_TILE)

        # The new keys s ≤ t, weighted by the series of their logits.
        c = tl.arange(0, D_PAD)
        queries = tl.load(q_rows[:, None] + c[None, :], mask=live[:, None] & (c[None, :] < D), other=0.0)
        queries = queries.to(tl.float32)
        end = tl.minimum(start + BLOCK_T, length)  # one past the block's last query
        for s0 in range(0, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            keys, values = load_keys(k_ptr, v_ptr, (first + s).to(tl.int64), s < end, h, k_stride_t, k_stride_h,
                                     v_stride_t, v_stride_h, D, D_PAD, DV, DV_PAD)
            weight = series_weight(tl.dot(queries, keys, input_precision="ieee") * scale, ORDER)
            weight = tl.where(s[None, :] <= t[:, None], weight, 0.0)  # causal (and the keys past `end`)
            acc += tl.dot(weight, values, input_precision="ieee")
            total += tl.reduce(weight, 1, add)

        out = acc / total[:, None]
        tl.store(out_ptr + token[:, None] * o_stride_t + head[:, None] * o_stride_h + e[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=live[:, None] & (e[None, :] < DV))

    @triton.jit
    def hybrid_readout_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, starts_ptr, context_ptr, pages_ptr, indices_ptr, reset_ptr, index_ptr,
        coefficient_ptr, q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h, o_stride_t,
        o_stride_h, page_stride, head_stride, m, num_tiles, scale,
        G: tl.constexpr, G_P2: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        DV: tl.constexpr, DV_PAD: tl.constexpr, WIDTH: tl.constexpr, ORDER: tl.constexpr, M_TILE: tl.constexpr,
        BLOCK_S: tl.constexpr, SINKS: tl.constexpr, WINDOW: tl.constexpr,
    ):
        block, h, b = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1), tl.program_id(2)
        first = tl.load(starts_ptr + b)
        length = tl.load(starts_ptr + b + 1) - first
        start = block * BLOCK_T
        if start >= length:
            return
        context = tl.load(context_ptr + b)  # the tokens the state holds: the first new token's position
        kept = tl.load(reset_ptr + b) == 0  # a reset page holds another sequence's series and slots
        t, live, token, head, q_rows = block_rows(q_ptr, first, start, length, h, q_stride_t, q_stride_h, G, G_P2,
                                                  BLOCK_T)
        position = context + t  # each row's query position
        e = tl.arange(0, DV_PAD)
        page = pages_ptr + tl.load(indices_ptr + b).to(tl.int64) * page_stride + h * head_stride

        # φ(q)·S_0 (the positions S..n0 − W − 1), unscaled, then on the row scale c = log of its weight.
        acc, series_total = read_series(q_rows, live, page, m, tl.where(kept, num_tiles, 0), index_ptr,
                                        coefficient_ptr, D, DV, DV_PAD, WIDTH, M_TILE)
        counted = series_total > 0
        c = tl.where(counted, tl.log(tl.where(counted, series_total, 1.0)), NO_SCALE)
        share = tl.where(counted, 1.0 / tl.where(counted, series_total, 1.0), 0.0)  # exp(−c)
        acc = acc * share[:, None]
        norm = series_total * share

        d = tl.arange(0, D_PAD)
        queries = tl.load(q_rows[:, None] + d[None, :], mask=live[:, None] & (d[None, :] < D), other=0.0)
        queries = queries.to(tl.float32)
        # The stored slots: the sinks, exact for every query, and the ring's positions before n0, exact
        # within a row's window, the series (from the stored key: S_0 lacks them) once the row has passed them.
        keys_at = page + m * (DV + 1)
        values_at = keys_at + (SINKS + WINDOW) * D
        for s0 in range(0, tl.where(kept, SINKS + WINDOW, 0), BLOCK_S):
            slot = s0 + tl.arange(0, BLOCK_S)
            held = held_positions(slot, context, SINKS, WINDOW)
            used = (slot < SINKS + WINDOW) & (held >= 0)
            keys = tl.load(keys_at + slot[None, :] * D + d[:, None], mask=used[None, :] & (d[:, None] < D),
                           other=0.0)
            values = tl.load(values_at + slot[:, None] * DV + e[None, :], mask=used[:, None] & (e[None, :] < DV),
                             other=0.0)
            x = tl.dot(queries, keys, input_precision="ieee") * scale
            exact = used[None, :] & ((held[None, :] < SINKS) | (held[None, :] > position[:, None] - WINDOW))
            series = used[None, :] & (held[None, :] <= position[:, None] - WINDOW) & (held[None, :] >= SINKS)
            acc, norm, series_total, c = on_one_scale(acc, norm, series_total, c, x, exact, series, values, ORDER)

        # The new keys s ≤ t: exact if a sink or within t's window, the series otherwise.
        end = tl.minimum(start + BLOCK_T, length)  # one past the block's last query
        for s0 in range(0, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            keys, values = load_keys(k_ptr, v_ptr, (first + s).to(tl.int64), s < end, h, k_stride_t, k_stride_h,
                                     v_stride_t, v_stride_h, D, D_PAD, DV, DV_PAD)
            x = tl.dot(queries, keys, input_precision="ieee") * scale
            causal = (s[None, :] <= t[:, None]) & (s[None, :] < end)
            inside = ((context + s)[None, :] < SINKS) | (t[:, None] - s[None, :] < WINDOW)
            exact = causal & inside
            series = causal != exact
            acc, norm, series_total, c = on_one_scale(acc, norm, series_total, c, x, exact, series, values, ORDER)

        out = acc / tl.where(live, norm, 1.0)[:, None]  # ≥ the query's own share (padding rows: nothing)
        tl.store(out_ptr + token[:, None] * o_stride_t + head[:, None] * o_stride_h + e[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=live[:, None] & (e[None, :] < DV))

    @triton.jit
    def update_kernel(
        k_ptr, v_ptr, starts_ptr, context_ptr, pages_ptr, indices_ptr, reset_ptr, index_ptr, coefficient_ptr,
        k_stride_t, k_stride_h, v_stride_t, v_stride_h, page_stride, head_stride, m,
        D: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, WIDTH: tl.constexpr, M_TILE: tl.constexpr,
        BLOCK_S: tl.constexpr, SINKS: tl.constexpr, WINDOW: tl.constexpr,
    ):
        tile, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        first = tl.load(starts_ptr + b)
        length = tl.load(starts_ptr + b + 1) - first
        rows = tile * M_TILE + tl.arange(0, M_TILE)
        in_m = rows < m
        e = tl.arange(0, DV_PAD)
        # The tile's rows [M_TILE, DV + 1] as the numerator's DV columns and the normalizer's one; a reset
        # state is not read (its page may hold another sequence's).
        kept = tl.load(reset_ptr + b) == 0
        stored = tl.where(kept, in_m, False)  # (`&` with a scalar: the interpreter fails)
        page = pages_ptr + tl.load(indices_ptr + b).to(tl.int64) * page_stride + h * head_stride
        state = page + rows * (DV + 1)
        numerator = tl.load(state[:, None] + e[None, :], mask=stored[:, None] & (e[None, :] < DV), other=0.0)
        normalizer = tl.load(state + DV, mask=stored, other=0.0)
        if WINDOW == 0:  # plain sata: every new token
            begin, end = 0, length
        else:
            # The token at p pushes the key at p − W (if ≥ S) into the series: the positions
            # max(S, n0 − W)..n0 + L − W − 1; first those the ring slots hold (before n0, none on a reset).
            context = tl.load(context_ptr + b)
            keys_at = page + m * (DV + 1)
            lowest = tl.maximum(context - WINDOW, SINKS)
            held_end = tl.where(kept, tl.minimum(context, context + length - WINDOW), lowest)
            for p0 in range(lowest, held_end, BLOCK_S):
                p = p0 + tl.arange(0, BLOCK_S)
                slot = SINKS + (p - SINKS) % WINDOW  # p ≥ S
                numerator, normalizer = fold(numerator, normalizer, keys_at + slot * D,
                                             keys_at + (SINKS + WINDOW) * D + slot * DV, p < held_end, rows, in_m,
                                             index_ptr, coefficient_ptr, D, DV, DV_PAD, WIDTH)
            begin, end = tl.maximum(SINKS - context, 0), length - WINDOW  # then the new ones (not the sinks)
        for s0 in range(begin, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            key = (first + s).to(tl.int64)
            numerator, normalizer = fold(numerator, normalizer, k_ptr + key * k_stride_t + h * k_stride_h,
                                         v_ptr + key * v_stride_t + h * v_stride_h, s < end, rows, in_m, index_ptr,
                                         coefficient_ptr, D, DV, DV_PAD, WIDTH)
        tl.store(state[:, None] + e[None, :], numerator, mask=in_m[:, None] & (e[None, :] < DV))
        tl.store(state + DV, normalizer, mask=in_m)

    @triton.jit
    def store_kernel(
        k_ptr, v_ptr, starts_ptr, context_ptr, pages_ptr, indices_ptr,
        k_stride_t, k_stride_h, v_stride_t, v_stride_h, page_stride, head_stride, keys_offset,
        D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, SINKS: tl.constexpr,
        WINDOW: tl.constexpr, SLOT_TILE: tl.constexpr,
    ):
        tile, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        first = tl.load(starts_ptr + b)
        length = tl.load(starts_ptr + b + 1) - first
        context = tl.load(context_ptr + b)
        slot = tile * SLOT_TILE + tl.arange(0, SLOT_TILE)
        # The slots that hold one of the step's tokens once it is done: its sinks and its last W.
        held = held_positions(slot, context + length, SINKS, WINDOW)
        new = (slot < SINKS + WINDOW) & (held >= context)
        key = (first + held - context).to(tl.int64)
        keys_at = pages_ptr + tl.load(indices_ptr + b).to(tl.int64) * page_stride + h * head_stride + keys_offset
        d, e = tl.arange(0, D_PAD), tl.arange(0, DV_PAD)
        keys = tl.load(k_ptr + key[:, None] * k_stride_t + h * k_stride_h + d[None, :],
                       mask=new[:, None] & (d[None, :] < D), other=0.0)
        tl.store(keys_at + slot[:, None] * D + d[None, :], keys.to(tl.float32), mask=new[:, None] & (d[None, :] < D))
        values = tl.load(v_ptr + key[:, None] * v_stride_t + h * v_stride_h + e[None, :],
                         mask=new[:, None] & (e[None, :] < DV), other=0.0)
        tl.store(keys_at + (SINKS + WINDOW) * D + slot[:, None] * DV + e[None, :], values.to(tl.float32),
                 mask=new[:, None] & (e[None, :] < DV))


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
    context_lens: torch.Tensor | None = None,
    sink_tokens: int = 0,
    window: int = 0,
) -> torch.Tensor:
    """SATA over a step's sequences, each continuing from its state: the contract of
    `chunk.chunk_sata_varlen` (plain with window = 0, then context_lens are not needed; the hybrid with
    window ≥ 1 and sink_tokens ≥ 0, context_lens [P] the tokens each state already holds).

    q [T, H, d], k [T, Hkv, d], v [T, Hkv, d_v] packed (query_start_loc [P + 1], max_query_len ≥ every
    sequence's new tokens); state_pages [N, Hkv, floats] float32, updated in place at state_indices [P]:
    per head the series Σ φ(k)·[v, 1]ᵀ [m, d_v + 1], then the hybrid's S + W exact keys and values (floats
    past them untouched); reset [P] bool: states that start empty (their page may hold another sequence's).
    Returns [T, H, d_v] in q's dtype. No host sync."""
    num_tokens, heads, head_size = q.shape
    kv_heads, head_size_v = k.shape[1], v.shape[-1]
    num_sequences = query_start_loc.shape[0] - 1
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    if sink_tokens and not window:
        raise ValueError("sink tokens need a window of at least 1 token (the query's own)")
    if window and context_lens is None:
        raise ValueError("the hybrid's prefill needs context_lens (the positions of the new tokens)")
    m = feature_size(head_size, order)
    floats = state_size(head_size, head_size_v, order, sink_tokens + window)
    if state_pages.dtype != torch.float32 or state_pages.stride(-1) != 1 or state_pages.shape[-1] < floats:
        raise ValueError(f"state pages {tuple(state_pages.shape)} do not hold {floats} float32 a head")
    check_device(q.device, "sata: the Triton prefill")
    index, coefficient = feature_tables(head_size, order, scale, q.device)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(num_tokens, heads, head_size_v, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_sequences == 0:
        return out
    starts, indices, reset = (x.contiguous() for x in (query_start_loc, state_indices, reset))
    context = context_lens.contiguous() if window else starts  # not read without a window
    group = heads // kv_heads
    group_p2 = triton.next_power_of_2(group)
    block_t = max(1, READ_ROWS // group_p2)
    dv_pad = pad(head_size_v)
    read_tile = min(pad(m), max(16, READ_TILE_FLOATS // dv_pad))
    update_tile = min(pad(m), max(16, UPDATE_TILE_FLOATS // dv_pad))
    common = dict(D=head_size, DV=head_size_v, DV_PAD=dv_pad, WIDTH=order - 1, BLOCK_S=KEY_BLOCK, num_warps=NUM_WARPS)
    strides = (k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    read = dict(G=group, G_P2=group_p2, BLOCK_T=block_t, D_PAD=pad(head_size), ORDER=order, M_TILE=read_tile)
    # The readout reads S_0 and the stored slots; the update then folds into S in place (reading the slots
    # whose keys leave the window); the store last overwrites the slots.
    read_grid = (triton.cdiv(max(max_query_len, 1), block_t), kv_heads, num_sequences)
    read_sizes = (state_pages.stride(0), state_pages.stride(1), m, triton.cdiv(m, read_tile), float(scale))
    if window:
        hybrid_readout_kernel[read_grid](
            q, k, v, out, starts, context, state_pages, indices, reset, index, coefficient,
            q.stride(0), q.stride(1), *strides, out.stride(0), out.stride(1), *read_sizes,
            SINKS=sink_tokens, WINDOW=window, **read, **common,
        )
    else:
        readout_kernel[read_grid](
            q, k, v, out, starts, state_pages, indices, reset, index, coefficient,
            q.stride(0), q.stride(1), *strides, out.stride(0), out.stride(1), *read_sizes, **read, **common,
        )
    update_kernel[(triton.cdiv(m, update_tile), kv_heads, num_sequences)](
        k, v, starts, context, state_pages, indices, reset, index, coefficient,
        *strides, state_pages.stride(0), state_pages.stride(1), m,
        M_TILE=update_tile, SINKS=sink_tokens, WINDOW=window, **common,
    )
    if window:
        store_kernel[(triton.cdiv(sink_tokens + window, SLOT_TILE), kv_heads, num_sequences)](
            k, v, starts, context, state_pages, indices, *strides, state_pages.stride(0), state_pages.stride(1),
            m * (head_size_v + 1), D=head_size, D_PAD=pad(head_size), DV=head_size_v, DV_PAD=dv_pad,
            SINKS=sink_tokens, WINDOW=window, SLOT_TILE=SLOT_TILE, num_warps=4,
        )
    return out
