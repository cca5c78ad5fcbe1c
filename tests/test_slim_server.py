"""Slim through the real stock OpenAI server: float32 exactness and capacity on every architecture."""

import json
import re

import pytest

ARCHS = ["llama", "llama_bias", "gpt_neox", "gptj", "gpt2", "opt"]


def slim_layers_bound(server) -> int:
    return len(re.findall(r"slim: layer \S+ runs SLIM", server.log()))


@pytest.mark.server
@pytest.mark.parametrize("arch", ARCHS)
def test_float32_greedy_equals_stock_and_capacity_doubles(servers, models, prompts, arch):
    model = models(arch, dtype="float32")
    stock = servers.get(model, "--dtype", "float32")
    stock_tokens = stock.greedy_tokens(list(prompts))
    stock_capacity = stock.capacity_tokens()
    slim = servers.get(model, "--dtype", "float32", "--attention-backend", "slim")
    # Which backend ran: every layer bound by slim, the stock CPU backend never picked.
    config = json.loads((model / "config.json").read_text())
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    assert slim_layers_bound(slim) == layers
    assert "Using SLIM attention backend on CPU" in slim.log()
    for prompt, got, expected in zip(prompts, slim.greedy_tokens(list(prompts)), stock_tokens, strict=True):
        assert got == expected, prompt
    assert slim.capacity_tokens() >= 1.95 * stock_capacity
