"""Slim on the further MHA families (`fixtures.models.FAMILY_ARCHS`) through the real stock server, float32,
against Hugging Face's own implementation of each family: its greedy tokens for the prompt ids the server
tokenized. One server a family (no stock server: transformers is the reference), each proving which
backend ran and that the Triton kernels served it. The traps (biases drawn at random, not the init's
zeros): Qwen1.5's biases under YaRN (a scaled table, past its original 64 positions), Gemma-7B's shape
(heads x head_dim wider than hidden), StableLM's partial rotary, Phi-3's longrope (a scaled table) with a
sliding window longer than the context, Phi-2 and OLMo through vLLM's Transformers backend. Their
bfloat16 numerics are tests/test_slim_numerics.py's, layer by layer."""

import json
import re

import pytest

from test_slim_server import stock_capacity_tokens
from vllm_slim.fixtures.models import FAMILY_ARCHS, transformers_greedy

SLIM = ("--dtype", "float32", "--attention-backend", "slim")
# Phi-3's longrope: vLLM uses the long table for good once max_model_len passes the original context (512
# here), Hugging Face per forward by the sequence's length; at 512 both use the short one (with its mscale).
SERVED_LENGTH = {"phi3_longrope": ("--max-model-len", "512")}
# The family servers write, prefill and decode through the Triton kernels (the path GPU users run), under
# Triton's interpreter, where a decode step takes about a second: 8 tokens for two prompts, the long one
# prefilled in chunks after its cached pages, decoded beside the other. The CPU's own forms serve the
# architectures of tests/test_slim_server.py and the windowed Phi-3 below.
TRITON = {"VLLM_SLIM_TRITON": "1"}
MAX_TOKENS = 8


@pytest.mark.server
@pytest.mark.parametrize("family", FAMILY_ARCHS)
def test_family_float32_greedy_equals_transformers(servers, models, prompts, family):
    model = models(family, dtype="float32")
    slim = servers.get(model, *SLIM, *SERVED_LENGTH.get(family, ()), env=TRITON)
    config = json.loads((model / "config.json").read_text())
    assert len(re.findall(r"slim: layer \S+ runs SLIM", slim.log())) == config["num_hidden_layers"]
    assert "Using SLIM attention backend on CPU" in slim.log()
    assert "slim: cache writes and decode through Triton kernels under Triton's interpreter" in slim.log()
    if family == "phi3_longrope":  # a window (4096) at least max_model_len long is full attention, not refused
        assert "sliding window (4096 tokens) is at least max_model_len (512)" in slim.log()
    served = prompts[1:3]
    prompt_ids, tokens = slim.greedy_completions(list(served), MAX_TOKENS)
    expected = transformers_greedy(model, prompt_ids, MAX_TOKENS)
    for prompt, got, want in zip(served, tokens, expected, strict=True):
        assert got == want, prompt
    assert slim.capacity_tokens() >= 1.95 * stock_capacity_tokens(slim, config)  # K alone: twice the tokens


@pytest.mark.server
def test_sliding_window_served_as_stock_serves_it_past_the_window(servers, models, prompts):
    """Phi-3-mini-4k's real window (2,047 of 4,096 positions; here 24 of 2,048): every prompt decodes past it,
    and the long one's chunked prefill straddles it while vLLM's sliding-window manager frees the pages that
    fell out of it (the null block reads in their place). Against the stock backend's tokens and Hugging
    Face's windowed model; its full-attention twin answers otherwise, so the window is in effect."""
    model = models("phi3", dtype="float32", sliding_window=24)
    slim = servers.get(model, *SLIM)
    assert len(re.findall(r"slim: layer \S+ runs SLIM", slim.log())) == 2
    prompt_ids, tokens = slim.greedy_completions(list(prompts))
    assert tokens == servers.get(model, "--dtype", "float32").greedy_tokens(list(prompts))
    assert tokens == transformers_greedy(model, prompt_ids, 32)
    assert tokens != transformers_greedy(models("phi3", dtype="float32", sliding_window=None), prompt_ids, 32)


def test_inspect_names_olmo_clip_qkv(tmp_path):
    """OLMo-1.7 clamps q, k and v to ±clip_qkv: `vllm-slim inspect` says so from config.json, as the server
    refuses it (tests/test_slim_refusals.py)."""
    from vllm_slim.fixtures.models import build_model
    from vllm_slim.inspection import inspect_model

    model_dir = build_model("olmo", tmp_path / "olmo", num_layers=1, clip_qkv=8.0)
    assert any("clip_qkv (8.0)" in reason for reason in inspect_model(model_dir).slim_reasons)


@pytest.mark.parametrize("window,kept", [(4096, None), (1024, None), (1023, 1023)])
def test_only_a_window_that_can_take_effect_is_kept(window, kept):
    """max_model_len 1024: a window of 1024 or more never leaves a key out (positions 0..1023), so it is
    dropped from both configs vLLM reads it from; 1023 can take effect and stays (the layer refuses it)."""
    from types import SimpleNamespace

    from vllm_slim.backends.registration import _drop_unreachable_window

    text_config = SimpleNamespace(sliding_window=window)
    config = SimpleNamespace(
        cache_config=SimpleNamespace(sliding_window=window),
        model_config=SimpleNamespace(max_model_len=1024, hf_text_config=text_config),
        attention_config=SimpleNamespace(backend=SimpleNamespace(name="SLIM")),
    )
    _drop_unreachable_window(config)
    assert config.cache_config.sliding_window == kept and text_config.sliding_window == kept
