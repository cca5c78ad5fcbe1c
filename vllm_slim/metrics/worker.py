"""The worker's half of the metrics: describe the cache our backends laid out (see `report.py`)."""

import torch

from vllm.config import VllmConfig
from vllm.logger import init_logger

from vllm_slim.metrics.report import CacheReport, LayerReport, publish
from vllm_slim.ops.sata.policy import stock_bytes_per_token

logger = init_logger(f"vllm.{__name__}")


def publish_cache_report(model: torch.nn.Module, vllm_config: VllmConfig) -> None:
    """After the weights are bound: bytes per token ours and stock, and each layer's policy."""
    from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.kv_cache_interface import AttentionSpec
    from vllm.v1.worker.utils import customize_attention_spec

    from vllm_slim.backends.registration import BACKENDS

    layers = [
        module for module in model.modules()
        if isinstance(module, Attention) and module.attn_backend.get_name() in BACKENDS
    ]
    if not layers or get_tensor_model_parallel_rank() != 0:
        return  # tensor-parallel ranks hold the same layers: the first one speaks for them
    name = layers[0].attn_backend.get_name()
    # The spec as the model runners page it (v1/worker/gpu/attn_utils.get_kv_cache_spec).
    specs = [layer.get_kv_cache_spec(vllm_config) for layer in layers]
    specs = [
        customize_attention_spec(layer.attn_backend, spec) if isinstance(spec, AttentionSpec) else spec
        for layer, spec in zip(layers, specs)
    ]
    report = CacheReport(
        backend=name.lower(),
        # sata's block is one sequence's state, max_model_len tokens long
        bytes_per_token=sum(spec.page_size_bytes / spec.block_size for spec in specs),
        stock_bytes_per_token=sum(
            stock_bytes_per_token(layer.num_kv_heads, layer.head_size, layer.head_size_v, layer.kv_cache_torch_dtype)
            for layer in layers
        ),
        state_bytes_per_sequence=sum(spec.page_size_bytes for spec in specs) if name == "SATA" else None,
        layers=[_layer_report(layer) for layer in layers],
        map_bytes=sum(layer.impl.projection.map_bytes for layer in layers if getattr(layer.impl, "projection", None)),
    )
    engine = vllm_config.parallel_config.data_parallel_rank
    path = publish(report, engine, get_pp_group().rank_in_group)
    if path is None:
        logger.warning(
            "vllm-slim: no report directory (SLIM_REPORT_DIR) in this worker: /metrics will not "
            "carry the vllm_slim_* gauges; set it to a directory the API server can read"
        )


def _layer_report(layer: torch.nn.Module) -> LayerReport:
    layout = getattr(layer.impl, "layout", None)
    if layout is None:  # sata
        return LayerReport(layer.layer_name, layer.impl.policy.describe())
    numerics = next(numerics for numerics in layout.layers if numerics.name == layer.layer_name)
    return LayerReport(
        layer.layer_name, layout.describe(), numerics.cond, numerics.error, numerics.error_naive, layout.stock_error
    )
