"""The offline fixture models load and run under transformers, and mean what they say."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_slim.fixtures.models import ARCHS, build_model, key_condition_numbers, model_summary
from vllm_slim.fixtures.tokenizer import STDLIB, read_source

BIASED_ARCHS = ("llama_bias", "gpt_neox", "gptj", "gpt2", "opt")  # any bias (GPT-J: its MLP and norms)
TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_position": 256}
TEXT = "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n"
# Held out from training (fixtures/tokenizer.py VALIDATION_SOURCES).
HELD_OUT = read_source(STDLIB / "json" / "decoder.py")
# Measured: 16.2 for the shipped model on these 512 tokens; random inits of its shape give ~2150.
TRAINED_PERPLEXITY_BOUND = 20.0


def load(model_dir):
    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_random_model_loads_and_runs(tmp_path, arch):
    model_dir = build_model(arch, tmp_path / arch, **TINY)
    tokenizer, model = load(model_dir)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 2048)
    assert torch.isfinite(logits).all()
    # Biases are drawn, not the init's zeros: the biased families' bias handling is exercised.
    biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
    assert bool(biases) == (arch in BIASED_ARCHS) and all(p.std() > 0.2 for p in biases)
    assert model_summary(model_dir) == {
        "arch": type(model).__name__, "layers": 2, "heads": 4, "head_size": 16, "hidden": 64,
        "vocab": 2048, "dtype": "float32",
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_well_conditioning_changes_only_the_keys(tmp_path, arch):
    random_dir = build_model(arch, tmp_path / "random", conditioning="random")
    well_dir = build_model(arch, tmp_path / "well", conditioning="well")
    (tokenizer, random), (_, well) = load(random_dir), load(well_dir)
    assert max(key_condition_numbers(well)) < 10
    assert min(key_condition_numbers(random)) > 100
    # With one token in context its single key gets softmax weight 1 whatever W_K is:
    # position 0 is unchanged iff only the keys (or queries) moved.
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        random_logits, well_logits = random(ids).logits[0], well(ids).logits[0]
    torch.testing.assert_close(well_logits[0], random_logits[0])
    assert not torch.allclose(well_logits[1:], random_logits[1:])


def test_build_is_deterministic(tmp_path):
    first = build_model("gpt_neox", tmp_path / "a", **TINY, conditioning="well", dtype="bfloat16")
    second = build_model("gpt_neox", tmp_path / "b", **TINY, conditioning="well", dtype="bfloat16")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_tokenizer_round_trips_and_has_a_chat_template(tmp_path):
    tokenizer, _ = load(build_model("llama", tmp_path / "llama", **TINY))
    ids = tokenizer(HELD_OUT).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == HELD_OUT
    assert len(HELD_OUT) / len(ids) > 2.5  # BPE merges, not bytes
    messages = [{"role": "user", "content": "hi"}]
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat == "<s>### user\nhi</s>\n### assistant\n"


def test_trained_model_predicts_held_out_python(trained_model):
    tokenizer, model = load(trained_model)
    assert model_summary(trained_model) == {
        "arch": "LlamaForCausalLM", "layers": 4, "heads": 8, "head_size": 32, "hidden": 256,
        "vocab": 2048, "dtype": "bfloat16",
    }
    ids = tokenizer(HELD_OUT, return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        perplexity = math.exp(model.float()(ids, labels=ids).loss.item())
    assert perplexity < TRAINED_PERPLEXITY_BOUND
