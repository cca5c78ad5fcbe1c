"""`vllm-slim inspect MODEL_DIR`: what slim and sata would do with a model, before deploying it.

Reads config.json and the safetensors weights only (no vLLM engine), finds each layer's W_K and W_V
by tensor name, and runs the backends' own code on them: `choose_layout` for slim (per-layer
cond(W_K), predicted V error, spill width, capacity gain), `state_bytes` and `break_even_tokens`
for sata. The refusals the backends raise from the live model (GQA, QK-norm, sliding windows, ...)
are read here from the config and the tensor names.
"""

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from vllm_slim.backends.weights import QK_NORM_NAMES, QKV_LAYOUTS, key_value_rows
from vllm_slim.ops.sata import is_positive_order
from vllm_slim.ops.sata.policy import SataPolicy, break_even_tokens, sequence_state_bytes, stock_bytes_per_token
from vllm_slim.ops.slim import SlimNotApplicable
from vllm_slim.ops.slim.policy import SlimLayout, SlimPolicy, choose_layout, net_capacity_gain

DTYPES = {
    "half": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float": torch.float32, "float32": torch.float32,
}
# Slim's supported KV-cache dtypes (SlimAttentionBackend.supported_kv_cache_dtypes).
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")
# The 16-bit dtypes a model is usually served in: slim's predicted V error is shown for each.
SERVING_DTYPES = (torch.bfloat16, torch.float16)
SATA_ORDERS = tuple(order for order in range(1, 6) if is_positive_order(order))
# Hugging Face architecture -> the vLLM attention module it runs (or a subclass of it), named as in
# slim's weights.QKV_LAYOUTS. The backend refuses any other module as an unknown layout.
SLIM_ATTENTION_MODULES = {
    "LlamaForCausalLM": "LlamaAttention",
    "LLaMAForCausalLM": "LlamaAttention",
    "MistralForCausalLM": "LlamaAttention",  # vLLM's MistralAttention subclasses it
    "Phi3ForCausalLM": "LlamaAttention",  # vLLM's Phi3ForCausalLM is a LlamaForCausalLM
    "Qwen2ForCausalLM": "Qwen2Attention",
    "GemmaForCausalLM": "GemmaAttention",
    "StableLmForCausalLM": "StablelmAttention",
    "GPTJForCausalLM": "GPTJAttention",
    "OPTForCausalLM": "OPTAttention",
    "GPT2LMHeadModel": "GPT2Attention",
    # Hugging Face's modules, through vLLM's Transformers backend
    "GPTNeoXForCausalLM": "GPTNeoXAttention",
    "PhiForCausalLM": "PhiAttention",
    "OlmoForCausalLM": "OlmoAttention",
}
# The RoPE scalings vLLM builds for these families; slim's un-RoPE inverts each exactly, the magnitude
# some carry (YaRN's and longrope's) included. Any other is left to the start-up check.
ROPE_SCALINGS = ("default", "linear", "dynamic", "ntk", "yarn", "longrope", "llama3")
GQA_REASON = "K has fewer columns than the hidden state, so V is not a function of K"


@dataclass(frozen=True)
class ModelShape:
    """What config.json says about the attention layers."""

    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype  # the checkpoint's
    config: dict


@dataclass
class AttentionTensors:
    """One layer's K = X·w_k + k_bias and V = X·w_v + v_bias (row vectors), as the checkpoint stores them."""

    prefix: str  # the attention module's name in the checkpoint
    w_k: torch.Tensor  # [hidden, KV heads·head size]
    w_v: torch.Tensor
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    qk_norms: tuple[str, ...]  # q/k normalisations found beside the projections


@dataclass
class LayerReport:
    name: str
    attention: str  # "MHA", or what else it is
    cond: float  # of W_K in the served dtype
    slim_errors: dict[torch.dtype, float]  # predicted relative V error per model dtype; empty if slim does not apply


@dataclass(frozen=True)
class SataRow:
    order: int
    state_bytes_per_sequence: int  # all layers
    break_even_tokens: int  # context length from which the state is smaller than the stock cache


@dataclass
class InspectReport:
    model_dir: Path
    shape: ModelShape
    dtype: torch.dtype  # the model dtype it would be served in
    dtype_note: str
    cache_dtype: torch.dtype  # the stock KV cache's
    layers: list[LayerReport]
    slim_reasons: list[str]  # why slim does not apply; empty if it does
    slim_layouts: dict[torch.dtype, SlimLayout]  # per model dtype, the served one first; empty if slim does not apply
    sata_reasons: list[str]
    sata_policy: SataPolicy  # the configured one (the table's sizes include its hybrid window)
    sata_rows: list[SataRow]


def read_shape(model_dir: Path) -> ModelShape:
    """The attention shape config.json gives; a ValueError naming the field for anything it cannot read."""
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object")

    def first(*names, default=None):  # GPT-2, GPT-J and OPT use their own names
        return next(((name, config[name]) for name in names if config.get(name) is not None), (names[0], default))

    def count(*names, default=None) -> int:
        name, value = first(*names, default=default)
        if value is None:
            raise ValueError(f"{path} names no {' / '.join(names)}")
        if not is_integer(value) or value < 1:
            raise ValueError(f"{path}: {name} is {value!r}, not a positive integer")
        return value

    hidden = count("hidden_size", "n_embd", "d_model")
    heads = count("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads")
    layers = count("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
    name, dtype_name = first("torch_dtype", "dtype", default="float32")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise ValueError(f"{path}: unknown {name} {dtype_name!r}")
    kv = kv_heads(config, heads)
    if not is_integer(kv) or not 1 <= kv <= heads or heads % kv:
        raise ValueError(f"{path}: {kv!r} KV heads cannot serve {heads} attention heads")
    architectures = config.get("architectures")
    return ModelShape(
        architecture=str(architectures[0]) if isinstance(architectures, list) and architectures else "?",
        model_type=str(config.get("model_type", "?")),
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv,
        head_size=count("head_dim", default=hidden // heads),
        dtype=DTYPES[dtype_name],
        config=config,
    )


def is_integer(value) -> bool:
    """A JSON integer: JSON's true and false load as Python bools, which are ints too."""
    return isinstance(value, int) and not isinstance(value, bool)


def kv_heads(config: dict, heads: int) -> int:
    """KV heads under each convention config.json files use: Llama's num_key_value_heads, Falcon's
    num_kv_heads (new decoder) and n_head_kv (RW), ChatGLM's multi_query_group_num, and a bare
    multi_query flag (Falcon-7B, StarCoder: one KV head)."""
    if config.get("multi_query_attention") and config.get("multi_query_group_num"):
        return config["multi_query_group_num"]
    for name in ("num_key_value_heads", "num_kv_heads", "n_head_kv"):
        if config.get(name) is not None:
            return config[name]
    return 1 if config.get("multi_query") else heads


class Checkpoint:
    """The tensors of every *.safetensors file in a model directory, read on demand."""

    def __init__(self, model_dir: Path, stack: ExitStack):
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in {model_dir} (inspect reads safetensors checkpoints)")
        self.files = {}
        for path in files:
            handle = stack.enter_context(safe_open(path, framework="pt"))
            for name in handle.keys():
                self.files.setdefault(name, handle)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor | None:
        return self.files[name].get_tensor(name) if name in self.files else None

    def prefixes(self, suffix: str) -> list[str]:
        """Module names that own a tensor `<name>.<suffix>`, in layer order."""
        found = [name.removesuffix("." + suffix) for name in self.files if name.endswith("." + suffix)]
        return sorted(found, key=lambda name: [int(n) if n.isdigit() else n for n in re.split(r"(\d+)", name)])


def find_attention(checkpoint: Checkpoint, shape: ModelShape) -> tuple[list[AttentionTensors], str | None]:
    """Every layer's K/V projections by tensor name, or none and why the layout is unknown."""

    def qk_norms(prefix):
        return tuple(n for n in QK_NORM_NAMES if f"{prefix}.{n}.weight" in checkpoint)

    def fused(prefix, name, k_rows, v_rows, conv1d=False):
        """K and V rows of a fused projection; nn.Linear stores [out, hidden], GPT-2's Conv1D [hidden, out]."""
        weight, bias = checkpoint.get(f"{prefix}.{name}.weight"), checkpoint.get(f"{prefix}.{name}.bias")
        if conv1d:
            weight = weight.T
        return AttentionTensors(
            prefix, weight[k_rows].T, weight[v_rows].T,
            None if bias is None else bias[k_rows], None if bias is None else bias[v_rows], qk_norms(prefix),
        )

    separate = [p for p in checkpoint.prefixes("k_proj.weight") if f"{p}.v_proj.weight" in checkpoint]
    if separate:  # Llama family, OPT, GPT-J
        return [
            AttentionTensors(
                p, checkpoint.get(f"{p}.k_proj.weight").T, checkpoint.get(f"{p}.v_proj.weight").T,
                checkpoint.get(f"{p}.k_proj.bias"), checkpoint.get(f"{p}.v_proj.bias"), qk_norms(p),
            )
            for p in separate
        ], None
    q_size, kv_size = shape.num_heads * shape.head_size, shape.num_kv_heads * shape.head_size
    qkv_proj = checkpoint.prefixes("qkv_proj.weight")
    if qkv_proj:  # Phi-3: rows [q | k | v]
        k_rows, v_rows = slice(q_size, q_size + kv_size), slice(q_size + kv_size, q_size + 2 * kv_size)
        return [fused(p, "qkv_proj", k_rows, v_rows) for p in qkv_proj], None
    query_key_value = checkpoint.prefixes("query_key_value.weight")
    if query_key_value and shape.model_type == "gpt_neox":  # rows [h0: q k v | h1: q k v | ...]
        k_rows, v_rows = key_value_rows(shape.num_heads, shape.head_size, per_head_interleaved=True)
        return [fused(p, "query_key_value", k_rows, v_rows) for p in query_key_value], None
    c_attn = checkpoint.prefixes("c_attn.weight")
    if c_attn and shape.model_type == "gpt2":  # columns [q | k | v]
        k_rows, v_rows = key_value_rows(shape.num_heads, shape.head_size, per_head_interleaved=False)
        return [fused(p, "c_attn", k_rows, v_rows, conv1d=True) for p in c_attn], None
    # The same tensor names mean other layouts in other families (Falcon, Bloom, Qwen-1, ...).
    seen = next((
        f"a fused {name} in a {shape.model_type} model"
        for name, found in (("query_key_value", query_key_value), ("c_attn", c_attn)) if found
    ), None)
    return [], (
        f"unknown attention layout: {seen or 'no q/k/v projection tensors'} (slim reads q_proj/k_proj/v_proj, "
        "qkv_proj, GPT-NeoX's per-head query_key_value and GPT-2's c_attn)"
    )


def sliding_layers(shape: ModelShape) -> list[bool]:
    """Which layers attend through a sliding window, from config.json. A window at least the model's
    context (max_position_embeddings, vLLM's default max_model_len) never takes effect and the backends
    serve it as full attention (Phi-3-128k's 262,144)."""
    config = shape.config
    window, context = config.get("sliding_window"), config.get("max_position_embeddings")
    if not is_integer(window):
        window = None  # null, or unreadable: model_reasons says which
    if not window or (isinstance(context, int) and window >= context):
        return [False] * shape.num_layers
    if isinstance(config.get("layer_types"), list):
        return [kind == "sliding_attention" for kind in config["layer_types"]]
    return [bool(config.get("use_sliding_window", True))] * shape.num_layers


def rope_scaling(config: dict) -> str | None:
    """The RoPE scaling config.json asks for and whether slim inverts it, or None for plain RoPE / none."""
    parameters = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(parameters, dict):
        return f"unreadable ({parameters!r} is not an object): the start-up check compares it with the model's own rotation"
    kind = parameters.get("rope_type") or parameters.get("type")
    if kind in (None, "default"):
        return None
    factor = parameters.get("factor")
    named = f"{kind}" + (f" x{factor}" if factor else "")
    if kind in ROPE_SCALINGS:
        return f"{named}: un-RoPE divides out the table's own magnitude, exact"
    return f"{named}: not one slim knows; the start-up check compares it with the model's own rotation"


def head_layout(shape: ModelShape) -> str:
    if shape.num_kv_heads == shape.num_heads:
        return "MHA"
    kind = "MQA" if shape.num_kv_heads == 1 else "GQA"
    return f"{kind} {shape.num_heads}q/{shape.num_kv_heads}kv"


def model_reasons(shape: ModelShape) -> tuple[list[str], list[str]]:
    """What slim, and sata, refuse about the model as a whole, in the backends' words."""
    config = shape.config
    both = []
    sliding = sliding_layers(shape)
    window = config.get("sliding_window")
    if window not in (None, False) and not is_integer(window):
        both.append(f"an unreadable sliding_window ({window!r}, not a token count)")
    sata = []
    if any(sliding):  # slim masks the keys out of a query's window (the layer table marks its layers)
        sata.append(
            f"sliding-window attention (window {window}, {sum(sliding)} of {len(sliding)} layers: a SATA state "
            f"cannot forget the tokens that leave the window; served as full attention with --max-model-len "
            f"{window} or less)"
        )
    if config.get("attn_logit_softcapping"):
        both.append(f"logit soft-capping ({config['attn_logit_softcapping']})")
    if config.get("is_encoder_decoder"):
        both.append("encoder-decoder model (decoder self-attention only is served)")
    slim = []
    if shape.num_kv_heads != shape.num_heads:
        kind = "multi-query" if shape.num_kv_heads == 1 else "grouped-query"
        slim.append(f"{kind} attention ({shape.num_heads} query heads, {shape.num_kv_heads} KV heads): {GQA_REASON}")
    if config.get("clip_qkv"):
        slim.append(f"clip_qkv ({config['clip_qkv']}) clamps q, k and v: a clamped K no longer determines V")
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
        slim.append(f"quantized weights ({method}): W_K must be dense to solve W_KV")
    return slim + both, sata + both


def served_dtype(shape: ModelShape, dtype: str) -> tuple[torch.dtype, str]:
    """The model dtype `vllm serve --dtype <dtype>` runs, and how it was chosen."""
    if dtype != "auto":
        return DTYPES[dtype], f"--dtype {dtype}"
    if shape.dtype == torch.float32:
        # vLLM's auto dtype downcasts float32 checkpoints to the platform's preferred 16-bit dtype.
        return torch.bfloat16, "--dtype auto: vLLM serves float32 checkpoints in bfloat16 where supported"
    return shape.dtype, "--dtype auto: the checkpoint's"


def inspect_model(
    model_dir: Path | str, dtype: str = "auto", kv_cache_dtype: str = "auto", additional_config: dict | None = None,
) -> InspectReport:
    """Everything `vllm-slim inspect` prints, as numbers; the options mean what they mean to `vllm serve`."""
    model_dir = Path(model_dir)
    options = additional_config or {}
    slim_policy = SlimPolicy.from_config(options.get("slim", {}))
    sata_policy = SataPolicy.from_config(options.get("sata", {}))
    shape = read_shape(model_dir)
    model_dtype, dtype_note = served_dtype(shape, dtype)
    cache_dtype = model_dtype if kv_cache_dtype == "auto" else DTYPES[kv_cache_dtype]
    with ExitStack() as stack:
        attention, layout_reason = find_attention(Checkpoint(model_dir, stack), shape)
    slim_reasons, sata_reasons = model_reasons(shape)
    norms = sorted({norm for layer in attention for norm in layer.qk_norms})
    if norms:
        slim_reasons.append(
            f"QK-norm ({', '.join(norms)}) normalises each key, so V is not a linear function of the cached K"
        )
    if layout_reason:
        slim_reasons.append(layout_reason)
    elif SLIM_ATTENTION_MODULES.get(shape.architecture) not in QKV_LAYOUTS:
        slim_reasons.append(
            f"unknown attention layout: {shape.architecture} is not among the architectures known to run an "
            f"attention module slim's backend reads ({', '.join(QKV_LAYOUTS)})"
        )

    layouts: dict[torch.dtype, SlimLayout] = {}
    # The policy's solves are float64 SVDs of hidden x hidden matrices, slow on a CPU for 7B-size models.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not slim_reasons:
        for layout_dtype in dict.fromkeys((model_dtype, *SERVING_DTYPES)):
            stock = cache_dtype if kv_cache_dtype != "auto" else layout_dtype
            on_device = lambda t: None if t is None else t.to(device, layout_dtype)  # noqa: E731
            weights = {a.prefix: tuple(map(on_device, (a.w_k, a.w_v, a.k_bias, a.v_bias))) for a in attention}
            try:
                layouts[layout_dtype], _ = choose_layout(
                    weights, shape.num_heads, shape.head_size, layout_dtype, stock, kv_cache_dtype != "auto",
                    slim_policy,
                )
            except SlimNotApplicable as error:  # W_K not square or singular
                slim_reasons.append(str(error))
                layouts.clear()
                break

    sliding = sliding_layers(shape)
    layers = []
    for index, a in enumerate(attention):
        kind = head_layout(shape)
        if a.qk_norms:
            kind += ", QK-norm"
        if index < len(sliding) and sliding[index]:
            kind += ", sliding"
        numerics = {d: next(n for n in layout.layers if n.name == a.prefix) for d, layout in layouts.items()}
        cond = numerics[model_dtype].cond if numerics else torch.linalg.cond(a.w_k.to(model_dtype).double()).item()
        layers.append(LayerReport(a.prefix, kind, cond, {d: n.error for d, n in numerics.items()}))

    exact = sata_policy.exact_tokens  # the hybrid's exact keys and values, when configured
    sata_rows = [
        SataRow(
            order,
            sequence_state_bytes(
                [(shape.num_kv_heads, shape.head_size, shape.head_size)] * shape.num_layers, order, exact
            ),
            break_even_tokens(shape.num_kv_heads, shape.head_size, shape.head_size, model_dtype, order, exact),
        )
        for order in SATA_ORDERS
    ]
    return InspectReport(
        model_dir, shape, model_dtype, dtype_note, cache_dtype, layers, slim_reasons, layouts,
        sata_reasons, sata_policy, sata_rows,
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def human_bytes(count: int) -> str:
    value, unit = float(count), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{count:,} B" if unit == "B" else f"{value:.2f} {unit} ({count:,} B)"


# Cache sizes the net capacity gain is shown at (a small GPU's and a large one's).
NET_GAIN_CACHES_GIB = (8, 40)


def layout_line(layout: SlimLayout) -> str:
    """The policy's own summary line (the last line of the table the backend logs at start-up)."""
    return layout.table().splitlines()[-1]


def format_report(report: InspectReport) -> str:
    shape = report.shape
    lines = [
        f"model: {report.model_dir} ({shape.architecture}, model_type {shape.model_type}): {shape.num_layers} layers, "
        f"hidden {shape.hidden_size}, {shape.num_heads} query heads x {shape.head_size}, {shape.num_kv_heads} KV heads",
        f"dtype: {dtype_name(report.dtype)} ({report.dtype_note}); stock KV cache {dtype_name(report.cache_dtype)}",
        f"RoPE scaling: {rope_scaling(shape.config) or 'none'}",
        "",
    ]
    error_dtypes = list(dict.fromkeys((report.dtype, *SERVING_DTYPES)))
    lines.append("V err <dtype>: slim's predicted relative V error served in that dtype (x the stock cache's)")
    header = f"{'layer':<36} {'attention':<20} {'cond(W_K)':>11}" + "".join(
        f" {'V err ' + dtype_name(d):>18}" for d in error_dtypes
    )
    lines.append(header)
    for layer in report.layers:
        row = f"{layer.name:<36} {layer.attention:<20} {layer.cond:>11.5g}"
        for d in error_dtypes:
            error = layer.slim_errors.get(d)
            cell = "-" if error is None else f"{error:.2e} ({error / report.slim_layouts[d].stock_error:.2f}x)"
            row += f" {cell:>18}"
        lines.append(row)
    if not report.layers:
        lines.append("(no attention layers recognised in the checkpoint)")
    lines.append("")

    if report.slim_reasons:
        lines.append(f"slim: not applicable ({'; '.join(report.slim_reasons)})")
    else:
        lines.append("slim: applies; the layout `--attention-backend slim` picks at start-up, per model dtype:")
        for d, layout in report.slim_layouts.items():
            served = " (served)" if d == report.dtype else ""
            lines.append(f"  {dtype_name(d) + served:<20} {layout_line(layout)}")
        served_layout = report.slim_layouts[report.dtype]
        if not served_layout.within_budget:
            lines.append(
                "slim: refuses to start at this dtype (predicted V error over its budget); see the slim options "
                "max_error_ratio, min_capacity_gain, spill_per_head and allow_over_budget"
            )
        stock = shape.num_layers * stock_bytes_per_token(shape.num_kv_heads, shape.head_size, shape.head_size,
                                                         report.cache_dtype)
        slim = shape.num_layers * shape.num_heads * (shape.head_size + served_layout.spill_per_head) * \
            served_layout.store_dtype.itemsize
        lines.append(
            f"slim: KV cache per token, all layers: stock {stock:,} B, slim {slim:,} B -> capacity gain "
            f"{served_layout.capacity_gain:.3f}x the stock backend's tokens in the same memory"
        )
        net = {gib: net_capacity_gain(served_layout, slim, stock, gib * 2**30) for gib in NET_GAIN_CACHES_GIB}
        lines.append(
            f"slim: its value maps take {human_bytes(served_layout.map_bytes)} of that memory: net gain "
            + ", ".join(f"{gain:.2f}x with {gib} GiB for the cache" for gib, gain in net.items())
        )
    lines.append("")

    if report.sata_reasons:
        lines.append(f"sata: not applicable ({'; '.join(report.sata_reasons)})")
    stock_token = shape.num_layers * stock_bytes_per_token(shape.num_kv_heads, shape.head_size, shape.head_size,
                                                           report.dtype)
    lines.append(
        f"sata: a fixed-size float32 state per sequence ({shape.num_layers} layers x {shape.num_kv_heads} KV heads x "
        f"{shape.head_size}), against the stock {dtype_name(report.dtype)} KV cache's {stock_token:,} B per token; "
        f"configured: {report.sata_policy.describe()}"
    )
    lines.append(f"  {'order':>5}  {'degrees':<8} {'state per sequence':>36} {'break-even context':>20}")
    for row in report.sata_rows:
        lines.append(
            f"  {row.order:>5}  {f'0..{row.order - 1}':<8} {human_bytes(row.state_bytes_per_sequence):>36}"
            f" {f'{row.break_even_tokens:,} token' + 's' * (row.break_even_tokens != 1):>20}"
        )
    lines.append("  (below the break-even context the stock KV cache of the same sequence is smaller)")
    return "\n".join(lines)
