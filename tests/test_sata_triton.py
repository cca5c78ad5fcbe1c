"""SATA's Triton decode (`ops/sata/triton_decode.py`), plain and hybrid, against the chunk form (output and the
states left in the pages) and against the naive references over decoded sequences: on the CPU under Triton's
interpreter at small shapes (GQA and MHA, d_v ≠ d, orders 1, 3 and 5, resets, permuted and strided state
indices, pages with trailing floats, bf16 and float32; for the hybrid, steps that fill the sinks and the
window, fold the first tokens leaving the window into the series and wrap the ring, no sinks, two tiles of
exact slots, and logits 20 to 40 times the usual), and, marked `gpu`, compiled on CUDA at Llama-7B's shape."""

import pytest
import torch

from vllm_slim.ops.sata import chunk_sata_varlen, feature_size, naive_hybrid_sata_attention, state_size
from vllm_slim.ops.sata.chunk import slot_positions, split_state_page
from vllm_slim.ops.sata.triton_decode import triton_decode_sata

SPARE = 5  # trailing floats a page, which neither form may touch
# An empty series has log-weight log(0) = −inf, which numpy (under the interpreter) warns about.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")


def decode_case(steps, batch, heads, kv_heads, head_size, head_size_v, order, dtype, exact_tokens=0, device="cpu",
                seed=0):
    """q, k, v [steps, batch, heads, size] in `dtype` and garbage float32 pages [2·batch, Hkv, floats]."""
    g = torch.Generator(device=device).manual_seed(seed)
    floats = state_size(head_size, head_size_v, order, exact_tokens) + SPARE
    pages = torch.randn(2 * batch, kv_heads, floats, generator=g, device=device)
    q, k, v = (
        torch.randn(steps, batch, h, size, generator=g, device=device).to(dtype)
        for h, size in ((heads, head_size), (kv_heads, head_size), (kv_heads, head_size_v))
    )
    return q, k, v, pages


def chunk_step(q, k, v, pages, indices, reset, scale, order, seen=None, sink_tokens=0, window=0, lengths=None):
    """The chunk form on the pages' state floats: one token a sequence (the decode contract), or `lengths`
    [B] each (packed), after `seen` [B] tokens (default none)."""
    batch, device = indices.shape[0], q.device
    seen = torch.zeros(batch, dtype=torch.long, device=device) if seen is None else seen
    lengths = torch.ones(batch, dtype=torch.long, device=device) if lengths is None else lengths
    starts = torch.cat((lengths.new_zeros(1), lengths.cumsum(0)))
    state = pages[..., : pages.shape[-1] - SPARE]
    return chunk_sata_varlen(
        q, k, v, starts, seen, int(lengths.max()), state, indices, reset, scale, order, sink_tokens, window
    )


def clear_empty_slots(pages, indices, seen, head_size, head_size_v, order, sink_tokens, window):
    """Zero the exact slots that hold no token after `seen` [B] at `indices`: after a reset the chunk form
    zeroes them, the kernel leaves what was there (neither reads them)."""
    page = pages[indices]
    m, exact_tokens = feature_size(head_size, order), sink_tokens + window
    _, keys, values = split_state_page(page[..., :-SPARE], m, head_size, head_size_v, exact_tokens)
    empty = (slot_positions(seen, sink_tokens, window) < 0)[:, None, :, None]
    keys.masked_fill_(empty, 0.0)
    values.masked_fill_(empty, 0.0)
    pages[indices] = page


@pytest.mark.parametrize("heads,kv_heads,head_size,head_size_v,order,dtype", [
    (4, 2, 8, 8, 3, torch.float32),  # GQA
    (2, 2, 16, 12, 5, torch.bfloat16),  # MHA, d_v ≠ d, 4,845 basis rows in 10 tiles
    (2, 1, 8, 8, 1, torch.bfloat16),  # order 1: the mean of the values
])
def test_triton_decode_equals_the_chunk_form(heads, kv_heads, head_size, head_size_v, order, dtype):
    """A step that continues two states and resets the third (its page holding another state), its
    sequences at permuted pages through a strided index tensor; every page compared after, the untouched
    ones and the trailing floats included."""
    q, k, v, pages = decode_case(2, 3, heads, kv_heads, head_size, head_size_v, order, dtype)
    indices = torch.tensor([4, 9, 0, 9, 2, 9])[::2]
    scale = head_size**-0.5
    chunk_step(q[0], k[0], v[0], pages, indices, torch.ones(3, dtype=torch.bool), scale, order)
    expected_pages = pages.clone()
    reset = torch.tensor([False, True, False])
    expected = chunk_step(q[1], k[1], v[1], expected_pages, indices, reset, scale, order)
    got = triton_decode_sata(q[1], k[1], v[1], pages, indices, reset, scale, order)
    assert got.dtype == dtype and got.shape == (3, heads, head_size_v)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(pages, expected_pages, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,head_size_v,sink_tokens,window,dtype,scale", [
    (4, 2, 8, 2, 3, torch.float32, 8**-0.5),  # GQA
    (2, 1, 12, 0, 17, torch.bfloat16, 20 * 8**-0.5),  # no sinks, d_v ≠ d, 17 slots in two tiles, 20× logits
])
def test_hybrid_decode_steps_equal_the_chunk_form(heads, kv_heads, head_size_v, sink_tokens, window, dtype, scale):
    """Three steps of three sequences at permuted, strided pages: one reset at position 0 over another
    sequence's page (its sinks, its window filling), one whose next token fills the window (then its first
    tokens leave the window into the series, and the ring wraps), one long past; the continued states from
    prompts through the chunk form. The output and every page compared after each step."""
    head_size, order, steps = 8, 3, 3
    exact = dict(sink_tokens=sink_tokens, window=window)
    q, k, v, pages = decode_case(steps, 3, heads, kv_heads, head_size, head_size_v, order, dtype, sink_tokens + window)
    indices = torch.tensor([4, 9, 0, 9, 2, 9])[::2]
    seen = torch.tensor([0, sink_tokens + window - 1, sink_tokens + 3 * window + 2])
    prompt = decode_case(int(seen[1:].sum()), 1, heads, kv_heads, head_size, head_size_v, order, dtype, seed=1)
    chunk_step(*(x[:, 0] for x in prompt[:3]), pages, indices[1:], torch.ones(2, dtype=torch.bool), scale, order,
               lengths=seen[1:], **exact)
    expected_pages = pages.clone()
    reset = torch.tensor([True, False, False])
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for t in range(steps):
        expected = chunk_step(q[t], k[t], v[t], expected_pages, indices, reset, scale, order, seen, **exact)
        got = triton_decode_sata(q[t], k[t], v[t], pages, indices, reset, scale, order, seen, **exact)
        seen, reset = seen + 1, torch.zeros_like(reset)
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
        for x in (pages, expected_pages):
            clear_empty_slots(x, indices, seen, head_size, head_size_v, order, **exact)
        torch.testing.assert_close(pages, expected_pages, rtol=1e-5, atol=1e-5)
    # A reset reads nothing of its page, wherever its position: here past the window, its slots and series
    # full. The output is the token's own value, and its series stays empty.
    got = triton_decode_sata(q[0, 2:], k[0, 2:], v[0, 2:], pages, indices[2:], torch.ones(1, dtype=torch.bool),
                             scale, order, seen[2:], **exact)
    torch.testing.assert_close(got, v[0, 2:].repeat_interleave(heads // kv_heads, 1))
    assert not pages[indices[2], :, : feature_size(head_size, order) * (head_size_v + 1)].count_nonzero()


@pytest.mark.parametrize("order,dtype,sink_tokens,window,scale", [
    (3, torch.float32, 0, 0, 0.4),
    (5, torch.bfloat16, 0, 0, 0.4),
    (3, torch.float32, 1, 3, 0.4),  # the hybrid: tokens 1 and 2 leave the window into the series
    (3, torch.bfloat16, 2, 1, 16.0),  # logits 40× (to ±200): exp overflows float32 unless scaled
])
def test_decoded_sequences_equal_the_naive_reference(order, dtype, sink_tokens, window, scale):
    """Two sequences of GQA heads decoded token by token through the kernel from a reset: every step's
    output is the quadratic reference's at that position. At the large logits, keys opposite their query
    set a step's exact logits to ≈ −130: the first step's (exp(−c) overflows float32 over an empty series),
    and the last's in the other sequence (the series, 3 tokens, outweighs the exact part by ~e^130)."""
    steps, heads, kv_heads, head_size = 6, 4, 2, 8
    exact = dict(sink_tokens=sink_tokens, window=window)
    q, k, v, pages = decode_case(steps, 2, heads, kv_heads, head_size, head_size, order, dtype, window + sink_tokens,
                                 seed=1)
    if scale > 1:
        k[0, 1] = -q[0, 1, ::2]
        k[[0, 1, 5], 0] = -q[5, 0, ::2]
    indices = torch.tensor([3, 1])
    got = torch.stack([
        triton_decode_sata(q[t], k[t], v[t], pages, indices, torch.full((2,), t == 0), scale, order,
                           torch.full((2,), t), **exact)
        for t in range(steps)
    ])
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for s in range(2):
        expected = naive_hybrid_sata_attention(q[:, s].double(), k[:, s].double(), v[:, s].double(), scale, order,
                                               **exact)
        torch.testing.assert_close(got[:, s].double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sink_tokens,window", [(0, 0), (4, 64)])
def test_triton_decode_on_cuda_at_llama7b_shape(sink_tokens, window):
    """Compiled (not interpreted): 8 sequences of 32 heads x 128 at order 3 (8,385 basis rows, 4.3 MB of
    state a head), bf16 inputs, against the chunk form on the same GPU: output and pages. The hybrid's
    prompts put the sequences before, at and past the window's end and its ring's wrap."""
    heads, head_size, order = 32, 128, 3
    exact = dict(sink_tokens=sink_tokens, window=window)
    q, k, v, pages = decode_case(2, 8, heads, heads, head_size, head_size, order, torch.bfloat16,
                                 sink_tokens + window, "cuda")
    indices = torch.randperm(16, device="cuda")[:8]
    scale = head_size**-0.5
    seen = torch.tensor([1, 3, 67, 5, 68, 131, 9, 300], device="cuda")
    prompt = decode_case(int(seen.sum()), 1, heads, heads, head_size, head_size, order, torch.bfloat16,
                         device="cuda", seed=1)
    chunk_step(*(x[:, 0] for x in prompt[:3]), pages, indices, torch.ones(8, dtype=torch.bool, device="cuda"),
               scale, order, lengths=seen, **exact)
    expected_pages = pages.clone()
    reset = torch.arange(8, device="cuda") % 3 == 0
    seen = seen.masked_fill(reset, 0)
    expected = chunk_step(q[1], k[1], v[1], expected_pages, indices, reset, scale, order, seen, **exact)
    got = triton_decode_sata(q[1], k[1], v[1], pages, indices, reset, scale, order, seen, **exact)
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
    if window:
        for x in (pages, expected_pages):
            clear_empty_slots(x, indices, seen + 1, head_size, head_size, order, **exact)
    torch.testing.assert_close(pages, expected_pages, rtol=1e-5, atol=1e-5)
