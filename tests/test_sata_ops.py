"""SATA math (no vLLM): the basis reproduces the truncated series, naive = chunk = recurrent, positivity."""

import math

import pytest
import torch

from vllm_slim.ops.sata import (
    DEFAULT_ORDER,
    basis_indices,
    basis_size,
    chunk_sata_attention,
    feature_map,
    feature_size,
    initial_state,
    is_positive_order,
    multinomial_weights,
    naive_sata_attention,
    naive_softmax_attention,
    recurrent_sata_attention,
    state_bytes,
    state_size,
    truncated_exp,
)

# (head size, order) pairs kept cheap: φ has C(d+order−1, order−1) entries.
SIZES_ORDERS = [(8, 1), (8, 2), (8, 3), (8, 4), (8, 5), (16, 3), (16, 5), (32, 3), (32, 4), (64, 2), (64, 3)]


def series64(x: torch.Tensor, order: int) -> torch.Tensor:
    return sum(x.double() ** p / math.factorial(p) for p in range(order))


def assert_relative(actual, expected, rel=1e-5):
    """Elementwise within rel of the largest reference entry (outputs average values, so some sit near 0)."""
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * expected.abs().max().item())


def qkv(tokens, heads, kv_heads, head_size, head_size_v=None, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = std * torch.randn(tokens, heads, head_size, generator=g)
    k = std * torch.randn(tokens, kv_heads, head_size, generator=g)
    v = torch.randn(tokens, kv_heads, head_size_v or head_size, generator=g)
    return q, k, v


@pytest.mark.parametrize("head_size,order", SIZES_ORDERS)
def test_basis_sizes_and_weights(head_size, order):
    for p in range(order):
        rows, weights = basis_indices(head_size, p), multinomial_weights(head_size, p)
        assert rows.shape == (math.comb(head_size + p - 1, p), p) == (basis_size(head_size, p), p)
        assert torch.all(rows[:, 1:] >= rows[:, :-1]) and len(set(map(tuple, rows.tolist()))) == rows.shape[0]
        assert weights.sum().item() == head_size**p
    assert feature_size(head_size, order) == sum(basis_size(head_size, p) for p in range(order))
    assert state_size(head_size, 2 * head_size, order) == feature_size(head_size, order) * (2 * head_size + 1)
    assert state_bytes(head_size, head_size, order) == 4 * state_size(head_size, head_size, order)


def test_state_size_matches_paper():
    # Per-head (d_v+1)·C(d+P−1, P−1) at the paper's P=4: 3.11M floats at d=64, 47.2M at d=128.
    assert state_size(64, 64, 4) == 65 * 47_905 == 3_113_825
    assert state_size(128, 128, 4) == 129 * 366_145


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("head_size,order", SIZES_ORDERS)
def test_feature_inner_product_is_truncated_series(head_size, order, scale):
    g = torch.Generator().manual_seed(head_size + order)
    q, k = torch.randn(20, head_size, generator=g), torch.randn(30, head_size, generator=g)
    factor = head_size**-0.5 if scale is None else scale
    got = feature_map(q, order, factor) @ feature_map(k, order, factor).T
    expected = series64((q.double() @ k.double().T) * factor, order)
    # float32 sums of terms as large as e^|x|, which the series can cancel down from.
    atol = 1e-6 * series64((q.double() @ k.double().T).abs() * factor, order).max().item()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("order, head_size", [(1, 64), (3, 64), (3, 8), (5, 16), (7, 4)])
def test_feature_map_by_slices_equals_the_gather(order, head_size):
    """The CPU's form and the one GPUs run: the same products, up to float32 rounding (from degree 5 on,
    the factors are multiplied in another order; below that the two agree bit for bit here)."""
    x = torch.randn(3, 50, head_size, generator=torch.Generator().manual_seed(order)).bfloat16()
    gathered = feature_map(x, order, 0.125, by_slices=False)
    assert gathered.shape == (3, 50, feature_size(head_size, order))
    exact = order <= 5
    torch.testing.assert_close(
        feature_map(x, order, 0.125, by_slices=True), gathered, rtol=0 if exact else 1e-6, atol=0
    )


@pytest.mark.parametrize("order", [1, 3, 5, 7, 9])
def test_odd_orders_stay_positive(order):
    x = -torch.logspace(-3, 4, 2000, dtype=torch.float64)
    assert is_positive_order(order)
    # The minimum, x^{P−1}/(P−1)! at the series' stationary point, shrinks with P but stays > 0.
    minimum = {1: 1, 3: 0.5, 5: 0.2704, 7: 0.1493, 9: 0.0833}[order]
    assert truncated_exp(x, order).min().item() == pytest.approx(minimum, rel=1e-3)


def test_paper_default_order_goes_negative():
    # P=4 ends on degree 3: 1 + x + x²/2 + x³/6 crosses zero at x ≈ −1.596, so SATA's paper default gives
    # negative attention weights (and possibly a vanishing normalizer) for logits below that.
    assert not is_positive_order(4) and not is_positive_order(2) and is_positive_order(DEFAULT_ORDER)
    x = torch.tensor([-1.59, -1.60, -3.0, -10.0], dtype=torch.float64)
    assert truncated_exp(x, 4)[0] > 0 and torch.all(truncated_exp(x, 4)[1:] < 0)
    assert torch.all(truncated_exp(torch.tensor([-2.19, -5.0]), 6) < 0)


@pytest.mark.parametrize("tokens,chunk_size", [(1, 64), (7, 3), (64, 24), (130, 48)])
@pytest.mark.parametrize("head_size,order", [(8, 1), (8, 2), (8, 3), (8, 4), (8, 5), (16, 3), (32, 3), (64, 3)])
def test_forms_match_naive(head_size, order, tokens, chunk_size):
    # Even orders go negative (below x = −1 for P=2, −1.6 for P=4); logits of std 0.36 keep the normalizer off 0.
    std = 1.0 if is_positive_order(order) else 0.6
    q, k, v = qkv(tokens, 4, 2, head_size, std=std, seed=tokens)
    ref = naive_sata_attention(q, k, v, order=order)
    chunked, chunk_state = chunk_sata_attention(q, k, v, order=order, chunk_size=chunk_size)
    recurrent, recurrent_state = recurrent_sata_attention(q, k, v, order=order)
    assert_relative(chunked, ref)
    assert_relative(recurrent, ref)
    assert_relative(chunk_state.numerator, recurrent_state.numerator)
    assert_relative(chunk_state.normalizer, recurrent_state.normalizer)


@pytest.mark.parametrize("heads,kv_heads,head_size_v", [(4, 4, 8), (4, 1, 8), (6, 2, 12), (2, 2, 5)])
def test_forms_match_naive_across_head_layouts(heads, kv_heads, head_size_v):
    q, k, v = qkv(37, heads, kv_heads, 8, head_size_v, seed=heads)
    ref = naive_sata_attention(q, k, v, scale=0.4)
    assert_relative(chunk_sata_attention(q, k, v, scale=0.4, chunk_size=10)[0], ref)
    assert_relative(recurrent_sata_attention(q, k, v, scale=0.4)[0], ref)


@pytest.mark.parametrize("head_size,order", [(8, 5), (16, 3), (64, 3)])
def test_state_carries_across_calls(head_size, order):
    """Prefill in two pieces, decode steps, prefill again: one naive pass over the whole sequence."""
    q, k, v = qkv(100, 4, 2, head_size, seed=3)
    state = initial_state(2, head_size, head_size, order)
    outputs = []
    for start, stop, form in [(0, 45, "chunk"), (45, 70, "chunk"), (70, 75, "recurrent"), (75, 100, "chunk")]:
        piece = (q[start:stop], k[start:stop], v[start:stop])
        if form == "chunk":
            out, state = chunk_sata_attention(*piece, state, order=order, chunk_size=16)
        else:
            for t in range(stop - start):
                out, state = recurrent_sata_attention(*(x[t : t + 1] for x in piece), state, order=order)
                outputs.append(out)
            continue
        outputs.append(out)
    assert_relative(torch.cat(outputs), naive_sata_attention(q, k, v, order=order))


def test_given_state_is_not_modified():
    q, k, v = qkv(9, 2, 2, 8)
    _, state = chunk_sata_attention(q, k, v)
    before = (state.numerator.clone(), state.normalizer.clone())
    chunk_sata_attention(q, k, v, state)
    recurrent_sata_attention(q, k, v, state)
    assert torch.equal(state.numerator, before[0]) and torch.equal(state.normalizer, before[1])


def test_mismatched_state_or_heads_are_refused():
    q, k, v = qkv(5, 4, 2, 8)
    with pytest.raises(ValueError, match="feature size"):
        chunk_sata_attention(q, k, v, initial_state(2, 8, 8, order=5), order=3)
    with pytest.raises(ValueError, match="multiple"):
        recurrent_sata_attention(*qkv(5, 3, 2, 8))


def test_low_precision_inputs_keep_float32_state():
    q, k, v = qkv(40, 4, 2, 16)
    ref = naive_sata_attention(q, k, v)
    out, state = chunk_sata_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), chunk_size=16)
    assert out.dtype == torch.bfloat16 and state.numerator.dtype == state.normalizer.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    out, state = recurrent_sata_attention(q.half(), k.half(), v.half(), state)
    assert out.dtype == torch.float16 and state.numerator.dtype == torch.float32


def test_higher_orders_approach_softmax():
    """On N(0,1)-sized logits the error to exact softmax falls with every added even degree."""
    q, k, v = qkv(256, 4, 2, 16, seed=5)
    q, k, v = q.double(), k.double(), v.double()  # so the comparison measures truncation, not rounding
    exact = naive_softmax_attention(q, k, v)
    errors = [(naive_sata_attention(q, k, v, order=order) - exact).norm() / exact.norm() for order in (1, 3, 5, 7)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05  # 3.2 % here: each two degrees cut it about threefold
