"""Models and settings slim cannot serve are refused at start-up by the real server,
with an error that names the reason and the offending values; never a silent fallback."""

import pytest

from vllm_slim.fixtures.models import build_whisper

SLIM = ("--dtype", "float32", "--attention-backend", "slim")
SMALL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4}

# One refusal of each kind through the real server: as vLLM builds the layers (GQA here and Whisper's below;
# MQA, ALiBi, soft-capping and the others of this kind through a real Attention layer in
# tests/test_backend_batches.py), by the weights reader on the model's own attention module (QK-norm,
# clip_qkv), and at bind time (the error budget).
CASES = {
    # Llama-3 / Mistral's layout, the one users try first
    "gqa": (
        "llama", {"num_key_value_heads": 2}, (),
        "slim attention cannot serve this model: grouped-query attention (4 query heads, 2 KV heads): K has "
        "fewer columns than the hidden state, so V is not a function of K",
    ),
    # Qwen3 (MHA here) normalises each key: V is not a linear function of the cached K
    "qk_norm": (
        "qwen3", {}, (),
        "QK-norm (Qwen3Attention.q_norm) normalises each key, so V is not a linear function of the cached K",
    ),
    # OLMo-1.7 through vLLM's Transformers backend: a clamped K no longer determines V
    "clip_qkv": (
        "olmo", {"clip_qkv": 8.0}, (),
        "OlmoAttention clamps q, k and v to ±8.0 (clip_qkv): a clamped K no longer determines V",
    ),
    # a budget no layout meets (its floor, 1e-4, is under bfloat16's rounding): refused with the widest
    # spill the 1.8x capacity floor allows at head size 16, and the override named
    "over_budget": (
        "llama", {}, ("--dtype", "bfloat16", "--additional-config", '{"slim": {"max_error_ratio": 0.01}}'),
        "slim: predicted V error exceeds its budget (1.00e-04) even with 1 spill coordinates per head "
        "(capacity 1.88x). Raise the budget or the spill",
    ),
}


@pytest.mark.server
@pytest.mark.parametrize("case", CASES)
def test_refused_at_startup_with_the_reason(models, refused_startup, case):
    arch, overrides, extra_args, reason = CASES[case]
    log = refused_startup(models(arch, **SMALL, **overrides), *SLIM, *extra_args)
    assert reason in log, log[-3000:]
    assert "runs SLIM" not in log


@pytest.mark.server
def test_encoder_decoder_refused(tmp_path, refused_startup):
    # Whisper prefills without chunking: a step must fit the prompt and its 1500 audio frames.
    length = ("--max-model-len", "448", "--max-num-batched-tokens", "1500")
    log = refused_startup(build_whisper(tmp_path / "whisper"), *SLIM, *length)
    assert "attention type 'encoder_decoder' (slim serves decoder self-attention only" in log, log[-3000:]
