"""Slim's paged decode as Triton kernels: Z = P·K_raw in two passes (the default) or in one (K read once).

One pass (`columns_kernel`, ONE_PASS): one program per (column tile, split, sequence); a column tile is
COLUMNS columns of the padded key row, whole key heads or a part of one. For each tile of TILE tokens of
its split it scores every query head against the post-RoPE keys as stored (one [TILE, D] load per head,
so one key tile is live at a time), updates each head's online-softmax max and sum, rescales its
accumulator and adds P [H, TILE] times its un-RoPE'd columns, and the spill of the key heads whose first
column it holds (tl.dot, float32 accumulation; precision below). The H × (H·D) float32 accumulator does
not fit one program (512 KiB at 32 × 128), hence the column tiles: the tiles of one (split, sequence) are
launched side by side (grid axis 0) and read the same key tiles, so HBM sees K once and the repeats hit
L2. The price: every column tile computes all H heads' scores, H·D multiply-adds a head and token each
(at 32 × 128 and 128 columns, 32 tiles: as many as P·K_raw itself, on CUDA cores), and L2 serves K once
per tile: so until a GPU has timed both (benchmarks/gpu_decode.py), the two passes are the default.
Two passes (`scores_kernel`, then `columns_kernel` reading P from a scratch): the scores and softmax
statistics first, one program per (head, split, sequence), then the same column tiles, each reading only
its own columns of K. K is read twice from HBM (the bytes stock reads for K and V), the scores once more
through a small scratch.

The un-RoPE is done in registers from `Rotary.inverse_cos_sin` (NeoX or GPT-J pairs, partial rotary): a
raw column is x·cos ± x'·sin, x' the stored value of its rotation partner. Each split writes its Z, spill
Z, max and sum unnormalised; `triton_decode_rows` merges the splits by log-sum-exp, giving
`decode.decode_rows`'s contract: normalised Z [B, H, H·D] = Σ_l P_l·K_raw,l and spill Z [B, H, H·R].
With a sliding window a sequence's tiles start at the one holding its window's first key: the pages before
it (vLLM's null block once freed) are never read, and the splits wholly before it end at once.

Precision of P·K_raw and P·spill (float32 operands, float32 accumulation): a float32 cache takes
input_precision="ieee" (a float32 model stays exact against stock); a 16-bit cache takes "tf32x3", three
TF32 tensor-core products per dot (a = a_hi + a_lo), about float32's accuracy. Rounding P or K_raw to 16
bits instead would add a rounding of K to every value, amplified by W_KV: the error slim's layout exists
to keep at stock's level. On CUDA cores the product alone would need about SDPA's whole time at 32 x 128
(B = 16, n = 32k: 137 GFLOP, ~2 ms at ~67 TFLOP/s); compiled for sm_90 the 16-bit form runs mma.sync
(`benchmarks/sm90_compile.py`). Untimed: the device check decides whether it pays.

On CUDA these kernels are slim's decode; without CUDA they run under Triton's interpreter, for tests
(`ops/triton_build.py`). No host sync, and nothing a captured CUDA graph would freeze wrongly: the launch
sizes come from the batch, a bound on its pages (the metadata's; `max_model_len`'s when a graph is
captured) and the window, never from a sequence's length. Each sequence reads its length on the device and
cuts its own keys into the launch's splits; its tiles start at its window and stop at its length.
"""

import torch
import triton
import triton.language as tl

from vllm_slim.ops.slim.rope import Rotary
from vllm_slim.ops.triton_build import add, check_device, kernel_definitions, larger, occupancy_splits, pad

TILE_TOKENS = 16  # tokens per tile: tl.dot's least
# Key-row columns a program accumulates: [H_PAD, 128] float32 plus [16, 128] operands (the columns, their
# partners, cos, sin) and tf32x3's split halves. Compiled for sm_90 (benchmarks/sm90_compile.py, triton 3.6
# and 3.9) the two passes' tile of 128 uses no stack at 32 × 128 and 16 × 256; tiles of 256 spilled
# 520–1,400 bytes a thread under tf32x3.
COLUMN_TILE = 128
NUM_WARPS = 8
NO_WINDOW = 1 << 30  # the window of a layer without one: more keys than any sequence holds


with kernel_definitions():

    @triton.jit
    def tile_rows(table_ptr, b, table_stride, lane, valid, stride_block, stride_token, BLOCK_SIZE: tl.constexpr):
        """Each token's cache offset (int64, head 0): its page from the block table, its slot in the page."""
        block = tl.load(table_ptr + b * table_stride + lane // BLOCK_SIZE, mask=valid, other=0)
        return block.to(tl.int64) * stride_block + (lane % BLOCK_SIZE) * stride_token

    @triton.jit
    def window_start(position, window):
        """The first key a query at `position` sees under a sliding window of `window` keys (its own included)."""
        return tl.maximum(position - window + 1, 0)

    @triton.jit
    def split_span(lens_ptr, b, s, num_splits, window, max_keys, TILE: tl.constexpr):
        """Sequence b's length n (a padded row's 0 read as 1: it attends position 0, finite; never past
        max_keys, the launch's bound, so that no length reads or writes past what it sized), its window's
        first position lo, and the tiles of split s that hold keys in [lo, n): from `start` to `end`. Each
        sequence cuts its own keys into num_splits spans of whole tiles (TILE-aligned, as the two passes'
        tiles must be), so the launch depends on no sequence's length: one launch serves any lengths, as a
        captured CUDA graph replays it. A split past the sequence has no tiles; any other tile holds at least
        one key in [lo, n) (the columns pass takes P = exp(score − max), NaN where a split's max stayed −inf)."""
        n = tl.minimum(tl.maximum(tl.load(lens_ptr + b), 1), max_keys)
        lo = window_start(n - 1, window)
        first = lo // TILE * TILE
        per_split = (n - first + num_splits - 1) // num_splits  # builtins only: tl.cdiv is a jitted helper
        span = (per_split + TILE - 1) // TILE * TILE
        start = first + s * span
        return n, lo, start, tl.minimum(start + span, n)

    @triton.jit
    def head_scores(
        q_ptr, cache_ptr, at, valid, b, h, scale, stride_head, H: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    ):
        """Query head h's scores [TILE] against key head h's post-RoPE keys as stored, −inf off the sequence."""
        d = tl.arange(0, D_PAD)
        q = tl.load(q_ptr + (b * H + h) * D + d, mask=d < D, other=0.0).to(tl.float32)
        k = tl.load(cache_ptr + (at + h * stride_head)[:, None] + d[None, :],
                    mask=valid[:, None] & (d[None, :] < D), other=0.0)
        return tl.where(valid, tl.reduce(k.to(tl.float32) * q[None, :], 1, add) * scale, float("-inf"))

    @triton.jit
    def tile_scores(
        q_ptr, cache_ptr, at, valid, b, scale, stride_head,
        H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, TILE: tl.constexpr,
    ):
        """Every query head's scores [H_PAD, TILE], −inf on the padding heads. A loop over heads, not a
        [H, TILE, D] product: one key tile in registers at a time."""
        heads = tl.arange(0, H_PAD)
        score = tl.full((H_PAD, TILE), float("-inf"), tl.float32)
        for h in range(H):
            row = head_scores(q_ptr, cache_ptr, at, valid, b, h, scale, stride_head, H, D, D_PAD)
            score = tl.where(heads[:, None] == h, row[None, :], score)
        return score

    @triton.jit
    def softmax_step(peak, total, score):
        """Online softmax over a tile's scores [rows, TILE]: the new max and sum [rows], the factor the
        partials so far take, and P (taken against the new max)."""
        top = tl.maximum(peak, tl.reduce(score, 1, larger))
        base = tl.where(top == float("-inf"), 0.0, top)  # a padding head: nothing to add
        p = tl.exp(score - base[:, None])
        rescale = tl.exp(peak - base)
        return top, total * rescale + tl.reduce(p, 1, add), rescale, p

    @triton.jit
    def scores_kernel(
        q_ptr, cache_ptr, table_ptr, lens_ptr, scores_ptr, max_ptr, sum_ptr,
        stride_block, stride_head, stride_token, table_stride, scale, num_splits, window, max_keys, max_len,
        H: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    ):
        h, s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n, lo, start, end = split_span(lens_ptr, b, s, num_splits, window, max_keys, TILE)
        row = (b * H + h).to(tl.int64)
        one = tl.arange(0, 1)  # the head's statistics as [1] rows, for `softmax_step`
        peak = tl.full((1,), float("-inf"), tl.float32)
        total = tl.full((1,), 0.0, tl.float32)
        for l0 in range(start, end, TILE):
            lane = l0 + tl.arange(0, TILE)
            valid = (lane >= lo) & (lane < n)
            at = tile_rows(table_ptr, b, table_stride, lane, valid, stride_block, stride_token, BLOCK_SIZE)
            score = head_scores(q_ptr, cache_ptr, at, valid, b, h, scale, stride_head, H, D, D_PAD)
            tl.store(scores_ptr + row * max_len + lane, score, mask=valid)
            peak, total, _, _ = softmax_step(peak, total, score[None, :])
        tl.store(max_ptr + row * num_splits + s + one, peak)
        tl.store(sum_ptr + row * num_splits + s + one, total)

    @triton.jit
    def columns_kernel(
        q_ptr, cache_ptr, table_ptr, lens_ptr, cos_sin_ptr, scores_ptr, max_ptr, sum_ptr, z_ptr, zs_ptr,
        stride_block, stride_head, stride_token, table_stride, scale, num_splits, window, max_keys, max_len,
        H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, R: tl.constexpr,
        R_PAD: tl.constexpr, ROT: tl.constexpr, NEOX: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        TILE: tl.constexpr, COLUMNS: tl.constexpr, SPILL_HEADS: tl.constexpr, ONE_PASS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        gc, s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n, lo, start, end = split_span(lens_ptr, b, s, num_splits, window, max_keys, TILE)
        heads = tl.arange(0, H_PAD)
        live = heads < H
        rows = (b * H + heads).to(tl.int64)
        if ONE_PASS:
            peak = tl.full((H_PAD,), float("-inf"), tl.float32)
            total = tl.full((H_PAD,), 0.0, tl.float32)
        else:  # the split's max from the first pass (padding heads: 0, their scores are −inf)
            peak = tl.load(max_ptr + rows * num_splits + s, mask=live, other=0.0)
        # The tile's columns of the padded key row (H heads of D_PAD, D used): whole heads, or a part of one.
        c = gc * COLUMNS + tl.arange(0, COLUMNS)
        key, j = c // D_PAD, c % D_PAD
        kept = (key < H) & (j < D)
        column = key.to(tl.int64) * stride_head + j
        half = ROT // 2
        rotated = kept & (j < ROT)
        if NEOX:
            first = j < half
            pair, mate = tl.where(first, j, j - half), tl.where(first, j + half, j - half)
        else:
            first, pair, mate = j % 2 == 0, j // 2, j ^ 1
        sign = tl.where(first, 1.0, -1.0)  # raw first = x1·cos + x2·sin, raw second = x2·cos − x1·sin
        # A key head's R spill columns, by the tile that holds its column 0 (SPILL_HEADS heads of them).
        cs = tl.arange(0, SPILL_HEADS * R_PAD)
        spill_key, r = gc * COLUMNS // D_PAD + cs // R_PAD, cs % R_PAD
        owner = gc * COLUMNS % D_PAD == 0
        spill_kept = (spill_key < tl.where(owner, H, 0)) & (r < R)  # a scalar's & is int32 under the interpreter
        acc = tl.full((H_PAD, COLUMNS), 0.0, tl.float32)
        acc_spill = tl.full((H_PAD, SPILL_HEADS * R_PAD), 0.0, tl.float32)
        for l0 in range(start, end, TILE):
            lane = l0 + tl.arange(0, TILE)
            valid = (lane >= lo) & (lane < n)
            at = tile_rows(table_ptr, b, table_stride, lane, valid, stride_block, stride_token, BLOCK_SIZE)
            if ONE_PASS:
                score = tile_scores(q_ptr, cache_ptr, at, valid, b, scale, stride_head, H, H_PAD, D, D_PAD, TILE)
                peak, total, rescale, p = softmax_step(peak, total, score)
                acc = acc * rescale[:, None]
                acc_spill = acc_spill * rescale[:, None]
            else:
                score = tl.load(scores_ptr + rows[:, None] * max_len + lane[None, :],
                                mask=live[:, None] & valid[None, :], other=float("-inf"))
                p = tl.exp(score - peak[:, None])  # [H_PAD, TILE], 0 off the sequence
            x = tl.load(cache_ptr + at[:, None] + column[None, :], mask=valid[:, None] & kept[None, :],
                        other=0.0).to(tl.float32)
            if ROT > 0:
                turn = valid[:, None] & rotated[None, :]
                partner = tl.load(cache_ptr + at[:, None] + (column + mate - j)[None, :], mask=turn,
                                  other=0.0).to(tl.float32)
                angle = lane.to(tl.int64)[:, None] * ROT + pair[None, :]
                cos = tl.load(cos_sin_ptr + angle, mask=turn, other=1.0)
                sin = tl.load(cos_sin_ptr + angle + half, mask=turn, other=0.0)
                x = x * cos + partner * sin * sign[None, :]
            acc += tl.dot(p, x, input_precision=PRECISION)
            if R > 0:
                spill = tl.load(cache_ptr + at[:, None] + (spill_key.to(tl.int64) * stride_head + D + r)[None, :],
                                mask=valid[:, None] & spill_kept[None, :], other=0.0).to(tl.float32)
                acc_spill += tl.dot(p, spill, input_precision=PRECISION)
        out = ((b * num_splits + s) * H + heads).to(tl.int64)[:, None]
        tl.store(z_ptr + out * (H * D) + (key * D + j)[None, :], acc, mask=live[:, None] & kept[None, :])
        tl.store(zs_ptr + out * (H * R) + (spill_key * R + r)[None, :], acc_spill,
                 mask=live[:, None] & spill_kept[None, :])
        if ONE_PASS:
            if gc == 0:  # the statistics are the same in every column tile: one writes them
                tl.store(max_ptr + rows * num_splits + s, peak, mask=live)
                tl.store(sum_ptr + rows * num_splits + s, total, mask=live)


def triton_decode_rows(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    num_pages: int,
    rotary: Rotary | None,
    scale: float,
    split_pages: int | None = None,
    one_pass: bool = False,
    columns: int | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised Z [B, H, H·D] and spill Z [B, H, H·R] (`decode.decode_rows`'s contract). num_pages: a
    bound on every sequence's pages (the launch and the scores' scratch are sized by it, not by the
    lengths); split_pages: the launch has at least ⌈num_pages / split_pages⌉ splits (default: one; more
    where the batch alone would not fill the GPU: `occupancy_splits`), and each sequence's keys are cut
    evenly into them; one_pass: K read once, else the two passes; columns: the key-row columns a program
    accumulates, a power of two ≥ 16 (default COLUMN_TILE; whole heads or a part of one); window: a sliding
    window of that many keys (None: all)."""
    batch, heads, head_size = q.shape
    spill = kv_cache.shape[-1] - head_size
    block_size = kv_cache.shape[2]
    head_pad = pad(head_size)
    columns = min(columns or COLUMN_TILE, head_pad << (heads - 1).bit_length())
    if columns < 16 or columns & (columns - 1):
        raise ValueError(f"slim: a column tile must be a power of two of at least 16 columns, got {columns}")
    tiles = -(-heads * head_pad // columns)
    # As many splits as fill the GPU, and at least the caller's.
    fill = -(-max(num_pages, 1) // occupancy_splits(batch * tiles, num_pages, q.device))
    split_pages = max(1, min(split_pages or num_pages, fill))
    num_splits = -(-max(num_pages, 1) // split_pages)
    device = q.device
    maxes = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=device)
    sums = torch.empty_like(maxes)
    z = torch.empty(batch, num_splits, heads, heads * head_size, dtype=torch.float32, device=device)
    z_spill = torch.empty(batch, num_splits, heads, heads * spill, dtype=torch.float32, device=device)
    table, lens = block_table.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous()
    q = q.contiguous()
    rotary_dim = 0 if rotary is None else rotary.rotary_dim
    cos_sin = rotary.inverse_cos_sin if rotary is not None else maxes  # any float32 pointer
    stride_block, stride_head, stride_token, last = kv_cache.stride()
    if last != 1:
        raise ValueError("slim: the Triton decode reads cache rows with unit stride")
    check_device(device, "slim: the Triton decode")
    max_keys = max(num_pages, 1) * block_size
    walk = (stride_block, stride_head, stride_token, table.stride(0), scale, num_splits, window or NO_WINDOW, max_keys)
    shape = dict(H=heads, D=head_size, D_PAD=head_pad, BLOCK_SIZE=block_size, TILE=TILE_TOKENS)
    scores, max_len = maxes, 0  # the one pass keeps no scores
    if not one_pass:
        max_len = -(-max_keys // TILE_TOKENS) * TILE_TOKENS  # a score per key position
        scores = torch.empty(batch, heads, max_len, dtype=torch.float32, device=device)
        scores_kernel[(heads, num_splits, batch)](
            q, kv_cache, table, lens, scores, maxes, sums, *walk, max_len, **shape
        )
    columns_kernel[(tiles, num_splits, batch)](
        q, kv_cache, table, lens, cos_sin, scores, maxes, sums, z, z_spill, *walk, max_len, **shape,
        H_PAD=pad(heads), R=spill, R_PAD=pad(spill), ROT=rotary_dim, NEOX=rotary is None or rotary.neox,
        COLUMNS=columns, SPILL_HEADS=max(1, columns // head_pad),
        ONE_PASS=one_pass, PRECISION="ieee" if kv_cache.dtype == torch.float32 else "tf32x3", num_warps=NUM_WARPS,
    )
    # Each split's partials are taken against its own max: rescale to the largest (finite: one split holds
    # the query's own position; a split past a sequence's end or before its window has max −inf, sum 0,
    # Z 0), add, normalise.
    peak = maxes.amax(-1, keepdim=True)
    factor = (maxes - peak).exp()
    total = (sums * factor).sum(-1)[..., None]
    weight = factor.permute(0, 2, 1)[..., None]  # [B, splits, H, 1]
    return (z * weight).sum(1) / total, (z_spill * weight).sum(1) / total
