"""`vllm-slim inspect` on fixture models: the per-layer table against numbers computed here from the
models' own modules (not from the checkpoint's tensor names), the layout slim's policy picks, and the
reasons it gives where slim does not apply. Fast: no vLLM server."""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from vllm_slim.backends.weights import QKV_LAYOUTS
from vllm_slim.cli import main
from vllm_slim.fixtures.models import ARCHS, FAMILY_ARCHS, build_model
from vllm_slim.inspection import GQA_REASON, SLIM_ATTENTION_MODULES, model_reasons, read_shape
from vllm_slim.ops.slim.policy import SlimPolicy, choose_layout

SMALL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4}
HEAD_SIZE = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models(arch, **overrides) -> a float32 fixture model dir, built once per module."""
    root, built = tmp_path_factory.mktemp("inspect-models"), {}

    def get(arch, **overrides):
        name = "-".join([arch, *(f"{k}={v}" for k, v in sorted(overrides.items()))])
        if name not in built:
            built[name] = build_model(arch, root / name, **SMALL, **overrides)
        return built[name]

    return get


def inspect_output(capsys, model_dir, *args) -> str:
    main(["inspect", str(model_dir), *args])
    return capsys.readouterr().out


def attention_projections(model) -> dict[str, tuple]:
    """module name -> (w_k, w_v, k_bias, v_bias) in K = X·W_K form, read from the model's modules."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "k_proj") and hasattr(module, "v_proj"):
            found[name] = (module.k_proj.weight.T, module.v_proj.weight.T, module.k_proj.bias, module.v_proj.bias)
        elif hasattr(module, "qkv_proj"):  # Phi-3: rows [q | k | v]
            _, w_k, w_v = module.qkv_proj.weight.chunk(3, dim=0)
            found[name] = (w_k.T, w_v.T, None, None)
        elif hasattr(module, "c_attn"):  # GPT-2 Conv1D: [hidden, q | k | v]
            w_q, w_k, w_v = module.c_attn.weight.chunk(3, dim=1)
            b_q, b_k, b_v = module.c_attn.bias.chunk(3)
            found[name] = (w_k, w_v, b_k, b_v)
        elif hasattr(module, "query_key_value"):  # GPT-NeoX: rows per head [q k v]
            heads = model.config.num_attention_heads
            weight = module.query_key_value.weight.view(heads, 3, -1, model.config.hidden_size)
            bias = module.query_key_value.bias.view(heads, 3, -1)
            rows = lambda t, i: t[:, i].reshape(heads * t.shape[2], *t.shape[3:])  # noqa: E731
            found[name] = (rows(weight, 1).T, rows(weight, 2).T, rows(bias, 1), rows(bias, 2))
    return {name: tuple(None if t is None else t.detach() for t in ws) for name, ws in found.items()}


def layer_rows(output: str, names) -> dict[str, list[str]]:
    rows = {tokens[0]: tokens for tokens in map(str.split, output.splitlines()) if tokens and tokens[0] in names}
    assert list(rows) == list(names), output
    return rows


def numbers(tokens: list[str]) -> list[float]:
    """The numeric cells of a table row: cond(W_K), then one V error per dtype."""
    values = []
    for token in tokens[1:]:
        try:
            values.append(float(token))
        except ValueError:
            pass
    return values


def expected_layouts(projections, dtypes, head_size=HEAD_SIZE, num_heads=4):
    """choose_layout as the backend calls it: weights in the model dtype, stock cache in the same dtype."""
    layouts = {}
    for dtype in dtypes:
        weights = {
            name: tuple(None if t is None else t.to(dtype) for t in ws) for name, ws in projections.items()
        }
        layouts[dtype], _ = choose_layout(weights, num_heads, head_size, dtype, dtype, False, SlimPolicy())
    return layouts


ROPE_SCALING_LINES = {  # the families whose RoPE is scaled: what inspect reports
    "qwen2": "RoPE scaling: yarn x32.0: un-RoPE divides out the table's own magnitude, exact",
    "phi3_longrope": "RoPE scaling: longrope: un-RoPE divides out the table's own magnitude, exact",
}


@pytest.mark.parametrize("arch", ARCHS + FAMILY_ARCHS)
def test_mha_table_matches_the_policy_and_the_weights(models, capsys, arch):
    model_dir = models(arch)
    output = inspect_output(capsys, model_dir, "--dtype", "float32")
    # Phi-3's sliding window (4096) is past its context (2048): never in effect, not a refusal.
    assert ROPE_SCALING_LINES.get(arch, "RoPE scaling: none") in output.splitlines()
    projections = attention_projections(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    rows = layer_rows(output, projections)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    head_size = json.loads((model_dir / "config.json").read_text()).get("head_dim") or HEAD_SIZE  # Gemma's: 24
    layouts = expected_layouts(projections, dtypes, head_size)

    assert "slim: applies" in output and "not applicable" not in output
    for index, (name, (w_k, *_)) in enumerate(projections.items()):
        assert rows[name][1] == "MHA"
        cond, *errors = numbers(rows[name])
        assert cond == pytest.approx(torch.linalg.cond(w_k.double()).item(), rel=1e-4)
        assert errors == [pytest.approx(layouts[d].layers[index].error, rel=6e-3) for d in dtypes]
    served = next(line for line in output.splitlines() if "(served)" in line)
    assert served.split(None, 2)[2] == layouts[torch.float32].table().splitlines()[-1]
    for dtype in (torch.bfloat16, torch.float16):
        assert f"  {str(dtype)[6:]:<20} {layouts[dtype].table().splitlines()[-1]}" in output
    assert f"capacity gain {layouts[torch.float32].capacity_gain:.3f}x" in output


def test_bfloat16_checkpoint_is_inspected_as_served(capsys, trained_model):
    """--dtype auto keeps a bfloat16 checkpoint's dtype, and the policy sees the weights as they are."""
    output = inspect_output(capsys, trained_model)
    projections = attention_projections(AutoModelForCausalLM.from_pretrained(trained_model, dtype=torch.float32))
    rows = layer_rows(output, projections)
    config = json.loads((trained_model / "config.json").read_text())
    heads = config["num_attention_heads"]
    layouts = expected_layouts(projections, (torch.bfloat16,), config["hidden_size"] // heads, heads)

    assert "dtype: bfloat16 (--dtype auto: the checkpoint's)" in output
    for name, (w_k, *_) in projections.items():
        assert numbers(rows[name])[0] == pytest.approx(torch.linalg.cond(w_k.double()).item(), rel=1e-4)
    assert f"bfloat16 (served)    {layouts[torch.bfloat16].table().splitlines()[-1]}" in output


@pytest.mark.parametrize("kv_heads, kind", [(2, "grouped-query"), (1, "multi-query")])
def test_gqa_says_why_slim_does_not_apply_and_prints_sata(models, kv_heads, kind):
    model_dir = models("llama", num_key_value_heads=kv_heads)
    # The console entry point, as a user runs it: a readable table and exit status 0.
    result = subprocess.run(
        [sys.executable, "-m", "vllm_slim.cli", "inspect", str(model_dir), "--dtype", "float32"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout
    assert f"slim: not applicable ({kind} attention (4 query heads, {kv_heads} KV heads)" in output
    projections = attention_projections(AutoModelForCausalLM.from_pretrained(model_dir))
    rows = layer_rows(output, projections)
    label = "MQA" if kv_heads == 1 else "GQA"
    for name, (w_k, *_) in projections.items():
        assert " ".join(rows[name][1:3]) == f"{label} 4q/{kv_heads}kv"
        assert w_k.shape == (64, kv_heads * HEAD_SIZE)
        assert numbers(rows[name])[0] == pytest.approx(torch.linalg.cond(w_k.double()).item(), rel=1e-4)
        assert rows[name][-1] == "-"  # no slim error where slim does not apply

    # SATA supports GQA: one float32 state [KV heads, m, d + 1] per layer, m = C(d + P − 1, P − 1).
    for order in (1, 3, 5):
        per_layer = kv_heads * 4 * math.comb(HEAD_SIZE + order - 1, order - 1) * (HEAD_SIZE + 1)
        stock_per_token = kv_heads * 2 * HEAD_SIZE * 4  # K and V, float32
        row = next(line for line in output.splitlines() if line.split()[:2] == [str(order), f"0..{order - 1}"])
        assert f"{2 * per_layer:,} B" in row
        assert f"{-(-per_layer // stock_per_token):,} token" in row


def test_qk_norm_model_is_refused_with_the_reason(models, capsys):
    model_dir = models("qwen3")
    output = inspect_output(capsys, model_dir, "--dtype", "float32")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    projections = attention_projections(model)
    rows = layer_rows(output, projections)
    assert "slim: not applicable (QK-norm (k_norm, q_norm) normalises each key" in output
    for name, (w_k, *_) in projections.items():
        assert " ".join(rows[name][1:3]) == "MHA, QK-norm"
        assert numbers(rows[name])[0] == pytest.approx(torch.linalg.cond(w_k.double()).item(), rel=1e-4)
    assert "sata: a fixed-size float32 state per sequence" in output


def test_unknown_layout_is_a_line_not_a_crash(tmp_path, capsys):
    # Falcon's query_key_value is not GPT-NeoX's per-head interleaving: same name, other layout.
    save_file({"transformer.h.0.self_attention.query_key_value.weight": torch.randn(192, 64)},
              tmp_path / "model.safetensors")
    config = {"architectures": ["FalconForCausalLM"], "model_type": "falcon", "hidden_size": 64,
              "num_attention_heads": 4, "num_hidden_layers": 1, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    output = inspect_output(capsys, tmp_path)
    assert "slim: not applicable (unknown attention layout: a fused query_key_value in a falcon model" in output
    assert "sata: a fixed-size float32 state per sequence" in output


def test_a_directory_without_a_model_exits_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "config.json" in capsys.readouterr().err


def test_known_architectures_name_modules_the_backend_reads():
    assert set(SLIM_ATTENTION_MODULES.values()) <= set(QKV_LAYOUTS)


@pytest.mark.parametrize("config, heads, kv", [
    ({"model_type": "falcon", "hidden_size": 4544, "num_attention_heads": 71, "num_hidden_layers": 32,
      "multi_query": True, "new_decoder_architecture": False}, 71, 1),  # Falcon-7B
    ({"model_type": "falcon", "hidden_size": 8192, "num_attention_heads": 128, "num_hidden_layers": 60,
      "new_decoder_architecture": True, "num_kv_heads": 8}, 128, 8),  # Falcon-40B
    ({"model_type": "RefinedWeb", "hidden_size": 4544, "n_head": 71, "n_layer": 32, "n_head_kv": 1}, 71, 1),
    ({"model_type": "gpt_bigcode", "n_embd": 6144, "n_head": 48, "n_layer": 40, "multi_query": True}, 48, 1),
    ({"model_type": "mpt", "d_model": 4096, "n_heads": 32, "n_layers": 32}, 32, 32),
    ({"model_type": "chatglm", "hidden_size": 4096, "num_attention_heads": 32, "num_layers": 28,
      "multi_query_attention": True, "multi_query_group_num": 2}, 32, 2),
], ids=["falcon-7b", "falcon-40b", "refinedweb", "starcoder", "mpt", "chatglm"])
def test_kv_heads_read_from_every_config_convention(tmp_path, config, heads, kv):
    """MQA and GQA checkpoints that do not use Llama's names (read from config.json alone)."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = read_shape(tmp_path)
    assert (shape.num_heads, shape.num_kv_heads) == (heads, kv)
    kind = "multi-query" if kv == 1 else "grouped-query"
    expected = [] if kv == heads else [f"{kind} attention ({heads} query heads, {kv} KV heads): {GQA_REASON}"]
    assert model_reasons(shape)[0][:1] == expected



def with_config(source, tmp_path, edit):
    """A model directory with `source`'s weights and edit(its config.json as a dict) as config.json."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(edit(json.loads((source / "config.json").read_text()))))
    (model / "model.safetensors").symlink_to(source / "model.safetensors")
    return model


@pytest.mark.parametrize("edit, message", [
    (lambda config: [config], "holds a JSON list, not an object"),
    (lambda config: {**config, "num_attention_heads": "4"}, "num_attention_heads is '4', not a positive integer"),
    (lambda config: {**config, "hidden_size": 0}, "hidden_size is 0, not a positive integer"),
    (lambda config: {**config, "num_key_value_heads": 3}, "3 KV heads cannot serve 4 attention heads"),
    (lambda config: {**config, "head_dim": 16.0}, "head_dim is 16.0, not a positive integer"),
    (lambda config: {**config, "torch_dtype": ["bfloat16"]}, "unknown torch_dtype ['bfloat16']"),
], ids=["list", "string-heads", "zero-hidden", "kv-heads", "float-head-dim", "dtype-list"])
def test_a_config_it_cannot_read_is_one_line_naming_the_field(models, tmp_path, capsys, edit, message):
    model = with_config(models("llama"), tmp_path, edit)
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(model)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unreadable_optional_fields_and_weights_are_said_not_raised(models, tmp_path, capsys):
    unreadable = {"rope_scaling": "yarn", "sliding_window": "4096", "quantization_config": "gptq"}
    model = with_config(models("llama"), tmp_path, lambda config: {**config, **unreadable})
    output = inspect_output(capsys, model)
    assert "RoPE scaling: unreadable ('yarn' is not an object)" in output
    assert "an unreadable sliding_window ('4096', not a token count)" in output
    assert "quantized weights (gptq)" in output
    # A truncated checkpoint: the reader's own error, in one line.
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").write_bytes((models("llama") / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(model)])
    assert exit_info.value.code == 2
    assert f"vllm-slim inspect: could not read {model}: " in capsys.readouterr().err


def test_a_window_shorter_than_the_context_is_served_by_slim_and_refused_by_sata(models, tmp_path, capsys):
    """Phi-3-mini-4k's case (a 2,047 window, 4,096 positions), at the fixture's size: 48 of 2,048."""
    window = {"sliding_window": 48, "max_position_embeddings": 2048}
    model = with_config(models("llama"), tmp_path, lambda config: {**config, **window})
    output = inspect_output(capsys, model, "--dtype", "float32")
    assert "slim: applies" in output
    assert "sata: not applicable (sliding-window attention (window 48, 2 of 2 layers: a SATA state cannot forget" in output
    rows = [line.split() for line in output.splitlines() if "self_attn" in line]
    assert len(rows) == 2 and all(row[1:3] == ["MHA,", "sliding"] for row in rows), rows
