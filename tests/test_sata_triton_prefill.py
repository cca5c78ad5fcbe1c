"""Plain sata's Triton prefill (`ops/sata/triton_prefill.py`) against the chunk form (output and every page
after) and against the naive reference over sequences prefilled in two steps: on the CPU under Triton's
interpreter at small shapes (GQA and MHA, d_v ≠ d, orders 1, 3 and 5, ragged new-token counts past a query
block, continued states, a reset over a garbage page, permuted and strided state indices, pages with
trailing floats, q/k/v as strided views of one fused projection, bf16 and float32), and, marked `gpu`,
compiled on CUDA at Llama-7B's shape."""

import pytest
import torch
import triton

from vllm_slim.ops.sata import chunk_sata_varlen, feature_size, naive_sata_attention
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
