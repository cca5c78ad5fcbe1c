"""Slim math (no vLLM): projection identity, and naive = parallel = decode."""

import pytest
import torch

from vllm_slim.ops.slim import (
    Rotary,
    decode_slim_attention,
    naive_slim_attention,
    parallel_slim_attention,
    rebuild_values,
    rotate,
    solve_projection,
    cache_rows,
    unrope,
)


def rope_table(max_pos: int, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def make_layer(heads, head_size, bias, spill, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = heads * head_size
    w_k = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    w_v = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    b_k = torch.randn(d, generator=g, dtype=torch.float64) if bias else None
    b_v = torch.randn(d, generator=g, dtype=torch.float64) if bias else None
    return w_k, w_v, b_k, b_v, solve_projection(w_k, w_v, b_k, b_v, heads, spill)


@pytest.mark.parametrize("spill", [0, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_rebuilt_values_equal_projected_values(spill, bias):
    heads, head_size, tokens = 4, 8, 50
    w_k, w_v, b_k, b_v, proj = make_layer(heads, head_size, bias, spill)
    x = torch.randn(tokens, heads * head_size, dtype=torch.float64)
    k = x @ w_k + (b_k if bias else 0)
    v = x @ w_v + (b_v if bias else 0)
    k3, v3 = k.view(tokens, heads, head_size), v.view(tokens, heads, head_size)
    _, s = cache_rows(k3, v3, proj)
    if spill:  # the spill is X's coordinates along W_K's weakest directions
        u, _, _ = torch.linalg.svd(w_k)
        torch.testing.assert_close(s.double(), x @ u[:, -spill:], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(rebuild_values(k3, s, proj).double(), v3, rtol=1e-3, atol=1e-3)


def test_spill_removes_amplified_rounding():
    """bf16-rounded K, W_K with 8 weak directions: spilling them brings V to stock error."""
    heads, head_size, tokens = 4, 16, 400
    d = heads * head_size
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    sigma = torch.ones(d, dtype=torch.float64)
    sigma[-8:] = torch.logspace(-2, -4, 8, dtype=torch.float64)  # cond 1e4
    w_k = u @ torch.diag(sigma) @ w.T
    w_v = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    x = torch.randn(tokens, d, generator=g, dtype=torch.float64)
    k_bf16 = (x @ w_k).bfloat16().view(tokens, heads, head_size)
    v = (x @ w_v).view(tokens, heads, head_size)

    def v_error(spill):
        proj = solve_projection(w_k, w_v, None, None, heads, spill)
        _, s = cache_rows(k_bf16, v.bfloat16(), proj)
        s = s.bfloat16()
        return ((rebuild_values(k_bf16, s, proj).double() - v).norm() / v.norm()).item()

    stock = ((v.bfloat16().double() - v).norm() / v.norm()).item()
    assert v_error(0) > 100 * stock
    assert v_error(4) > 10 * stock
    assert v_error(8) < 1.5 * stock


@pytest.mark.parametrize("neox", [True, False])
def test_unrope_inverts_rope(neox):
    table = rope_table(64, 16)
    rotary = Rotary(table, 16, neox)
    k = torch.randn(64, 3, 32)
    pos = torch.arange(64)
    kr = rotate(k, pos, rotary)
    assert not torch.allclose(kr[1:], k[1:])
    torch.testing.assert_close(kr[..., 16:], k[..., 16:])  # partial rotary: tail untouched
    torch.testing.assert_close(unrope(kr, pos, rotary), k, rtol=1e-5, atol=1e-5)


FORMS = [parallel_slim_attention, decode_slim_attention]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("q_len,ctx_len", [(1, 0), (1, 37), (5, 0), (7, 64), (40, 9)])
@pytest.mark.parametrize("rope", ["none", "neox", "gptj_partial"])
@pytest.mark.parametrize("spill,bias,with_v_new", [(0, False, False), (8, True, True), (4, True, False)])
def test_forms_match_naive(form, q_len, ctx_len, rope, spill, bias, with_v_new):
    heads, head_size = 4, 16
    _, w_v, _, _, proj = make_layer(heads, head_size, bias, spill, seed=q_len + ctx_len)
    rotary = {
        "none": None,
        "neox": Rotary(rope_table(256, head_size), head_size, True),
        "gptj_partial": Rotary(rope_table(256, 8), 8, False),
    }[rope]
    kv_len = ctx_len + q_len
    g = torch.Generator().manual_seed(7)
    q = torch.randn(q_len, heads, head_size, generator=g)
    k = torch.randn(kv_len, heads, head_size, generator=g)
    s = torch.randn(kv_len, spill, generator=g) if spill else None
    v_new = torch.randn(q_len, heads, head_size, generator=g) if with_v_new else None
    ref = naive_slim_attention(q, k, s, proj, rotary, 0.25, v_new)
    got = form(q, k, s, proj, rotary, 0.25, v_new)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
