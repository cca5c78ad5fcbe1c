"""Decode speed against context length on the CPU build, end to end: stock vs sata (and slim), with
vLLM's own `vllm bench serve`.

    .venv/bin/python -m benchmarks.serve_context_cpu [--input-lens 1024 4096 12288] [--backends stock sata]

One server per backend: the 4-layer bfloat16 MHA Llama of `serve_cpu` (4 heads x 64, random
weights) with positions up to 16,640 and a 1 GiB KV budget (every sequence fits: no preemption).
For each input length, one run of 8 prompts at concurrency 8, 256 output tokens, EOS ignored, after
one warm-up run at the shortest length. The figure of merit is the median inter-token latency: one
decode step of the 8 sequences at that context, as a client sees it. The mean TPOT also counts the
steps that carry other requests' prefill chunks (the 8 prompts arrive together), so it is reported
beside it, with the TTFT. Appends to benchmarks/results/serve_context_cpu.json and rewrites its .md
and .png.
"""

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.serve_cpu import BACKENDS, RESULTS, bench_model, bench_once, machine
from vllm_slim.serving import Server

MAX_MODEL_LEN = 16640
SERVER_ARGS = ["--max-model-len", str(MAX_MODEL_LEN), "--dtype", "bfloat16", "--kv-cache-memory-bytes", str(2**30)]
OUTPUT_LEN, PROMPTS = 256, 8


def bench_args(input_len: int) -> list[str]:
    return [
        "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(OUTPUT_LEN),
        "--num-prompts", str(PROMPTS), "--max-concurrency", str(PROMPTS), "--ignore-eos", "--seed", "0",
    ]


def measure(model: Path, backend: str, input_lens: list[int], scratch: Path) -> list[dict]:
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override --kv-cache-memory-bytes
    with Server(str(model), [*SERVER_ARGS, *BACKENDS[backend]]) as server:
        bench_once(server, model, scratch, f"{backend}-warmup", bench_args(min(input_lens)))
        results = []
        for input_len in input_lens:
            started = time.monotonic()
            result = bench_once(server, model, scratch, f"{backend}-{input_len}", bench_args(input_len))
            print(f"{backend} {input_len}: {result} ({time.monotonic() - started:.0f} s)", flush=True)
            results.append({"backend": backend, "input_len": input_len, **result})
    return results


def write_report(records: list[dict]) -> None:
    from matplotlib.figure import Figure

    lines = [
        "# Decode speed against context length, end to end on the CPU build",
        "",
        *[f"Command ({label}): `{command}`  " for label, command in
          dict.fromkeys((r["label"], r["command"]) for r in records)],
        f"Machine: {records[-1]['machine']}  ",
        "Model: 4-layer bfloat16 MHA Llama, 4 heads x 64 (hidden 256), random weights, 1 GiB KV budget; "
        f"`vllm bench serve` random dataset, {PROMPTS} prompts at concurrency {PROMPTS}, {OUTPUT_LEN} output "
        "tokens, EOS ignored; one run per length after a warm-up run. Median ITL: one decode step of the "
        f"{PROMPTS} sequences at that context. Mean TPOT also counts the steps carrying other requests' "
        "prefill chunks.",
        "",
        "| code | date | backend | input tokens | median ITL ms | ITL / stock's | mean TPOT ms | mean TTFT s "
        "| output tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        stock = next((r for r in records if r["label"] == record["label"] and r["backend"] == "stock"
                      and r["input_len"] == record["input_len"]), None)
        ratio = f"{record['median_itl_ms'] / stock['median_itl_ms']:.2f}" if stock else "-"
        lines.append(
            f"| {record['label']} | {record['date']} | {record['backend']} | {record['input_len']} | "
            f"{record['median_itl_ms']:.1f} | {ratio} | {record['mean_tpot_ms']:.1f} | "
            f"{record['mean_ttft_ms'] / 1e3:.1f} | {record['output_tok_s']:.0f} |"
        )
    (RESULTS / "serve_context_cpu.md").write_text("\n".join(lines) + "\n")
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    for label, backend in dict.fromkeys((r["label"], r["backend"]) for r in records):
        rows = sorted((r for r in records if (r["label"], r["backend"]) == (label, backend)), key=lambda r: r["input_len"])
        axis.plot([r["input_len"] for r in rows], [r["median_itl_ms"] for r in rows], marker="o", label=f"{backend} ({label})")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("input tokens per sequence")
    axis.set_ylabel(f"median inter-token latency, ms ({PROMPTS} sequences)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(RESULTS / "serve_context_cpu.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-lens", nargs="+", type=int, default=[1024, 4096, 12288])
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--backends", nargs="+", default=["stock", "sata"], choices=list(BACKENDS))
    args = parser.parse_args()
    if max(args.input_lens) + OUTPUT_LEN > MAX_MODEL_LEN:
        parser.error(f"input lengths up to {MAX_MODEL_LEN - OUTPUT_LEN} (the model's positions)")
    store = RESULTS / "serve_context_cpu.json"
    records = json.loads(store.read_text()) if store.exists() else []
    with tempfile.TemporaryDirectory() as scratch:
        model = bench_model(Path(scratch), max_position=MAX_MODEL_LEN)
        for backend in args.backends:
            for result in measure(model, backend, sorted(args.input_lens), Path(scratch)):
                records = [r for r in records if (r["label"], r["backend"], r["input_len"]) !=
                           (args.label, backend, result["input_len"])]
                records.append({
                    "label": args.label, "date": datetime.date.today().isoformat(),
                    "command": shlex.join(["python", "-m", "benchmarks.serve_context_cpu", *sys.argv[1:]]),
                    "machine": machine(), **result,
                })
                store.write_text(json.dumps(records, indent=1))
    write_report(records)


if __name__ == "__main__":
    main()
