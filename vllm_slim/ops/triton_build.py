"""What this package's Triton kernels share: where they run, and the builtins-only helpers they call.

On CUDA the kernels are compiled. Without CUDA they run under Triton's interpreter, for tests: the
interpreter is chosen when a function is decorated, so kernels are decorated inside `kernel_definitions()`,
which sets TRITON_INTERPRET for that moment only (nothing else in the process sees it, notes §5). Kernels
call only builtins and the combine functions below: triton's own jitted helpers (tl.sum, tl.max,
tl.zeros) were decorated without the interpreter when triton was imported, and fail under it. `tl` must be a global of
each kernel's module: the interpreter patches the `triton.language` it finds there. Triton 3.6 (the GPU
machine's) and 3.9 (the CPU venv's) both have everything used here.
"""

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

INTERPRETED = not torch.cuda.is_available()
PROGRAMS_PER_SM = 4  # programs a launch aims to give each multiprocessor, so that loads overlap


@contextlib.contextmanager
def kernel_definitions():
    """Decorate the kernels defined in this block for the interpreter (no CUDA) or the compiler."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if INTERPRETED else "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def pad(n: int) -> int:
    """The power of two ≥ max(n, 16) that a tile of n columns takes (tl.dot needs 16 or more)."""
    return max(16, 1 << max(0, n - 1).bit_length())


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The device's multiprocessors (1 off CUDA: the interpreter runs one program at a time)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def occupancy_splits(programs_per_split: int, num_pages: int, device: torch.device) -> int:
    """How many splits to cut each sequence's pages into, so that a launch of `programs_per_split` programs
    per split fills the GPU (PROGRAMS_PER_SM a multiprocessor): one long sequence would otherwise leave
    most of it idle. At most one split a page."""
    wanted = -(-PROGRAMS_PER_SM * multiprocessors(device) // max(1, programs_per_split))
    return max(1, min(max(num_pages, 1), wanted))


def check_device(device: torch.device, what: str) -> None:
    """Refuse a launch on a device the kernels were not decorated for."""
    if (device.type == "cuda") == INTERPRETED:
        built = "the interpreter" if INTERPRETED else "CUDA"
        raise RuntimeError(f"{what} was built for {built}, not {device}")


# The combine functions tl.sum and tl.max reduce with, for tl.reduce: compiled, the same code as theirs;
# under the interpreter, tl.reduce recognises these two and reduces with numpy, where a combine function
# of ours would run element by element in Python (one layer's decode step of the server tests' GPT-J,
# 4 sequences of ~150 tokens: 8.5 s with our own, 1.2 s with these).
# Private names of triton.language.standard, the same from triton 2.1 through 3.9.
add = tl.standard._sum_combine
larger = tl.standard._elementwise_max
