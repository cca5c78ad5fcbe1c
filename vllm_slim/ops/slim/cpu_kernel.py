"""Slim's fused CPU decode (`cpu_decode.c`, built by `vllm_slim.ops.cpu_build`)."""

import ctypes
from pathlib import Path

import torch

from vllm_slim.ops.cpu_build import library, pointer

SOURCE = Path(__file__).with_name("cpu_decode.c")
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_HEADS = 256  # the kernel's per-head statistics live on its stack


def supports(kv_cache: torch.Tensor, num_heads: int) -> bool:
    """Whether the fused CPU decode can read this cache."""
    return (
        kv_cache.device.type == "cpu" and kv_cache.dtype in DTYPES and kv_cache.stride(-1) == 1
        and num_heads <= MAX_HEADS and library(SOURCE) is not None
    )


def fused_decode_rows(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cos_sin: torch.Tensor | None,
    rotary_dim: int,
    neox: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised Z [B, H, H·D] = Σ_l P_l·K_raw,l and spill Z [B, H, H·R] for one query per sequence
    (the contract of `decode.decode_rows`), by the fused C loop."""
    lib = library(SOURCE)
    batch, heads, head_size = q.shape
    spill = kv_cache.shape[-1] - head_size
    q = q.float().contiguous()
    table = block_table.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    table_cos_sin = cos_sin.float().contiguous() if cos_sin is not None else q.new_zeros(1)
    z = q.new_empty(batch, heads, heads * head_size)
    z_spill = q.new_empty(batch, heads, heads * spill)
    stride_block, stride_head, stride_token, _ = kv_cache.stride()
    failed = lib.slim_decode(
        pointer(kv_cache), DTYPES[kv_cache.dtype], ctypes.c_int64(stride_block), ctypes.c_int64(stride_head),
        ctypes.c_int64(stride_token), pointer(table), ctypes.c_int64(table.stride(0)), pointer(lens), pointer(q),
        pointer(table_cos_sin), rotary_dim, int(neox), batch, heads, head_size, spill, kv_cache.shape[2],
        ctypes.c_float(scale), pointer(z), pointer(z_spill),
    )
    if failed:
        raise MemoryError("slim: the fused CPU decode could not allocate its row buffers")
    return z, z_spill
