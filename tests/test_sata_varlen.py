"""The served SATA form batched over a step: ragged prefills and decodes of several sequences together,
each continuing from its own paged state, against the quadratic references run per sequence."""

import pytest
import torch

from vllm_slim.ops.sata import chunk_sata_varlen, feature_size, naive_hybrid_sata_attention, naive_sata_attention, state_size
from vllm_slim.ops.sata.cpu_kernel import fused_decode_sata


def run_steps(sequences, steps, num_kv_heads, head_size, options, num_pages=9, chunk_size=5):
    """Feed each sequence's q, k, v in the given steps: steps[j] = {sequence: tokens this step}; sequences
    share one call per step, their states at scattered pages. Returns each sequence's outputs."""
    order, sink_tokens, window = options["order"], options["sink_tokens"], options["window"]
    floats = state_size(head_size, head_size, order, sink_tokens + window)
    pages = torch.randn(num_pages, num_kv_heads, floats) * 100  # garbage: a reset must clear it
    page_of = {s: 1 + (3 * s) % (num_pages - 1) for s in range(len(sequences))}
    seen = [0] * len(sequences)
    outputs = [[] for _ in sequences]
    for step in steps:
        order_in_batch = sorted(step, key=lambda s: step[s])  # decodes first, as vLLM orders a batch
        qs, ks, vs, lens = [], [], [], []
        for s in order_in_batch:
            q, k, v = sequences[s]
            part = slice(seen[s], seen[s] + step[s])
            qs.append(q[part]), ks.append(k[part]), vs.append(v[part]), lens.append(step[s])
        query_start_loc = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
        context = torch.tensor([seen[s] for s in order_in_batch])
        out = chunk_sata_varlen(
            torch.cat(qs), torch.cat(ks), torch.cat(vs), query_start_loc, context, max(lens), pages,
            torch.tensor([page_of[s] for s in order_in_batch]), context == 0, head_size**-0.5,
            chunk_size=chunk_size, **options,
        )
        for i, s in enumerate(order_in_batch):
            outputs[s].append(out[query_start_loc[i] : query_start_loc[i + 1]])
            seen[s] += step[s]
    return [torch.cat(o) for o in outputs]


def make_sequences(lengths, heads, kv_heads, head_size, std=1.2):
    g = torch.Generator().manual_seed(sum(lengths))
    return [
        tuple(std * torch.randn(n, h, head_size, generator=g) for h in (heads, kv_heads, kv_heads)) for n in lengths
    ]


STEPS = [  # sequence -> tokens: ragged prefills, chunked prefill beside decodes, single-token decodes
    {0: 12, 1: 1, 2: 7},
    {0: 1, 1: 9, 2: 1},
    {0: 1, 1: 1, 2: 20, 3: 3},
    {0: 1, 1: 1, 2: 1, 3: 1},
    {0: 6, 2: 1, 3: 11},
]


@pytest.mark.parametrize("heads,kv_heads,head_size", [(4, 4, 8), (4, 2, 8), (2, 1, 16)])
@pytest.mark.parametrize("order,sink_tokens,window", [(3, 0, 0), (1, 0, 0), (5, 0, 0), (3, 2, 4), (3, 0, 1), (3, 3, 16)])
def test_batched_steps_equal_the_reference_per_sequence(heads, kv_heads, head_size, order, sink_tokens, window):
    lengths = [sum(step.get(s, 0) for step in STEPS) for s in range(4)]
    sequences = make_sequences(lengths, heads, kv_heads, head_size)
    options = dict(order=order, sink_tokens=sink_tokens, window=window)
    got = run_steps(sequences, STEPS, kv_heads, head_size, options)
    for (q, k, v), out in zip(sequences, got):
        q, k, v = q.double(), k.double(), v.double()
        if window:
            ref = naive_hybrid_sata_attention(q, k, v, None, order, sink_tokens, window)
        else:
            ref = naive_sata_attention(q, k, v, None, order)
        torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)


def test_padded_rows_and_other_pages_are_left_alone():
    """A row whose state index is the null block (0) and holds no tokens changes no other page."""
    heads, head_size = 2, 8
    floats = state_size(head_size, head_size, 3)
    pages = torch.randn(4, heads, floats)
    before = pages.clone()
    q, k, v = make_sequences([3], heads, heads, head_size)[0]
    out = chunk_sata_varlen(
        q, k, v, torch.tensor([0, 3, 3]), torch.tensor([0, 0]), 3, pages, torch.tensor([2, 0]),
        torch.tensor([True, True]), head_size**-0.5,
    )
    torch.testing.assert_close(out.double(), naive_sata_attention(q.double(), k.double(), v.double()), rtol=2e-5, atol=2e-5)
    assert torch.equal(pages[[1, 3]], before[[1, 3]])
    assert feature_size(head_size, 3) * (head_size + 1) == floats


@pytest.mark.parametrize("heads,kv_heads,head_size,order", [(4, 4, 8, 3), (4, 2, 8, 1), (2, 1, 16, 5), (8, 8, 16, 3)])
def test_fused_cpu_decode_equals_the_chunk_form(heads, kv_heads, head_size, order):
    """The fused CPU decode (one token per sequence, states in place) against the chunk form on the same
    pages: states carried, a state reset (its page holding garbage), a padded row on the null block."""
    floats = state_size(head_size, head_size, order)
    g = torch.Generator().manual_seed(order)
    pages = torch.randn(6, kv_heads, floats, generator=g)
    context = torch.tensor([5, 0, 9, 0])  # the second starts afresh on garbage; the last is padding
    indices = torch.tensor([3, 1, 4, 0])
    q, k, v = (torch.randn(4, h, head_size, generator=g) for h in (heads, kv_heads, kv_heads))
    reference_pages = pages.clone()
    chunk = chunk_sata_varlen(
        q, k, v, torch.arange(5), context, 1, reference_pages, indices, context == 0, head_size**-0.5, order=order
    )
    fused = fused_decode_sata(q, k, v, pages, indices, context == 0, head_size**-0.5, order)
    torch.testing.assert_close(fused[:3], chunk[:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pages[1:], reference_pages[1:], rtol=1e-5, atol=1e-5)  # the null block aside
