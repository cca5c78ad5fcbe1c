"""The fused CPU decode (`cpu_decode.c`): built at first use with the machine's C compiler (with
OpenMP, so that it runs on torch's own threads), loaded with ctypes.

Why C on the CPU: the torch form of the decode makes four passes over float32 copies of the keys
(gather, convert, un-rotate, products), and a CPU's memory bandwidth makes those passes, not the
arithmetic, the cost: several times the stock CPU kernel's single read. The fused loop reads each
cached row twice in its stored dtype and keeps everything else in registers and a row buffer.
On a GPU the same role falls to a Triton kernel; without a C compiler the torch form runs.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode.c")
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_HEADS = 256  # the kernel's per-head statistics live on its stack


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (no C compiler, or it failed: the torch form runs instead)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        return None
    source = SOURCE.read_bytes()
    # -march=native: the library is built for this CPU, so the cache is keyed by what it supports.
    key = hashlib.sha256(source + compiler.encode() + _cpu_flags().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-slim"
    path = cache / f"slim_cpu_decode-{key}.so"
    if not path.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as scratch:
                built = Path(scratch) / path.name
                # Reassociation lets the dot products vectorise (any BLAS reorders sums the same way).
                flags = ["-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
                subprocess.run(
                    [compiler, *flags, "-fopenmp", "-shared", "-fPIC", "-o", str(built), str(SOURCE), "-lm"],
                    check=True, capture_output=True, text=True,
                )
                os.replace(built, path)  # atomic: concurrent builders race harmlessly
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or error
            logger.warning("vllm-slim: could not build the fused CPU decode (%s); using the torch form", detail)
            return None
    lib = ctypes.CDLL(str(path))
    lib.slim_decode.restype = ctypes.c_int
    return lib


def supports(kv_cache: torch.Tensor, num_heads: int) -> bool:
    """Whether the fused CPU decode can read this cache."""
    return (
        kv_cache.device.type == "cpu" and kv_cache.dtype in DTYPES and kv_cache.stride(-1) == 1
        and num_heads <= MAX_HEADS and library() is not None
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
    lib = library()
    batch, heads, head_size = q.shape
    spill = kv_cache.shape[-1] - head_size
    q = q.float().contiguous()
    table = block_table.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    table_cos_sin = cos_sin.float().contiguous() if cos_sin is not None else q.new_zeros(1)
    z = q.new_empty(batch, heads, heads * head_size)
    z_spill = q.new_empty(batch, heads, heads * spill)
    stride_block, stride_head, stride_token, _ = kv_cache.stride()
    pointer = ctypes.c_void_p
    failed = lib.slim_decode(
        pointer(kv_cache.data_ptr()), DTYPES[kv_cache.dtype], ctypes.c_int64(stride_block),
        ctypes.c_int64(stride_head), ctypes.c_int64(stride_token), pointer(table.data_ptr()),
        ctypes.c_int64(table.stride(0)), pointer(lens.data_ptr()), pointer(q.data_ptr()),
        pointer(table_cos_sin.data_ptr()), rotary_dim, int(neox), batch, heads, head_size, spill,
        kv_cache.shape[2], ctypes.c_float(scale), pointer(z.data_ptr()), pointer(z_spill.data_ptr()),
    )
    if failed:
        raise MemoryError("slim: the fused CPU decode could not allocate its row buffers")
    return z, z_spill
