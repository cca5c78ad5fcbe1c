"""bfloat16 through the real server: slim's teacher-forced log-prob error vs a float32 reference.

Three servers per model: stock float32 (the reference), stock bfloat16 and slim
bfloat16 under its default layout. The prompt is fed in 16-token chunks, so
every step reads most of its context back from the cache: slim rebuilds those
values from cached keys through the reordered decode form.
"""

import sysconfig
from pathlib import Path

import pytest
from transformers import AutoTokenizer

BOUND = 4.0
CHUNKS = ("--max-num-batched-tokens", "16")
TEXT = Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py").read_text()


def prompt_logprobs(server, token_ids: list[int]) -> list[float]:
    answer = server.post("/v1/completions", {
        "model": server.model, "prompt": token_ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0,
    })
    entries = answer["choices"][0]["prompt_logprobs"][1:]
    return [entry[str(token)]["logprob"] for entry, token in zip(entries, token_ids[1:])]


def mean_abs_diff(a, b):
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


@pytest.fixture(scope="module")
def bf16_models(models, trained_model, tmp_path_factory):
    from vllm_slim.fixtures.transplant import build_minilm_attention_llama

    return {
        "trained": trained_model,
        "minilm_attention": build_minilm_attention_llama(tmp_path_factory.mktemp("minilm") / "model"),
        "random": models("llama", dtype="bfloat16", hidden_size=256, num_heads=8),
        "well_conditioned": models("llama", dtype="bfloat16", hidden_size=256, num_heads=8, conditioning="well"),
    }


@pytest.mark.server
@pytest.mark.parametrize("which", ["trained", "minilm_attention", "random", "well_conditioned"])
def test_bf16_teacher_forced_error_within_bound_of_stock(servers, bf16_models, which):
    model = bf16_models[which]
    tokens = AutoTokenizer.from_pretrained(model)(TEXT).input_ids[:400]
    reference = prompt_logprobs(servers.get(model, "--dtype", "float32", *CHUNKS), tokens)
    stock = prompt_logprobs(servers.get(model, "--dtype", "bfloat16", *CHUNKS), tokens)
    slim_server = servers.get(model, "--dtype", "bfloat16", "--attention-backend", "slim", *CHUNKS)
    slim = prompt_logprobs(slim_server, tokens)
    stock_error, slim_error = mean_abs_diff(stock, reference), mean_abs_diff(slim, reference)
    layout = next(line for line in slim_server.log().splitlines() if "layout: K in" in line)
    print(f"{which}: mean |dlogprob| stock {stock_error:.4f} slim {slim_error:.4f} "
          f"({slim_error / stock_error:.2f}x); {layout.split('] ', 1)[-1]}")
    assert slim_error <= BOUND * stock_error
