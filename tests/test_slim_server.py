"""Slim through the real stock OpenAI server (float32): against the stock backend's own tokens under load
with preemption and on a prefix-cache hit, chat and streaming, then exactness against Hugging Face's own
model and capacity against the stock pages' on every architecture. The llama tests come first and share
their slim server with the parametrized test's first case; GPT-J's slim server runs the Triton kernels
under Triton's interpreter."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_slim.fixtures.models import transformers_greedy

# Llama with q/k/v biases is not served here for time: the same bias rows serve Qwen1.5's and OPT's servers.
ARCHS = ["llama", "gpt_neox", "gptj", "gpt2", "opt"]
FLOAT32 = ("--dtype", "float32")
SLIM = (*FLOAT32, "--attention-backend", "slim")
# One architecture's slim server writes and decodes through the Triton kernels, under Triton's interpreter:
# GPT-J's (interleaved pairs, partial rotary), so that the metadata, tables and RoPE reach the kernels right.
TRITON_ARCH = "gptj"


def slim_layers_bound(server) -> int:
    return len(re.findall(r"slim: layer \S+ runs SLIM", server.log()))


def _counter(metrics: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", metrics, re.M))


@pytest.mark.server
def test_greedy_under_preemption_and_cancellations_matches_each_prompt_alone_on_stock(servers, models, prompts):
    """Slim's output is a function of the cached rows alone: the same tokens however a sequence was chunked,
    batched, preempted and recomputed, as stock's are for a prompt sent alone."""
    # 24 blocks of 32 tokens cannot hold 8 sequences of ~150 tokens: the scheduler preempts.
    model = models("llama", dtype="float32")
    requests = [f"{prompts[i % len(prompts)]}# request {i}\n" for i in range(8)]
    stock = servers.get(model, *FLOAT32)
    alone = [stock.greedy_tokens([request], max_tokens=96)[0] for request in requests]
    slim = servers.get(model, *SLIM, "--num-gpu-blocks-override", "24", "--max-model-len", "512")
    before = _counter(slim.metrics(), "vllm:num_preemptions_total")
    # One request with all 8 prompts: the API server adds them to the engine in one go, where 8 requests
    # of their own could reach a fast engine one after another, each done before the next arrives. Beside
    # it, 4 streams that hang up mid-way: their blocks are freed while the others run.
    with ThreadPoolExecutor(5) as pool:
        cancelled = [
            pool.submit(slim.stream, "/v1/completions", {"model": slim.model, "prompt": request, "max_tokens": 96,
                        "temperature": 0, "ignore_eos": True}, stop_after=3 + 4 * i)
            for i, request in enumerate(requests[:4])
        ]
        concurrent = pool.submit(slim.greedy_tokens, requests, max_tokens=96).result()
        assert [len(stream.result()) for stream in cancelled] == [3, 7, 11, 15]
    assert _counter(slim.metrics(), "vllm:num_preemptions_total") > before, "no preemption happened"
    assert concurrent == alone


@pytest.mark.server
def test_prefix_cache_hit_rebuilds_values_from_cached_keys(servers, models, prompts):
    model = models("llama", dtype="float32")
    prompt = prompts[2]  # long: several full blocks to hit
    stock_server = servers.get(model, *FLOAT32)
    stock = stock_server.greedy_tokens([prompt])
    assert "vllm_slim_" not in stock_server.metrics()  # the plugin is loaded, but exports only for its own backends
    slim = servers.get(model, *SLIM)
    assert slim.greedy_tokens([prompt]) == stock
    hits = _counter(slim.metrics(), "vllm:prefix_cache_hits_total")
    assert slim.greedy_tokens([prompt]) == stock
    assert _counter(slim.metrics(), "vllm:prefix_cache_hits_total") > hits


@pytest.mark.server
def test_chat_and_streaming(servers, models, prompts, check_chat_and_streaming):
    check_chat_and_streaming(servers.get(models("llama", dtype="float32"), *SLIM), prompts[0])


def stock_capacity_tokens(server, config: dict) -> float:
    """Tokens the stock backend's pages (K and V, float32) would hold in the memory vLLM gave this server's
    KV cache: its start-up line, in GiB to two decimals (taken at the upper end), over config.json's shape."""
    gib = float(re.search(r"set \(([\d.]+)/[\d.]+\) GiB for KV cache", server.log())[1]) + 0.005
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    heads, hidden = config.get("num_attention_heads", config.get("n_head")), config.get("hidden_size", config.get("n_embd"))
    head_size = config.get("head_dim") or hidden // heads  # Gemma's is wider than hidden / heads
    return gib * 2**30 / (2 * layers * heads * head_size * 4)


@pytest.mark.server
@pytest.mark.parametrize("arch", ARCHS)
def test_float32_greedy_equals_transformers_and_capacity_doubles(servers, models, prompts, arch):
    """Against Hugging Face's own model (the llama one's stock server is compared above, under load and on a
    prefix-cache hit): one server an architecture."""
    model = models(arch, dtype="float32")
    triton = arch == TRITON_ARCH
    slim = servers.get(model, *SLIM, env={"VLLM_SLIM_TRITON": "1"} if triton else None)
    assert ("slim: cache writes and decode through Triton kernels under Triton's interpreter" in slim.log()) == triton
    # Which backend ran: every layer bound by slim, the stock CPU backend never picked.
    config = json.loads((model / "config.json").read_text())
    assert slim_layers_bound(slim) == config.get("num_hidden_layers", config.get("n_layer"))
    assert "Using SLIM attention backend on CPU" in slim.log()
    # The interpreter runs a decode step of this model in seconds: 8 tokens.
    max_tokens = 8 if triton else 32
    prompt_ids, tokens = slim.greedy_completions(list(prompts), max_tokens)
    for prompt, got, expected in zip(prompts, tokens, transformers_greedy(model, prompt_ids, max_tokens), strict=True):
        assert got == expected, prompt
    assert slim.capacity_tokens() >= 1.95 * stock_capacity_tokens(slim, config)
