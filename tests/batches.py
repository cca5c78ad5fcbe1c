"""One attention layer of ours driven the way vLLM's model runner drives it, without a server: a real
`Attention` module under a real engine config, our builder's metadata from `CommonAttentionMetadata`
(with `positions` left None, as vLLM's own backend tests leave it), a paged cache at scattered blocks,
and a step = build → do_kv_cache_update (if the backend asks for it) → forward."""

import itertools
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

# The batch shapes of vLLM's attention-backend tests (tests/v1/attention/test_attention_backends.py):
# name -> (seq_lens, query_lens); each sequence's last query_len tokens are this step's queries.
BATCH_SPECS = {
    "small_decode": ([32, 40], [1, 1]),
    "small_prefill": ([32, 40], [8, 8]),
    "mixed_small": ([32, 40, 48, 56], [1, 1, 5, 5]),
    "medium_decode": ([128, 256, 512, 1024, 128, 256, 512, 1024], [1] * 8),
    "medium_prefill": ([256, 512, 1024, 2048], [16] * 4),
    "mixed_medium": ([512, 1024, 2048, 512, 1024, 2048], [1, 1, 1, 7, 7, 7]),
    "large_decode": ([2048] * 32, [1] * 32),
    "large_prefill": ([4096] * 8, [32] * 8),
    "mixed_large": ([1024, 2048, 4096, 1024, 2048, 4096], [1, 1, 1, 32, 32, 32]),
    "single_decode": ([1024], [1]),
    "single_prefill": ([1024], [64]),
    "small_encoder_prefill": ([32, 64, 128, 256], [32, 64, 128, 256]),
    "medium_encoder_prefill": ([256, 512, 1024, 2048], [256, 512, 1024, 2048]),
}
HEADS, HEAD_SIZE, BLOCK_SIZE, MAX_LEN = 4, 32, 16, 4096
LAYER_NAME = "model.layers.0.self_attn.attn"


def engine_config(model_dir: Path, backend: str, dtype: str, additional_config: dict | None = None, **engine_args):
    """vLLM's engine config for the fixture model with our backend selected (plugin registered)."""
    import vllm_slim
    from vllm.engine.arg_utils import EngineArgs

    vllm_slim.register()
    return EngineArgs(
        model=str(model_dir), attention_backend=backend, dtype=dtype, block_size=BLOCK_SIZE,
        max_model_len=MAX_LEN, max_num_seqs=64, max_num_batched_tokens=MAX_LEN,
        additional_config=additional_config or {}, **engine_args,
    ).create_engine_config()


def attention_layer(vllm_config):
    """A real vLLM `Attention` module, built as a model builds it (its impl is the selected backend's)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention import Attention

    with set_current_vllm_config(vllm_config):
        return Attention(
            HEADS, HEAD_SIZE, HEAD_SIZE**-0.5, HEADS, cache_config=vllm_config.cache_config, prefix=LAYER_NAME
        )


@dataclass
class Step:
    """One step's batch: sequence i holds seq_lens[i] tokens after it, query_lens[i] of them new."""

    seq_lens: list[int]
    query_lens: list[int]

    @property
    def context_lens(self) -> list[int]:
        return [s - q for s, q in zip(self.seq_lens, self.query_lens)]

    def token_positions(self) -> torch.Tensor:
        return torch.cat([torch.arange(c, s) for c, s in zip(self.context_lens, self.seq_lens)])


def common_metadata(step: Step, block_table: torch.Tensor, block_size: int, device="cpu", with_upper_bound=False):
    """CommonAttentionMetadata for `step` over `block_table` [B, max_blocks], as the runner fills it."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    query_start_loc = torch.tensor([0, *itertools.accumulate(step.query_lens)], dtype=torch.int32)
    seq_lens = torch.tensor(step.seq_lens, dtype=torch.int32)
    positions = step.token_positions()
    owner = torch.repeat_interleave(torch.arange(len(step.seq_lens)), torch.tensor(step.query_lens))
    slots = block_table[owner, positions // block_size].long() * block_size + positions % block_size
    return CommonAttentionMetadata(
        query_start_loc=query_start_loc.to(device),
        query_start_loc_cpu=query_start_loc,
        seq_lens=seq_lens.to(device),
        num_reqs=len(step.seq_lens),
        num_actual_tokens=int(query_start_loc[-1]),
        max_query_len=max(step.query_lens),
        max_seq_len=max(step.seq_lens),
        block_table_tensor=block_table.to(device),
        slot_mapping=slots.to(device),
        seq_lens_cpu_upper_bound=seq_lens if with_upper_bound else None,
    )


def scattered_block_table(seq_lens: list[int], block_size: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Each sequence's pages at distinct shuffled blocks, never block 0 (vLLM's null block); unused
    entries 0, as the runner leaves them. Returns (block_table, num_blocks)."""
    pages = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(pages) + 1
    order = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    table = torch.zeros(len(seq_lens), max(pages), dtype=torch.int32)
    for i, n in enumerate(pages):
        table[i, :n] = torch.tensor([order.pop() for _ in range(n)], dtype=torch.int32)
    return table, num_blocks


def rope_table(max_position: int, rotary_dim: int, base: float = 10000.0, dtype=torch.float32) -> torch.Tensor:
    """[max_position, rotary_dim] cos | sin, vLLM's `cos_sin_cache` layout."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=dtype) / rotary_dim)
    freqs = torch.outer(torch.arange(max_position, dtype=dtype), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def run_step(
    layer, vllm_config, cam, query, key, value, kv_cache, write_only=False, guard=lambda phase: nullcontext()
) -> torch.Tensor | None:
    """Build this step's metadata and run the layer's impl as vLLM's attention op does (or only its
    cache write); guard(phase) wraps the "build" and the "forward" phase."""
    from vllm.forward_context import set_forward_context

    backend = layer.get_attn_backend()
    builder = backend.get_builder_cls()(layer.get_kv_cache_spec(vllm_config), [LAYER_NAME], vllm_config, query.device)
    with guard("build"):
        metadata = builder.build(0, cam)
    output = torch.empty(query.shape[0], HEADS, value.shape[-1], dtype=query.dtype, device=query.device)
    with set_forward_context({LAYER_NAME: metadata}, vllm_config), guard("forward"):
        if not backend.forward_includes_kv_cache_update:
            layer.impl.do_kv_cache_update(layer, key, value, kv_cache, cam.slot_mapping)
        if write_only:
            return None
        return layer.impl.forward(layer, query, key, value, kv_cache, metadata, output)
