"""Make `--attention-backend slim` (and `sata`) work in every vLLM process.

vLLM loads general plugins in the API server, the engine core and each worker;
`register_backends` runs in all of them and is idempotent. Three fixes beyond
registering the enum member (see shared notes, vllm-internals §4-5):
- dynamic enum members pickle by value and the spawned engine unpickles the
  config before loading plugins: ours pickle by name through `lookup_backend`;
- the CPU platform silently swaps any selection for CPU_ATTN: ours are honoured
  and validated there the way the CUDA platform does it;
- W_KV needs the qkv weights, which the CPU platform deletes before the
  attention impl's own post-load hook: a wrapper around the loader's
  `process_weights_after_loading` binds every slim layer first (and, once the
  weights are done, reports the cache layout for /metrics, `vllm_slim.metrics`).
The same hook gives every layer of ours the cache spec its model needs (the layout
is per model, never class state). A sliding window at least max_model_len long is
dropped for both (it never takes effect). For sata, three more: prefix caching is turned
off (a fixed-size state cannot be shared or rewound to a prefix), so is FlashInfer's
autotune (its warm-up gives state-paged layers no metadata), and the engine's
"not enough KV cache memory" error is restated as what one sequence's state needs
and which order would fit.
"""

from collections.abc import Callable

import torch

from vllm.logger import init_logger

from vllm_slim.ops.dispatch import kernel_path

logger = init_logger(f"vllm.{__name__}")  # under vLLM's configured logger

BACKENDS = {
    "SLIM": "vllm_slim.backends.slim_attn.SlimAttentionBackend",
    "SATA": "vllm_slim.backends.sata_attn.SataAttentionBackend",
}

_registered = False

# The bind-time check passes a binding whose rebuilt values stay within this multiple of the
# layout's predicted error, or under the floor (float32 layouts predict ~1e-7).
BINDING_ERROR_RATIO = 4.0
BINDING_ERROR_FLOOR = 1e-3


def lookup_backend(name: str):
    """Unpickle one of our enum members by name (registering it first)."""
    register_backends()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[name]


def register_backends() -> None:
    """Register both backends and patch the few vLLM functions they need, all or nothing: a step that
    fails (a vLLM whose internals moved) undoes the steps before it, and start-up stops saying which
    step failed, where a half-patched process could serve wrongly without a word."""
    global _registered
    if _registered:
        return
    import vllm
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    undo: list[Callable[[], None]] = []
    steps = (
        (_register_members, AttentionBackendEnum), (_pickle_members_by_name, AttentionBackendEnum),
        (_honour_selection_on_cpu,), (_bind_weights_after_loading,), (_fit_config_to_backend,),
        (_explain_sata_memory_errors,),
    )
    for step, *args in steps:
        try:
            step(undo, *args)
        except Exception as error:
            for restore in reversed(undo):
                restore()
            raise RuntimeError(
                f"vllm-slim could not register with vLLM {vllm.__version__}: {step.__name__.strip('_')} failed "
                f"({type(error).__name__}: {error}); every earlier step was undone, so neither the slim nor the "
                "sata backend is available in this process"
            ) from error
    _registered = True


def _replace(undo: list, owner, name: str, value) -> None:
    """owner.name = value, with the way back in `undo` (an attribute the owner only inherited is deleted)."""
    own = vars(owner)
    if name in own:
        old = own[name]
        undo.append(lambda: setattr(owner, name, old))
    else:
        undo.append(lambda: delattr(owner, name))
    setattr(owner, name, value)


def _register_members(undo: list, enum_cls) -> None:
    for name, path in BACKENDS.items():
        if name not in enum_cls.__members__:
            enum_cls.register(name, path)

            def remove(name=name, path=path):
                enum_cls._member_map_.pop(name, None)  # first: Enum refuses to delete a member it maps
                enum_cls._value2member_map_.pop(path, None)
                delattr(enum_cls, name)

            undo.append(remove)


def _pickle_members_by_name(undo: list, enum_cls) -> None:
    by_value = enum_cls.__reduce_ex__

    def reduce_ex(member, protocol):
        if member.name in BACKENDS:
            return lookup_backend, (member.name,)
        return by_value(member, protocol)

    _replace(undo, enum_cls, "__reduce_ex__", reduce_ex)


def _honour_selection_on_cpu(undo: list) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return  # CUDA honours and validates any registered selection itself
    platform_cls = type(current_platform)
    stock_selector = platform_cls.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend is None or selected_backend.name not in BACKENDS:
            return stock_selector(cls, selected_backend, attn_selector_config, num_heads)
        backend = selected_backend.get_class()
        reasons = backend.validate_configuration(
            device_capability=None, **attn_selector_config._asdict()
        )
        if reasons:
            raise ValueError(
                f"Selected backend {selected_backend.name} is not valid for this "
                f"configuration. Reason: {reasons}"
            )
        logger.info_once("Using %s attention backend on CPU.", selected_backend.name)
        return selected_backend.get_path()

    _replace(undo, platform_cls, "get_attn_backend_cls", classmethod(get_attn_backend_cls))


def _bind_weights_after_loading(undo: list) -> None:
    from vllm.model_executor.model_loader import base_loader

    stock_hook = base_loader.process_weights_after_loading
    if getattr(stock_hook, "_slim_wrapped", False):
        return

    def process_weights_after_loading(model, model_config, target_device):
        from vllm.config import get_current_vllm_config

        from vllm_slim.metrics.worker import publish_cache_report

        bind_slim_layers(model)
        bind_sata_layers(model)
        stock_hook(model, model_config, target_device)
        try:
            publish_cache_report(model, get_current_vllm_config())
        except Exception:  # the gauges are for operators: serving goes on without them
            logger.exception("vllm-slim: could not report the cache layout; no vllm_slim_* gauges on /metrics")

    process_weights_after_loading._slim_wrapped = True
    _replace(undo, base_loader, "process_weights_after_loading", process_weights_after_loading)


def _layers_of(model: torch.nn.Module, impl_cls) -> dict[str, torch.nn.Module]:
    from vllm.model_executor.layers.attention import Attention

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, Attention) and isinstance(module.impl, impl_cls)
    }


@torch.no_grad()
def bind_slim_layers(model: torch.nn.Module) -> None:
    """Choose the cache layout, solve W_KV for every slim layer, check each binding, log the numerics."""
    from vllm_slim.backends.slim_attn import SlimAttentionImpl
    from vllm_slim.backends.weights import attention_weights
    from vllm_slim.ops.slim import SlimNotApplicable
    from vllm_slim.ops.slim.cache import binding_error
    from vllm_slim.ops.slim.policy import choose_layout

    layers = _layers_of(model, SlimAttentionImpl)
    if not layers:
        return
    weights = {name: attention_weights(model, name, attn) for name, attn in layers.items()}
    impl = next(iter(layers.values())).impl
    policy = impl.policy
    layout, projections = choose_layout(
        {n: (w.w_k, w.w_v, w.k_bias, w.v_bias) for n, w in weights.items()},
        impl.num_heads,
        impl.head_size,
        impl.model_dtype,
        impl.cache_torch_dtype,
        impl.kv_cache_dtype != "auto",
        policy,
    )
    logger.info("slim: per-layer V error predicted for isotropic inputs\n%s", layout.table())
    if not layout.within_budget:
        message = (
            f"slim: predicted V error exceeds its budget ({layout.error_budget:.2e}) even with "
            f"{layout.spill_per_head} spill coordinates per head (capacity {layout.capacity_gain:.2f}x). "
            "Raise the budget or the spill with --additional-config "
            "'{\"slim\": {\"min_capacity_gain\": 1.5}}' (or \"spill_per_head\": N), or accept it "
            "with '{\"slim\": {\"allow_over_budget\": true}}'.\n" + layout.table()
        )
        if not policy.allow_over_budget:
            raise SlimNotApplicable(message)
        logger.warning(message)
    expected = {numerics.name: numerics.error for numerics in layout.layers}
    for name, attn in layers.items():
        w, proj = weights[name], projections[name]
        positions = check_positions(w.rotary, w.w_k.device)
        error = binding_error(
            w.w_k, w.w_v, w.k_bias, w.v_bias, proj, w.rotary, w.rotate_keys, impl.model_dtype,
            layout.store_dtype, positions,
        )
        if error > max(BINDING_ERROR_RATIO * expected[name], BINDING_ERROR_FLOOR):
            raise SlimNotApplicable(
                f"slim: {name}: values rebuilt from the cache differ from the model's by {error:.2e} (relative) "
                f"on synthetic inputs at positions up to {int(positions.max())}, where "
                f"the layout predicts {expected[name]:.2e}: the K/V projections or the RoPE found for "
                f"{type(model.get_submodule(name.rsplit('.', 1)[0])).__name__} are not the ones it computes with"
            )
        attn.impl.bind(attn, layout, proj, w.rotary)
        logger.info("slim: layer %s runs SLIM (binding checked: V error %.2e)", name, error)
    logger.info("slim: cache writes and decode through %s", kernel_path(next(iter(weights.values())).w_k.device))


def check_positions(rotary, device) -> torch.Tensor:
    """Where the bind-time check places its tokens: the first few (position 0 is not rotated, so
    it alone would pass any pairing) and spread over the whole RoPE table."""
    end = rotary.cos_sin.shape[0] if rotary is not None else 64
    return torch.cat((torch.arange(min(8, end)), torch.linspace(0, end - 1, 56, dtype=torch.float64).long())).to(device)


def bind_sata_layers(model: torch.nn.Module) -> None:
    """Page every sata layer as one state per request; log what that state costs."""
    from vllm_slim.backends.sata_attn import SataAttentionImpl, log_state

    layers = _layers_of(model, SataAttentionImpl)
    for attn in layers.values():
        attn.impl.bind(attn)
    if layers:
        log_state(list(layers.values()))
        logger.info("sata: decodes and prefills through %s", kernel_path(next(model.parameters()).device))


def _selected(vllm_config) -> str | None:
    """SLIM or SATA when one of ours is the selected backend, else None."""
    backend = vllm_config.attention_config.backend
    return backend.name if backend is not None and backend.name in BACKENDS else None


def _selects_sata(vllm_config) -> bool:
    return _selected(vllm_config) == "SATA"


def _fit_config_to_backend(undo: list) -> None:
    """After the platform's own config check, for our backends only: a sliding window that can never take
    effect is dropped; for sata, prefix caching and FlashInfer's autotune are turned off."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    stock_check = platform_cls.check_and_update_config.__func__
    if getattr(stock_check, "_slim_wrapped", False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        stock_check(cls, vllm_config)
        if _selected(vllm_config) is None:
            return
        _drop_unreachable_window(vllm_config)
        if _selects_sata(vllm_config):
            _sata_config(vllm_config)

    check_and_update_config._slim_wrapped = True
    _replace(undo, platform_cls, "check_and_update_config", classmethod(check_and_update_config))


def _drop_unreachable_window(vllm_config) -> None:
    """A sliding window at least max_model_len long never leaves a key out (a query at position p < max_model_len
    sees p + 1 ≤ window keys): attention is full attention. Phi-3-128k's configs carry 262,144: without this,
    sata would refuse it and slim would page it as a sliding window for nothing. A window that can take effect
    is served by slim and refused by sata, with its values."""
    cache_config, model_config = vllm_config.cache_config, vllm_config.model_config
    window, max_model_len = cache_config.sliding_window, model_config.max_model_len
    if window is None or window < max_model_len:
        return
    cache_config.sliding_window = None
    model_config.hf_text_config.sliding_window = None  # the model files read it per layer from here
    logger.info(
        "%s: the model's sliding window (%d tokens) is at least max_model_len (%d), so it never takes effect: "
        "served as full attention", _selected(vllm_config).lower(), window, max_model_len,
    )


def _sata_config(vllm_config) -> None:
    if vllm_config.cache_config.enable_prefix_caching:
        vllm_config.cache_config.enable_prefix_caching = False
        logger.info(
            "sata: prefix caching turned off: a sequence keeps one fixed-size state, which "
            "cannot be shared with another sequence or rewound to a common prefix"
        )
    kernel_config = getattr(vllm_config, "kernel_config", None)
    if kernel_config is not None and kernel_config.enable_flashinfer_autotune:
        # Its dummy run builds no metadata for Mamba-style groups, so sata's layers would find
        # none (a KeyError in vLLM's attention op; v1/worker/gpu/model_runner.py, 0.33).
        kernel_config.enable_flashinfer_autotune = False
        logger.info(
            "sata: FlashInfer autotune turned off: its warm-up run gives state-paged layers no "
            "attention metadata; FlashInfer kernels run with their default configurations"
        )


def _explain_sata_memory_errors(undo: list) -> None:
    from vllm.v1.engine import core

    stock_configs = core.get_kv_cache_configs
    if getattr(stock_configs, "_sata_wrapped", False):
        return

    def get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory):
        try:
            return stock_configs(vllm_config, kv_cache_specs, available_memory)
        except ValueError as error:
            if not _selects_sata(vllm_config):
                raise
            message = _sata_memory_message(vllm_config, kv_cache_specs[0], min(available_memory))
            if message is None:
                raise
            raise ValueError(message) from error

    get_kv_cache_configs._sata_wrapped = True
    _replace(undo, core, "get_kv_cache_configs", get_kv_cache_configs)


def _sata_memory_message(vllm_config, layer_specs: dict, available: int) -> str | None:
    """What one sequence's state needs against what the cache has, and the largest order that fits."""
    from vllm.v1.kv_cache_interface import MambaSpec

    from vllm_slim.ops.sata.policy import SataPolicy, largest_fitting_order, sequence_state_bytes

    policy = SataPolicy.from_config((vllm_config.additional_config or {}).get("sata", {}))
    order, exact = policy.order, policy.exact_tokens
    head_size = vllm_config.model_config.get_head_size()
    num_kv_heads = vllm_config.model_config.get_num_kv_heads(vllm_config.parallel_config)
    shapes = [(num_kv_heads, head_size, head_size)] * sum(isinstance(s, MambaSpec) for s in layer_specs.values())
    needed = sequence_state_bytes(shapes, order, exact)
    # vLLM's block pool keeps one block aside (its null block): the cache must hold two states.
    if not shapes or 2 * needed <= available:
        return None
    fitting = largest_fitting_order(shapes, available // 2, exact)
    advice = (
        f"order {fitting} would fit: --additional-config '{{\"sata\": {{\"order\": {fitting}}}}}'"
        if fitting else "no order fits: give the cache more memory"
    )
    return (
        f"sata: one sequence's state at order {order} needs {needed / 2**20:,.1f} MiB "
        f"({len(shapes)} layers x {shapes[0][0]} KV heads of {head_size}); the cache has "
        f"{available / 2**20:,.1f} MiB and must hold two (vLLM keeps one block aside); {advice}"
    )
