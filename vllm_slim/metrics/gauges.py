"""The `vllm_slim_*` gauges: names, help and labels (importable without vLLM).

Names follow Prometheus conventions, not vLLM's `vllm:` ones: colons are for recording rules, and
vLLM unregisters every `vllm:` collector after plugin loggers are built. Labels are vLLM's
(`model_name`, `engine`) so its dashboards' variables filter ours too. Each gauge is created once
per process, with a multiprocess mode, so they also work with several API servers
(PROMETHEUS_MULTIPROC_DIR).
"""

import functools

from prometheus_client import Gauge

_ENGINE = ["model_name", "engine"]
GAUGES = {
    # name: (help, extra labels)
    "vllm_slim_kv_cache_bytes_per_token": (
        "Cache bytes our backend stores per token, all layers (sata: one sequence's state spread over "
        "max_model_len tokens).", []),
    "vllm_slim_stock_kv_cache_bytes_per_token": (
        "Cache bytes the stock backend stores per token, all layers, same model and cache dtype.", []),
    "vllm_slim_kv_cache_capacity_tokens": (
        "Tokens our cache holds at the configured memory (num_gpu_blocks x tokens per block; sata: "
        "sequences x max_model_len).", []),
    "vllm_slim_stock_kv_cache_capacity_tokens": (
        "Tokens the stock cache would hold in the same memory (the KV cache's, plus slim's value maps, "
        "which the stock backend does not need).", []),
    "vllm_slim_value_map_bytes": (
        "Slim: bytes its per-layer value maps (W_KV, refinement, spill) hold, all layers, taken from the "
        "memory the KV cache would otherwise have.", []),
    "vllm_slim_kv_cache_saved_bytes": (
        "Bytes saved now against the stock cache for the sequences held (negative for sata below its "
        "break-even length).", []),
    "vllm_slim_sata_state_bytes_per_sequence": ("One sequence's SATA state, all layers.", []),
    "vllm_slim_sata_state_bytes": ("SATA state bytes held now, all sequences.", []),
    "vllm_slim_sata_equivalent_kv_bytes": (
        "Bytes the stock KV cache would hold now for the same sequences.", []),
    "vllm_slim_layer_w_k_condition_number": ("Slim: cond(W_K) of the layer.", ["layer"]),
    "vllm_slim_layer_v_relative_error": (
        "Slim: predicted relative error of the values read back, per layer, for the chosen layout "
        "(layout=slim), the paper's K-only layout (paper) and the stock cache (stock).", ["layer", "layout"]),
    "vllm_slim_layer_policy_info": (
        "The policy our backend chose for the layer (value 1).", ["layer", "backend", "policy"]),
}


@functools.cache
def gauge(name: str) -> Gauge:
    """One Gauge per process (prometheus_client refuses a second registration of a name)."""
    documentation, labels = GAUGES[name]
    return Gauge(name, documentation, labelnames=_ENGINE + labels, multiprocess_mode="mostrecent")
