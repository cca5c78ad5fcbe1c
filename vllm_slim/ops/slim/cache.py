"""Slim's paged cache: what a row holds, how rows are written at their slots and read back per sequence.

Layout, as vLLM allocates it for a spec with head_size_v = spill per head:
kv_cache [num_blocks, H, block_size, D + r_h]. A row is a head's post-RoPE key
(refined when the layout refines) followed by that head's r_h spill
coordinates; the spill vector of a token, S [r = H·r_h], is laid out head-major.
"""

from collections.abc import Callable

import torch

from vllm_slim.ops.dispatch import uses_triton
from vllm_slim.ops.slim import cpu_kernel
from vllm_slim.ops.slim.projection import SlimProjection, rebuild_values
from vllm_slim.ops.slim.rope import Rotary, rotate, unrope

# vLLM's block pool never hands out block 0 (its null block, `NULL_BLOCK_ID` in
# v1/attention/backends/utils.py): padding tokens (slot -1) are written there.
NULL_BLOCK = 0
# The largest maps (W_KV, spill and refinement, bytes a layer) the fused CPU store is used for.
FUSED_STORE_MAP_BYTES = 4 << 20


def cache_rows(
    key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor, proj: SlimProjection, rotary: Rotary | None
) -> torch.Tensor:
    """The rows slim caches for T new tokens, [T, H, D + r_h], from the post-RoPE keys [T, H, D] and
    the values [T, H, Dv] the model produced at `positions` [T]. Float32 unless nothing is derived
    (no spill, no refinement: the model's keys are stored as they are)."""
    if not proj.spill and proj.refine is None:
        return key
    k0, v0 = unrope(key, positions, rotary).flatten(1).float(), value.flatten(1).float()
    if proj.k_bias is not None:
        k0 = k0 - proj.k_bias
    if proj.v_bias is not None:
        v0 = v0 - proj.v_bias
    kv0 = torch.cat((k0, v0), dim=1)
    keys = key.float()
    if proj.refine is not None:
        # The least-squares layer input's key, re-rotated: finer than the model's 16-bit K.
        refined = kv0 @ proj.refine
        if proj.k_bias is not None:
            refined = refined + proj.k_bias
        refined = refined.view_as(key)
        keys = refined if rotary is None else rotate(refined, positions, rotary)
    spill = (kv0 @ proj.spill_in).view(key.shape[0], key.shape[1], -1)
    return torch.cat((keys, spill), dim=-1)


def write_rows(kv_cache: torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store rows [T, H, C] at their slots [T]; slot -1 (padding) lands in the null block, with no
    boolean mask and no host sync."""
    block_size = kv_cache.shape[2]
    slots = slot_mapping[: rows.shape[0]].clamp_min(NULL_BLOCK * block_size)
    kv_cache[slots // block_size, :, slots % block_size] = rows.to(kv_cache.dtype)


def store_rows(
    kv_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    proj: SlimProjection,
    rotary: Rotary | None,
    fused: bool | None = None,
) -> None:
    """Cache T new tokens: `cache_rows` written by `write_rows`, or the same by the device's fused form
    (`fused`), which writes no padding row at all. Fused by default: on CUDA, the Triton kernels of
    `triton_store` (VLLM_SLIM_TRITON=1 makes them the CPU's fused form too, under Triton's interpreter: for
    tests, it gives no speed); on the CPU, one C loop for maps up to FUSED_STORE_MAP_BYTES, where some forty
    small torch ops cost more than the products: 0.36 -> 0.10 ms for 16 tokens at 4 x 64; past that, BLAS's
    products win: at Llama-7B's 32 x 128 the C loop took 45 ms for 16 tokens where torch took 20)."""
    triton = uses_triton(kv_cache.device)
    if fused is None:
        fused = triton or (cpu_kernel.supports(kv_cache, key.shape[1]) and proj.map_bytes <= FUSED_STORE_MAP_BYTES)
    if fused and triton:
        from vllm_slim.ops.slim.triton_store import triton_store_rows  # imports triton: only when used

        triton_store_rows(kv_cache, key, value, positions, slot_mapping, proj, rotary)
    elif fused:
        cpu_kernel.fused_store_rows(kv_cache, key, value, positions, slot_mapping, proj, rotary)
    else:
        write_rows(kv_cache, cache_rows(key, value, positions, proj, rotary), slot_mapping)


def read_rows(kv_cache: torch.Tensor, block_table: torch.Tensor, num_pages: int) -> torch.Tensor:
    """Each sequence's first `num_pages` pages, [B, num_pages, block_size, H, C] (one gather in the
    stored dtype; position p of a sequence is [p // block_size, p % block_size])."""
    return kv_cache[block_table[:, :num_pages]].transpose(2, 3)


def page_positions(num_pages: int, block_size: int, device) -> torch.Tensor:
    """[num_pages, block_size] the position each page slot holds."""
    return torch.arange(num_pages * block_size, device=device).view(num_pages, block_size)


def binding_error(
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    k_bias: torch.Tensor | None,
    v_bias: torch.Tensor | None,
    proj: SlimProjection,
    rotary: Rotary | None,
    rotate_keys: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    model_dtype: torch.dtype,
    store_dtype: torch.dtype,
    positions: torch.Tensor,
) -> float:
    """Relative error of the values rebuilt from what slim caches, for random layer inputs at
    `positions` whose keys `rotate_keys` rotated (the model's own code; None: `rotary`) and were
    rounded to the model's dtype. A wrong K/V split, RoPE pairing or RoPE table gives an error far
    above the layout's prediction for such inputs; a right binding gives about the prediction."""
    device, heads = w_k.device, proj.num_heads
    # float32 explicitly: the loader may have set the model's dtype as torch's default
    x = torch.randn(positions.shape[0], w_k.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    x = x.to(device)
    keys = x @ w_k.float() + (0 if k_bias is None else k_bias.float())
    values = (x @ w_v.float() + (0 if v_bias is None else v_bias.float())).view(positions.shape[0], heads, -1)
    keys = keys.view(positions.shape[0], heads, -1)
    if rotate_keys is not None:
        keys = rotate_keys(keys, positions)
    elif rotary is not None:  # no code of the model's own to rotate with: its table, as found
        keys = rotate(keys, positions, rotary)
    rows = cache_rows(keys.to(model_dtype), values.to(model_dtype), positions, proj, rotary).to(store_dtype)
    head_size = keys.shape[-1]
    rebuilt = rebuild_values(unrope(rows[..., :head_size], positions, rotary), rows[..., head_size:].flatten(1), proj)
    return ((rebuilt - values).norm() / values.norm()).item()
