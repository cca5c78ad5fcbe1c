"""One layer's decode step on the CPU, slim against the stock CPU backend: time, bytes read, multiply-adds.

    .venv/bin/python -m benchmarks.decode_cpu

Each backend runs through its own builder, cache write and forward (`vllm_slim.fixtures.step`), one
query per sequence, on a bfloat16 layer at the fixture's shape (4 heads x 64) and at Llama-2-7B's
(32 x 128): stock reads K and V (bfloat16), slim reads K and its spill (float16, its default layout)
and does (1 + H)·L·d multiply-adds per query where stock does 2·L·d. Slim's decode form is timed both
ways: the fused C loop (the CPU default) and the batched torch form it replaces. Median of 7 after a
warm-up; torch's thread count as the machine gives it. Writes benchmarks/results/decode_cpu.md and .png.
"""

import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vllm_slim.fixtures.models import build_model
from vllm_slim.fixtures.step import (
    Step,
    attention_layer,
    common_metadata,
    engine_config,
    rope_table,
    run_step,
    scattered_block_table,
)
from vllm_slim.ops.slim import Rotary, paged_decode_slim_attention
from vllm_slim.ops.slim.policy import choose_layout

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK_SIZE = 128  # the CPU build's default
SHAPES = {  # name -> heads, head size, [(batch, context)], with sata (its state at 32 x 128: 138 MB a sequence)
    "4 x 64 (the e2e model's)": (4, 64, [(1, 512), (1, 8192), (16, 512), (16, 2048), (16, 8192), (16, 16000)], True),
    "32 x 128 (Llama-2-7B's)": (32, 128, [(1, 512), (1, 2048), (16, 512), (16, 2048)], False),
}


def median_ms(run, repeats: int = 7) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def layers_for(root: Path, heads: int, head_size: int, with_sata: bool):
    """Stock, slim (bound to random weights) and, if asked, sata layers, with their configs."""
    hidden = heads * head_size
    model = build_model("llama", root / f"llama-{heads}x{head_size}", hidden_size=hidden, num_heads=heads,
                        num_layers=1, max_position=16384, dtype="bfloat16")
    made = {}
    for backend in (None, "slim", "sata") if with_sata else (None, "slim"):
        config = engine_config(model, backend, "bfloat16", BLOCK_SIZE, 16384)
        made[backend] = config, attention_layer(config, heads, head_size)
    if with_sata:
        made["sata"][1].impl.bind(made["sata"][1])
    config, slim = made["slim"]
    g = torch.Generator().manual_seed(0)
    w_k, w_v = (torch.randn(hidden, hidden, generator=g, dtype=torch.float64) / hidden**0.5 for _ in "kv")
    impl = slim.impl
    layout, projections = choose_layout({slim.layer_name: (w_k, w_v, None, None)}, heads, head_size,
                                        impl.model_dtype, impl.cache_torch_dtype, False, impl.policy)
    impl.bind(slim, layout, projections[slim.layer_name], Rotary(rope_table(16384, head_size), head_size, True))
    return made


def measure(made, heads: int, head_size: int, batch: int, context: int) -> dict:
    step = Step([context] * batch, [1] * batch)
    block_table, num_blocks = scattered_block_table(step.seq_lens, BLOCK_SIZE)
    q, k, v = (torch.randn(batch, heads, head_size).bfloat16() for _ in "qkv")
    row = {}
    for backend, (config, layer) in made.items():
        page = layer.get_kv_cache_spec(config)
        if backend == "sata":  # one state block per sequence, whatever the context
            states = torch.zeros(batch + 1, 1, 1, page.page_size_bytes, dtype=torch.int8)
            table = torch.arange(1, batch + 1, dtype=torch.int32)[:, None]
            cam = common_metadata(step, table, 16384)
            row["sata"] = median_ms(lambda: run_step(layer, config, cam, q, k, v, states))
            continue
        if backend is None:  # the stock CPU backend's own layout: [blocks, heads, block, K | V]
            kv_cache = torch.randn(num_blocks, heads, BLOCK_SIZE, 2 * head_size).to(page.dtype)
        else:  # the CPU build's token-major layout viewed head-major
            kv_cache = torch.randn(num_blocks, BLOCK_SIZE, heads, head_size + page.head_size_v).to(page.dtype)
            kv_cache = kv_cache.transpose(1, 2)
        cam = common_metadata(step, block_table, BLOCK_SIZE)
        row["stock" if backend is None else "slim"] = median_ms(lambda: run_step(layer, config, cam, q, k, v, kv_cache))
        if backend == "slim":
            impl, pages = layer.impl, -(-context // BLOCK_SIZE)
            for fused in (True, False):
                row[f"slim op ({'fused' if fused else 'torch'})"] = median_ms(lambda: paged_decode_slim_attention(
                    q, kv_cache, block_table, cam.seq_lens, pages, impl.projection, impl.rotary, impl.scale,
                    fused=fused,
                ))
            row["spill"] = page.head_size_v
    return row


def main() -> None:
    machine = f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    lines = [
        "# One layer's decode step on the CPU: slim vs the stock CPU backend",
        "",
        "Command: `python -m benchmarks.decode_cpu`  ",
        f"Machine: {machine}  ",
        f"Date: {datetime.date.today().isoformat()}",
        "",
        "bfloat16 model; stock caches K and V in bfloat16, slim K in float16 plus its spill. `stock` and `slim` "
        "are whole steps (metadata, cache write, attention) through each backend; the `slim op` columns are "
        "the decode form alone. Read = cache bytes the step must read; MACs = multiply-adds of attention.",
        "",
        "| heads x size | batch | context | stock ms | slim ms | slim / stock | slim op fused ms | slim op torch ms "
        "| sata ms (order 3) | read stock MB | read slim MB | MACs stock M | MACs slim M |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, (heads, head_size, grid, with_sata) in SHAPES.items():
            made = layers_for(Path(scratch), heads, head_size, with_sata)
            for batch, context in grid:
                row = measure(made, heads, head_size, batch, context)
                d = heads * head_size
                read_stock = batch * context * d * 2 * 2 / 1e6
                read_slim = batch * context * heads * (head_size + row["spill"]) * 2 / 1e6
                macs_stock, macs_slim = 2 * batch * context * d / 1e6, (1 + heads) * batch * context * d / 1e6
                rows.append((name, heads, batch, context, row))
                sata = f"{row['sata']:.2f}" if "sata" in row else "—"
                lines.append(
                    f"| {name} | {batch} | {context} | {row['stock']:.2f} | {row['slim']:.2f} | "
                    f"{row['slim'] / row['stock']:.2f} | {row['slim op (fused)']:.2f} | {row['slim op (torch)']:.2f} | "
                    f"{sata} | {read_stock:.1f} | {read_slim:.1f} | {macs_stock:.0f} | {macs_slim:.0f} |"
                )
                print(lines[-1], flush=True)
    lines += [
        "",
        "Slim's reordered decode does (1 + H)/2 times stock's multiply-adds while reading about half the "
        "bytes: at 4 heads that is 2.5x the arithmetic, and the step stays bandwidth-bound like stock's; "
        "at Llama-7B's 32 heads it is 16.5x, and a CPU (whose arithmetic, not its memory, then limits) "
        "runs slim's decode several times slower than stock's. On a GPU the same product runs on tensor "
        "cores and stays memory-bound (shared notes, gpu-integration §4). Sata's step (its fused CPU decode) "
        "costs the same at every context: each sequence's state (order 3, 4 x 64: 2.2 MB a layer) is read and "
        "written once; the stock cache of the same sequence reaches that size at 2,145 tokens of context.",
    ]
    (RESULTS / "decode_cpu.md").write_text("\n".join(lines) + "\n")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4))
    for axis, name in zip(figure.subplots(1, len(SHAPES)), SHAPES):
        shown = [r for r in rows if r[0] == name]
        labels = [f"B={b}\nL={c}" for _, _, b, c, _ in shown]
        x = range(len(shown))
        axis.bar([i - 0.2 for i in x], [r[4]["stock"] for r in shown], 0.4, label="stock", color="#888")
        axis.bar([i + 0.2 for i in x], [r[4]["slim"] for r in shown], 0.4, label="slim", color="#37c")
        axis.set_xticks(list(x), labels, fontsize=7)
        axis.set_ylabel("ms per layer step")
        axis.set_yscale("log")
        axis.set_title(name)
        axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "decode_cpu.png", dpi=120)


if __name__ == "__main__":
    main()
