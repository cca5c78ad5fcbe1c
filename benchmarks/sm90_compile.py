"""Every Triton kernel of vllm_slim compiled for an H100/H200 (sm_90) on a machine without a GPU, at the real
model shapes, and what each compiled kernel holds: registers a thread, stack bytes (where ptxas spills the
registers it lacks), shared memory, tensor-core instructions.
What the interpreter cannot show: a kernel that does not compile for a GPU, spills registers, or asks for
more shared memory than an SM has.

    python -m benchmarks.sm90_compile      # the table; --json: the rows and every kernel defined; --out DIR: the .md
    pip install --target DIR --no-deps triton==3.6.0 && PYTHONPATH=DIR python -m benchmarks.sm90_compile
                                           # the same with the GPU machine's triton

How: in this process the kernels are decorated for the compiler (torch is told CUDA exists before they are
defined), triton is given a driver that names sm_90 as its target, and every launch the ops make is turned
into a compile without a launch (`JITFunction.run(..., warmup=True)`). The ops are called on CPU tensors of
the real widths (heads, head sizes, rotary, spill, orders, windows) and a few tokens: a kernel compiles
for its dtypes, strides' divisibility and constexprs, not for its lengths. Resource usage is read from each
cubin with the cuobjdump that ships with triton. The venv's triton is 3.9 and the GPU machine's 3.6: their
code differs (registers by kernel change a lot between them), so both are worth compiling, and neither
replaces a device run.
"""

import argparse
import contextlib
import datetime
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

SHARED_PER_BLOCK = 227 * 1024  # sm_90's most shared memory one block may use
REGISTERS_PER_SM = 65536
# Llama-2-7B (32 x 128, NeoX) and GPT-J-6B (16 x 256, 64 interleaved rotary dims): the widest rows slim serves.
SLIM_SHAPES = {"llama7b": (32, 128, 128, True), "gptj": (16, 256, 64, False)}


@contextlib.contextmanager
def compiling_for_sm90():
    """Launches become compiles for sm_90; yields the list (kernel name, CompiledKernel) they fill."""
    torch.cuda.is_available = lambda: True  # before vllm_slim.ops.triton_build is imported: the compiler
    import triton
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget

    import vllm_slim.ops.triton_build as build

    if build.INTERPRETED:
        raise RuntimeError("vllm_slim's kernels were already defined for the interpreter in this process")

    class Sm90Driver:  # what JITFunction.run asks of a driver before it compiles
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_device_interface(self):
            return torch.cuda

        def get_active_torch_device(self):
            return torch.device("cpu")

    compiled = []
    run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((kernel_name(self) + (" (one pass)" if kwargs.get("ONE_PASS") else ""), kernel))
        return kernel

    triton.runtime.driver.set_active(Sm90Driver())
    jit.JITFunction.run = compile_only
    for module in triton_modules():  # their launches take CPU tensors here
        module.check_device = lambda device, what: None
    try:
        yield compiled
    finally:
        jit.JITFunction.run = run


def kernel_name(function) -> str:
    """ops/slim/triton_store.py's raw_kernel as "slim.triton_store.raw_kernel"."""
    return f"{function.fn.__module__.removeprefix('vllm_slim.ops.')}.{function.fn.__name__}"


def triton_modules() -> list:
    """The ops' modules that define kernels (vllm_slim/ops/*/triton_*.py), imported."""
    import importlib
    import pkgutil

    import vllm_slim.ops

    return [
        importlib.import_module(info.name) for info in pkgutil.walk_packages(vllm_slim.ops.__path__, "vllm_slim.ops.")
        if info.name.rsplit(".", 1)[-1].startswith("triton_") and info.name != "vllm_slim.ops.triton_build"
    ]


def defined_kernels() -> set[str]:
    """Every kernel (a jitted function named *_kernel) the ops' Triton modules define."""
    import triton

    return {
        kernel_name(value) for module in triton_modules() for value in vars(module).values()
        if isinstance(value, triton.runtime.jit.JITFunction) and value.fn.__name__.endswith("_kernel")
    }


def slim_cases(compiled):
    """Slim's store, decode (both forms) and prefill at each shape, bf16 model, float16 cache, 2 spill a head."""
    from vllm_slim.fixtures.step import rope_table
    from vllm_slim.ops.slim import Rotary
    from vllm_slim.ops.slim import triton_decode, triton_prefill, triton_store
    from vllm_slim.ops.slim.projection import SlimProjection

    spill, block_size, tokens = 2, 16, 3
    for shape, (heads, head_size, rotary_dim, neox) in SLIM_SHAPES.items():
        width, r = heads * head_size, heads * spill
        zeros = torch.zeros
        proj = SlimProjection(zeros(width, width), zeros(r, width), zeros(2 * width, r), zeros(2 * width, width),
                              zeros(width), zeros(width), heads, 1.0)
        rotary = Rotary(rope_table(64, rotary_dim), rotary_dim, neox)
        cache = torch.zeros(4, heads, block_size, head_size + spill, dtype=torch.float16)
        table, lens = torch.zeros(tokens, 2, dtype=torch.int32), torch.ones(tokens, dtype=torch.int32)
        key = torch.zeros(tokens, heads, head_size, dtype=torch.bfloat16)
        start = len(compiled)
        triton_store.triton_store_rows(cache, key, key, lens.long(), lens.long(), proj, rotary)
        for one_pass in (False, True):
            triton_decode.triton_decode_rows(key.float(), cache, table, lens, 2, rotary, 0.1, None, one_pass)
        starts = torch.arange(tokens + 1, dtype=torch.int32)
        triton_prefill.triton_prefill_slim_attention(key, starts, lens, cache, table, 2, 1, proj, rotary, 0.1)
        yield shape, compiled[start:]


def sata_cases(compiled):
    """Sata's decode and prefill at 32 x 128, order 3, bf16: plain, and the hybrid with 4 sinks and a window of 64."""
    from vllm_slim.ops.sata import state_size, triton_decode, triton_prefill

    heads, head_size, order, tokens = 32, 128, 3, 2
    for name, sinks, window in (("plain", 0, 0), ("hybrid", 4, 64)):
        pages = torch.zeros(3, heads, state_size(head_size, head_size, order, sinks + window))
        q = torch.zeros(tokens, heads, head_size, dtype=torch.bfloat16)
        indices, reset = torch.arange(tokens), torch.zeros(tokens, dtype=torch.bool)
        seen = torch.ones(tokens, dtype=torch.long)
        start = len(compiled)
        triton_decode.triton_decode_sata(q, q, q, pages, indices, reset, 0.1, order, seen, sinks, window)
        starts = torch.arange(tokens + 1, dtype=torch.int32)
        triton_prefill.triton_prefill_sata(q, q, q, starts, 1, pages, indices, reset, 0.1, order, seen, sinks, window)
        yield f"sata {name}", compiled[start:]


def resources(kernel) -> dict:
    """Registers, stack and local bytes, shared memory and tensor-core instructions of a compiled kernel, from
    its cubin and PTX."""
    import triton

    cuobjdump = Path(triton.knobs.nvidia.ptxas.path).with_name("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True, check=True)
    fields = dict(part.split(":") for line in usage.stdout.splitlines() if "REG:" in line for part in line.split())
    warps = kernel.metadata.num_warps
    registers = int(fields["REG"])
    return {
        # a stack frame is local memory too: what ptxas spills to when registers run out
        "registers": registers, "local_bytes": int(fields["LOCAL"]), "stack_bytes": int(fields["STACK"]),
        "shared_bytes": kernel.metadata.shared,
        "warps": warps, "blocks_per_sm_by_registers": REGISTERS_PER_SM // (registers * 32 * warps),
        # tl.dot on tensor cores: mma.sync or wgmma instructions in the PTX (none: CUDA cores)
        "tensor_core_instructions": len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\b", kernel.asm["ptx"])),
    }


def measure() -> dict:
    """{"rows": a row per compiled kernel and case, "defined": every kernel the ops define, the limit}."""
    rows = []
    with compiling_for_sm90() as compiled:
        for cases in (slim_cases, sata_cases):
            for case, kernels in cases(compiled):
                for name, kernel in kernels:
                    rows.append({"case": case, "kernel": name, **resources(kernel)})
        defined = sorted(defined_kernels())
    return {"rows": rows, "defined": defined, "shared_per_block": SHARED_PER_BLOCK}


def markdown(rows: list[dict]) -> str:
    import triton

    lines = [
        "# vllm_slim's Triton kernels compiled for sm_90 (H100/H200) without a GPU",
        "",
        f"Command: `python -m benchmarks.sm90_compile` under triton {triton.__version__} (another triton: the "
        f"module's docstring). Machine: a CPU-only dev machine (no GPU); target sm_90. "
        f"Date: {datetime.date.today().isoformat()}.",
        "Compile-time facts only: no kernel ran. Limits: 255 registers a thread, "
        f"{SHARED_PER_BLOCK // 1024} KiB of shared memory a block; a stack frame is where ptxas spills the "
        "registers a thread lacks (local memory, through L1).",
        "",
        "| case | kernel | registers | stack bytes | local bytes | shared KiB | warps | blocks/SM by registers "
        "| tensor-core mma |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['kernel']} | {r['registers']} | {r['stack_bytes']} | {r['local_bytes']} | "
            f"{r['shared_bytes'] / 1024:.1f} | "
            f"{r['warps']} | {r['blocks_per_sm_by_registers']} | {r['tensor_core_instructions']} |"
        )
    capped = sorted({f"{r['kernel']} ({r['case']})" for r in rows if r["registers"] >= 255})
    spilling = sorted({f"{r['kernel']} ({r['case']}, {r['stack_bytes']:,} B)" for r in rows if r["stack_bytes"]})
    lines += [
        "",
        f"Blocks/SM by registers: how many blocks of that many warps an SM's {REGISTERS_PER_SM:,} registers hold "
        "(shared memory may allow fewer). Tensor-core mma: the mma.sync / wgmma instructions in its PTX (0: its "
        "tl.dot products, if any, run on CUDA cores).",
        f"At the 255-register cap, so the fewest warps an SM: {', '.join(capped) or 'none'}.",
        f"With a stack frame: {', '.join(spilling) or 'none'}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--out", type=Path, help="write sm90_compile_triton-VERSION.md there")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns unless it is said
    result = measure()
    text = markdown(result["rows"])
    print(json.dumps(result) if args.json else text)
    if args.out:
        import triton

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"sm90_compile_triton-{triton.__version__}.md").write_text(text)


if __name__ == "__main__":
    main()
