"""`vllm-slim demo`: serve a small MHA model with slim and with the stock backend, compare.

Uses the trained fixture model shipped in the package (a 4-layer Llama with
RoPE, trained on Python's own sources), serves it on the stock OpenAI server
once with `--attention-backend slim` and once with the stock backend at the
same memory setting, sends each the same request, and prints what each cache holds.
"""

import time
from pathlib import Path

from vllm_slim.serving import Server

TRAINED_MODEL = Path(__file__).parent / "fixtures" / "trained" / "tiny-llama-pysrc"
PROMPT = "def read_config(path):\n    "
SERVER_ARGS = ["--max-model-len", "2048", "--gpu-memory-utilization", "0.3", "--enforce-eager"]


def run_demo() -> None:
    model = str(TRAINED_MODEL)
    rows = []
    for backend in ("slim", None):
        label = backend or "stock (platform default)"
        args = SERVER_ARGS + (["--attention-backend", backend] if backend else [])
        print(f"\n== starting vLLM OpenAI server: {label} ...", flush=True)
        started = time.monotonic()
        with Server(model, args) as server:
            print(f"   up in {time.monotonic() - started:.0f}s at {server.url}; log: {server.log_path}")
            answer = server.post("/v1/completions", {
                "model": model, "prompt": PROMPT, "max_tokens": 48, "temperature": 0,
            })
            print(f"   POST /v1/completions {PROMPT!r} ->\n{PROMPT}{answer['choices'][0]['text']}")
            info = server.cache_config()
            layout = [line.split("] ", 1)[-1] for line in server.log().splitlines() if "layout: K in" in line]
            if layout:
                print(f"   {layout[0]}")
            rows.append((label, int(info["num_gpu_blocks"]), int(info["block_size"])))
    (slim, slim_blocks, slim_bs), (stock, stock_blocks, stock_bs) = rows
    slim_tokens, stock_tokens = slim_blocks * slim_bs, stock_blocks * stock_bs
    print("\nKV cache at the same memory setting (from /metrics vllm:cache_config_info):")
    print(f"{'backend':<28} {'blocks':>10} {'tokens':>12}")
    print(f"{stock:<28} {stock_blocks:>10} {stock_tokens:>12}")
    print(f"{slim:<28} {slim_blocks:>10} {slim_tokens:>12}")
    print(f"slim holds {slim_tokens / stock_tokens:.2f}x the tokens of the stock backend.")


if __name__ == "__main__":
    run_demo()
