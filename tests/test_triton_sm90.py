"""Every Triton kernel the ops define, compiled for sm_90 (H100/H200) on this CPU-only machine at the real
widths (Llama-2-7B's 32 x 128, GPT-J's 16 x 256 with 64 interleaved rotary dims, sata's order 3 at 32 x 128,
plain and hybrid): each compiles and fits a block's shared memory, slim's kernels and sata's decode spill
no register, and slim's products of a 16-bit cache run on tensor cores. What the interpreter, which runs
every other kernel test here, cannot show (`benchmarks/sm90_compile.py`)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_sm90_without_spilling():
    # A process of its own: in this one the kernels were defined for the interpreter.
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.sm90_compile", "--json"], cwd=ROOT, capture_output=True, text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.splitlines()[-1])
    rows = result["rows"]
    compiled = {row["kernel"] for row in rows}
    assert len(result["defined"]) >= 12 and set(result["defined"]) <= compiled, set(result["defined"]) - compiled
    assert "slim.triton_decode.columns_kernel (one pass)" in compiled
    assert {row["case"] for row in rows} == {"llama7b", "gptj", "sata plain", "sata hybrid"}
    assert result["shared_per_block"] == 227 * 1024
    for row in rows:
        assert row["local_bytes"] == 0 and row["registers"] <= 255, row
        assert row["shared_bytes"] <= result["shared_per_block"], row
        # No spill in the decode path's kernels (slim's, sata's decode); sata's prefill readouts still spill.
        if row["kernel"].startswith(("slim.", "sata.triton_decode.")):
            assert row["stack_bytes"] == 0, row
        # Slim's products of a 16-bit cache on tensor cores: P·K in the decode, Q·K and P·V in the prefill.
        if row["kernel"].startswith(("slim.triton_decode.columns_kernel", "slim.triton_prefill.attention_kernel")):
            assert row["tensor_core_instructions"] > 0, row
