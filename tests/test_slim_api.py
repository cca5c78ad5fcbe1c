"""Slim through the real stock OpenAI server: prefix caching, chat, streaming, load with preemption."""

import re

import pytest


def greedy(server, prompt, max_tokens=32) -> list[int]:
    return server.greedy_tokens([prompt], max_tokens)[0]


@pytest.mark.server
def test_prefix_cache_hit_rebuilds_values_from_cached_keys(servers, models, prompts):
    slim = servers.get(models("llama", dtype="float32"), "--dtype", "float32", "--attention-backend", "slim")
    prompt = prompts[2]  # long: several full blocks to hit
    first = greedy(slim, prompt)
    hits = _counter(slim.metrics(), "vllm:prefix_cache_hits_total")
    assert greedy(slim, prompt) == first
    assert _counter(slim.metrics(), "vllm:prefix_cache_hits_total") > hits


def _counter(metrics: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", metrics, re.M))


@pytest.mark.server
def test_chat_and_streaming(servers, models, prompts, check_chat_and_streaming):
    check_chat_and_streaming(
        servers.get(models("llama", dtype="float32"), "--dtype", "float32", "--attention-backend", "slim"), prompts[0]
    )


@pytest.mark.server
def test_concurrent_requests_under_preemption_match_sequential(servers, models, prompts):
    # 24 blocks of 32 tokens cannot hold 8 sequences of ~150 tokens: the scheduler preempts.
    slim = servers.get(
        models("llama", dtype="float32"), "--dtype", "float32", "--attention-backend", "slim",
        "--num-gpu-blocks-override", "24", "--max-model-len", "512",
    )
    requests = [f"{prompts[i % len(prompts)]}# request {i}\n" for i in range(8)]
    sequential = [greedy(slim, p, max_tokens=96) for p in requests]
    before = _counter(slim.metrics(), "vllm:num_preemptions_total")
    # One request with all 8 prompts: the API server adds them to the engine in one go, where 8 requests
    # of their own could reach a fast engine one after another, each done before the next arrives.
    concurrent = slim.greedy_tokens(requests, max_tokens=96)
    assert _counter(slim.metrics(), "vllm:num_preemptions_total") > before, "no preemption happened"
    assert concurrent == sequential
