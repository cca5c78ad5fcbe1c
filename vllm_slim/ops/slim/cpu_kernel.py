"""Slim's fused CPU loops (`cpu_fused.c`, built by `vllm_slim.ops.cpu_build`): the cache write of a
step's new tokens and the decode, each reading its inputs once in place."""

import ctypes
from pathlib import Path

import torch

from vllm_slim.ops.cpu_build import library, pointer
from vllm_slim.ops.slim.projection import SlimProjection
from vllm_slim.ops.slim.rope import Rotary

SOURCE = Path(__file__).with_name("cpu_fused.c")
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_HEADS = 256  # the decode's per-head statistics live on its stack


def supports(kv_cache: torch.Tensor, num_heads: int) -> bool:
    """Whether the fused CPU loops can read and write this cache."""
    return (
        kv_cache.device.type == "cpu" and kv_cache.dtype in DTYPES and kv_cache.stride(-1) == 1
        and num_heads <= MAX_HEADS and library(SOURCE) is not None
    )


def _rotary_args(rotary: Rotary | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The model's cos/sin table, its inverse (`Rotary.inverse_cos_sin`), rotary_dim and NeoX-ness."""
    if rotary is None:
        none = like.new_zeros(1, dtype=torch.float32)
        return none, none, 0, 0
    return rotary.cos_sin.float().contiguous(), rotary.inverse_cos_sin, rotary.rotary_dim, int(rotary.neox)


def _heads_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] with each token's heads side by side (a row stride of its own is fine)."""
    return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous()


def fused_store_rows(
    kv_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    proj: SlimProjection,
    rotary: Rotary | None,
) -> None:
    """`cache.cache_rows` then `cache.write_rows` for T new tokens, by the fused C loop: key [T, H, D]
    post-RoPE and value [T, H, Dv] in the model's dtype, positions and slots [T] (slot -1 skipped)."""
    lib = library(SOURCE)
    tokens, heads, head_size = key.shape
    key, value = _heads_contiguous(key), _heads_contiguous(value.to(key.dtype))
    slots = slot_mapping[:tokens].to(torch.int64).contiguous()
    positions = positions[:tokens].to(torch.int64).contiguous()
    cos_sin, inverse_cos_sin, rotary_dim, neox = _rotary_args(rotary, key)
    # Held here until the call returns (float32, contiguous: as `solve_projection` made them).
    maps = [None if m is None else m.float().contiguous() for m in (proj.refine, proj.spill_in, proj.k_bias, proj.v_bias)]
    stride_block, stride_head, stride_token, _ = kv_cache.stride()
    failed = lib.slim_store(
        pointer(kv_cache), DTYPES[kv_cache.dtype], ctypes.c_int64(stride_block), ctypes.c_int64(stride_head),
        ctypes.c_int64(stride_token), kv_cache.shape[2], pointer(key), pointer(value), DTYPES[key.dtype],
        ctypes.c_int64(key.stride(0)), ctypes.c_int64(value.stride(0)), pointer(slots), pointer(positions), tokens,
        heads, head_size, value.shape[-1], kv_cache.shape[-1] - head_size,
        *(None if m is None else pointer(m) for m in maps), pointer(cos_sin), pointer(inverse_cos_sin),
        rotary_dim, neox,
    )
    if failed:
        raise MemoryError("slim: the fused CPU store could not allocate its row buffers")


def fused_decode_rows(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    rotary: Rotary | None,
    scale: float,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised Z [B, H, H·D] = Σ_l P_l·K_raw,l and spill Z [B, H, H·R] for one query per sequence
    (the contract of `decode.decode_rows`, a sliding window of `window` keys included), by the fused C loop."""
    lib = library(SOURCE)
    batch, heads, head_size = q.shape
    spill = kv_cache.shape[-1] - head_size
    q = q.float().contiguous()
    table = block_table.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    _, inverse_cos_sin, rotary_dim, neox = _rotary_args(rotary, q)
    z = q.new_empty(batch, heads, heads * head_size)
    z_spill = q.new_empty(batch, heads, heads * spill)
    stride_block, stride_head, stride_token, _ = kv_cache.stride()
    failed = lib.slim_decode(
        pointer(kv_cache), DTYPES[kv_cache.dtype], ctypes.c_int64(stride_block), ctypes.c_int64(stride_head),
        ctypes.c_int64(stride_token), pointer(table), ctypes.c_int64(table.stride(0)), pointer(lens), pointer(q),
        pointer(inverse_cos_sin), rotary_dim, neox, batch, heads, head_size, spill, kv_cache.shape[2],
        ctypes.c_float(scale), window or 0, pointer(z), pointer(z_spill),
    )
    if failed:
        raise MemoryError("slim: the fused CPU decode could not allocate its row buffers")
    return z, z_spill
