"""Slim through the real stock OpenAI server: exactness, capacity, API surface, load."""

import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\nclass Config:\n    def __init__(self",
    "# Copyright 2001 Python Software Foundation\n" * 12,  # long: chunked prefill
    "for i in range(10):\n    print(",
]
ARCHS = ["llama", "llama_bias", "gpt_neox", "gptj", "gpt2", "opt"]


def greedy(server, prompt, max_tokens=32, **extra) -> list[int]:
    answer = server.post("/v1/completions", {
        "model": server.model, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, "return_token_ids": True, **extra,
    })
    return answer["choices"][0]["token_ids"]


def slim_layers_bound(server) -> int:
    return len(re.findall(r"slim: layer \S+ runs SLIM", server.log()))


@pytest.mark.server
@pytest.mark.parametrize("arch", ARCHS)
def test_float32_greedy_equals_stock_and_capacity_doubles(servers, models, arch):
    model = models(arch, dtype="float32")
    stock = servers.get(model, "--dtype", "float32")
    stock_tokens = [greedy(stock, p) for p in PROMPTS]
    stock_capacity = stock.capacity_tokens()
    slim = servers.get(model, "--dtype", "float32", "--attention-backend", "slim")
    # Which backend ran: every layer bound by slim, the stock CPU backend never picked.
    config = json.loads((model / "config.json").read_text())
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    assert slim_layers_bound(slim) == layers
    assert "Using SLIM attention backend on CPU" in slim.log()
    for prompt, expected in zip(PROMPTS, stock_tokens):
        assert greedy(slim, prompt) == expected, prompt
    assert slim.capacity_tokens() >= 1.95 * stock_capacity


@pytest.mark.server
def test_prefix_cache_hit_rebuilds_values_from_cached_keys(servers, models):
    slim = servers.get(models("llama", dtype="float32"), "--dtype", "float32", "--attention-backend", "slim")
    prompt = PROMPTS[2]
    first = greedy(slim, prompt)
    hits = _counter(slim.metrics(), "vllm:prefix_cache_hits_total")
    assert greedy(slim, prompt) == first
    assert _counter(slim.metrics(), "vllm:prefix_cache_hits_total") > hits


def _counter(metrics: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", metrics, re.M))


@pytest.mark.server
def test_chat_and_streaming(servers, models):
    slim = servers.get(models("llama", dtype="float32"), "--dtype", "float32", "--attention-backend", "slim")
    messages = [{"role": "user", "content": "Write a Python function."}]
    chat = slim.post("/v1/chat/completions", {
        "model": slim.model, "messages": messages, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
    })
    text = chat["choices"][0]["message"]["content"]
    assert chat["usage"]["completion_tokens"] == 24 and text
    assert _stream(slim, "/v1/chat/completions", {"messages": messages}) == text
    completion = slim.post("/v1/completions", {
        "model": slim.model, "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0, "ignore_eos": True,
    })["choices"][0]["text"]
    assert _stream(slim, "/v1/completions", {"prompt": PROMPTS[0]}) == completion


def _stream(server, path, body) -> str:
    payload = {"model": server.model, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": True, **body}
    request = urllib.request.Request(
        server.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    pieces = []
    with urllib.request.urlopen(request, timeout=300) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            pieces.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(pieces)


@pytest.mark.server
def test_concurrent_requests_under_preemption_match_sequential(servers, models):
    # 24 blocks of 32 tokens cannot hold 8 sequences of ~150 tokens: the scheduler preempts.
    slim = servers.get(
        models("llama", dtype="float32"), "--dtype", "float32", "--attention-backend", "slim",
        "--num-gpu-blocks-override", "24",
    )
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}# request {i}\n" for i in range(8)]
    sequential = [greedy(slim, p, max_tokens=96) for p in prompts]
    before = _counter(slim.metrics(), "vllm:num_preemptions_total")
    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(lambda p: greedy(slim, p, max_tokens=96), prompts))
    assert _counter(slim.metrics(), "vllm:num_preemptions_total") > before, "no preemption happened"
    assert concurrent == sequential
