"""Slim's paged decode as Triton kernels, two passes (K read twice: the bytes stock reads for K and V).

Pass 1, one program per (sequence, split, head): the scores of the split's cached keys (post-RoPE, as
stored) against the head's query, kept in a scratch row, and the split's softmax max and sum.
Pass 2, one program per (sequence, split, key head g): P = exp(score − M) for every query head, M the
sequence's max over its splits, times head g's un-RoPE'd key columns and its spill (tl.dot, float32
accumulation), the rotation done in registers from the cos/sin table (NeoX or GPT-J pairs, partial
rotary). The splits' partials share M, so they add. The result is `decode.decode_rows`'s contract:
normalised Z [B, H, H·D] = Σ_l P_l·K_raw,l and spill Z [B, H, H·R].

On CUDA these kernels are slim's decode; without CUDA they run under Triton's interpreter, for tests
(`ops/triton_build.py`). No host sync: the launch sizes come from host numbers the metadata already
holds (pages, split length).
"""

import torch
import triton
import triton.language as tl

from vllm_slim.ops.slim.rope import Rotary
from vllm_slim.ops.triton_build import add, check_device, kernel_definitions, larger, pad

BLOCK_N = 32  # tokens per tile of a split


with kernel_definitions():

    @triton.jit
    def scores_kernel(
        q_ptr, cache_ptr, table_ptr, lens_ptr, scores_ptr, max_ptr, sum_ptr,
        stride_block, stride_head, stride_token, table_stride, scale, split_len, num_splits, max_len,
        H: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        TILE: tl.constexpr,
    ):
        b, s, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n = tl.maximum(tl.load(lens_ptr + b), 1)  # a padded row (0) attends position 0: finite
        d = tl.arange(0, D_PAD)
        q = tl.load(q_ptr + (b * H + h) * D + d, mask=d < D, other=0.0).to(tl.float32)
        peak = tl.full((), float("-inf"), tl.float32)
        total = tl.full((), 0.0, tl.float32)
        row = (b * H + h).to(tl.int64)
        for l0 in range(s * split_len, (s + 1) * split_len, TILE):
            lane = l0 + tl.arange(0, TILE)
            valid = lane < n
            block = tl.load(table_ptr + b * table_stride + lane // BLOCK_SIZE, mask=valid, other=0)
            at = block.to(tl.int64) * stride_block + h * stride_head + (lane % BLOCK_SIZE) * stride_token
            k = tl.load(cache_ptr + at[:, None] + d[None, :], mask=valid[:, None] & (d[None, :] < D), other=0.0)
            score = tl.where(valid, tl.reduce(k.to(tl.float32) * q[None, :], 1, add) * scale, float("-inf"))
            tl.store(scores_ptr + row * max_len + lane, score)
            top = tl.maximum(peak, tl.reduce(score, 0, larger))
            base = tl.where(top == float("-inf"), 0.0, top)  # a tile past the end: nothing to add
            total = total * tl.exp(peak - base) + tl.reduce(tl.exp(score - base), 0, add)
            peak = top
        tl.store(max_ptr + row * num_splits + s, peak)
        tl.store(sum_ptr + row * num_splits + s, total)

    @triton.jit
    def accumulate_kernel(
        cache_ptr, table_ptr, lens_ptr, cos_sin_ptr, scores_ptr, max_ptr, z_ptr, zs_ptr,
        stride_block, stride_head, stride_token, table_stride, split_len, num_splits, max_len,
        H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
        ROT: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr, NEOX: tl.constexpr,
        S_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    ):
        b, s, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n = tl.maximum(tl.load(lens_ptr + b), 1)
        heads = tl.arange(0, H_PAD)
        rows = (b * H + heads).to(tl.int64)
        splits = tl.arange(0, S_PAD)
        maxes = tl.load(max_ptr + rows[:, None] * num_splits + splits[None, :],
                        mask=(heads[:, None] < H) & (splits[None, :] < num_splits), other=float("-inf"))
        peak = tl.reduce(maxes, 1, larger)
        peak = tl.where(peak == float("-inf"), 0.0, peak)  # padding heads
        half = ROT // 2
        i = tl.arange(0, HALF_PAD)
        if NEOX:
            first, second = i, i + half
        else:
            first, second = 2 * i, 2 * i + 1
        tail = ROT + tl.arange(0, TAIL_PAD)
        r = tl.arange(0, R_PAD)
        acc1 = tl.full((H_PAD, HALF_PAD), 0.0, tl.float32)
        acc2 = tl.full((H_PAD, HALF_PAD), 0.0, tl.float32)
        acc_tail = tl.full((H_PAD, TAIL_PAD), 0.0, tl.float32)
        acc_spill = tl.full((H_PAD, R_PAD), 0.0, tl.float32)
        for l0 in range(s * split_len, (s + 1) * split_len, TILE):
            lane = l0 + tl.arange(0, TILE)
            valid = lane < n
            score = tl.load(scores_ptr + rows[:, None] * max_len + lane[None, :],
                            mask=(heads[:, None] < H) & valid[None, :], other=float("-inf"))
            p = tl.exp(score - peak[:, None])  # [H_PAD, TILE], 0 off the sequence
            block = tl.load(table_ptr + b * table_stride + lane // BLOCK_SIZE, mask=valid, other=0)
            at = block.to(tl.int64) * stride_block + g * stride_head + (lane % BLOCK_SIZE) * stride_token
            pair = valid[:, None] & (i[None, :] < half)
            x1 = tl.load(cache_ptr + at[:, None] + first[None, :], mask=pair, other=0.0).to(tl.float32)
            x2 = tl.load(cache_ptr + at[:, None] + second[None, :], mask=pair, other=0.0).to(tl.float32)
            angle = lane.to(tl.int64)[:, None] * ROT + i[None, :]
            cos = tl.load(cos_sin_ptr + angle, mask=pair, other=0.0)
            sin = tl.load(cos_sin_ptr + angle + half, mask=pair, other=0.0)
            acc1 += tl.dot(p, x1 * cos + x2 * sin, input_precision="ieee")
            acc2 += tl.dot(p, x2 * cos - x1 * sin, input_precision="ieee")
            passed = tl.load(cache_ptr + at[:, None] + tail[None, :], mask=valid[:, None] & (tail[None, :] < D),
                             other=0.0).to(tl.float32)
            acc_tail += tl.dot(p, passed, input_precision="ieee")
            spill = tl.load(cache_ptr + at[:, None] + D + r[None, :], mask=valid[:, None] & (r[None, :] < R),
                            other=0.0).to(tl.float32)
            acc_spill += tl.dot(p, spill, input_precision="ieee")
        out = ((b * num_splits + s) * H + heads).to(tl.int64)[:, None]
        live = heads[:, None] < H
        z_row = z_ptr + out * (H * D) + g * D
        tl.store(z_row + first[None, :], acc1, mask=live & (i[None, :] < half))
        tl.store(z_row + second[None, :], acc2, mask=live & (i[None, :] < half))
        tl.store(z_row + tail[None, :], acc_tail, mask=live & (tail[None, :] < D))
        tl.store(zs_ptr + out * (H * R) + g * R + r[None, :], acc_spill, mask=live & (r[None, :] < R))


def triton_decode_rows(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    num_pages: int,
    rotary: Rotary | None,
    scale: float,
    split_pages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised Z [B, H, H·D] and spill Z [B, H, H·R] (`decode.decode_rows`'s contract) by the two
    kernels; split_pages: pages per split (default: all in one)."""
    batch, heads, head_size = q.shape
    spill = kv_cache.shape[-1] - head_size
    block_size = kv_cache.shape[2]
    split_pages = max(1, split_pages or num_pages)
    num_splits = -(-max(num_pages, 1) // split_pages)
    split_len = split_pages * block_size
    tile = min(BLOCK_N, pad(split_len))
    split_len = -(-split_len // tile) * tile
    max_len = num_splits * split_len
    device = q.device
    scores = torch.empty(batch, heads, max_len, dtype=torch.float32, device=device)
    maxes = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=device)
    sums = torch.empty_like(maxes)
    z = torch.empty(batch, num_splits, heads, heads * head_size, dtype=torch.float32, device=device)
    z_spill = torch.empty(batch, num_splits, heads, heads * spill, dtype=torch.float32, device=device)
    table, lens = block_table.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous()
    rotary_dim = 0 if rotary is None else rotary.rotary_dim
    cos_sin = rotary.cos_sin.float().contiguous() if rotary is not None else maxes  # any float32 pointer
    stride_block, stride_head, stride_token, last = kv_cache.stride()
    if last != 1:
        raise ValueError("slim: the Triton decode reads cache rows with unit stride")
    check_device(device, "slim: the Triton decode")
    grid = (batch, num_splits, heads)
    scores_kernel[grid](
        q.contiguous(), kv_cache, table, lens, scores, maxes, sums,
        stride_block, stride_head, stride_token, table.stride(0), scale, split_len, num_splits, max_len,
        H=heads, D=head_size, D_PAD=pad(head_size), BLOCK_SIZE=block_size, TILE=tile,
    )
    accumulate_kernel[grid](
        kv_cache, table, lens, cos_sin, scores, maxes, z, z_spill,
        stride_block, stride_head, stride_token, table.stride(0), split_len, num_splits, max_len,
        H=heads, H_PAD=pad(heads), D=head_size, R=spill, R_PAD=pad(spill), ROT=rotary_dim,
        HALF_PAD=pad(rotary_dim // 2), TAIL_PAD=pad(head_size - rotary_dim),
        NEOX=rotary is None or rotary.neox, S_PAD=pad(num_splits), BLOCK_SIZE=block_size, TILE=tile,
    )
    # Every split's partial is scaled by the same max; the sums are merged the same way.
    peak = maxes.amax(-1, keepdim=True)
    total = (sums * (maxes - peak).exp()).sum(-1)[..., None]
    return z.sum(1) / total, z_spill.sum(1) / total
