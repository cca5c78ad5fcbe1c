"""Slim's cache write (`cache.store_rows`) as two Triton kernels around cuBLAS's products, where the torch form
(`cache_rows` + `write_rows`) launches some twenty small kernels a layer a step.

1. `raw_kernel`, one program per token (all heads in one tile): kv0 = [unrope(K) − b_K, V − b_V], float32
   [T, d + dv], the rotation undone in registers by `Rotary.inverse_cos_sin` (NeoX or GPT-J pairs, partial
   rotary).
   Skipped when the layout derives nothing (no spill, no refinement).
2. torch: refined keys kv0 @ refine and spill kv0 @ spill_in (two matmuls on the maps as they are held).
3. `row_kernel`, one program per token: each head's stored row — the refined key + b_K re-rotated, or the
   model's key as given when not refining — then the head's spill coordinates, rounded to the cache's dtype
   and written at the token's slot [slot // block_size, head, slot % block_size]. Padding (slot < 0) is not
   written at all (the torch form parks it in the null block).

On CUDA these kernels are slim's store; without CUDA they run under Triton's interpreter, for tests
(`ops/triton_build.py`). No host sync: every size is a host number the tensors' shapes already hold.
"""

import torch
import triton
import triton.language as tl

from vllm_slim.ops.slim.projection import SlimProjection
from vllm_slim.ops.slim.rope import Rotary
from vllm_slim.ops.triton_build import check_device, kernel_definitions, pad


with kernel_definitions():

    @triton.jit
    def row_angles(cos_sin_ptr, positions, ROT: tl.constexpr, HALF_PAD: tl.constexpr, NEOX: tl.constexpr):
        """For rows at `positions` [N]: the rotary pairs as [1, HALF_PAD] columns (first, second), the lanes
        that hold one, and the cos, sin [N, HALF_PAD] of their angles (ROT = 0: no pair)."""
        i = tl.arange(0, HALF_PAD)
        pair = i < ROT // 2
        if NEOX:
            first, second = i, i + ROT // 2
        else:
            first, second = 2 * i, 2 * i + 1
        angle = positions.to(tl.int64)[:, None] * ROT + i[None, :]
        cos = tl.load(cos_sin_ptr + angle, mask=pair[None, :], other=0.0)
        sin = tl.load(cos_sin_ptr + angle + ROT // 2, mask=pair[None, :], other=0.0)
        return first[None, :], second[None, :], pair[None, :], cos, sin

    @triton.jit
    def load_key(rows, first, second, tail, pair, in_tail):
        """Rows' rotary halves and passed-through tail, float32 (rows: [H_PAD, 1] pointers)."""
        x1 = tl.load(rows + first, mask=pair, other=0.0).to(tl.float32)
        x2 = tl.load(rows + second, mask=pair, other=0.0).to(tl.float32)
        rest = tl.load(rows + tail, mask=in_tail, other=0.0).to(tl.float32)
        return x1, x2, rest

    @triton.jit
    def store_key(rows, x1, x2, rest, first, second, tail, pair, in_tail):
        """`load_key`'s inverse; tl.store rounds to the rows' dtype (to nearest even)."""
        tl.store(rows + first, x1, mask=pair)
        tl.store(rows + second, x2, mask=pair)
        tl.store(rows + tail, rest, mask=in_tail)

    @triton.jit
    def raw_kernel(
        key_ptr, value_ptr, positions_ptr, cos_sin_ptr, k_bias_ptr, v_bias_ptr, kv0_ptr,
        key_stride_t, key_stride_h, value_stride_t, value_stride_h,
        H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
        ROT: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr, NEOX: tl.constexpr,
        K_BIAS: tl.constexpr, V_BIAS: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        heads = tl.arange(0, H_PAD)[:, None]
        live = heads < H
        position = tl.load(positions_ptr + t + tl.arange(0, 1))  # [1]: one row's angles
        first, second, pair, cos, sin = row_angles(cos_sin_ptr, position, ROT, HALF_PAD, NEOX)
        pair = live & pair
        tail = ROT + tl.arange(0, TAIL_PAD)[None, :]
        in_tail = live & (tail < D)
        x1, x2, rest = load_key(key_ptr + t * key_stride_t + heads * key_stride_h, first, second, tail, pair, in_tail)
        x1, x2 = x1 * cos + x2 * sin, x2 * cos - x1 * sin
        if K_BIAS:
            b1, b2, b_rest = load_key(k_bias_ptr + heads * D, first, second, tail, pair, in_tail)
            x1, x2, rest = x1 - b1, x2 - b2, rest - b_rest
        kv0 = kv0_ptr + t * (H * (D + DV))
        store_key(kv0 + heads * D, x1, x2, rest, first, second, tail, pair, in_tail)
        j = tl.arange(0, DV_PAD)[None, :]
        in_value = live & (j < DV)
        v = tl.load(value_ptr + t * value_stride_t + heads * value_stride_h + j, mask=in_value, other=0.0)
        v = v.to(tl.float32)
        if V_BIAS:
            v -= tl.load(v_bias_ptr + heads * DV + j, mask=in_value, other=0.0)
        tl.store(kv0 + H * D + heads * DV + j, v, mask=in_value)

    @triton.jit
    def row_kernel(
        key_ptr, spill_ptr, positions_ptr, slots_ptr, cos_sin_ptr, k_bias_ptr, cache_ptr,
        key_stride_t, key_stride_h, stride_block, stride_head, stride_token,
        H: tl.constexpr, H_PAD: tl.constexpr, D: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
        ROT: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr, NEOX: tl.constexpr,
        K_BIAS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        heads = tl.arange(0, H_PAD)[:, None]
        # Padding: no live head, no store at all ((heads < H) & (slot >= 0) is int32 under the interpreter).
        live = heads < tl.where(slot < 0, 0, H)
        block, offset = tl.maximum(slot, 0) // BLOCK_SIZE, tl.maximum(slot, 0) % BLOCK_SIZE
        rows = cache_ptr + block * stride_block + heads * stride_head + offset * stride_token
        position = tl.load(positions_ptr + t + tl.arange(0, 1))  # [1]: one row's angles
        first, second, pair, cos, sin = row_angles(cos_sin_ptr, position, ROT, HALF_PAD, NEOX)
        pair = live & pair
        tail = ROT + tl.arange(0, TAIL_PAD)[None, :]
        in_tail = live & (tail < D)
        x1, x2, rest = load_key(key_ptr + t * key_stride_t + heads * key_stride_h, first, second, tail, pair, in_tail)
        if K_BIAS:
            b1, b2, b_rest = load_key(k_bias_ptr + heads * D, first, second, tail, pair, in_tail)
            x1, x2, rest = x1 + b1, x2 + b2, rest + b_rest
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        store_key(rows, x1, x2, rest, first, second, tail, pair, in_tail)
        r = tl.arange(0, R_PAD)[None, :]
        in_spill = live & (r < R)
        spill = tl.load(spill_ptr + t * (H * R) + heads * R + r, mask=in_spill, other=0.0)
        tl.store(rows + D + r, spill, mask=in_spill)


def rotation_constants(rotary_dim: int, head_size: int, neox: bool) -> dict:
    """The constexprs `row_angles`, `load_key` and `store_key` take for a rotary slice of rotary_dim
    columns of a head of head_size (rotary_dim 0: nothing rotates, the whole row is the tail)."""
    return dict(ROT=rotary_dim, HALF_PAD=pad(rotary_dim // 2), TAIL_PAD=pad(head_size - rotary_dim), NEOX=neox)


def triton_store_rows(
    kv_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    proj: SlimProjection,
    rotary: Rotary | None,
) -> None:
    """`cache.store_rows`'s contract by the kernels above: key [T, H, D] post-RoPE and value [T, H, Dv] in the
    model's dtype (a row stride of their own is fine), positions and slots [T] (slot -1: not written)."""
    tokens, heads, head_size = key.shape
    spill = kv_cache.shape[-1] - head_size
    stride_block, stride_head, stride_token, last = kv_cache.stride()
    if last != 1:
        raise ValueError("slim: the Triton store writes cache rows with unit stride")
    check_device(kv_cache.device, "slim: the Triton store")
    key = key if key.stride(-1) == 1 else key.contiguous()
    positions, slots = positions[:tokens].contiguous(), slot_mapping[:tokens].contiguous()
    rotary_dim = 0 if rotary is None else rotary.rotary_dim
    neox = rotary is None or rotary.neox
    anything = proj.w_kv  # a float32 pointer for the arguments a launch never reads
    # The raw keys are rotated back with the inverse table, the refined ones forward with the model's own.
    cos_sin = anything if rotary is None else rotary.cos_sin.float().contiguous()
    inverse_cos_sin = anything if rotary is None else rotary.inverse_cos_sin
    # Not refining: the model's keys are stored as given (no rotation, no bias), no spill: none written.
    source, rerotated, k_bias, spill_rows = key, 0, None, anything
    if proj.spill or proj.refine is not None:
        value = value if value.stride(-1) == 1 else value.contiguous()
        value_size = value.shape[-1]
        kv0 = key.new_empty(tokens, heads * (head_size + value_size), dtype=torch.float32)
        raw_kernel[(tokens,)](
            key, value, positions, inverse_cos_sin, proj.k_bias if proj.k_bias is not None else anything,
            proj.v_bias if proj.v_bias is not None else anything, kv0,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            H=heads, H_PAD=pad(heads), D=head_size, DV=value_size, DV_PAD=pad(value_size),
            K_BIAS=proj.k_bias is not None, V_BIAS=proj.v_bias is not None,
            **rotation_constants(rotary_dim, head_size, neox),
        )
        if proj.spill:
            spill_rows = kv0 @ proj.spill_in
        if proj.refine is not None:
            source, rerotated, k_bias = (kv0 @ proj.refine).view(tokens, heads, head_size), rotary_dim, proj.k_bias
    row_kernel[(tokens,)](
        source, spill_rows, positions, slots, cos_sin, anything if k_bias is None else k_bias, kv_cache,
        source.stride(0), source.stride(1), stride_block, stride_head, stride_token,
        H=heads, H_PAD=pad(heads), D=head_size, R=spill, R_PAD=pad(spill), K_BIAS=k_bias is not None,
        BLOCK_SIZE=kv_cache.shape[2], **rotation_constants(rerotated, head_size, neox),
    )
