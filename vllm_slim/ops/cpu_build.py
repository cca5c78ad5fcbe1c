"""The fused CPU loops (`slim/cpu_fused.c`, `sata/cpu_decode.c`): built at first use with the machine's
C compiler, with OpenMP (sharing the libgomp torch already loaded, so they run on torch's own threads),
cached by source and CPU flags, loaded with ctypes.

Why C on the CPU: the torch forms make several passes over float32 copies of the cache or the state
(gather, convert, rotate, products, scatter), and a CPU's memory bandwidth makes those passes, not the
arithmetic, the cost. A fused loop reads each cached row, or each state, once in place. On a GPU the
same role falls to Triton kernels; without a C compiler the torch forms run.
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

logger = logging.getLogger(__name__)

# Reassociation lets the dot products vectorise (any BLAS reorders sums the same way).
FLAGS = ["-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-fopenmp"]


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


@functools.cache
def library(source: Path) -> ctypes.CDLL | None:
    """`source` compiled and loaded, or None (no C compiler, or it failed: the caller's torch form runs)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not source.exists() or platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        logger.warning("vllm-slim: no C compiler (or no %s): the torch form runs instead", source.name)
        return None
    # -march=native: the library is built for this CPU, so the cache is keyed by what it supports.
    key = hashlib.sha256(source.read_bytes() + compiler.encode() + _cpu_flags().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-slim"
    path = cache / f"{source.parent.name}_{source.stem}-{key}.so"
    if not path.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as scratch:
                built = Path(scratch) / path.name
                subprocess.run(
                    [compiler, *FLAGS, "-shared", "-fPIC", "-o", str(built), str(source), "-lm"],
                    check=True, capture_output=True, text=True,
                )
                os.replace(built, path)  # atomic: concurrent builders race harmlessly
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or error
            logger.warning("vllm-slim: could not build %s (%s); the torch form runs instead", source.name, detail)
            return None
    return ctypes.CDLL(str(path))


def pointer(tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())
