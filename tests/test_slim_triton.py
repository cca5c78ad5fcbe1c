"""Slim's Triton decode (`ops/slim/triton_decode.py`), the one pass and the two, against the torch form and
the naive reference: on the CPU under Triton's interpreter at small shapes (ragged lengths, n = 1, page
boundaries, several splits, a padded row, partial and interleaved rotary, spill 0 and > 0, padded head
tiles, a head count not a power of two, several column tiles, of whole heads and of half a head, sliding
windows whose freed pages hold NaN), and, marked `gpu`, compiled on CUDA at Llama-7B's shape, once replayed
from a CUDA graph."""

import math

import pytest
import torch

from batches import rope_table
from test_slim_ops import ROPES, free_out_of_window, sequence_case, write_sequences
from test_slim_triton_store import random_maps
from vllm_slim.ops.slim import Rotary, naive_slim_attention, paged_decode_slim_attention, store_rows
from vllm_slim.ops.slim.decode import decode_rows
from vllm_slim.ops.slim.triton_decode import triton_decode_rows


def decode_case(heads, layer, rope, cache_dtype, seq_lens=(1, 17, 40), block_size=4, seed=2, window=None,
                head_size=16):
    """layer: a name in test_slim_ops.LAYERS (the rows that layer caches), or a spill width per head
    (random rows, no layer: any head count); window: the pages a decode's window leaves freed (NaN)."""
    if isinstance(layer, int):
        g = torch.Generator().manual_seed(seed)
        rows = [torch.randn(n, heads, head_size + layer, generator=g) for n in seq_lens]
        proj, rotary = None, ROPES[rope](head_size)
    else:
        proj, rotary, rows = sequence_case(heads, head_size, layer, rope, list(seq_lens), seed=seed)
    rows = [r.to(cache_dtype) for r in rows]
    kv_cache, block_table = write_sequences(rows, block_size, token_major=True)
    q = torch.randn(len(seq_lens) + 1, heads, head_size, generator=torch.Generator().manual_seed(seed))
    # A padded row (seq_len 0, the null block) rides along.
    table = torch.cat((block_table, torch.zeros(1, block_table.shape[1], dtype=block_table.dtype)))
    lens = torch.tensor([*seq_lens, 0])
    if window:
        table = free_out_of_window(kv_cache, table, lens, 1, window)
    return q, kv_cache, table, lens, math.ceil(max(seq_lens) / block_size), proj, rotary, rows


@pytest.mark.parametrize("rope,layer,split_pages,heads,window", [  # every RoPE and layout, one split and several
    ("neox", "refined_spill", None, 4, None), ("neox", "plain", 3, 4, None),
    ("gptj_partial", "refined_spill", 3, 4, None), ("gptj_partial", 2, None, 3, None),
    ("none", "refined_spill", 3, 4, None),
    # Sliding windows over sequences of 1, 17 and 40: 20 tokens, across the split boundary at 32 (splits of 4
    # pages, one tile), the first split wholly before it at 40; 3, shorter than a page.
    ("neox", "refined_spill", 4, 4, 20), ("gptj_partial", 2, None, 3, 3),
])
def test_triton_decode_rows_equal_the_torch_form(rope, layer, split_pages, heads, window):
    """Both forms: the two passes with one column tile of the padded heads, the one pass with tiles of two
    key heads (the last one partly padding at 3 heads)."""
    q, kv_cache, table, lens, pages, _, rotary, _ = decode_case(heads, layer, rope, torch.float16, window=window)
    expected = decode_rows(q, kv_cache, table, lens, pages, rotary, 0.25, split_pages, window)
    for one_pass, columns in ((False, None), (True, 32)):
        got = triton_decode_rows(
            q, kv_cache, table, lens, pages, rotary, 0.25, split_pages, one_pass, columns, window=window
        )
        for g, e in zip(got, expected):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g[:-1], e[:-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope,layer,heads", [("neox", "refined_spill", 4), ("gptj_partial", 2, 3)])
def test_column_tiles_of_part_of_a_head_equal_the_torch_form(rope, layer, heads):
    """Tiles of 16 columns over heads of 32 (as GPT-J's heads of 256 take tiles of 128): two tiles a head,
    the spill accumulated by the first; both forms against the torch form."""
    q, kv_cache, table, lens, pages, _, rotary, _ = decode_case(heads, layer, rope, torch.float16, head_size=32)
    expected = decode_rows(q, kv_cache, table, lens, pages, rotary, 0.25, 3)
    for one_pass in (False, True):
        got = triton_decode_rows(q, kv_cache, table, lens, pages, rotary, 0.25, 3, one_pass, 16)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g[:-1], e[:-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 6])
def test_one_launch_sized_by_a_bound_serves_any_lengths_within_it(window):
    """What a captured CUDA graph replays: the launch sized for 64 pages (as for max_model_len) and 8 splits
    (short sequences leave most empty), whatever the lengths are (0 for a padded row, 1, 17, 40: 10 pages);
    each form, both passes' kernels, against the torch form over the pages the lengths need."""
    q, kv_cache, table, lens, pages, _, rotary, _ = decode_case(
        4, "refined_spill", "neox", torch.float16, window=window
    )
    expected = decode_rows(q, kv_cache, table, lens, pages, rotary, 0.25, None, window)
    for one_pass in (False, True):
        got = triton_decode_rows(q, kv_cache, table, lens, 64, rotary, 0.25, 8, one_pass, window=window)
        for g, e in zip(got, expected):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g[:-1], e[:-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype,one_pass,window", [
    (torch.float32, True, None), (torch.bfloat16, False, None), (torch.float16, True, 5), (torch.float32, False, 5)
])
def test_triton_decode_equals_the_naive_reference(monkeypatch, cache_dtype, one_pass, window):
    """The whole decode (Z, then the value map) through the fused form with VLLM_SLIM_TRITON=1 (each
    pass once; 33 tokens: two splits of two tiles), per sequence against `naive_slim_attention` on the rows
    the cache holds (4 heads: the head tile is padded to 16 rows, which must add nothing); a window of 5
    (over two pages, and across the two splits' boundary at position 32; freed pages of NaN at 9 and 33)."""
    q, kv_cache, table, lens, pages, proj, rotary, rows = decode_case(
        4, "refined_spill", "neox", cache_dtype, seq_lens=(1, 9, 33), seed=5, window=window
    )
    monkeypatch.setenv("VLLM_SLIM_TRITON", "1")
    got = paged_decode_slim_attention(
        q, kv_cache, table, lens, pages, proj, rotary, 0.25, split_pages=5, one_pass=one_pass, window=window
    )
    assert torch.isfinite(got).all()
    for i, row in enumerate(rows):
        expected = naive_slim_attention(q[i : i + 1], row, proj, rotary, 0.25, window)
        torch.testing.assert_close(got[i : i + 1], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch,context,window", [(1, 4096, None), (16, 4000, None), (16, 4000, 2047)])
def test_triton_decode_on_cuda_at_llama7b_shape(batch, context, window):
    """Compiled (not interpreted), both forms: 32 heads x 128 (32 column tiles), fp16 cache of block 16,
    several splits, against the torch form in float32 on the same GPU; Phi-3-mini's window of 2,047 (its
    freed pages NaN)."""
    heads, head_size, block_size = 32, 128, 16
    rotary = Rotary(rope_table(context + 1, head_size), head_size, True).to("cuda")
    pages = math.ceil(context / block_size)
    g = torch.Generator(device="cuda").manual_seed(0)
    kv_cache = torch.randn(batch * pages + 2, heads, block_size, head_size + 2, generator=g, device="cuda").half()
    table = (torch.randperm(batch * pages, device="cuda") + 1).view(batch, pages).int()
    lens = torch.full((batch,), context, device="cuda")
    lens[0] = 1
    if window:
        table = free_out_of_window(kv_cache, table, lens, 1, window)
    q = torch.randn(batch, heads, head_size, generator=g, device="cuda")
    expected = decode_rows(q, kv_cache, table, lens, pages, rotary, head_size**-0.5, 64, window)
    for one_pass in (False, True):
        got = triton_decode_rows(q, kv_cache, table, lens, pages, rotary, head_size**-0.5, 64, one_pass, window=window)
        for gz, ez in zip(got, expected):
            torch.testing.assert_close(gz, ez, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decode_step_replayed_from_a_cuda_graph_equals_eager():
    """As vLLM's FULL decode graphs run slim's step (Llama-7B's shape, refined keys and 2 spill a head, a bf16
    model, an fp16 cache): the new tokens' rows stored, then the decode and its value map. Captured once with
    every sequence 1 token long and the bound of max_model_len's pages; replayed after new queries, keys,
    values, positions, slots, lengths and block tables were written into the same buffers. Each replay must
    write the cache an eager step writes and return its rows."""
    heads, head_size, spill, block_size, max_pages, batch = 32, 128, 2, 16, 256, 8
    g = torch.Generator(device="cuda").manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    proj = random_maps(heads, head_size, spill, g)
    rotary = Rotary(rope_table(max_pages * block_size, head_size), head_size, True).to("cuda")
    cache = randn(batch * max_pages + 1, heads, block_size, head_size + spill).half()
    q, key, value = (torch.zeros(batch, heads, head_size, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    table = torch.zeros(batch, max_pages, dtype=torch.int32, device="cuda")
    lens = torch.ones(batch, dtype=torch.int32, device="cuda")
    positions = torch.zeros(batch, dtype=torch.long, device="cuda")
    slots = torch.full((batch,), -1, dtype=torch.long, device="cuda")

    def step():
        store_rows(cache, key, value, positions, slots, proj, rotary)
        return paged_decode_slim_attention(q, cache, table, lens, max_pages, proj, rotary, head_size**-0.5)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compile outside the capture (slot -1: nothing written)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for lengths in ([4096, 1, 0, 300, 2049, 17, 4000, 64], [33] * batch):
        for x in (q, key, value):
            x.copy_(randn(batch, heads, head_size))
        table.copy_((torch.randperm(batch * max_pages, device="cuda", generator=g) + 1).view(batch, max_pages))
        lens.copy_(torch.tensor(lengths, dtype=torch.int32))
        live = lens > 0
        positions.copy_((lens.long() - 1).clamp_min(0))
        page = table.gather(1, (positions // block_size)[:, None])[:, 0].long()
        slots.copy_((page * block_size + positions % block_size).where(live, -1))
        before = cache.clone()
        graph.replay()
        replayed, replayed_cache = captured.clone(), cache.clone()
        cache.copy_(before)
        eager = step()
        assert torch.equal(replayed_cache, cache)
        torch.testing.assert_close(replayed[live], eager[live], rtol=1e-5, atol=1e-5)
