"""Models and settings slim cannot serve are refused at start-up by the real server,
with an error that names the reason and the offending values; never a silent fallback."""

import pytest

from vllm_slim.fixtures.models import build_whisper

SLIM = ("--dtype", "float32", "--attention-backend", "slim")
SMALL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4}

# One refusal of each kind through the real server: decided as vLLM builds the layers (Whisper's, below; GQA,
# MQA and the others of this kind go through a real Attention layer in tests/test_backend_batches.py), and at
# bind time (the error budget; the weights reader's own refusals, QK-norm and clip_qkv, are unit-tested on
# the models' modules).
CASES = {
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


def test_qk_norm_refused_by_the_weights_reader(tmp_path):
    """Qwen3 (MHA here) normalises each key: V is not a linear function of the cached K. Refused with the
    module and norm named, from the model's own attention module, before its projections are read."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from vllm_slim.backends.weights import attention_weights
    from vllm_slim.fixtures.models import build_model
    from vllm_slim.ops.slim import SlimNotApplicable

    model = AutoModelForCausalLM.from_pretrained(build_model("qwen3", tmp_path / "qwen3", **SMALL))
    with pytest.raises(SlimNotApplicable, match=r"QK-norm \(Qwen3Attention.q_norm\) normalises each key"):
        attention_weights(model, "model.layers.0.self_attn.attn", SimpleNamespace(num_heads=4, head_size=16))
