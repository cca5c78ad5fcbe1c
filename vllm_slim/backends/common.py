"""What the slim and sata backends share: decoder self-attention only, any block and head size,
a cache page that depends on the model they bind, and start-up errors that say what is unsupported
and why."""

import contextvars
from collections.abc import Callable
from typing import ClassVar

from torch import nn

from vllm.config import VllmConfig
from vllm.v1.attention.backend import AttentionBackend, AttentionType, CommonAttentionMetadata, MultipleOf
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheSpec


class DecoderAttentionBackend(AttentionBackend):

    # Why the KV-cache dtypes this backend refuses are refused, and why sliding windows are (sata's).
    kv_cache_dtype_reason: ClassVar[str] = ""
    sliding_window_reason: ClassVar[str] = ""

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size > 0

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False  # connectors and offloading assume the stock K|V page

    @classmethod
    def validate_configuration(cls, **config) -> list[str]:
        """vLLM's checks, with its generic reasons replaced by ones that name the value and why."""
        attn_type = config.get("attn_type")
        name = cls.get_name().lower()
        specific = {
            "kv_cache_dtype not supported": (
                f"KV-cache dtype {config.get('kv_cache_dtype')!r} ({cls.kv_cache_dtype_reason}; "
                f"use one of {cls.supported_kv_cache_dtypes})"
            ),
            f"attention type {attn_type} not supported": (
                f"attention type {getattr(attn_type, 'value', attn_type)!r} ({name} serves decoder "
                "self-attention only; encoder and encoder-decoder cross-attention are not handled by it)"
            ),
            "sliding window not supported": (
                f"sliding-window attention ({cls.sliding_window_reason}; a window at least --max-model-len "
                "long never takes effect and is served as full attention: lower --max-model-len to the "
                "window to serve this model)"
            ),
        }
        return [specific.get(reason, reason) for reason in super().validate_configuration(**config)]


# Set while a bound layer's stock spec is built: vLLM sizes a sliding-window layer's block by calling the
# backend's `customize_spec` on a stock-shaped spec inside that call, before `bind_cache_spec` pages it.
_BUILDING_STOCK_SPEC = contextvars.ContextVar("building_stock_spec", default=False)


def bind_cache_spec(layer: nn.Module, page: Callable[[AttentionSpec], KVCacheSpec]) -> None:
    """Have `layer` hand both model runners `page(its stock spec)` as its cache spec. What our backends
    page depends on the model (slim's layout, sata's state), which `customize_spec`, a class method
    given only the spec, cannot see; per-model facts live on the layer, never on the class."""
    stock = type(layer).get_kv_cache_spec.__get__(layer)

    def paged(vllm_config: VllmConfig) -> KVCacheSpec:
        building = _BUILDING_STOCK_SPEC.set(True)
        try:
            spec = stock(vllm_config)
        finally:
            _BUILDING_STOCK_SPEC.reset(building)
        return page(spec)

    layer.get_kv_cache_spec = paged


def building_stock_spec() -> bool:
    """Whether `customize_spec` is sizing a bound layer's stock spec (see `bind_cache_spec`)."""
    return _BUILDING_STOCK_SPEC.get()


def host_max_seq_len(cam: CommonAttentionMetadata, first: int, end: int) -> int:
    """The longest sequence of requests first..end−1 as the host knows it (an upper bound), 0 if none."""
    if first >= end:
        return 0
    if cam.seq_lens_cpu_upper_bound is not None:
        return int(cam.seq_lens_cpu_upper_bound[first:end].max())
    return cam.max_seq_len


def unsupported_features(
    alibi_slopes, logits_soft_cap, kv_sharing_target_layer_name, extra_impl_args, vllm_config: VllmConfig,
    tensor_parallel_reason: str, speculative_reason: str,
) -> list[str]:
    """Attention features neither backend implements, as reasons naming the offending values."""
    reasons = []
    if alibi_slopes is not None:
        reasons.append("ALiBi slopes")
    if logits_soft_cap:
        reasons.append(f"logit soft-capping ({logits_soft_cap})")
    if kv_sharing_target_layer_name is not None:
        reasons.append(f"cross-layer KV sharing (target {kv_sharing_target_layer_name})")
    if extra_impl_args.get("sinks") is not None:
        reasons.append("attention sinks")
    tp = vllm_config.parallel_config.tensor_parallel_size
    if tp > 1:
        reasons.append(f"tensor parallel size {tp}: {tensor_parallel_reason}")
    speculative = vllm_config.speculative_config
    if speculative is not None:
        method = getattr(speculative, "method", None) or "draft model"
        reasons.append(
            f"speculative decoding ({method}, {speculative.num_speculative_tokens} tokens): {speculative_reason}"
        )
    return reasons
