"""End-to-end serving speed on the CPU build, with vLLM's own `vllm bench serve`: stock vs slim vs sata.

    .venv/bin/python -m benchmarks.serve_cpu [--repeats 3] [--label NAME] [--backends ...] [--budgets ...]

One model (a 4-layer bfloat16 MHA Llama, 4 heads x 64, random weights, built here), one server at a
time, at a loose KV budget (`--kv-cache-memory-bytes` 1 GiB: every sequence fits; the CPU build's
automatic budget takes nearly all free memory, and the benchmark client then runs out) and a tight one
(16 MiB: the stock cache holds 32 blocks of 128 tokens, five of the sixteen concurrent sequences);
VLLM_CPU_KVCACHE_SPACE would override the flag, so it is left unset. Per server: one warm-up run,
then `--repeats` runs of `vllm bench serve` (random dataset, 512 in / 256 out, 32 prompts,
concurrency 16, EOS ignored); the median run is reported, with /metrics sampled every 0.2 s for the
peak of running requests and the preemptions. Run by another environment's python (one with an
earlier vllm_slim installed) and a `--label`, it measures that version beside this one.
Appends to benchmarks/results/serve_cpu.json and rewrites serve_cpu.md and serve_cpu.png from it.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from vllm_slim.fixtures.models import build_model
from vllm_slim.serving import Server

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = {"loose": ["--kv-cache-memory-bytes", str(2**30)], "tight": ["--kv-cache-memory-bytes", str(16 * 2**20)]}
BACKENDS = {"stock": [], "slim": ["--attention-backend", "slim"], "sata": ["--attention-backend", "sata"]}
SERVER_ARGS = ["--max-model-len", "1024", "--dtype", "bfloat16"]
BENCH_ARGS = [
    "--dataset-name", "random", "--random-input-len", "512", "--random-output-len", "256",
    "--num-prompts", "32", "--max-concurrency", "16", "--ignore-eos", "--seed", "0",
]
# The CPU build's `vllm` console script fails (it looks up a distribution named `vllm`): the same
# `vllm bench serve`, entered through its module.
BENCH_MAIN = (
    "import sys; from vllm.benchmarks.serve import add_cli_args, main; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "parser = FlexibleArgumentParser(); add_cli_args(parser); main(parser.parse_args(sys.argv[1:]))"
)


def bench_model(root: Path, max_position: int = 2048) -> Path:
    return build_model("llama", root / f"llama-4x64-bf16-{max_position}", hidden_size=256, num_heads=4,
                       num_layers=4, max_position=max_position, dtype="bfloat16")


def counter(metrics: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", metrics, re.M))


class MetricsSampler(threading.Thread):
    """Peak of vllm:num_requests_running while a run lasts."""

    def __init__(self, server: Server):
        super().__init__(daemon=True)
        self.server, self.peak, self.done = server, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            try:
                self.peak = max(self.peak, counter(self.server.metrics(), "vllm:num_requests_running"))
            except OSError:
                pass


def bench_once(server: Server, model: Path, out_dir: Path, name: str, bench_args: list[str] = BENCH_ARGS) -> dict:
    preempted = counter(server.metrics(), "vllm:num_preemptions_total")
    sampler = MetricsSampler(server)
    sampler.start()
    command = [
        sys.executable, "-c", BENCH_MAIN, "--backend", "vllm", "--base-url", server.url, "--model", str(model),
        *bench_args, "--save-result", "--result-dir", str(out_dir), "--result-filename", f"{name}.json",
    ]
    subprocess.run(command, check=True, capture_output=True, text=True)
    sampler.done.set()
    sampler.join()
    result = json.loads((out_dir / f"{name}.json").read_text())
    return {
        "output_tok_s": result["output_throughput"], "mean_ttft_ms": result["mean_ttft_ms"],
        "mean_tpot_ms": result["mean_tpot_ms"], "median_itl_ms": result["median_itl_ms"],
        "completed": result["completed"],
        "peak_running": sampler.peak,
        "preemptions": counter(server.metrics(), "vllm:num_preemptions_total") - preempted,
    }


def measure(model: Path, budget: str, backend: str, repeats: int, scratch: Path) -> dict:
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override --kv-cache-memory-bytes
    server = Server(str(model), [*SERVER_ARGS, *BUDGETS[budget], *BACKENDS[backend]])
    try:
        server.__enter__()
    except RuntimeError as error:  # a refusal at start-up is a result too
        reason = re.search(r"(?:ValueError|SlimNotApplicable|SataNotApplicable): ((?:sata|slim)[^\n]*)", server.log())
        return {"refused": reason.group(1) if reason else str(error).splitlines()[0]}
    try:
        blocks = int(server.cache_config()["num_gpu_blocks"])
        bench_once(server, model, scratch, f"{budget}-{backend}-warmup")
        runs = [bench_once(server, model, scratch, f"{budget}-{backend}-{i}") for i in range(repeats)]
    finally:
        server.stop()
    median = sorted(runs, key=lambda run: run["output_tok_s"])[len(runs) // 2]
    return {**median, "num_gpu_blocks": blocks, "output_tok_s_runs": [run["output_tok_s"] for run in runs]}


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {memory:.0f} GiB"


def stock_row(records: list[dict], record: dict) -> dict | None:
    """The stock row a row is compared with: its own run's, else the one its `stock_label` names (this
    machine's speed drifts between sessions: a ratio holds only within one), else the first."""
    stock = [r for r in records if r["budget"] == record["budget"] and r["backend"] == "stock" and "refused" not in r]
    return next((r for r in stock if r["label"] == record["label"]), None) or next(
        (r for r in stock if r["label"] == record.get("stock_label")), None) or next(iter(stock), None)


def write_report(records: list[dict]) -> None:
    from matplotlib.figure import Figure

    lines = [
        "# End-to-end serving on the CPU build: stock vs slim vs sata",
        "",
        *[f"Command ({label}): `{command}`  " for label, command in
          dict((r["label"], r["command"]) for r in records).items()],
        f"Machine: {records[-1]['machine']}  ",
        "An earlier version is measured by running this script from a checkout of it (its `vllm_slim` is then "
        "the one imported, by the server too), or with the python of an environment that has it installed; "
        "`x stock` is against the stock row of the same run, else of the run `--stock-label` names (the stock "
        "backend is vLLM's, the same code; this machine's speed differs between sessions).  ",
        "Model: 4-layer bfloat16 MHA Llama, 4 heads x 64 (hidden 256), random weights; "
        "`vllm bench serve` random dataset, 512 in / 256 out, 32 prompts, concurrency 16, EOS ignored; "
        "median of the runs listed (after one warm-up run on the same server).",
        "",
        "| code | date | budget | backend | blocks | output tok/s (runs) | x stock | mean TTFT ms | mean TPOT ms "
        "| peak running | preemptions |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        stock = stock_row(records, record)
        if "refused" in record:
            lines.append(f"| {record['label']} | {record['date']} | {record['budget']} | {record['backend']} | "
                         f"refused at start-up: {record['refused']} ||||||")
            continue
        ratio = record["output_tok_s"] / stock["output_tok_s"] if stock else float("nan")
        runs = ", ".join(f"{value:.0f}" for value in record["output_tok_s_runs"])
        lines.append(
            f"| {record['label']} | {record['date']} | {record['budget']} | {record['backend']} | "
            f"{record['num_gpu_blocks']} | {record['output_tok_s']:.0f} ({runs}) | {ratio:.2f} | "
            f"{record['mean_ttft_ms']:.0f} | {record['mean_tpot_ms']:.1f} | {record['peak_running']:.0f} | "
            f"{record['preemptions']:.0f} |"
        )
    (RESULTS / "serve_cpu.md").write_text("\n".join(lines) + "\n")
    measured = [r for r in records if "refused" not in r]
    figure = Figure(figsize=(9, 4))
    axes = figure.subplots(1, 2)
    for axis, budget in zip(axes, BUDGETS):
        rows = [r for r in measured if r["budget"] == budget]
        names = [f"{r['backend']}\n{r['label']}" for r in rows]
        axis.bar(names, [r["output_tok_s"] for r in rows], color=["#888" if r["backend"] == "stock" else "#37c" for r in rows])
        axis.set_title(f"{budget} KV budget")
        axis.set_ylabel("output tokens/s")
        axis.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    figure.savefig(RESULTS / "serve_cpu.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--stock-label", help="the run whose stock rows this run's are compared with")
    args = parser.parse_args()
    store = RESULTS / "serve_cpu.json"
    records = json.loads(store.read_text()) if store.exists() else []
    with tempfile.TemporaryDirectory() as scratch:
        model = bench_model(Path(scratch))
        for budget in args.budgets:
            for backend in args.backends:
                started = time.monotonic()
                result = measure(model, budget, backend, args.repeats, Path(scratch))
                print(f"{args.label} {budget} {backend}: {result} ({time.monotonic() - started:.0f} s)", flush=True)
                records = [r for r in records if (r["label"], r["budget"], r["backend"]) != (args.label, budget, backend)]
                records.append({
                    "label": args.label, "budget": budget, "backend": backend,
                    "date": datetime.date.today().isoformat(),
                    "command": shlex.join(["python", "-m", "benchmarks.serve_cpu", *sys.argv[1:]]),
                    "machine": machine(), "stock_label": args.stock_label or args.label,
                    **result,
                })
                store.write_text(json.dumps(records, indent=1))
    write_report(records)


if __name__ == "__main__":
    main()
