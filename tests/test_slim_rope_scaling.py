"""Slim against vLLM's own rotary embeddings, every scaling a MHA checkpoint ships with, without a server:
the table slim finds rotates keys as the module does, and un-RoPE gives the raw key back exactly, at
positions past the original context too. YaRN's and longrope's tables carry a magnitude (mscale): rotating
back by the same angles left V times mscale² (1.045 at YaRN factor 1.25, under the old 5 % check)."""

import math

import pytest
import torch

from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers import rotary_embedding
from vllm.model_executor.layers.rotary_embedding import get_rope, phi3_long_rope_scaled_rope
from vllm_slim.backends.weights import _model_rotation, _vllm_rotary
from vllm_slim.ops.slim import solve_projection
from vllm_slim.ops.slim.cache import binding_error
from vllm_slim.ops.slim.rope import rotate, unrope

HEAD_SIZE, ORIGINAL = 32, 256
LONG = [1.0 + i / 8 for i in range(HEAD_SIZE // 2)]  # longrope's per-frequency factors (Phi-3's shape)
SCALINGS = {
    "default": {"rope_type": "default"},
    "partial_0.5": {"rope_type": "default", "partial_rotary_factor": 0.5},
    "linear_4": {"rope_type": "linear", "factor": 4.0},
    "dynamic_4": {"rope_type": "dynamic", "factor": 4.0},
    "llama3_8": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
    },
    "yarn_1.25": {"rope_type": "yarn", "factor": 1.25, "original_max_position_embeddings": ORIGINAL},
    "yarn_4": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "longrope_short": {
        "rope_type": "longrope", "short_factor": [1.0] * (HEAD_SIZE // 2), "long_factor": LONG,
        "original_max_position_embeddings": ORIGINAL,
    },
    "longrope_long": {
        "rope_type": "longrope", "short_factor": [1.0] * (HEAD_SIZE // 2), "long_factor": LONG,
        "original_max_position_embeddings": ORIGINAL,
    },
}


def vllm_rope(name, monkeypatch):
    """vLLM's rotary module for a config with `max_position_embeddings` 4x the original context."""
    parameters = {"rope_theta": 10000.0, **SCALINGS[name]}
    # longrope picks its long table for good when the served length passes the original context.
    served = 4 * ORIGINAL if name == "longrope_long" else ORIGINAL
    config = type("C", (), {"model_config": type("M", (), {"max_model_len": served})()})()
    monkeypatch.setattr(phi3_long_rope_scaled_rope, "get_current_vllm_config", lambda: config)
    # vLLM caches modules by their arguments; longrope's also depends on the served length.
    monkeypatch.setattr(rotary_embedding, "_ROPE_DICT", {})
    with set_current_vllm_config(VllmConfig()):  # vLLM's custom ops read it when built
        return get_rope(HEAD_SIZE, 4 * ORIGINAL, True, parameters, torch.float32)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_unrope_inverts_vllms_rotary_embedding(name, monkeypatch):
    rope = vllm_rope(name, monkeypatch)
    rotary, rotate_keys = _vllm_rotary(rope, "layer", torch.device("cpu")), _model_rotation(rope)
    positions = torch.cat((torch.arange(8), torch.randint(0, rotary.cos_sin.shape[0], (56,))))
    keys = torch.randn(64, 3, HEAD_SIZE, dtype=torch.float64)
    by_model = rotate_keys(keys.float(), positions)
    # The table found rotates as the module does (NeoX pairs, partial rotary, the magnitude) ...
    torch.testing.assert_close(rotate(keys.float(), positions, rotary), by_model, rtol=1e-5, atol=1e-5)
    # ... and its inverse gives the raw keys back, magnitude included.
    raw = unrope(by_model.double(), positions, rotary)
    assert ((raw - keys).norm() / keys.norm()).item() < 1e-6
    magnitude = rotary.cos_sin[:, : rotary.rotary_dim // 2].square() + rotary.cos_sin[:, rotary.rotary_dim // 2 :].square()
    if name.startswith(("yarn", "longrope_long")):
        assert magnitude.min() > 1.01, "a scaled table: the case the inverse table is for"


@pytest.mark.parametrize("name", ["default", "yarn_1.25", "longrope_long"])
def test_binding_check_passes_scaled_rope(name, monkeypatch):
    """The start-up check on the model's own rotation at positions up to the end of the table: with the
    magnitude divided out the rebuilt V is at float32 rounding (YaRN 1.25 was off by 4.5 %)."""
    rope = vllm_rope(name, monkeypatch)
    rotary, rotate_keys = _vllm_rotary(rope, "layer", torch.device("cpu")), _model_rotation(rope)
    heads, hidden = 2, 2 * HEAD_SIZE
    g = torch.Generator().manual_seed(0)
    w_k, w_v = (torch.randn(hidden, hidden, generator=g) / math.sqrt(hidden) for _ in range(2))
    proj = solve_projection(w_k, w_v, None, None, heads, 0)
    positions = torch.linspace(0, rotary.cos_sin.shape[0] - 1, 64).long()
    error = binding_error(w_k, w_v, None, None, proj, rotary, rotate_keys, torch.float32, torch.float32, positions)
    assert error < 2e-4  # float32 rounding through a random W_K (cond ~100); 4.5e-2 before, at YaRN 1.25
