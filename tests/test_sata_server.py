"""SATA through the real stock OpenAI server, checked against a transformers model running
SATA's exact definition (`vllm_slim.fixtures.sata_reference`), in float32."""

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoTokenizer

from conftest import wait_for
from vllm_slim.fixtures.hold import HOLD_ARGS
from vllm_slim.fixtures.sata_reference import greedy_tokens, load_reference

SATA = ("--dtype", "float32", "--attention-backend", "sata")
# Two usable state blocks (vLLM holds one back as its null block): at most two sequences hold a
# state at once, the rest queue. Long enough for the 2,000-token generation (a state block
# covers the whole model length), and held where a test reads /metrics.
MAIN = (*SATA, "--num-gpu-blocks-override", "3", "--max-model-len", "2048", *HOLD_ARGS)
# Weights 10x the usual init: logits of a few units, where SATA and softmax attention differ
# (at the usual init every attention row is all but uniform, and the two agree).
SMALL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "initializer_range": 0.2}


def _gauge(source, name: str) -> float:
    """`name`'s one value from a server (a fresh scrape) or a scrape's text."""
    text = source if isinstance(source, str) else source.metrics()
    match = re.search(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M)
    assert match, f"{name} not on /metrics"
    return float(match.group(1))


@pytest.fixture(scope="module")
def sata(servers, models):
    return servers.get(models("llama", **SMALL), *MAIN)


@pytest.mark.server
@pytest.mark.parametrize("heads", [{}, {"num_key_value_heads": 2}], ids=["mha", "gqa"])
def test_greedy_equals_reference(servers, models, prompts, heads):
    """The GQA server prefills and decodes through the Triton kernels under Triton's interpreter, the MHA
    one through the chunk form and the CPU's fused loop."""
    model = models("llama", **SMALL, **heads)
    triton = bool(heads)
    server = servers.get(model, *MAIN, env={"VLLM_SLIM_TRITON": "1"} if triton else None)
    assert "Using SATA attention backend on CPU" in server.log()
    kernels = "sata: decodes and prefills through Triton kernels under Triton's interpreter"
    assert (kernels in server.log()) == triton
    assert "sata: prefix caching turned off" in server.log()
    kv_heads = heads.get("num_key_value_heads", 4)
    state = 2 * kv_heads * math.comb(16 + 2, 2) * (16 + 1) * 4  # layers x heads x features x (d_v + 1) x fp32
    assert f"({state:,} B) per sequence (2 layers x {kv_heads} KV heads of 16)" in server.log()
    tokenizer = AutoTokenizer.from_pretrained(model)
    reference = load_reference(model, order=3)
    softmax = load_reference(model, order=None)
    # The long prompt runs through chunked prefill: the state is carried across steps.
    got = server.greedy_tokens(list(prompts))
    expected, exact = [], []
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        expected.append(greedy_tokens(reference, ids, 32))
        exact.append(greedy_tokens(softmax, ids, 32))
    assert got == expected
    assert got != exact  # what ran is SATA, not softmax attention


@pytest.mark.server
def test_chat_and_streaming(sata, prompts, check_chat_and_streaming):
    check_chat_and_streaming(sata, prompts[0])


@pytest.mark.server
def test_concurrent_requests_match_sequential(sata, prompts):
    # Eight requests, two state blocks: they queue and reuse each other's blocks.
    requests = [f"{prompts[i % len(prompts)]}# request {i}\n" for i in range(8)]
    sequential = [sata.greedy_tokens([r], 48)[0] for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        concurrent = list(pool.map(lambda r: sata.greedy_tokens([r], 48)[0], requests))
    assert concurrent == sequential


@pytest.mark.server
def test_cancelled_request_leaves_no_state(sata, prompts):
    expected = sata.greedy_tokens([prompts[1]], 32)[0]
    body = {"model": sata.model, "prompt": prompts[3], "max_tokens": 500, "temperature": 0, "ignore_eos": True}
    assert len(sata.stream("/v1/completions", body, stop_after=5)) == 5
    wait_for(lambda: _gauge(sata, "vllm:kv_cache_usage_perc") == 0, timeout=30,
             message="the cancelled request's state was not freed")
    # The next request takes the freed block and must start from an empty state.
    assert sata.greedy_tokens([prompts[1]], 32)[0] == expected


@pytest.mark.server
def test_hybrid_greedy_equals_reference(servers, models, prompts):
    """Exact sink and window attention plus the series for older tokens, served from the fixed-size state:
    the window (8) slides inside chunked prefill and during decode."""
    model = models("llama", **SMALL)
    sink_tokens, window = 2, 8
    hybrid = {"sata": {"sink_tokens": sink_tokens, "window": window}}
    server = servers.get(model, *MAIN, "--additional-config", json.dumps(hybrid))
    floats = math.comb(16 + 2, 2) * (16 + 1) + (sink_tokens + window) * (16 + 16)  # series + exact K and V
    assert "exact 2 sink + 8 recent tokens, float32 state: state" in server.log()
    assert f"({2 * 4 * floats * 4:,} B) per sequence (2 layers x 4 KV heads of 16)" in server.log()
    tokenizer = AutoTokenizer.from_pretrained(model)
    reference = load_reference(model, order=3, sink_tokens=sink_tokens, window=window)
    plain = load_reference(model, order=3)
    got = server.greedy_tokens(list(prompts))
    expected = [greedy_tokens(reference, tokenizer(prompt).input_ids, 32) for prompt in prompts]
    assert got == expected
    assert got != [greedy_tokens(plain, tokenizer(prompt).input_ids, 32) for prompt in prompts]


@pytest.mark.server
def test_state_stays_constant_over_2000_tokens(sata):
    """One state block the whole way: the cache usage a request holds does not grow with its length. The
    engine is held at 8 and at 1,900 output tokens and read there."""
    body = {"model": sata.model, "prompt": "def main():\n", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    stock_per_token = _gauge(sata, "vllm_slim_stock_kv_cache_bytes_per_token")

    def sample() -> tuple[float, float, float]:
        """(requests running, tokens the request holds, cache usage) from one scrape."""
        metrics = sata.metrics()
        tokens = _gauge(metrics, "vllm_slim_sata_equivalent_kv_bytes") / stock_per_token
        return _gauge(metrics, "vllm:num_requests_running"), tokens, _gauge(metrics, "vllm:kv_cache_usage_perc")

    answer, samples = sata.sample_held("/v1/completions", body, [8, 1900], sample)
    prompt = answer["usage"]["prompt_tokens"]
    assert samples == [(1, prompt + 8, 0.5), (1, prompt + 1900, 0.5)]  # one of the two blocks, early and late


@pytest.mark.server
def test_order_too_large_for_memory_refused_with_one_that_fits(models, refused_startup):
    log = refused_startup(models("llama", **SMALL), *SATA, "--additional-config", '{"sata": {"order": 13}}')
    match = re.search(r"sata: one sequence's state at order 13 needs ([\d.,]+) MiB .*; the cache has "
                      r"([\d.,]+) MiB and must hold two .*; order (\d+) would fit", log)
    assert match, log[-3000:]
    needed, available, fitting = float(match[1].replace(",", "")), float(match[2].replace(",", "")), int(match[3])
    # 2 layers x 4 KV heads x C(16+12, 12) features x (16 + 1) floats x 4 bytes
    assert needed == round(2 * 4 * math.comb(28, 12) * 17 * 4 / 2**20, 1)
    assert 2 * needed > available
    fits = 2 * (2 * 4 * math.comb(16 + fitting - 1, fitting - 1) * 17 * 4) / 2**20 <= available
    larger_fits = 2 * (2 * 4 * math.comb(16 + fitting + 1, fitting + 1) * 17 * 4) / 2**20 <= available
    assert fits and not larger_fits
