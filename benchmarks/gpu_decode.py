"""One attention layer's decode step on a GPU: slim and sata against stock's K+V decode, at Llama-2-7B's
layer shape (32 heads x 128), one query per sequence.

    python3 -m benchmarks.gpu_decode --out DIR      # on a CUDA machine (no vLLM needed): DIR/gpu_decode.{json,md,png}
    python3 -m benchmarks.gpu_decode --report DIR/gpu_decode.json --out DIR  # only the markdown and PNG
    python3 -m benchmarks.gpu_decode --smoke        # on the CPU, tiny shapes under Triton's interpreter: the
                                                    # script's own checks, no timing worth reading

Compared, each over B in {1, 8, 16, 64} and n in {1k, 4k, 16k, 32k, 64k, 128k} (B x n up to 2M tokens):
- SDPA: torch's scaled_dot_product_attention (flash) on contiguous K and V [B, H, n, D] bf16: stock's
  memory floor in practice (../shared/notes/gpu-anchors.md);
- paged K+V: a plain Triton flash-decode over K and V pages of 16 tokens through a block table (splits
  as `occupancy_splits` gives, log-sum-exp merge) written here as the paged comparator: what a paged K+V
  decode reads, not vLLM's own kernel (vLLM does not run on that machine);
- slim, two-pass and one-pass (K read once): `paged_decode_slim_attention` on CUDA, from a float16 cache
  of K and 2 spill coordinates a head (slim's default layout for a bf16 model), W_KV products included;
- sata at order 3: `triton_decode_sata`, its state read and written once; flat in n by construction,
  timed once per B and set against SDPA's time at each n.
Every method's output is first checked against a float32 torch reference on the same inputs. Timing:
triton.testing.do_bench (L2 flushed between runs), median; slim's two passes also replayed from a CUDA
graph (do_bench_cudagraph), as vLLM runs slim's decode steps. Bytes per step: what each must read (slim
two-pass reads its cache twice, counted once: "effective" bandwidth). The K-only floor is SDPA's own time
scaled by slim's bytes over K+V's (the notes' practical floor: a plain copy is slower than SDPA's reads).
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vllm_slim.fixtures.step import rope_table
from vllm_slim.ops.dispatch import TRITON_ENV
from vllm_slim.ops.sata.basis import feature_size
from vllm_slim.ops.sata.triton_decode import triton_decode_sata
from vllm_slim.ops.slim import Rotary, paged_decode_slim_attention
from vllm_slim.ops.slim.decode import decode_rows, per_head_product
from vllm_slim.ops.slim.projection import SlimProjection
from vllm_slim.ops.triton_build import add, check_device, kernel_definitions, larger, occupancy_splits, pad

BLOCK_SIZE = 16  # vLLM's default page on CUDA
SPILL = 2  # spill coordinates per head in slim's default bf16 layout
MAX_TOKENS = 1 << 21  # B x n kept to 2M tokens: K+V 32 GiB at this shape
FULL = dict(heads=32, head_size=128, batches=(1, 8, 16, 64), contexts=(1024, 4096, 16384, 32768, 65536, 131072))
SMOKE = dict(heads=4, head_size=16, batches=(1, 3), contexts=(40, 100))
TARGETS = (
    "two-pass slim within 1.1x of SDPA's time; one-pass slim >= 1.6x faster than SDPA at B = 16, n = 32k "
    "and >= 80 % of the K-only floor; sata's time flat in n"
)

with kernel_definitions():

    @triton.jit
    def paged_kv_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, max_ptr, sum_ptr,
        stride_block, stride_head, stride_token, table_stride, scale, split_len, num_splits,
        H: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    ):
        b, s, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n = tl.load(lens_ptr + b)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + (b * H + h) * D + d).to(tl.float32)
        peak = tl.full((), float("-inf"), tl.float32)
        total = tl.full((), 0.0, tl.float32)
        acc = tl.full((D,), 0.0, tl.float32)
        for l0 in range(s * split_len, tl.minimum((s + 1) * split_len, n), TILE):
            lane = l0 + tl.arange(0, TILE)
            valid = lane < n
            block = tl.load(table_ptr + b * table_stride + lane // BLOCK_SIZE, mask=valid, other=0)
            at = (block.to(tl.int64) * stride_block + h * stride_head + (lane % BLOCK_SIZE) * stride_token)[:, None]
            k = tl.load(k_ptr + at + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            score = tl.where(valid, tl.reduce(k * q[None, :], 1, add) * scale, float("-inf"))
            top = tl.maximum(peak, tl.reduce(score, 0, larger))
            p = tl.exp(score - top)
            factor = tl.exp(peak - top)
            v = tl.load(v_ptr + at + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            acc = acc * factor + tl.reduce(p[:, None] * v, 0, add)
            total = total * factor + tl.reduce(p, 0, add)
            peak = top
        row = (b * num_splits + s) * H + h
        tl.store(out_ptr + row * D + d, acc)
        tl.store(max_ptr + row, peak)
        tl.store(sum_ptr + row, total)


def paged_kv_decode(q, k_cache, v_cache, table, lens, num_pages: int, num_splits: int) -> torch.Tensor:
    """[B, H, D] float32 attention of q [B, H, D] over paged K and V [blocks, H, BLOCK_SIZE, D]."""
    check_device(q.device, "the paged K+V decode")
    batch, heads, head_size = q.shape
    split_len = -(-num_pages // num_splits) * BLOCK_SIZE
    tile = min(64, pad(split_len))
    split_len = -(-split_len // tile) * tile  # whole tiles: a tile never reaches into the next split
    out = torch.empty(batch, num_splits, heads, head_size, dtype=torch.float32, device=q.device)
    maxes = torch.empty(batch, num_splits, heads, dtype=torch.float32, device=q.device)
    sums = torch.empty_like(maxes)
    paged_kv_kernel[(batch, num_splits, heads)](
        q, k_cache, v_cache, table, lens, out, maxes, sums, *k_cache.stride()[:3], table.stride(0),
        head_size**-0.5, split_len, num_splits, H=heads, D=head_size, BLOCK_SIZE=BLOCK_SIZE, TILE=tile,
    )
    # Splits past a sequence's end hold max -inf and sum 0: their weight below is 0.
    weight = (maxes - maxes.amax(1, keepdim=True)).exp()
    return (out * weight[..., None]).sum(1) / (sums * weight).sum(1)[..., None]


def timer(device, graph: bool = False):
    """ms of one call: do_bench's median on CUDA (graph: of a CUDA graph's replays, as vLLM's FULL decode
    graphs run it, without the launches' host overhead), a perf_counter median elsewhere (smoke: meaningless)."""
    if device.type == "cuda" and graph:
        return lambda fn: triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    if device.type == "cuda":
        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu(fn):
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    return cpu


def slim_layer(heads: int, head_size: int, context: int, device):
    """Random float32 maps of slim's default bf16 layout (spill 2 a head, W_K's solve not needed for
    timing) and the model's NeoX RoPE."""
    width = heads * head_size
    g = torch.Generator(device=device).manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device) / math.sqrt(shape[0])  # noqa: E731
    proj = SlimProjection(rand(width, width), rand(heads * SPILL, width), rand(2 * width, heads * SPILL),
                          None, None, None, heads, 1.0)
    return proj, Rotary(rope_table(context + 1, head_size).to(device), head_size, True)


def measure_config(batch: int, context: int, heads: int, head_size: int, device, bench, graph_bench) -> dict:
    """Every method at one (B, n): ms, bytes, checked outputs; slim's two passes also as a CUDA graph."""
    g = torch.Generator(device=device).manual_seed(0)
    num_pages = -(-context // BLOCK_SIZE)
    scale = head_size**-0.5
    q = torch.randn(batch, heads, head_size, generator=g, device=device, dtype=torch.bfloat16)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    table = (torch.randperm(batch * num_pages, device=device, generator=g) + 1).view(batch, num_pages).int()
    row = {"batch": batch, "context": context}

    # Stock: contiguous K, V for SDPA; the same values paged for the paged decode.
    k_pages = torch.randn(batch * num_pages + 1, heads, BLOCK_SIZE, head_size, generator=g, device=device,
                          dtype=torch.bfloat16)
    v_pages = torch.randn_like(k_pages)
    gather = lambda pages: pages[table.long()].permute(0, 2, 1, 3, 4).flatten(2, 3)[:, :, :context]  # noqa: E731
    k, v = gather(k_pages), gather(v_pages)  # [B, H, n, D]
    sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale)  # noqa: E731
    reference = F.scaled_dot_product_attention(q[:, :, None].float(), k.float(), v.float(), scale=scale)[:, :, 0]
    torch.testing.assert_close(sdpa()[:, :, 0].float(), reference, rtol=2e-2, atol=2e-2)
    splits = occupancy_splits(batch * heads, num_pages, device)
    paged = lambda: paged_kv_decode(q, k_pages, v_pages, table, lens, num_pages, splits)  # noqa: E731
    torch.testing.assert_close(paged(), reference, rtol=2e-3, atol=2e-3)
    kv_bytes = 2 * batch * heads * context * head_size * 2
    row["sdpa_ms"] = bench(sdpa)
    row["paged_kv_ms"] = bench(paged)
    row["kv_bytes"] = kv_bytes
    del k, v, k_pages, v_pages, reference

    # Slim: K and spill in one float16 row a head, V rebuilt through W_KV.
    proj, rotary = slim_layer(heads, head_size, num_pages * BLOCK_SIZE, device)  # the torch form un-RoPEs whole pages
    cache = torch.randn(batch * num_pages + 1, heads, BLOCK_SIZE, head_size + SPILL, generator=g, device=device,
                        dtype=torch.float16)
    z, z_spill = decode_rows(q, cache, table, lens, num_pages, rotary, scale, max(1, num_pages // splits))
    expected = per_head_product(z, proj.w_kv) + per_head_product(z_spill, proj.w_sv)
    for name, one_pass in (("slim_two_pass_ms", False), ("slim_one_pass_ms", True)):
        run = lambda: paged_decode_slim_attention(  # noqa: E731
            q, cache, table, lens, num_pages, proj, rotary, scale, one_pass=one_pass
        )
        torch.testing.assert_close(run(), expected, rtol=1e-3, atol=1e-3)
        row[name] = bench(run)
        if not one_pass:  # replayed from a CUDA graph, as vLLM runs slim's decode steps
            row["slim_two_pass_graph_ms"] = graph_bench(run)
    row["slim_bytes"] = batch * heads * context * (head_size + SPILL) * 2
    return row


def measure_sata(batch: int, heads: int, head_size: int, device, bench, order: int = 3) -> dict:
    """Sata's decode step at order 3 (no window): a state of m x (D + 1) floats per head, read and written once."""
    m = feature_size(head_size, order)
    g = torch.Generator(device=device).manual_seed(2)
    pages = torch.randn(batch, heads, m * (head_size + 1), generator=g, device=device) * 1e-3
    q, k, v = (torch.randn(batch, heads, head_size, generator=g, device=device, dtype=torch.bfloat16) for _ in range(3))
    indices = torch.arange(batch, device=device)
    reset = torch.zeros(batch, dtype=torch.bool, device=device)
    run = lambda: triton_decode_sata(q, k, v, pages, indices, reset, head_size**-0.5, order)  # noqa: E731
    return {"batch": batch, "order": order, "sata_ms": bench(run), "state_bytes": 2 * pages.numel() * 4}


def report(results: dict, out: Path) -> None:
    """gpu_decode.md and gpu_decode.png from the measured rows."""
    rows, sata = results["rows"], {r["batch"]: r for r in results["sata"]}
    lines = [
        "# One layer's decode step on a GPU: slim and sata against stock's K+V decode",
        "",
        f"Command: `{results['command']}`. Machine: {results['machine']}. Date: {results['date']}.",
        f"Shape: {results['heads']} heads x {results['head_size']}, bf16 queries; stock K+V bf16, slim float16 "
        f"K + {SPILL} spill a head, pages of {BLOCK_SIZE}. Targets: {TARGETS}.",
        "",
        "| B | n | SDPA ms | paged K+V ms | slim 2-pass ms | slim 2-pass, CUDA graph ms | slim 1-pass ms | SDPA TB/s "
        "| slim 1-pass eff. TB/s | 1-pass speedup vs SDPA | 1-pass % of K-only floor | 2-pass / SDPA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        floor = r["sdpa_ms"] * r["slim_bytes"] / r["kv_bytes"]
        lines.append(
            f"| {r['batch']} | {r['context']:,} | {r['sdpa_ms']:.3f} | {r['paged_kv_ms']:.3f} | "
            f"{r['slim_two_pass_ms']:.3f} | {r['slim_two_pass_graph_ms']:.3f} | {r['slim_one_pass_ms']:.3f} | {r['kv_bytes'] / r['sdpa_ms'] / 1e9:.2f} | "
            f"{r['slim_bytes'] / r['slim_one_pass_ms'] / 1e9:.2f} | {r['sdpa_ms'] / r['slim_one_pass_ms']:.2f}x | "
            f"{100 * floor / r['slim_one_pass_ms']:.0f} % | {r['slim_two_pass_ms'] / r['sdpa_ms']:.2f}x |"
        )
    lines += ["", "Sata (order 3, state read and written once a step; its time does not depend on n):", "",
              "| B | sata ms | state bytes read + written | SDPA ms at the n where sata is faster |",
              "|---|---|---|---|"]
    for b, s in sata.items():
        faster = [f"{r['context']:,}: {r['sdpa_ms']:.3f}" for r in rows if r["batch"] == b and r["sdpa_ms"] > s["sata_ms"]]
        lines.append(f"| {b} | {s['sata_ms']:.3f} | {s['state_bytes'] / 2**20:,.0f} MiB | {', '.join(faster) or 'none measured'} |")
    skipped = results.get("skipped")
    if skipped:
        lines += ["", f"Not run (B x n over {MAX_TOKENS:,} tokens): {', '.join(skipped)}."]
    (out / "gpu_decode.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
    except ImportError:  # the GPU machine may lack it: the PNG is drawn later with --report
        print(f"no matplotlib here: draw the PNG with `python -m benchmarks.gpu_decode --report {out}/gpu_decode.json`")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for b in sorted({r["batch"] for r in rows}):
        mine = [r for r in rows if r["batch"] == b]
        n = [r["context"] for r in mine]
        line = axes[0].plot(n, [r["sdpa_ms"] for r in mine], "o-", label=f"SDPA K+V, B={b}")[0]
        axes[0].plot(n, [r["slim_one_pass_ms"] for r in mine], "s--", color=line.get_color(), label=f"slim 1-pass, B={b}")
        axes[0].plot(n, [r["sdpa_ms"] * r["slim_bytes"] / r["kv_bytes"] for r in mine], ":", color=line.get_color())
        if b in sata:
            axes[0].axhline(sata[b]["sata_ms"], color=line.get_color(), lw=0.8, alpha=0.6)
        axes[1].plot(n, [r["kv_bytes"] / r["sdpa_ms"] / 1e9 for r in mine], "o-", color=line.get_color(), label=f"SDPA B={b}")
        axes[1].plot(n, [r["slim_bytes"] / r["slim_one_pass_ms"] / 1e9 for r in mine], "s--", color=line.get_color(),
                     label=f"slim 1-pass B={b}")
    axes[0].set(xscale="log", yscale="log", xlabel="context n (tokens)", ylabel="ms per layer-step",
                title="time (dotted: K-only floor; flat: sata)")
    axes[1].set(xscale="log", xlabel="context n (tokens)", ylabel="TB/s (bytes each must read / time)",
                title="achieved read bandwidth")
    axes[0].legend(fontsize=6)
    axes[1].legend(fontsize=6)
    figure.suptitle(f"{results['machine']}, {results['date']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "gpu_decode.png", dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    parser.add_argument("--report", type=Path, help="only write the markdown and PNG of a run's gpu_decode.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        report(json.loads(args.report.read_text()), args.out)
        return
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        os.environ[TRITON_ENV] = "1"  # slim's Triton path on the CPU (on CUDA it is the default)
    shape = SMOKE if args.smoke else FULL
    bench, graph_bench = timer(device), timer(device, graph=True)
    results = {
        "command": "python3 -m benchmarks.gpu_decode" + (" --smoke" if args.smoke else ""),
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "date": datetime.date.today().isoformat(), "heads": shape["heads"], "head_size": shape["head_size"],
        "torch": torch.__version__, "triton": triton.__version__, "rows": [], "sata": [], "skipped": [],
    }
    for batch in shape["batches"]:
        for context in shape["contexts"]:
            if batch * context > MAX_TOKENS:
                results["skipped"].append(f"B {batch} x n {context:,}")
                continue
            row = measure_config(batch, context, shape["heads"], shape["head_size"], device, bench, graph_bench)
            print(json.dumps(row), flush=True)
            results["rows"].append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        sata = measure_sata(batch, shape["heads"], shape["head_size"], device, bench)
        print(json.dumps(sata), flush=True)
        results["sata"].append(sata)
    (args.out / "gpu_decode.json").write_text(json.dumps(results, indent=1) + "\n")
    report(results, args.out)


if __name__ == "__main__":
    main()
