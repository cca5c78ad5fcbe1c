"""The backend tests' layer shape and batches, over `vllm_slim.fixtures.step` (one layer driven as
vLLM's model runner drives it)."""

from pathlib import Path

from vllm_slim.fixtures import step
from vllm_slim.fixtures.step import (  # noqa: F401 (the tests' names)
    LAYER_NAME,
    Step,
    common_metadata,
    rope_table,
    run_step,
    scattered_block_table,
)

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


def engine_config(model_dir: Path, backend: str, dtype: str, additional_config: dict | None = None, **engine_args):
    return step.engine_config(model_dir, backend, dtype, BLOCK_SIZE, MAX_LEN, additional_config, **engine_args)


def attention_layer(vllm_config, head_size: int = HEAD_SIZE, **options):
    return step.attention_layer(vllm_config, HEADS, head_size, **options)
