"""Slim math (no vLLM): projection identity, the cache rows, and the batched paged forms against the
per-sequence reference and against float64 softmax attention on V = X·W_V."""

import math

import pytest
import torch

from vllm_slim.ops.slim import (
    Rotary,
    cache_rows,
    naive_slim_attention,
    paged_decode_slim_attention,
    paged_prefill_slim_attention,
    rebuild_values,
    rotate,
    solve_projection,
    store_rows,
    unrope,
    write_rows,
)
from vllm_slim.ops.slim.cache import NULL_BLOCK, binding_error
from vllm_slim.ops.slim.projection import SlimNotApplicable
from batches import rope_table


def make_weights(heads, head_size, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = heads * head_size
    w = {n: torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5 for n in "qkv"}
    b = {n: (torch.randn(d, generator=g, dtype=torch.float64) if bias else torch.zeros(d, dtype=torch.float64)) for n in "qkv"}
    return w, b


def make_layer(heads, head_size, bias, spill, seed=0, refine=False):
    w, b = make_weights(heads, head_size, bias, seed)
    proj = solve_projection(w["k"], w["v"], b["k"] if bias else None, b["v"] if bias else None, heads, spill, refine)
    return w["k"], w["v"], b["k"] if bias else None, b["v"] if bias else None, proj


@pytest.mark.parametrize("spill", [0, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_rebuilt_values_equal_projected_values(spill, bias):
    heads, head_size, tokens = 4, 8, 50
    w_k, w_v, b_k, b_v, proj = make_layer(heads, head_size, bias, spill)
    x = torch.randn(tokens, heads * head_size, dtype=torch.float64)
    k = x @ w_k + (b_k if bias else 0)
    v = x @ w_v + (b_v if bias else 0)
    k3, v3 = k.view(tokens, heads, head_size), v.view(tokens, heads, head_size)
    rows = cache_rows(k3, v3, torch.arange(tokens), proj, None)
    s = rows[..., head_size:].flatten(1)
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
        rows = cache_rows(k_bf16, v.bfloat16(), torch.arange(tokens), proj, None).bfloat16()
        rebuilt = rebuild_values(rows[..., :head_size], rows[..., head_size:].flatten(1), proj)
        return ((rebuilt.double() - v).norm() / v.norm()).item()

    stock = ((v.bfloat16().double() - v).norm() / v.norm()).item()
    assert v_error(0) > 100 * stock
    assert v_error(4) > 10 * stock
    assert v_error(8) < 1.5 * stock


@pytest.mark.parametrize("neox,magnitude", [(True, 1.0), (False, 1.0), (True, 1.3)])
def test_unrope_inverts_rope(neox, magnitude):
    table = rope_table(64, 16) * magnitude  # a scaled rotary embedding's table (YaRN, longrope) when not 1
    rotary = Rotary(table, 16, neox)
    k = torch.randn(64, 3, 32)
    pos = torch.arange(64)
    kr = rotate(k, pos, rotary)
    assert not torch.allclose(kr[1:], k[1:])
    torch.testing.assert_close(kr[..., 16:], k[..., 16:])  # partial rotary: tail untouched
    torch.testing.assert_close(unrope(kr, pos, rotary), k, rtol=1e-5, atol=1e-5)
    # Any leading shape: positions [P, bs] against keys [B, P, bs, H, D].
    paged = unrope(kr.view(1, 8, 8, 3, 32), pos.view(8, 8), rotary)
    torch.testing.assert_close(paged.view(64, 3, 32), k, rtol=1e-5, atol=1e-5)


def write_sequences(rows_per_seq, block_size, seed=0, padding=3, token_major=False):
    """A paged cache (of the rows' dtype; token_major: stored [block, token, head, row] and viewed
    head-major, the CPU build's layout) holding each sequence's rows at scattered blocks (never the
    null block), written through `write_rows` with padding slots (-1) mixed in; returns
    (kv_cache, block_table)."""
    g = torch.Generator().manual_seed(seed)
    heads, width = rows_per_seq[0].shape[1:]
    dtype = rows_per_seq[0].dtype
    pages = [math.ceil(max(r.shape[0], 1) / block_size) for r in rows_per_seq]
    num_blocks = sum(pages) + 3
    order = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # block 0 is the null block
    block_table = torch.zeros(len(rows_per_seq), max(pages) + 1, dtype=torch.int32)
    if token_major:
        kv_cache = torch.randn(num_blocks, block_size, heads, width, generator=g).to(dtype).transpose(1, 2)
    else:
        kv_cache = torch.randn(num_blocks, heads, block_size, width, generator=g).to(dtype)
    for i, n in enumerate(pages):
        block_table[i, :n] = torch.tensor([order.pop() for _ in range(n)])
    rows = torch.cat(rows_per_seq)
    positions = torch.cat([torch.arange(r.shape[0]) for r in rows_per_seq])
    owner = torch.cat([torch.full((r.shape[0],), i) for i, r in enumerate(rows_per_seq)])
    slots = block_table[owner, positions // block_size].long() * block_size + positions % block_size
    pad = torch.randperm(rows.shape[0] + padding, generator=g)[:padding]
    keep = torch.ones(rows.shape[0] + padding, dtype=torch.bool)
    keep[pad] = False
    all_rows = (torch.randn(rows.shape[0] + padding, heads, width, generator=g) * 1e3).to(dtype)
    all_slots = torch.full((rows.shape[0] + padding,), -1, dtype=torch.long)
    all_rows[keep], all_slots[keep] = rows, slots
    before = kv_cache.clone()
    write_rows(kv_cache, all_rows, all_slots)
    used = block_table[block_table > 0].long()
    untouched = torch.ones(num_blocks, dtype=torch.bool)
    untouched[used] = False
    untouched[NULL_BLOCK] = False
    assert torch.equal(kv_cache[untouched], before[untouched]), "a padding row landed outside the null block"
    return kv_cache, block_table


def free_out_of_window(kv_cache, block_table, seq_lens, query_lens, window):
    """What vLLM's sliding-window manager does to the block table: the pages wholly before the first query's
    window (p − W < k ≤ p) are freed and another block stands in for them; here a spare block of NaN, which
    must never reach an output (0·NaN is NaN). Changes the cache in place; returns the new table."""
    used = set(block_table.flatten().tolist())
    spare = next(b for b in range(1, kv_cache.shape[0]) if b not in used)
    kv_cache[spare] = math.nan
    device = block_table.device
    first_seen = torch.as_tensor(seq_lens, device=device) - torch.as_tensor(query_lens, device=device) - window + 1
    whole_pages = first_seen.div(kv_cache.shape[2], rounding_mode="floor")  # negative: none
    freed = torch.arange(block_table.shape[1], device=device)[None, :] < whole_pages[:, None]
    return block_table.masked_fill(freed, spare)


ROPES = {
    "none": lambda d: None,
    # A scaled table: YaRN's and longrope's cos and sin carry a magnitude (mscale) that un-RoPE must divide out.
    "neox": lambda d: Rotary(rope_table(512, d) * 1.19, d, True),
    "gptj_partial": lambda d: Rotary(rope_table(512, d // 2), d // 2, False),
}
LAYERS = {  # spill, bias, refine
    "plain": (0, False, False), "spill_bias": (8, True, False), "refined_spill": (4, True, True),
}


def sequence_case(heads, head_size, layer, rope, seq_lens, seed):
    spill, bias, refine = LAYERS[layer]
    w_k, w_v, b_k, b_v, proj = make_layer(heads, head_size, bias, spill, seed, refine)
    rotary = ROPES[rope](head_size)
    g = torch.Generator().manual_seed(seed + 1)
    rows = []
    for n in seq_lens:
        x = torch.randn(n, heads * head_size, generator=g, dtype=torch.float64)
        k = (x @ w_k + (0 if b_k is None else b_k)).view(n, heads, head_size)
        v = (x @ w_v + (0 if b_v is None else b_v)).view(n, heads, head_size)
        positions = torch.arange(n)
        k = k if rotary is None else rotate(k, positions, Rotary(rotary.cos_sin.double(), rotary.rotary_dim, rotary.neox))
        rows.append(cache_rows(k.float(), v.float(), positions, proj, rotary).float())
    return proj, rotary, rows


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("block_size,split_pages,fused,window", [
    (4, None, False, None), (16, None, False, None), (4, 1, False, None), (4, 3, False, None), (4, None, True, None),
    (16, None, True, None),
    # Sliding windows: shorter than a page, splits wholly before the window; across pages and split boundaries;
    # the C loop's; longer than every sequence (as none).
    (4, 1, False, 3), (4, 3, False, 9), (16, None, False, 20), (4, None, True, 3), (16, None, True, 20),
    (4, 3, False, 64),
])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_paged_decode_matches_naive(rope, layer, block_size, split_pages, fused, window, cache_dtype):
    heads, head_size = 4, 16
    seq_lens = [1, 5, 16, 17, 40, 64, 3]  # n = 1, page boundaries, ragged
    proj, rotary, rows = sequence_case(heads, head_size, layer, rope, seq_lens, seed=block_size)
    rows = [r.to(cache_dtype) for r in rows]  # what the cache holds, in its dtype
    kv_cache, block_table = write_sequences(rows, block_size, token_major=block_size == 16)
    q = torch.randn(len(seq_lens), heads, head_size)
    # A padded row (seq_len 0, the null block) rides along and must not disturb the others.
    q_pad = torch.cat((q, torch.randn(1, heads, head_size)))
    table = torch.cat((block_table, torch.zeros(1, block_table.shape[1], dtype=block_table.dtype)))
    lens = torch.tensor([*seq_lens, 0])
    if window:  # some sequences shorter than the window, some longer
        table = free_out_of_window(kv_cache, table, lens, 1, window)
    num_pages = math.ceil(max(seq_lens) / block_size)
    # split_pages: the working set a split at a time (one page; splits past some sequences' ends)
    # fused: the C loop over the pages in place (the CPU's default form)
    got = paged_decode_slim_attention(
        q_pad, kv_cache, table, lens, num_pages, proj, rotary, 0.25, split_pages, fused, window=window
    )
    assert torch.isfinite(got).all()
    for i, n in enumerate(seq_lens):
        ref = naive_slim_attention(q[i : i + 1], rows[i], proj, rotary, 0.25, window)
        torch.testing.assert_close(got[i : i + 1], ref, rtol=1e-4, atol=1e-4)


def store_case(heads, head_size, layer, rope, model_dtype, cache_dtype, tokens=13, block_size=8, seed=0):
    """New tokens' keys and values in the model's dtype at scattered positions and slots (three of them
    padding, slot -1) and a random paged cache (token-major, as the CPU build lays it out)."""
    spill, bias, refine = LAYERS[layer]
    spill = spill and heads  # one spill coordinate per head for any head count
    w_k, w_v, b_k, b_v, proj = make_layer(heads, head_size, bias, spill, seed, refine)
    rotary = ROPES[rope](head_size)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, heads * head_size, generator=g, dtype=torch.float64)
    positions = torch.randperm(300, generator=g)[:tokens]
    k = (x @ w_k + (0 if b_k is None else b_k)).view(tokens, heads, head_size)
    k = k if rotary is None else rotate(k, positions, Rotary(rotary.cos_sin.double(), rotary.rotary_dim, rotary.neox))
    v = (x @ w_v + (0 if b_v is None else b_v)).view(tokens, heads, head_size)
    num_blocks = 6
    cache = torch.randn(num_blocks, block_size, heads, head_size + spill // heads, generator=g).to(cache_dtype)
    slots = torch.randperm((num_blocks - 1) * block_size, generator=g)[:tokens] + block_size  # never the null block
    slots[torch.randperm(tokens, generator=g)[:3]] = -1
    return k.to(model_dtype), v.to(model_dtype), positions, slots, cache.transpose(1, 2), proj, rotary


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("model_dtype,cache_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float16),
    (torch.float16, torch.float16),
])
@pytest.mark.parametrize("heads", [4, 5])
def test_fused_store_writes_what_the_torch_form_writes(rope, layer, model_dtype, cache_dtype, heads):
    """The CPU's fused store against `cache_rows` + `write_rows`: the same rows at the same slots, up to
    one rounding step of the cache's dtype (float32 sums in another order), padding skipped (the torch
    form puts it in the null block, which nothing reads); 5 heads: not a whole register block."""
    key, value, positions, slots, cache, proj, rotary = store_case(heads, 16, layer, rope, model_dtype, cache_dtype)
    # A row stride of its own, as the engine's split of its fused qkv output hands keys over.
    key = torch.cat((key, torch.zeros_like(key)), dim=1)[:, :heads]
    expected, got = cache.clone(), cache.clone()
    store_rows(expected, key, value, positions, slots, proj, rotary, fused=False)
    store_rows(got, key, value, positions, slots, proj, rotary, fused=True)
    assert not torch.equal(got[1:], cache[1:])
    ulp = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}[cache_dtype]
    torch.testing.assert_close(got[1:].float(), expected[1:].float(), rtol=ulp, atol=ulp)
    torch.testing.assert_close(got[0], cache[0])


@pytest.mark.parametrize("rope", ["neox", "gptj_partial"])
def test_fused_loops_with_heads_not_a_whole_register_block(rope):
    """5 heads of 16 with one spill coordinate each (rows of 85 floats: no whole 8-float vector at the
    end): the fused store then the fused decode against the naive reference on the rows the torch form
    builds, for a sequence that crosses pages."""
    heads, head_size, block_size, n = 5, 16, 8, 29
    key, value, _, _, _, proj, rotary = store_case(heads, head_size, "refined_spill", rope, torch.float32, torch.float32,
                                                   tokens=n, seed=4)
    positions, slots = torch.arange(n), torch.arange(n) + block_size  # pages 1.. of one sequence
    cache = torch.zeros(6, block_size, heads, head_size + 1).transpose(1, 2)
    store_rows(cache, key, value, positions, slots, proj, rotary, fused=True)
    q = torch.randn(2, heads, head_size)
    table = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]], dtype=torch.int32)
    got = paged_decode_slim_attention(q, cache, table, torch.tensor([n, 9]), 4, proj, rotary, 0.25, fused=True)
    rows = cache_rows(key, value, positions, proj, rotary)
    for i, length in enumerate([n, 9]):
        ref = naive_slim_attention(q[i : i + 1], rows[:length], proj, rotary, 0.25)
        torch.testing.assert_close(got[i : i + 1], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("window", [None, 5, 12, 40])  # none, shorter than a page, across pages, longer than all
def test_paged_prefill_matches_naive(rope, layer, window):
    heads, head_size, block_size = 4, 16, 8
    seq_lens = [7, 33, 16, 1, 24]
    query_lens = [7, 5, 16, 1, 9]  # whole prompts, chunks after a cached prefix, n = 1
    proj, rotary, rows = sequence_case(heads, head_size, layer, rope, seq_lens, seed=3)
    if rotary is not None:  # a table as long as the longest sequence (33), short of its last page's end (40)
        rotary = Rotary(rotary.cos_sin[: max(seq_lens)], rotary.rotary_dim, rotary.neox)
    kv_cache, block_table = write_sequences(rows, block_size)
    if window:  # a chunk's queries straddle their windows' starts
        block_table = free_out_of_window(kv_cache, block_table, seq_lens, query_lens, window)
    q = torch.randn(sum(query_lens), heads, head_size)
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()])
    num_pages = math.ceil(max(seq_lens) / block_size)
    got = paged_prefill_slim_attention(
        q, query_start_loc, torch.tensor(seq_lens), kv_cache, block_table, num_pages, 20, proj, rotary, 0.25,
        window=window,
    )
    assert torch.isfinite(got).all()
    for i in range(len(seq_lens)):
        span = slice(query_start_loc[i], query_start_loc[i + 1])
        ref = naive_slim_attention(q[span], rows[i], proj, rotary, 0.25, window)
        torch.testing.assert_close(got[span], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rope", ["neox", "gptj_partial"])
@pytest.mark.parametrize("window", [None, 7])
def test_paged_forms_equal_float64_softmax_attention(rope, window):
    """Independent of slim's maps: float64 causal softmax attention on V = X·W_V + b_V, K = rope(X·W_K + b_K),
    within a band p − W < k ≤ p with a sliding window (its freed pages NaN)."""
    heads, head_size, block_size = 4, 16, 8
    d = heads * head_size
    w, b = make_weights(heads, head_size, bias=True, seed=11)
    rotary32 = ROPES[rope](head_size)
    rotary64 = Rotary(rotary32.cos_sin.double(), rotary32.rotary_dim, rotary32.neox)
    proj = solve_projection(w["k"], w["v"], b["k"], b["v"], heads, 4)
    seq_lens, query_lens = [30, 9, 1, 20], [1, 9, 1, 6]
    g = torch.Generator().manual_seed(5)
    rows, queries, references = [], [], []
    for n, m in zip(seq_lens, query_lens):
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        positions = torch.arange(n)
        q, k, v = ((x @ w[c] + b[c]).view(n, heads, head_size) for c in "qkv")
        q, k = rotate(q, positions, rotary64), rotate(k, positions, rotary64)
        rows.append(cache_rows(k.float(), v.float(), positions, proj, rotary32).float())
        scores = torch.einsum("qhd,khd->hqk", q[n - m :], k) * 0.25
        distance = torch.arange(n - m, n)[:, None] - torch.arange(n)[None, :]
        band = (distance >= 0) & (distance < (window or n))
        references.append(torch.einsum("hqk,khd->qhd", scores.masked_fill(~band, -math.inf).softmax(-1), v))
        queries.append(q[n - m :].float())
    kv_cache, block_table = write_sequences(rows, block_size)
    if window:
        block_table = free_out_of_window(kv_cache, block_table, seq_lens, query_lens, window)
    num_pages = math.ceil(max(seq_lens) / block_size)
    decodes = [i for i, m in enumerate(query_lens) if m == 1]
    got = paged_decode_slim_attention(
        torch.cat([queries[i] for i in decodes]), kv_cache, block_table[decodes],
        torch.tensor(seq_lens)[decodes], num_pages, proj, rotary32, 0.25, window=window,
    )
    for row, i in enumerate(decodes):
        torch.testing.assert_close(got[row : row + 1].double(), references[i], rtol=1e-4, atol=1e-4)
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()])
    got = paged_prefill_slim_attention(
        torch.cat(queries), query_start_loc, torch.tensor(seq_lens), kv_cache, block_table, num_pages, 9,
        proj, rotary32, 0.25, window,
    )
    torch.testing.assert_close(got.double(), torch.cat(references), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_binding_check_refuses_a_wrong_rope_pairing_or_table(model_dtype):
    """The bind-time check: a right binding comes out near the layout's prediction; keys the model
    rotates GPT-J style read back NeoX style, or with a table scaled like YaRN's (x1.045), do not."""
    heads, head_size = 4, 16
    w_k, w_v, b_k, b_v, proj = make_layer(heads, head_size, True, 8, refine=model_dtype == torch.bfloat16)
    table = rope_table(2048, head_size)
    positions = torch.cat((torch.arange(8), torch.linspace(0, 2047, 56, dtype=torch.float64).long()))
    model_rotation = lambda keys, pos: rotate(keys, pos, Rotary(table, head_size, False))  # noqa: E731
    store = torch.float16 if model_dtype == torch.bfloat16 else torch.float32

    def error(rotary):
        return binding_error(w_k, w_v, b_k, b_v, proj, rotary, model_rotation, model_dtype, store, positions)

    right = error(Rotary(table, head_size, False))
    assert right < (3e-3 if model_dtype == torch.bfloat16 else 1e-4)
    assert error(Rotary(table, head_size, True)) > 100 * right  # pairing
    assert error(Rotary(table * 1.045, head_size, False)) > 10 * right  # magnitude


@pytest.mark.parametrize("spill,refine", [(0, False), (8, True)])
def test_wide_key_projection_rebuilds_values_exactly(spill, refine):
    """Gemma-7B's shape: heads x head_size (32) wider than the hidden state (24). W_K has full rank, so
    X = (K − b_K)·W_K⁺ and V follows exactly (float64); one column narrower than hidden is refused."""
    heads, head_size, hidden, tokens = 4, 8, 24, 40
    g = torch.Generator().manual_seed(7)
    w_k, w_v = (torch.randn(hidden, heads * head_size, generator=g, dtype=torch.float64) for _ in range(2))
    b_k, b_v = (torch.randn(heads * head_size, generator=g, dtype=torch.float64) for _ in range(2))
    proj = solve_projection(w_k, w_v, b_k, b_v, heads, spill, refine)
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    k, v = (x @ w_k + b_k).view(tokens, heads, head_size), (x @ w_v + b_v).view(tokens, heads, head_size)
    rows = cache_rows(k, v, torch.arange(tokens), proj, None).double()
    rebuilt = rebuild_values(rows[..., :head_size], rows[..., head_size:].flatten(1), proj)
    assert ((rebuilt.double() - v).norm() / v.norm()).item() < 1e-5  # the maps are held in float32
    with pytest.raises(SlimNotApplicable, match="fewer columns than the hidden state"):
        solve_projection(w_k[:, : hidden - 1], w_v[:, : hidden - 1], None, None, 1, 0)
