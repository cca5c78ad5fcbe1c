"""Hybrid (exact sink and window keys, truncated series for older ones): the reference's limits and a hand
case, and the served chunk form against the reference."""

import math

import pytest
import torch

from vllm_slim.ops.sata import (
    chunk_hybrid_sata_attention,
    feature_map,
    naive_hybrid_sata_attention,
    naive_sata_attention,
    naive_softmax_attention,
)
from vllm_slim.ops.sata.chunk import slot_positions


def qkv(tokens, heads, kv_heads, head_size, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = std * torch.randn(tokens, heads, head_size, generator=g, dtype=torch.float64)
    k = std * torch.randn(tokens, kv_heads, head_size, generator=g, dtype=torch.float64)
    v = torch.randn(tokens, kv_heads, head_size, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("sink_tokens", [0, 3])
def test_window_covering_all_tokens_is_exact_softmax(heads, kv_heads, sink_tokens):
    # std 3 gives logits of several units, where the series alone would be far off.
    q, k, v = qkv(40, heads, kv_heads, 8, std=3.0)
    for window in (40, 100):
        torch.testing.assert_close(
            naive_hybrid_sata_attention(q, k, v, None, 3, sink_tokens, window), naive_softmax_attention(q, k, v)
        )


@pytest.mark.parametrize("order", [1, 3, 5])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_no_sinks_no_window_is_plain_sata(order, heads, kv_heads):
    q, k, v = qkv(40, heads, kv_heads, 8)
    torch.testing.assert_close(
        naive_hybrid_sata_attention(q, k, v, 0.3, order, 0, 0), naive_sata_attention(q, k, v, 0.3, order)
    )


def test_sinks_alone_cover_a_short_sequence():
    q, k, v = qkv(5, 2, 2, 4, std=2.0)
    torch.testing.assert_close(naive_hybrid_sata_attention(q, k, v, None, 3, 5, 0), naive_softmax_attention(q, k, v))


def test_hand_computed_case():
    # One head, d = 1, scale 1: logits are q_t·k_s. Tokens 0..3, 1 sink, window 1 (the query itself), order 3.
    q = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64).view(4, 1, 1)
    k = torch.tensor([1.0, -1.0, 2.0, 3.0], dtype=torch.float64).view(4, 1, 1)
    v = torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=torch.float64).view(4, 1, 1)
    out = naive_hybrid_sata_attention(q, k, v, 1.0, 3, 1, 1)[:, 0, 0]

    def series(x):
        return 1 + x + x * x / 2

    # Query 3 (q = 0.5): key 0 is the sink, key 3 is the query itself, keys 1 and 2 use the series.
    weights = [math.exp(0.5), series(-0.5), series(1.0), math.exp(1.5)]
    expected_3 = sum(w * x for w, x in zip(weights, [10, 20, 30, 40])) / sum(weights)
    # Query 2 (q = −1): sink key 0, series key 1 (x = 1), exact key 2 (x = −2).
    weights = [math.exp(-1.0), series(1.0), math.exp(-2.0)]
    expected_2 = sum(w * x for w, x in zip(weights, [10, 20, 30])) / sum(weights)
    # Queries 0 and 1 see only exact keys (sink and self): plain softmax.
    expected_1 = (math.exp(2.0) * 10 + math.exp(-2.0) * 20) / (math.exp(2.0) + math.exp(-2.0))
    torch.testing.assert_close(out, torch.tensor([10.0, expected_1, expected_2, expected_3], dtype=torch.float64))


def test_large_logits_stay_finite_in_float32():
    # Logits in the hundreds, both signs: exp over- or underflows in float32 without the shared offset.
    q, k, v = qkv(16, 2, 2, 8)
    q, k, v = 20 * q.float(), 20 * k.float(), v.float()
    out = naive_hybrid_sata_attention(q, k, v, None, 3, 2, 4)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    expected = naive_hybrid_sata_attention(q.double(), k.double(), v.double(), None, 3, 2, 4)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


# ---- the served form: chunk_hybrid_sata_attention over its fixed-size state ----


def split_run(q, k, v, splits, **options):
    """The chunk form over `q, k, v` fed in calls of the given lengths, the state carried between them."""
    outs, state, seen = [], None, 0
    for length in splits:
        part = slice(seen, seen + length)
        out, state = chunk_hybrid_sata_attention(q[part], k[part], v[part], state, seen, **options)
        outs.append(out)
        seen += length
    return torch.cat(outs), state


@pytest.mark.parametrize("sink_tokens,window", [(0, 1), (4, 8), (2, 16), (4, 128)])
@pytest.mark.parametrize("heads,kv_heads,head_size", [(4, 4, 8), (4, 2, 16), (2, 1, 64)])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunk_form_equals_the_reference_across_calls(sink_tokens, window, heads, kv_heads, head_size, chunk_size):
    q, k, v = (x.float() for x in qkv(150, heads, kv_heads, head_size, std=1.5, seed=head_size + window))
    options = dict(scale=None, order=3, sink_tokens=sink_tokens, window=window)
    reference = naive_hybrid_sata_attention(q.double(), k.double(), v.double(), **options)
    for splits in ([150], [1, 36, 1, 1, 111], [70, 80]):  # ragged prefill chunks and single-token decode
        out, _ = split_run(q, k, v, splits, chunk_size=chunk_size, **options)
        torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)


def test_chunk_form_holds_large_logits_on_one_scale():
    # logits of several tens: exp(x) alone would be 1e17 and more; the shared offset keeps both parts finite
    q, k, v = (x.float() for x in qkv(80, 2, 2, 16, std=3.0, seed=5))
    options = dict(scale=None, order=3, sink_tokens=2, window=8)
    out, _ = split_run(q, k, v, [30, 1, 49], **options)
    reference = naive_hybrid_sata_attention(q.double(), k.double(), v.double(), **options)
    assert out.isfinite().all()
    torch.testing.assert_close(out.double(), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("splits", [[10], [8, 1, 1]], ids=["prefill", "decode"])
@pytest.mark.parametrize("window", [2, 10], ids=["series", "no_series"])
def test_chunk_form_holds_exact_logits_far_below_the_series(splits, window):
    """One head, d = 1, scale 1: the first 8 keys give logit 40 (series weight T(40) = 841 once they leave
    a window of 2), the last 2 give -300, exact: scaled by the exact part's largest logit alone, the series
    would be weighted by e^300, past float32's range; with a window of 10 nothing enters the series, and
    e^300 times its empty read must not be NaN either (the reference is finite in both)."""
    q = torch.full((10, 1, 1), 20.0)
    k = torch.cat((torch.full((8, 1, 1), 2.0), torch.full((2, 1, 1), -15.0)))
    k[:8] = k[:8] if window == 2 else -15.0
    v = torch.randn(10, 1, 3, generator=torch.Generator().manual_seed(0))
    options = dict(scale=1.0, order=3, sink_tokens=0, window=window)
    out, _ = split_run(q, k, v, splits, **options)
    reference = naive_hybrid_sata_attention(q.double(), k.double(), v.double(), **options)
    assert out.isfinite().all()
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)


def test_state_holds_the_sinks_the_last_window_and_folds_the_rest():
    q, k, v = (x.float() for x in qkv(50, 2, 2, 8, seed=3))
    _, state = split_run(q, k, v, [23, 27], scale=None, order=3, sink_tokens=3, window=5, chunk_size=4)
    positions = slot_positions(torch.tensor(50), 3, 5)
    assert positions.tolist() == [0, 1, 2, 48, 49, 45, 46, 47]  # position p ≥ 3 in slot 3 + (p − 3) mod 5
    torch.testing.assert_close(state.keys, k[positions].transpose(0, 1))
    torch.testing.assert_close(state.values, v[positions].transpose(0, 1))
    # the series state is Σ φ(k) over positions 3..44, nothing else
    phi = feature_map(k[3:45], 3, 8**-0.5)
    torch.testing.assert_close(state.series.normalizer, phi.sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        state.series.numerator, torch.einsum("shm,shv->hmv", phi, v[3:45]), rtol=1e-5, atol=1e-5
    )


def test_chunk_form_refuses_an_empty_window():
    q, k, v = (x.float() for x in qkv(4, 2, 2, 8))
    with pytest.raises(ValueError, match="window of at least 1"):
        chunk_hybrid_sata_attention(q, k, v, window=0)
