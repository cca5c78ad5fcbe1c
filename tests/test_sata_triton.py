"""SATA's Triton decode (`ops/sata/triton_decode.py`) against the chunk form (output and the states left
in the pages) and against the naive reference over decoded sequences: on the CPU under Triton's
interpreter at small shapes (GQA and MHA, d_v ≠ d, orders 1, 3 and 5, a reset, permuted and strided
state indices, pages with trailing floats as the hybrid lays them out, bf16 and float32), and, marked
`gpu`, compiled on CUDA at Llama-7B's shape."""

import pytest
import torch

from vllm_slim.ops.sata import chunk_sata_varlen, feature_size, naive_sata_attention
from vllm_slim.ops.sata.triton_decode import triton_decode_sata

SPARE = 5  # trailing floats a page: the stride of a hybrid page, whose exact keys this decode leaves alone


def decode_case(steps, batch, heads, kv_heads, head_size, head_size_v, order, dtype, device="cpu", seed=0):
    """q, k, v [steps, batch, heads, size] in `dtype` and garbage float32 pages [2·batch, Hkv, floats]."""
    g = torch.Generator(device=device).manual_seed(seed)
    floats = feature_size(head_size, order) * (head_size_v + 1) + SPARE
    pages = torch.randn(2 * batch, kv_heads, floats, generator=g, device=device)
    q, k, v = (
        torch.randn(steps, batch, h, size, generator=g, device=device).to(dtype)
        for h, size in ((heads, head_size), (kv_heads, head_size), (kv_heads, head_size_v))
    )
    return q, k, v, pages


def chunk_step(q, k, v, pages, indices, reset, scale, order):
    """The chunk form on one token per sequence (the decode contract), on the pages' series floats."""
    batch = q.shape[0]
    device = q.device
    series = pages[..., : pages.shape[-1] - SPARE]
    return chunk_sata_varlen(
        q, k, v, torch.arange(batch + 1, device=device), torch.ones(batch, dtype=torch.long, device=device), 1,
        series, indices, reset, scale, order=order,
    )


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


@pytest.mark.parametrize("order,dtype", [(3, torch.float32), (5, torch.bfloat16)])
def test_decoded_sequences_equal_the_naive_reference(order, dtype):
    """Two sequences of GQA heads decoded token by token through the kernel from a reset: every step's
    output is the quadratic reference's at that position."""
    steps, heads, kv_heads, head_size = 6, 4, 2, 8
    q, k, v, pages = decode_case(steps, 2, heads, kv_heads, head_size, head_size, order, dtype, seed=1)
    indices = torch.tensor([3, 1])
    got = torch.stack([
        triton_decode_sata(q[t], k[t], v[t], pages, indices, torch.full((2,), t == 0), 0.4, order)
        for t in range(steps)
    ])
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for s in range(2):
        expected = naive_sata_attention(q[:, s].double(), k[:, s].double(), v[:, s].double(), 0.4, order)
        torch.testing.assert_close(got[:, s].double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_decode_on_cuda_at_llama7b_shape():
    """Compiled (not interpreted): 8 sequences of 32 heads x 128 at order 3 (8,385 basis rows, 4.3 MB of
    state a head), bf16 inputs, against the chunk form on the same GPU: output and pages."""
    heads, head_size, order = 32, 128, 3
    q, k, v, pages = decode_case(2, 8, heads, heads, head_size, head_size, order, torch.bfloat16, "cuda")
    indices = torch.randperm(16, device="cuda")[:8]
    scale = head_size**-0.5
    chunk_step(q[0], k[0], v[0], pages, indices, torch.ones(8, dtype=torch.bool, device="cuda"), scale, order)
    expected_pages = pages.clone()
    reset = torch.arange(8, device="cuda") % 3 == 0
    expected = chunk_step(q[1], k[1], v[1], expected_pages, indices, reset, scale, order)
    got = triton_decode_sata(q[1], k[1], v[1], pages, indices, reset, scale, order)
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(pages, expected_pages, rtol=1e-5, atol=1e-5)
