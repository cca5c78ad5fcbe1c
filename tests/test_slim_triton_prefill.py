"""Slim's Triton prefill (`ops/slim/triton_prefill.py`) against the torch form and the naive reference: on the CPU
under Triton's interpreter at small shapes (one packed batch of a chunk after a cached prefix, a whole prompt over
two query blocks, a one-token query and a padded row; page boundaries; every RoPE; spill 0 and > 0 with biases;
float32, float16 and bfloat16 caches and queries; a head count not a power of two; sliding windows whose freed pages
hold NaN), and, marked `gpu`, compiled on CUDA at Llama-7B's shape."""

import math

import pytest
import torch

from batches import rope_table
from test_slim_ops import free_out_of_window, make_layer
from test_slim_triton import decode_case
from vllm_slim.ops.slim import Rotary, SlimProjection, naive_slim_attention, paged_prefill_slim_attention, parallel
from vllm_slim.ops.slim import triton_prefill

# Positions 33..39 of a 40-token sequence (a chunk starting mid-page, ending on a page boundary), a whole
# 23-token prompt (two query blocks of 16), one query at position 8; decode_case adds a padded row (seq_len 0,
# the null block), here with no queries.
SEQ_LENS, QUERY_LENS = (40, 23, 9), (7, 23, 1, 0)


def assert_near(got, expected, exact):
    """Float32 V and products: the torch form's values to float32 rounding. 16-bit: V and P rounded to the
    model's dtype (stock's own rounding of V), 2^-9 relative each (measured: 0.2% of the norm)."""
    if exact:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2**-7 * expected.abs().max().item())
        assert (got - expected).norm() / expected.norm() < 5e-3


@pytest.mark.parametrize("heads,layer,rope,cache_dtype,q_dtype,window", [
    (4, "spill_bias", "neox", torch.float32, torch.float32, None),  # 2 spill a head, biases
    (4, "refined_spill", "gptj_partial", torch.bfloat16, torch.bfloat16, None),  # 1 spill a head, biases
    (3, 0, "none", torch.float16, torch.bfloat16, None),  # random rows, no spill, biases; the query rounded to float16
    # Sliding windows: across pages (the prompt's second query block starts its keys at 7); shorter than a page;
    # as long as the prompt (longer than the 9-token sequence, shorter than the 40-token one).
    (4, "spill_bias", "neox", torch.float32, torch.float32, 10),
    (4, "refined_spill", "gptj_partial", torch.bfloat16, torch.bfloat16, 3),
    (3, 0, "none", torch.float16, torch.bfloat16, 23),
])
def test_triton_prefill_equals_the_torch_form_and_the_naive_reference(
    monkeypatch, heads, layer, rope, cache_dtype, q_dtype, window
):
    """Through the dispatch (VLLM_SLIM_TRITON=1), with tiles small enough for two query blocks and two key
    tiles of 32 (8 pages each). The slots past each sequence's end and the pages a window frees (vLLM's null
    block) hold NaN: whatever a cache holds there must reach neither form's output."""
    monkeypatch.setattr(triton_prefill, "BLOCK_M", 16)
    monkeypatch.setattr(triton_prefill, "BLOCK_N", 32)
    monkeypatch.setattr(triton_prefill, "RAW_ROWS", 256)  # one raw program a sequence: interpreter time
    monkeypatch.delenv("VLLM_SLIM_TRITON", raising=False)
    _, kv_cache, table, lens, pages, proj, rotary, rows = decode_case(heads, layer, rope, cache_dtype, SEQ_LENS)
    if proj is None:  # random rows: any maps do
        proj = make_layer(heads, 16, True, heads * layer)[-1]
    q = torch.randn(sum(QUERY_LENS), heads, 16, generator=torch.Generator().manual_seed(7)).to(q_dtype)
    query_start_loc = torch.tensor([0, *torch.tensor(QUERY_LENS).cumsum(0).tolist()])
    block_size = kv_cache.shape[2]
    for i, n in enumerate(lens.tolist()):
        last = table[i, n // block_size].long()  # the null block for the padded row
        kv_cache[last, :, n % block_size :] = math.nan
    if window:
        table = free_out_of_window(kv_cache, table, lens, QUERY_LENS, window)
    args = (q, query_start_loc, lens, kv_cache, table, pages, max(QUERY_LENS), proj, rotary, 0.25, window)
    expected = paged_prefill_slim_attention(*args)
    assert torch.isfinite(expected).all()
    monkeypatch.setenv("VLLM_SLIM_TRITON", "1")
    got = paged_prefill_slim_attention(*args)
    exact = torch.float32 == q_dtype
    assert_near(got, expected, exact)
    for i, row in enumerate(rows):
        span = slice(query_start_loc[i], query_start_loc[i + 1])
        assert_near(got[span], naive_slim_attention(q[span], row, proj, rotary, 0.25, window), exact)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cache_dtype,q_dtype,window", [
    (torch.float16, torch.bfloat16, None), (torch.float32, torch.float32, None), (torch.float16, torch.bfloat16, 200),
])
def test_triton_prefill_on_cuda_at_llama7b_shape(monkeypatch, cache_dtype, q_dtype, window):
    """Compiled (not interpreted): 32 heads x 128, a cache of block 16 with 2 spill a head (fp16 with bf16
    queries: tensor cores; float32: ieee products), a 1,000-query chunk after 500 cached tokens and a
    300-token prompt, against the torch form (float32 V) on the same GPU; random maps (the kernels apply
    whatever maps they are given); a sliding window shorter than both (its freed pages NaN)."""
    heads, head_size, block_size, spill = 32, 128, 16, 2
    seq_lens, query_lens = [1500, 300], [1000, 300]
    d, r = heads * head_size, heads * spill
    g = torch.Generator(device="cuda").manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g, device="cuda")  # noqa: E731
    proj = SlimProjection(randn(d, d) / d**0.5, randn(r, d) / r**0.5, randn(2 * d, r), None, randn(d), randn(d),
                          heads, 1.0)
    pages = math.ceil(max(seq_lens) / block_size)
    # The torch form un-RoPEs every slot of the last page, the Triton form only the sequence's own.
    rotary = Rotary(rope_table(pages * block_size, head_size), head_size, True).to("cuda")
    kv_cache = randn(2 * pages + 2, heads, block_size, head_size + spill).to(cache_dtype)
    table = (torch.randperm(2 * pages, device="cuda") + 1).view(2, pages).int()
    if window:
        table = free_out_of_window(kv_cache, table, seq_lens, query_lens, window)
    q = randn(sum(query_lens), heads, head_size).to(q_dtype)
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], device="cuda")
    args = (q, query_start_loc, torch.tensor(seq_lens, device="cuda"), kv_cache, table, pages, max(query_lens),
            proj, rotary, head_size**-0.5, window)
    got = paged_prefill_slim_attention(*args)
    monkeypatch.setattr(parallel, "uses_triton", lambda device: False)
    expected = paged_prefill_slim_attention(*args)
    if q_dtype == torch.float32:  # 1,500 float32 terms summed in another order
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    else:
        assert_near(got, expected, exact=False)
