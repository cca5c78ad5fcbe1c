"""Slim's Triton store (`ops/slim/triton_store.py`) against the torch form (`cache_rows` + `write_rows`): on
the CPU under Triton's interpreter at small shapes (every RoPE and layout, three cache dtypes, 4 and 5
heads, padding slots, a cache with padded rows), through `store_rows` and the Triton decode against the
naive reference, and, marked `gpu`, compiled on CUDA at Llama-7B's shape."""

import pytest
import torch

from batches import rope_table
from test_slim_ops import store_case
from vllm_slim.ops.slim import (
    Rotary, cache_rows, naive_slim_attention, paged_decode_slim_attention, store_rows, triton_store,
)
from vllm_slim.ops.slim.cache import NULL_BLOCK, write_rows
from vllm_slim.ops.slim.projection import SlimProjection
from vllm_slim.ops.slim.triton_store import triton_store_rows

ULP = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}  # one rounding step of the cache


def sentinel_cache(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache shaped as `cache` [blocks, H, block_size, C], token-major and with 3 columns of padding
    after each row (strides of its own), filled with NaN; and the whole allocation behind it."""
    blocks, heads, block_size, width = cache.shape
    memory = torch.full((blocks, block_size, heads, width + 3), float("nan"), dtype=cache.dtype)
    return memory[..., :width].transpose(1, 2), memory


# Every RoPE with each layout that rotates (refined: un-RoPE then re-RoPE; spill: un-RoPE only), the plain
# layout once (its keys are stored as given, RoPE plays no part), each cache dtype, 4 and 5 heads.
@pytest.mark.parametrize("rope,layer,model_dtype,cache_dtype,heads", [
    ("neox", "refined_spill", torch.bfloat16, torch.float16, 4),
    ("gptj_partial", "refined_spill", torch.float32, torch.float32, 5),
    ("none", "refined_spill", torch.bfloat16, torch.bfloat16, 5),
    ("neox", "spill_bias", torch.float32, torch.float32, 5),
    ("gptj_partial", "spill_bias", torch.bfloat16, torch.bfloat16, 4),
    ("none", "plain", torch.bfloat16, torch.float16, 4),
])
def test_triton_store_writes_what_the_torch_form_writes(rope, layer, model_dtype, cache_dtype, heads):
    """The whole cache allocation after the store: each real token's row at its slot (up to one rounding step
    of the cache's dtype: float32 sums in another order), and NaN exactly everywhere else: the null block and every
    unwritten slot (padding is not written at all), and the columns past each row (its width respected)."""
    key, value, positions, slots, like, proj, rotary = store_case(heads, 16, layer, rope, model_dtype, cache_dtype,
                                                                  tokens=8)
    # Keys and values with a row stride of their own, as the engine's split of its fused qkv output hands them.
    key = torch.cat((key, torch.zeros_like(key)), dim=1)[:, :heads]
    value = torch.cat((value, torch.zeros_like(value)), dim=1)[:, :heads]
    expected, expected_memory = sentinel_cache(like)
    got, got_memory = sentinel_cache(like)
    write_rows(expected, cache_rows(key, value, positions, proj, rotary), slots)
    expected[NULL_BLOCK] = float("nan")  # where the torch form parks padding rows
    triton_store_rows(got, key, value, positions, slots, proj, rotary)
    ulp = ULP[cache_dtype]
    torch.testing.assert_close(got_memory.float(), expected_memory.float(), rtol=ulp, atol=ulp, equal_nan=True)


def test_triton_store_then_triton_decode_equal_the_naive_reference(monkeypatch):
    """Through `store_rows` and `paged_decode_slim_attention` with VLLM_SLIM_TRITON=1 (both Triton): a sequence
    that crosses pages, refined with spill, partial GPT-J rotary, 5 heads (the head tile padded to 16 rows),
    against the naive reference on the rows the torch form builds."""
    heads, block_size, n = 5, 8, 13
    key, value, _, _, _, proj, rotary = store_case(heads, 16, "refined_spill", "gptj_partial", torch.float32,
                                                   torch.float32, tokens=n, seed=4)
    positions, slots = torch.arange(n), torch.arange(n) + block_size  # pages 1.. of one sequence
    cache = torch.zeros(6, block_size, heads, 16 + 1).transpose(1, 2)
    monkeypatch.setenv("VLLM_SLIM_TRITON", "1")
    calls = []  # the store went through the Triton form (not the C loop, which would pass too)
    monkeypatch.setattr(triton_store, "triton_store_rows", lambda *args: calls.append(triton_store_rows(*args)))
    store_rows(cache, key, value, positions, slots, proj, rotary)
    assert len(calls) == 1
    q = torch.randn(2, heads, 16, generator=torch.Generator().manual_seed(0))
    table = torch.tensor([[1, 2], [1, 2]], dtype=torch.int32)
    got = paged_decode_slim_attention(q, cache, table, torch.tensor([n, 6]), 2, proj, rotary, 0.25)
    rows = cache_rows(key, value, positions, proj, rotary)
    for i, length in enumerate([n, 6]):
        expected = naive_slim_attention(q[i : i + 1], rows[:length], proj, rotary, 0.25)
        torch.testing.assert_close(got[i : i + 1], expected, rtol=1e-4, atol=1e-4)


def random_maps(heads: int, head_size: int, spill: int, generator: torch.Generator) -> SlimProjection:
    """Random float32 maps of a refined layout's shapes (W_KV, W_SV, spill_in, refine, K and V biases) on the
    generator's device, each map scaled by its fan-in, unit biases: the kernels only apply them."""
    d, r = heads * head_size, heads * spill

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, device=generator.device) * scale

    return SlimProjection(
        randn(d, d, scale=d**-0.5), randn(r, d, scale=r**-0.5), randn(2 * d, r, scale=(2 * d) ** -0.5),
        randn(2 * d, d, scale=(2 * d) ** -0.5), randn(d), randn(d), heads, 1.0,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_store_on_cuda_at_llama7b_shape():
    """Compiled (not interpreted): 32 heads x 128, 2 spill coordinates a head, refined, biases, a bf16 model
    into an fp16 cache of block 16, 64 tokens (some padding), against the torch form on the same GPU."""
    heads, head_size, spill, block_size, tokens = 32, 128, 2, 16, 64
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device="cuda") * scale

    proj = random_maps(heads, head_size, spill, g)
    rotary = Rotary(rope_table(4096, head_size), head_size, True).to("cuda")
    key, value = randn(tokens, heads, head_size).bfloat16(), randn(tokens, heads, head_size).bfloat16()
    positions = torch.randint(0, 4096, (tokens,), generator=g, device="cuda")
    slots = torch.randperm(40 * block_size, generator=g, device="cuda")[:tokens] + block_size
    slots[::9] = -1
    cache = torch.full((41, heads, block_size, head_size + spill), float("nan"), device="cuda").half()
    expected, got = cache.clone(), cache.clone()
    write_rows(expected, cache_rows(key, value, positions, proj, rotary), slots)
    expected[NULL_BLOCK] = float("nan")
    triton_store_rows(got, key, value, positions, slots, proj, rotary)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-10, atol=2**-10, equal_nan=True)
