"""Sata's Triton prefill (`ops/sata/triton_prefill.py`), plain and hybrid, against the chunk form (output and
every page after) and against the naive references over sequences prefilled in several steps: on the CPU under
Triton's interpreter at small shapes (GQA and MHA, d_v ≠ d, orders 1, 3 and 5, ragged new-token counts past a
query block, continued states, a reset over a garbage page, permuted and strided state indices, pages with
trailing floats, q/k/v as strided views of one fused projection, bf16 and float32; for the hybrid, sinks and
none, prompts shorter and longer than the window, continuations whose stored ring slots leave the window
during the step, two tiles of exact slots, logits 40 times the usual and exact logits below −88), and,
marked `gpu`, compiled on CUDA at Llama-7B's (plain) and Llama-3-8B's (hybrid) shapes."""

import pytest
import torch
import triton

from test_sata_triton import clear_empty_slots
from vllm_slim.ops.sata import (
    chunk_sata_varlen,
    feature_map,
    feature_size,
    naive_hybrid_sata_attention,
    naive_sata_attention,
    state_size,
)
from vllm_slim.ops.sata.chunk import slot_positions, split_state_page
from vllm_slim.ops.sata.triton_prefill import KEY_BLOCK, READ_ROWS, triton_prefill_sata

SPARE = 5  # trailing floats a page: the stride of a hybrid page, whose exact keys this prefill leaves alone


def fused_qkv(tokens, heads, kv_heads, head_size, head_size_v, dtype, generator, device="cpu"):
    """q [T, H, d], k [T, Hkv, d], v [T, Hkv, d_v] in `dtype`: views of one [T, ...] projection, as vLLM
    splits its fused QKV (token stride larger than a row)."""
    widths = (heads * head_size, kv_heads * head_size, kv_heads * head_size_v)
    qkv = torch.randn(tokens, sum(widths), generator=generator, device=device).to(dtype)
    q, k, v = qkv.split(widths, -1)
    return q.view(tokens, heads, head_size), k.view(tokens, kv_heads, head_size), v.view(tokens, kv_heads, head_size_v)


def both_forms(lens, context, qkv, pages, expected_pages, indices, reset, scale, order):
    """One step of sequences with `lens` new tokens after `context` ones: (kernel, chunk form) outputs, the
    kernel on `pages`, the chunk form on `expected_pages` (their series floats)."""
    device = pages.device
    starts = torch.tensor([0, *lens], device=device).cumsum(0)
    reset = torch.tensor(reset, device=device)
    got = triton_prefill_sata(*qkv, starts, max(lens), pages, indices, reset, scale, order)
    expected = chunk_sata_varlen(
        *qkv, starts, torch.tensor(context, device=device), max(lens), expected_pages[..., :-SPARE], indices,
        reset, scale, order=order,
    )
    return got, expected


@pytest.mark.parametrize("heads,kv_heads,head_size,head_size_v,order,dtype", [
    (6, 2, 8, 8, 3, torch.float32),  # GQA of 3 heads (padded to 4): query blocks of 16 tokens
    (2, 2, 8, 20, 5, torch.bfloat16),  # MHA, d_v ≠ d: 495 basis rows, 4 readout and 2 update tiles, the last partial
    (2, 1, 16, 16, 1, torch.bfloat16),  # GQA of 2 heads, order 1: the mean of the values
])
def test_triton_prefill_equals_the_chunk_form(heads, kv_heads, head_size, head_size_v, order, dtype):
    """Two steps over pages of garbage at permuted pages through a strided index tensor. The first
    starts two sequences (3 and 6 tokens); the second continues them with 1 and 5 tokens and resets a
    third over a garbage page with more tokens than a query block and a key block (GQA of 3 heads: 3
    query blocks). Outputs and every page after each step (the untouched ones and the trailing floats
    included) equal the chunk form's."""
    g = torch.Generator().manual_seed(0)
    floats = feature_size(head_size, order) * (head_size_v + 1) + SPARE
    pages = torch.randn(6, kv_heads, floats, generator=g)
    expected_pages = pages.clone()
    indices = torch.tensor([4, 9, 0, 9, 2, 9])[::2]
    long = max(READ_ROWS // triton.next_power_of_2(heads // kv_heads), KEY_BLOCK) + 5
    scale = head_size**-0.5
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding
    steps = (([3, 6], [0, 0], [True, True]), ([1, 5, long], [3, 6, 0], [False, False, True]))
    for lens, context, reset in steps:
        qkv = fused_qkv(sum(lens), heads, kv_heads, head_size, head_size_v, dtype, g)
        got, expected = both_forms(lens, context, qkv, pages, expected_pages, indices[: len(lens)], reset, scale, order)
        assert got.dtype == dtype and got.shape == (sum(lens), heads, head_size_v)
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(pages, expected_pages, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order,dtype", [(3, torch.float32), (5, torch.bfloat16)])
def test_prefilled_sequences_equal_the_naive_reference(order, dtype):
    """Two sequences of GQA heads (9 and 45 tokens) prefilled through the kernel in two steps (a reset,
    then a continuation): the outputs of both steps together are the quadratic reference's."""
    heads, kv_heads, head_size = 4, 2, 8
    g = torch.Generator().manual_seed(1)
    lens, split = (9, 45), (4, 38)
    q, k, v = (torch.randn(2, 45, h, head_size, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads))
    pages = torch.randn(3, kv_heads, feature_size(head_size, order) * (head_size + 1), generator=g)
    indices = torch.tensor([2, 0])
    got = [[], []]
    for step, reset in enumerate((True, False)):
        parts = [slice(0, split[s]) if step == 0 else slice(split[s], lens[s]) for s in range(2)]
        new = [p.stop - p.start for p in parts]
        starts = torch.tensor([0, *new]).cumsum(0)
        packed = (torch.cat([x[s, parts[s]] for s in range(2)]) for x in (q, k, v))
        out = triton_prefill_sata(*packed, starts, max(new), pages, indices, torch.full((2,), reset), 0.4, order)
        for s in range(2):
            got[s].append(out[starts[s] : starts[s + 1]])
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for s in range(2):
        n = lens[s]
        expected = naive_sata_attention(q[s, :n].double(), k[s, :n].double(), v[s, :n].double(), 0.4, order)
        torch.testing.assert_close(torch.cat(got[s]).double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_prefill_on_cuda_at_llama7b_shape():
    """Compiled (not interpreted): 32 heads x 128 at order 3 (8,385 basis rows, 4.3 MB of state a head),
    bf16, against the chunk form on the same GPU: a sequence of 300 new tokens reset over a garbage page
    beside one of 50 continuing a state of 20 tokens (set up by a first step); output and pages."""
    heads, head_size, order = 32, 128, 3
    g = torch.Generator(device="cuda").manual_seed(0)
    pages = torch.randn(4, heads, feature_size(head_size, order) * (head_size + 1) + SPARE, generator=g, device="cuda")
    expected_pages = pages.clone()
    indices = torch.tensor([3, 1], device="cuda")
    scale = head_size**-0.5
    for lens, context, reset in (([20], [0], [True]), ([300, 50], [0, 20], [True, False])):
        qkv = fused_qkv(sum(lens), heads, heads, head_size, head_size, torch.bfloat16, g, "cuda")
        step_indices = indices[1:] if len(lens) == 1 else indices
        got, expected = both_forms(lens, context, qkv, pages, expected_pages, step_indices, reset, scale, order)
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(pages, expected_pages, rtol=1e-5, atol=1e-5)


# ---- the hybrid: exact sink and window keys, the series for the older ones ----


def hybrid_step(lens, context, qkv, pages, expected_pages, indices, reset, scale, order, sink_tokens, window):
    """One hybrid step: (kernel, chunk form) outputs, the kernel on `pages`, the chunk form on
    `expected_pages`, their empty exact slots then cleared in both (a reset leaves the kernel's as they were,
    the chunk form's zero; neither form reads them)."""
    device = pages.device
    starts = torch.tensor([0, *lens], device=device).cumsum(0)
    context, reset = torch.tensor(context, device=device), torch.tensor(reset, device=device)
    exact = dict(sink_tokens=sink_tokens, window=window)
    got = triton_prefill_sata(*qkv, starts, max(lens), pages, indices, reset, scale, order, context, **exact)
    expected = chunk_sata_varlen(*qkv, starts, context, max(lens), expected_pages[..., :-SPARE], indices, reset,
                                 scale, order, **exact)
    head_size, head_size_v = qkv[1].shape[-1], qkv[2].shape[-1]
    seen = context + starts.diff()
    for x in (pages, expected_pages):
        clear_empty_slots(x, indices, seen, head_size, head_size_v, order, **exact)
    return got, expected


@pytest.mark.parametrize("heads,kv_heads,head_size,head_size_v,order,dtype,sink_tokens,window", [
    (4, 2, 8, 8, 3, torch.float32, 2, 5),  # GQA: query blocks of 32 tokens
    (2, 2, 8, 12, 1, torch.bfloat16, 0, 3),  # MHA, d_v ≠ d, order 1, no sinks
    (6, 2, 8, 8, 5, torch.bfloat16, 4, 33),  # GQA of 3 (padded to 4), 495 basis rows, 37 slots in two tiles
])
def test_hybrid_prefill_equals_the_chunk_form(heads, kv_heads, head_size, head_size_v, order, dtype, sink_tokens,
                                              window):
    """Three steps over garbage pages at permuted pages through a strided index tensor, S sinks, window W.
    1: two resets, one token (shorter than the window) and S + 2W + 3 (tokens leave the window inside the
    step). 2: the first continues at position 1 with S + 3 tokens (the rest of its sinks among them); the
    second with 3 (its stored ring keys leave the window, and the new queries' windows pass them); a third
    resets over a garbage page, longer than a query block, a key block and S + W. 3: the first continues
    with W + 2 tokens (every stored ring key folds, then new ones), the second with 1. Outputs and every page
    after each step equal the chunk form's."""
    g = torch.Generator().manual_seed(0)
    floats = state_size(head_size, head_size_v, order, sink_tokens + window) + SPARE
    pages = torch.randn(6, kv_heads, floats, generator=g)
    expected_pages = pages.clone()
    indices = torch.tensor([4, 9, 0, 9, 2, 9])[::2]
    long = max(READ_ROWS // triton.next_power_of_2(heads // kv_heads), KEY_BLOCK, sink_tokens + window) + 5
    first = sink_tokens + 2 * window + 3
    steps = (
        ([1, first], [0, 0], [True, True]),
        ([sink_tokens + 3, 3, long], [1, first, 0], [False, False, True]),
        ([window + 2, 1], [sink_tokens + 4, first + 3], [False, False]),
    )
    scale = head_size**-0.5
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding
    for lens, context, reset in steps:
        qkv = fused_qkv(sum(lens), heads, kv_heads, head_size, head_size_v, dtype, g)
        got, expected = hybrid_step(lens, context, qkv, pages, expected_pages, indices[: len(lens)], reset, scale,
                                    order, sink_tokens, window)
        assert got.dtype == dtype and got.shape == (sum(lens), heads, head_size_v)
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(pages, expected_pages, rtol=1e-5, atol=1e-5)


def prefill_in_steps(q, k, v, splits, pages, indices, scale, order, sink_tokens, window):
    """Sequences q, k, v [P, n, heads, size] prefilled through the kernel in steps of splits[step][sequence]
    new tokens, from a reset: each sequence's outputs of all steps, concatenated [n, H, d_v]."""
    got, seen = [[] for _ in indices], [0] * len(indices)
    for step, new in enumerate(splits):
        parts = [slice(seen[s], seen[s] + new[s]) for s in range(len(new))]
        starts = torch.tensor([0, *new]).cumsum(0)
        packed = (torch.cat([x[s, parts[s]] for s in range(len(new))]) for x in (q, k, v))
        out = triton_prefill_sata(*packed, starts, max(new), pages, indices, torch.full((len(new),), step == 0),
                                  scale, order, torch.tensor(seen), sink_tokens, window)
        for s in range(len(new)):
            got[s].append(out[starts[s] : starts[s + 1]])
            seen[s] += new[s]
    return [torch.cat(x) for x in got]


@pytest.mark.parametrize("order,dtype,sink_tokens,window,scale", [
    (3, torch.float32, 2, 6, 0.4),
    (1, torch.bfloat16, 0, 4, 0.4),
    (5, torch.float32, 3, 2, 0.4),
    (3, torch.bfloat16, 2, 3, 16.0),  # logits 40× (to ±200): exp overflows float32 unless scaled
])
def test_hybrid_prefilled_sequences_equal_the_naive_reference(order, dtype, sink_tokens, window, scale):
    """Two sequences of GQA heads (9 and 45 tokens) prefilled through the kernel in three steps (a reset, then
    continuations of 3 + 10 and 2 + 5 tokens): the outputs of the steps together are the quadratic
    reference's, and each page then holds the reference's state: the series Σ φ(k)·[v, 1]ᵀ over the
    positions S..n − W − 1, the sinks and the last W keys and values in their slots. At the large logits, keys
    opposite their query set every exact logit of a row to ≈ −130: the first token's (exp(−c) overflows
    float32 over its empty series) and the first step's last of the other sequence (its sinks and window; the
    series of the step's 25 other keys outweighs them by ~e^130)."""
    heads, kv_heads, head_size = 4, 2, 8
    g = torch.Generator().manual_seed(1)
    lens, splits = (9, 45), ((4, 30), (3, 10), (2, 5))
    q, k, v = (torch.randn(2, 45, h, head_size, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads))
    if scale > 1:  # query head 0 of each KV head against keys opposite it: logits ≈ −130
        k[0, 0] = -q[0, 0, ::2]
        k[1, [0, 1, 27, 28, 29]] = -q[1, 29, ::2]
    exact = dict(sink_tokens=sink_tokens, window=window)
    pages = torch.randn(3, kv_heads, state_size(head_size, head_size, order, sink_tokens + window), generator=g)
    indices = torch.tensor([2, 0])
    got = prefill_in_steps(q, k, v, splits, pages, indices, scale, order, **exact)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    m = feature_size(head_size, order)
    for s in range(2):
        n = lens[s]
        expected = naive_hybrid_sata_attention(q[s, :n].double(), k[s, :n].double(), v[s, :n].double(), scale, order,
                                               **exact)
        torch.testing.assert_close(got[s].double(), expected, rtol=tolerance, atol=tolerance)
        series, keys, values = split_state_page(pages[indices[s]], m, head_size, head_size, sink_tokens + window)
        folded = slice(sink_tokens, n - window)
        phi = feature_map(k[s, folded].double(), order, scale).double()
        v1 = torch.cat((v[s, folded].double(), torch.ones(*v[s, folded].shape[:-1], 1, dtype=torch.double)), -1)
        torch.testing.assert_close(series.double(), torch.einsum("shm,shv->hmv", phi, v1), rtol=1e-4, atol=1e-4)
        held = slot_positions(torch.tensor(n), sink_tokens, window)
        assert (held >= 0).all()
        torch.testing.assert_close(keys, k[s, held].float().transpose(0, 1))
        torch.testing.assert_close(values, v[s, held].float().transpose(0, 1))


def test_hybrid_reset_reads_nothing_of_its_page_wherever_its_position():
    """A reset at position n0 = S + W + 7 over a garbage page (the backend resets at 0 only; the decode kernel
    has the same rule): no series, no stored slots, so the step is the reference over its own 20 tokens, none
    of them a sink; the series then holds exactly its first 20 − W tokens, the ring its last W."""
    heads, kv_heads, head_size, order, sink_tokens, window = 4, 2, 8, 3, 2, 6
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 20, h, head_size, generator=g) for h in (heads, kv_heads, kv_heads))
    pages = torch.randn(2, kv_heads, state_size(head_size, head_size, order, sink_tokens + window), generator=g)
    context = sink_tokens + window + 7
    out = triton_prefill_sata(q[0], k[0], v[0], torch.tensor([0, 20]), 20, pages, torch.tensor([1]),
                              torch.tensor([True]), 0.4, order, torch.tensor([context]), sink_tokens, window)
    expected = naive_hybrid_sata_attention(q[0].double(), k[0].double(), v[0].double(), 0.4, order, 0, window)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    m = feature_size(head_size, order)
    series, keys, values = split_state_page(pages[1], m, head_size, head_size, sink_tokens + window)
    phi = feature_map(k[0, : 20 - window], order, 0.4)
    torch.testing.assert_close(series[..., -1], phi.sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(series[..., :-1], torch.einsum("shm,shv->hmv", phi, v[0, : 20 - window]), rtol=1e-5,
                               atol=1e-5)
    ring = slot_positions(torch.tensor(context + 20), sink_tokens, window)[sink_tokens:] - context
    torch.testing.assert_close(keys[:, sink_tokens:], k[0, ring].transpose(0, 1))
    torch.testing.assert_close(values[:, sink_tokens:], v[0, ring].transpose(0, 1))


@pytest.mark.parametrize("splits", [[10], [3, 7], [8, 2]])
@pytest.mark.parametrize("window", [2, 10], ids=["series", "no_series"])
def test_hybrid_prefill_holds_exact_logits_far_below_the_series(splits, window):
    """One head, d = 1, scale 1 (the chunk form's test): the first 8 keys give logit 40 (series weight
    T(40) = 841 once they leave a window of 2), the last 2 give −300, exact: scaled by the exact part's
    largest logit alone, the series would be weighted by e^300, past float32's range; with a window of 10
    nothing enters the series, and e^300 times its empty read must not be NaN either."""
    q = torch.full((1, 10, 1, 1), 20.0)
    k = torch.cat((torch.full((8, 1, 1), 2.0 if window == 2 else -15.0), torch.full((2, 1, 1), -15.0)))[None]
    v = torch.randn(1, 10, 1, 3, generator=torch.Generator().manual_seed(0))
    pages = torch.randn(1, 1, state_size(1, 3, 3, window), generator=torch.Generator().manual_seed(1))
    got = prefill_in_steps(q, k, v, [[n] for n in splits], pages, torch.tensor([0]), 1.0, 3, 0, window)[0]
    expected = naive_hybrid_sata_attention(q[0].double(), k[0].double(), v[0].double(), 1.0, 3, 0, window)
    assert got.isfinite().all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hybrid_prefill_on_cuda_at_llama3_shape():
    """Compiled (not interpreted): 32 query heads on 8 KV heads of 128 at order 3 (8,385 basis rows, 4.4 MB
    of state a head), 4 sinks and a window of 128, bf16, against the chunk form on the same GPU: a prompt of
    1,500 tokens reset over a garbage page beside one of 40 (set up by a first step with a third of 200),
    then continuations of 300 and 1 tokens and a new prompt of 129; output and pages after each step."""
    heads, kv_heads, head_size, order, sink_tokens, window = 32, 8, 128, 3, 4, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    floats = state_size(head_size, head_size, order, sink_tokens + window) + SPARE
    pages = torch.randn(5, kv_heads, floats, generator=g, device="cuda")
    expected_pages = pages.clone()
    indices = torch.tensor([3, 1, 4], device="cuda")
    scale = head_size**-0.5
    steps = (([1500, 40, 200], [0, 0, 0], [True, True, True]), ([300, 1, 129], [40, 200, 0], [False, False, True]))
    for lens, context, reset in steps:
        qkv = fused_qkv(sum(lens), heads, kv_heads, head_size, head_size, torch.bfloat16, g, "cuda")
        step_indices = indices if lens[0] == 1500 else indices[[1, 2, 0]]
        got, expected = hybrid_step(lens, context, qkv, pages, expected_pages, step_indices, reset, scale, order,
                                    sink_tokens, window)
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(pages, expected_pages, rtol=1e-5, atol=1e-5)
