"""Greedy outputs under load against each prompt sent alone (issue 12's reproduction, as a new user tried it).

A 4-layer float32 MHA Llama on a 1,024-token KV budget (32 blocks of 32), 72 concurrent greedy requests of 64
tokens, every third one streamed and cancelled after 5-11 tokens: the scheduler preempts dozens of times and
chunks prompts differently from run to run. Prints, per run, the preemptions counted on /metrics and the
requests whose tokens differ from the same prompt sent alone (with the first differing position).

    python -m benchmarks.greedy_under_load slim 3     # or: stock, sata

CPU only, a few minutes a run; the CI test of the same property is
tests/test_slim_server.py::test_greedy_under_preemption_and_cancellations_matches_each_prompt_alone_on_stock.
"""

import re
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from vllm_slim.fixtures.models import build_model
from vllm_slim.serving import Server

PROMPTS = (
    "def fibonacci(n):\n", "import os\nimport sys\n\nclass Config:\n    def __init__(self",
    "# Copyright 2001 Python Software Foundation\n" * 12, "for i in range(10):\n    print(",
)
REQUESTS = [f"{PROMPTS[i % len(PROMPTS)]}# request {i}\n" for i in range(72)]
ARGS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--block-size", "32",
        "--num-gpu-blocks-override", "32", "--max-num-seqs", "32", "--max-num-batched-tokens", "64"]
MAX_TOKENS = 64


def preemptions(server: Server) -> float:
    return sum(float(v) for v in re.findall(r"^vllm:num_preemptions_total\{[^}]*\} (\S+)$", server.metrics(), re.M))


def main(backend: str, runs: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        model = build_model("llama", f"{root}/llama", num_layers=4, dtype="float32")
        args = ARGS if backend == "stock" else [*ARGS, "--attention-backend", backend]
        with Server(str(model), args) as server:
            alone = [server.greedy_tokens([request], MAX_TOKENS)[0] for request in REQUESTS]

            def send(i: int) -> list[int] | None:
                if i % 3 == 2:  # hang up mid-stream: the server aborts the request
                    body = {"model": server.model, "prompt": REQUESTS[i], "max_tokens": MAX_TOKENS,
                            "temperature": 0, "ignore_eos": True}
                    server.stream("/v1/completions", body, stop_after=5 + i % 7)
                    return None
                return server.greedy_tokens([REQUESTS[i]], MAX_TOKENS)[0]

            for run in range(runs):
                before = preemptions(server)
                with ThreadPoolExecutor(len(REQUESTS)) as pool:
                    loaded = list(pool.map(send, range(len(REQUESTS))))
                differing = [i for i, tokens in enumerate(loaded) if tokens is not None and tokens != alone[i]]
                compared = sum(tokens is not None for tokens in loaded)
                print(f"{backend} run {run}: {preemptions(server) - before:.0f} preemptions, "
                      f"{len(differing)} of {compared} completions differ from the prompt sent alone", flush=True)
                for i in differing:
                    first = next(j for j, (a, b) in enumerate(zip(loaded[i], alone[i])) if a != b)
                    print(f"  request {i}: first difference at token {first}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
