"""Both backends through their own builder and impl on the 13 batch shapes of vLLM's attention-backend
tests, in float32, bfloat16 and float16: slim against float64 softmax attention on V = X·W_V (and no
worse than a stock cache of the same dtype), sata against float64 evaluation of its definition. The
context is written by an earlier step, scattered over shuffled blocks; `positions` is left None."""

import itertools
import re
import subprocess
import sys

import pytest
import torch
import vllm
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

from batches import (
    BATCH_SPECS,
    BLOCK_SIZE,
    HEAD_SIZE,
    HEADS,
    LAYER_NAME,
    MAX_LEN,
    Step,
    attention_layer,
    common_metadata,
    engine_config,
    rope_table,
    run_step,
    scattered_block_table,
)
from vllm_slim.fixtures.models import build_model
from vllm_slim.ops.sata import truncated_exp
from vllm_slim.ops.slim import Rotary, rotate
from vllm_slim.ops.slim.policy import choose_layout

aten = torch.ops.aten
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SATA_OPTIONS = {"plain": {"order": 3}, "hybrid": {"order": 3, "sink_tokens": 2, "window": 16}}
# sata's state grows as head_size^2 (order 3): a smaller head keeps its 4,096-token steps quick.
SATA_HEAD_SIZE = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A one-layer MHA Llama of the harness's shape: only its config is read."""
    return build_model(
        "llama", tmp_path_factory.mktemp("batches") / "llama", dtype="float32", hidden_size=HEADS * HEAD_SIZE,
        num_heads=HEADS, num_layers=1, max_position=MAX_LEN,
    )


@pytest.fixture(scope="module")
def layers(model_dir):
    """(engine config, its attention layer) per (backend, dtype, options), built once: a config
    registers each layer name once."""
    built = {}

    def get(backend: str, dtype: str, options: dict | None = None, window: int | None = None):
        key = (backend, dtype, repr(options), window)
        if key not in built:
            config = engine_config(model_dir, backend, dtype, options and {backend: options})
            built[key] = config, attention_layer(
                config, SATA_HEAD_SIZE if backend == "sata" else HEAD_SIZE, per_layer_sliding_window=window
            )
        return built[key]

    return get


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return ((got.double() - reference).norm() / reference.norm()).item()


def reference_rows(q, k, v, step: Step, weigh) -> torch.Tensor:
    """Float64 attention of each sequence's query rows over its keys: weights weigh(logits, query
    positions, key positions) (causal mask applied here), normalised. q/k/v per sequence."""
    out = []
    for (qi, ki, vi), context, n in zip(zip(q, k, v), step.context_lens, step.seq_lens):
        query_pos, key_pos = torch.arange(context, n)[:, None], torch.arange(n)[None, :]
        logits = torch.einsum("qhd,khd->hqk", qi.double(), ki.double()) * qi.shape[-1] ** -0.5
        weights = weigh(logits, query_pos, key_pos).masked_fill(key_pos > query_pos, 0.0)
        out.append(torch.einsum("hqk,khd->qhd", weights / weights.sum(-1, keepdim=True), vi.double()))
    return torch.cat(out)


def sequences(step: Step, make, dtype):
    """Per sequence (q of its query rows, k, v of all its tokens), from make(tokens, positions) ->
    float64 q, k, v; returned in float64 and rounded to `dtype` (what the model hands over)."""
    exact = [make(n, torch.arange(n)) for n in step.seq_lens]
    exact = [(q[c:], k, v) for (q, k, v), c in zip(exact, step.context_lens)]
    rounded = [tuple(x.to(dtype) for x in seq) for seq in exact]
    return exact, rounded


def batch_and_context(step: Step, rounded, block_table):
    """This step's packed q, k, v and, for the sequences that have one, their context's k, v."""
    q = torch.cat([s[0] for s in rounded])
    k = torch.cat([s[1][c:] for s, c in zip(rounded, step.context_lens)])
    v = torch.cat([s[2][c:] for s, c in zip(rounded, step.context_lens)])
    held = [i for i, c in enumerate(step.context_lens) if c]
    context = Step([step.context_lens[i] for i in held], [step.context_lens[i] for i in held])
    context_kv = [torch.cat([rounded[i][j][: step.context_lens[i]] for i in held] or [k[:0]]) for j in (1, 2)]
    return (q, k, v), (context, block_table[held], context_kv)


def bind_random_weights(layer, seed=0):
    """Bind a slim layer to random MHA weights (biases, NeoX RoPE) under the policy's own layout;
    returns make(tokens, positions) -> that layer's float64 q, k, v for random inputs."""
    g = torch.Generator().manual_seed(seed)
    d = HEADS * HEAD_SIZE
    w = {n: torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5 for n in "qkv"}
    b = {n: 0.1 * torch.randn(d, generator=g, dtype=torch.float64) for n in "qkv"}
    impl = layer.impl
    layout, projections = choose_layout(
        {LAYER_NAME: (w["k"], w["v"], b["k"], b["v"])}, HEADS, HEAD_SIZE, impl.model_dtype, impl.cache_torch_dtype,
        False, impl.policy,
    )
    impl.bind(layer, layout, projections[LAYER_NAME], Rotary(rope_table(MAX_LEN, HEAD_SIZE), HEAD_SIZE, True))
    rotary64 = Rotary(rope_table(MAX_LEN, HEAD_SIZE, dtype=torch.float64), HEAD_SIZE, True)

    def make(tokens, positions):
        x = torch.randn(tokens, d, generator=g, dtype=torch.float64)
        q, k, v = ((x @ w[n] + b[n]).view(tokens, HEADS, HEAD_SIZE) for n in "qkv")
        return rotate(q, positions, rotary64), rotate(k, positions, rotary64), v

    return make


# A sliding window (float32, the layout's error floor): 100 keys, over 6 pages of 16, shorter than most batches.
@pytest.mark.parametrize("dtype,window", [(dtype, None) for dtype in DTYPES] + [("float32", 100)])
@pytest.mark.parametrize("spec", list(BATCH_SPECS))
def test_slim_batch_shapes_against_float64_attention(layers, spec, dtype, window):
    config, layer = layers("slim", dtype, window=window)
    make = bind_random_weights(layer)
    step = Step(*BATCH_SPECS[spec])
    exact, rounded = sequences(step, make, DTYPES[dtype])
    block_table, num_blocks = scattered_block_table(step.seq_lens, BLOCK_SIZE)
    page = layer.get_kv_cache_spec(config)
    assert page.head_size_v == layer.impl.layout.spill_per_head < HEAD_SIZE  # K-only rows
    assert isinstance(page, SlidingWindowSpec if window else FullAttentionSpec) and page.sliding_window == window
    # Stored token-major, as a [blocks, block, heads, row] allocation viewed head-major; one more block of NaN.
    kv_cache = torch.zeros(num_blocks + 1, BLOCK_SIZE, HEADS, page.head_size + page.head_size_v, dtype=page.dtype)
    kv_cache = kv_cache.transpose(1, 2)
    kv_cache[num_blocks] = float("nan")
    (q, k, v), (context, context_table, (context_k, context_v)) = batch_and_context(step, rounded, block_table)
    if context.seq_lens:
        cam = common_metadata(context, context_table, BLOCK_SIZE)
        run_step(layer, config, cam, context_k, context_k, context_v, kv_cache, write_only=True)
    if window:  # vLLM frees the pages out of every query's window: here they are the NaN block
        first_seen = torch.tensor(step.context_lens)[:, None] - window + 1
        block_table[(torch.arange(block_table.shape[1]) + 1) * BLOCK_SIZE <= first_seen] = num_blocks
    out = run_step(layer, config, common_metadata(step, block_table, BLOCK_SIZE), q, k, v, kv_cache)

    def softmax(logits, query_pos, key_pos):
        weights = (logits - logits.amax(-1, keepdim=True)).exp()
        return weights if window is None else weights.masked_fill(query_pos - key_pos >= window, 0.0)

    reference = reference_rows(*zip(*exact), step, softmax)
    stock = reference_rows(*zip(*((qi.float(), ki.float(), vi.float()) for qi, ki, vi in rounded)), step, softmax)
    slim_error, stock_error = relative_error(out, reference), relative_error(stock, reference)
    # Within 2x of what the layout predicts against a stock cache (bfloat16: below it; float16, whose
    # keys have no finer 16-bit dtype to be refined into, about 2x it: a server would refuse that
    # layout under the default budget); float32: the layout's error floor.
    layout = layer.impl.layout
    predicted_ratio = max(1.0, layout.layers[0].error / layout.stock_error)
    # The float32 floor is the float32 RoPE table's rounding at positions up to 4,096 (the reference rotates
    # in float64), amplified by cond(W_K): a window's 100 keys average less of it out than 2,048 do.
    floor = 1e-4 if window is None else 3e-4
    assert slim_error <= max(2 * predicted_ratio * stock_error, floor), (slim_error, stock_error, predicted_ratio)


@pytest.mark.parametrize("dtype,options", [(dtype, "plain") for dtype in DTYPES] + [("float32", "hybrid")])
@pytest.mark.parametrize("spec", list(BATCH_SPECS))
def test_sata_batch_shapes_against_float64_series(layers, spec, dtype, options):
    policy = SATA_OPTIONS[options]
    config, layer = layers("sata", dtype, policy)
    layer.impl.bind(layer)
    step = Step(*BATCH_SPECS[spec])
    g = torch.Generator().manual_seed(1)

    def make(tokens, positions):
        return tuple(1.2 * torch.randn(tokens, HEADS, SATA_HEAD_SIZE, generator=g, dtype=torch.float64) for _ in "qkv")

    _, rounded = sequences(step, make, DTYPES[dtype])
    page = layer.get_kv_cache_spec(config)
    num_blocks = len(step.seq_lens) + 2
    # Garbage in every state block: a new sequence's state must be reset, not read.
    kv_cache = torch.randint(-100, 100, (num_blocks, 1, 1, page.page_size_bytes), dtype=torch.int8)
    block_table = torch.arange(2, 2 + len(step.seq_lens), dtype=torch.int32)[:, None]
    (q, k, v), (context, context_table, (context_k, context_v)) = batch_and_context(step, rounded, block_table)
    if context.seq_lens:
        context_q = context_k  # any queries: only the state they leave behind matters
        run_step(layer, config, common_metadata(context, context_table, MAX_LEN), context_q, context_k, context_v, kv_cache)
    out = run_step(layer, config, common_metadata(step, block_table, MAX_LEN), q, k, v, kv_cache)

    sinks, window = policy.get("sink_tokens", 0), policy.get("window", 0)

    def series(logits, query_pos, key_pos):
        exact = (key_pos < sinks) | (query_pos - key_pos < window)
        return torch.where(exact, logits.exp(), truncated_exp(logits, policy["order"]))

    reference = reference_rows(*zip(*rounded), step, series)
    # The state and every product are float32; the output is rounded to the model's dtype.
    assert relative_error(out, reference) <= 2 * torch.finfo(DTYPES[dtype]).eps + 1e-4


# ---- what the GPU build needs, checked on the CPU ----


class NoHostSync(TorchDispatchMode):
    """Fails on what would make a GPU step wait for the host, or a captured CUDA graph replay stale
    data: reading a device tensor back (item, tolist, .cpu(), boolean-mask indexing) and, inside
    forward, copying host data to the device (a copy, or a tensor made from host values). Run on
    `meta` tensors, whose values do not exist."""

    READS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.item}

    def __init__(self, phase: str):
        super().__init__()
        self.phase = phase
        self.host_values = HostValuesOnDevice(phase)

    def __enter__(self):
        if self.phase == "forward":
            self.host_values.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if self.phase == "forward":
            self.host_values.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in self.READS and args[0].device.type == "meta":
            raise AssertionError(f"{self.phase}: {func} reads a device tensor on the host")
        if func.overloadpacket in (aten._to_copy, aten.copy_):
            source = args[1] if func.overloadpacket is aten.copy_ else args[0]
            target = args[0].device if func.overloadpacket is aten.copy_ else kwargs.get("device", source.device)
            if source.device.type == "meta" and torch.device(target).type == "cpu":
                raise AssertionError(f"{self.phase}: {func} copies a device tensor to the host")
            if self.phase == "forward" and source.device.type == "cpu" and torch.device(target).type == "meta":
                raise AssertionError(f"{self.phase}: {func} copies host data to the device")
        return func(*args, **kwargs)


class HostValuesOnDevice(TorchFunctionMode):
    """torch.tensor / as_tensor of host values onto the device (below the dispatcher, so the
    dispatch mode cannot see it)."""

    def __init__(self, phase: str):
        super().__init__()
        self.phase = phase

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and torch.device(kwargs.get("device") or "cpu").type == "meta":
            raise AssertionError(f"{self.phase}: {func.__name__} copies host values to the device")
        return func(*args, **kwargs)


def meta_step(step: Step, layer, config, kv_cache_shape, kv_cache_dtype, guard=NoHostSync):
    """One step of `layer` with every device tensor on `meta` (the host's copies real), under guard."""
    head_size = layer.head_size
    device = torch.device("meta")
    block_table, _ = scattered_block_table(step.seq_lens, BLOCK_SIZE)
    cam = common_metadata(step, block_table, BLOCK_SIZE, device, with_upper_bound=True)
    tokens = sum(step.query_lens)
    q, k, v = (torch.empty(tokens, HEADS, head_size, device=device) for _ in "qkv")
    kv_cache = torch.empty(kv_cache_shape, dtype=kv_cache_dtype, device=device)
    return run_step(layer, config, cam, q, k, v, kv_cache, guard=guard)


MIXED = Step([40, 1, 300, 17, 64], [1, 1, 1, 17, 9])  # decodes first, then a prompt and a chunk


def test_slim_step_reads_nothing_back_to_the_host(layers):
    config, layer = layers("slim", "bfloat16")
    bind_random_weights(layer)
    impl = layer.impl
    impl.projection, impl.rotary = impl.projection.to("meta"), impl.rotary.to("meta")
    page = layer.get_kv_cache_spec(config)
    shape = (64, HEADS, BLOCK_SIZE, page.head_size + page.head_size_v)
    out = meta_step(MIXED, layer, config, shape, page.dtype)
    assert out.device.type == "meta" and out.shape == (sum(MIXED.query_lens), HEADS, HEAD_SIZE)
    # The guard can fail: a forward that reads a length back, or makes a tensor of host values, is caught.
    with pytest.raises(AssertionError, match="reads a device tensor on the host"):
        with NoHostSync("forward"):
            int(torch.ones(3, device="meta").sum())
    with pytest.raises(AssertionError, match="copies host values to the device"):
        with NoHostSync("forward"):
            torch.tensor(3, device="meta")


def test_sata_step_reads_nothing_back_to_the_host(layers):
    config, layer = layers("sata", "bfloat16", SATA_OPTIONS["hybrid"])
    layer.impl.bind(layer)
    page = layer.get_kv_cache_spec(config)
    out = meta_step(MIXED, layer, config, (16, 1, 1, page.page_size_bytes), torch.int8)
    assert out.device.type == "meta" and out.shape == (sum(MIXED.query_lens), HEADS, SATA_HEAD_SIZE)


class DecodeGraph:
    """A slim layer's FULL decode graph of `size` requests as vLLM 0.33's V2 runner captures and replays it, emulated on
    the CPU: the runner's persistent input buffers; metadata built once by `build_for_cudagraph_capture`
    from the capture batch (every sequence 1 token long, max_seq_len = max_model_len); then, per step, the
    buffers rewritten in place, `build` called for its side effects only (its metadata is not what a
    replay reads), and the layer run with the captured metadata: the host numbers frozen at capture, the
    tensors read wherever they now hold. Padded rows: seq_len 0, no query token, slot −1, and a block-table
    row left stale (a live request's blocks)."""

    def __init__(self, layer, config, size: int, max_blocks: int):
        self.layer, self.config, self.size = layer, config, size
        self.seq_lens = torch.zeros(size, dtype=torch.int32)
        self.query_start_loc = torch.zeros(size + 1, dtype=torch.int32)
        self.block_table = torch.zeros(size, max_blocks, dtype=torch.int32)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.int64)
        backend = layer.get_attn_backend()
        self.builder = backend.get_builder_cls()(layer.get_kv_cache_spec(config), [LAYER_NAME], config, "cpu")
        max_model_len = config.model_config.max_model_len
        capture_batch = self._fill(Step([1] * size, [1] * size), max_model_len)
        self.captured = self.builder.build_for_cudagraph_capture(capture_batch)

    def _fill(self, step: Step, max_seq_len: int, block_table=None, slots=None):
        real = len(step.seq_lens)
        self.seq_lens.zero_()[:real] = torch.tensor(step.seq_lens)
        qsl = torch.tensor([0, *itertools.accumulate(step.query_lens)], dtype=torch.int32)
        self.query_start_loc.fill_(int(qsl[-1]))[: real + 1] = qsl
        if block_table is not None:
            self.block_table[:real, : block_table.shape[1]] = block_table
            self.block_table[real:] = self.block_table[0]  # stale rows
        self.slot_mapping.fill_(-1)
        if slots is not None:
            self.slot_mapping[:real] = slots
        upper = torch.zeros(self.size, dtype=torch.int32)
        upper[:real] = torch.tensor(step.seq_lens)
        return CommonAttentionMetadata(
            query_start_loc=self.query_start_loc, query_start_loc_cpu=self.query_start_loc.cpu(),
            seq_lens=self.seq_lens, num_reqs=self.size, num_actual_tokens=self.size, max_query_len=1,
            max_seq_len=max_seq_len, block_table_tensor=self.block_table, slot_mapping=self.slot_mapping,
            seq_lens_cpu_upper_bound=upper,
        )

    def replay(self, step: Step, block_table, q, k, v, kv_cache) -> torch.Tensor:
        """The step's decodes (padded to the graph's size with random rows) through the captured metadata."""
        from vllm.forward_context import set_forward_context

        real = len(step.seq_lens)
        slots = common_metadata(step, block_table, BLOCK_SIZE).slot_mapping
        self.builder.build(0, self._fill(step, max(step.seq_lens), block_table, slots))
        q, k, v = (torch.cat((x, torch.randn(self.size - real, *x.shape[1:], dtype=x.dtype))) for x in (q, k, v))
        output = torch.empty(*q.shape[:2], v.shape[-1], dtype=q.dtype)
        impl, layer, captured = self.layer.impl, self.layer, self.captured
        with set_forward_context({LAYER_NAME: captured}, self.config):
            impl.do_kv_cache_update(layer, k, v, kv_cache, self.slot_mapping)  # slim writes before forward
            return impl.forward(layer, q, k, v, kv_cache, captured, output)[:real]


# Two decode steps replayed by one graph of 4 requests: 3 of them live (one past 200 tokens), then 4, longer.
REPLAYED = (Step([40, 1, 230], [1, 1, 1]), Step([41, 2, 231, 97], [1, 1, 1, 1]))


def test_slim_decode_graph_replays_each_step_as_eager_does(layers, monkeypatch):
    """Through the Triton kernels (the path CUDA runs; under the interpreter here), bfloat16 (refined keys:
    the store un-RoPEs and re-RoPEs at each token's position): each replayed step writes the rows an eager
    step writes, and returns its rows up to the order of float32 sums (its splits are cut for the longest
    sequence max_model_len allows, eager's for the step's)."""
    monkeypatch.setenv("VLLM_SLIM_TRITON", "1")
    config, layer = layers("slim", "bfloat16")
    assert layer.get_attn_backend().get_builder_cls()._cudagraph_support.name == "UNIFORM_SINGLE_TOKEN_DECODE"
    make = bind_random_weights(layer, seed=5)
    page = layer.get_kv_cache_spec(config)
    graph = DecodeGraph(layer, config, 4, MAX_LEN // BLOCK_SIZE)
    for step in REPLAYED:
        _, rounded = sequences(step, make, torch.bfloat16)
        block_table, num_blocks = scattered_block_table(step.seq_lens, BLOCK_SIZE, seed=len(step.seq_lens))
        kv_cache = torch.zeros(num_blocks, HEADS, BLOCK_SIZE, page.head_size + page.head_size_v, dtype=page.dtype)
        (q, k, v), (context, context_table, (context_k, context_v)) = batch_and_context(step, rounded, block_table)
        run_step(layer, config, common_metadata(context, context_table, BLOCK_SIZE), context_k, context_k,
                 context_v, kv_cache, write_only=True)
        eager_cache = kv_cache.clone()
        eager = run_step(layer, config, common_metadata(step, block_table, BLOCK_SIZE), q, k, v, eager_cache)
        replayed = graph.replay(step, block_table, q, k, v, kv_cache)
        assert torch.equal(kv_cache, eager_cache)
        torch.testing.assert_close(replayed, eager, rtol=1.6e-2, atol=1e-3)  # bfloat16 rounding of the rows


def test_each_model_pages_by_its_own_layout(layers):
    """Two models in one process (a draft beside its target, two engines): each layer's page follows
    its own model's layout, whichever was bound last."""
    config32, layer32 = layers("slim", "float32")
    config16, layer16 = layers("slim", "bfloat16")
    bind_random_weights(layer32, seed=3)
    bind_random_weights(layer16, seed=4)
    for config, layer in ((config32, layer32), (config16, layer16)):
        layout, page = layer.impl.layout, layer.get_kv_cache_spec(config)
        assert (page.head_size_v, page.dtype) == (layout.spill_per_head, layout.store_dtype)
    assert layer32.get_kv_cache_spec(config32).dtype == torch.float32
    assert layer16.get_kv_cache_spec(config16).dtype == torch.float16  # refined keys for bfloat16
    assert not hasattr(layer32.get_attn_backend(), "layout")  # nothing per model on the class


@pytest.mark.parametrize("backend", ["slim", "sata"])
@pytest.mark.parametrize("option, reason", [
    ({"alibi_slopes": [0.5, 0.25, 0.125, 0.0625]}, r"ALiBi slopes"),
    ({"logits_soft_cap": 30.0}, r"logit soft-capping \(30\.0\)"),
    ({"kv_sharing_target_layer_name": "model.layers.0.self_attn.attn"},
     r"cross-layer KV sharing \(target model\.layers\.0\.self_attn\.attn\)"),
], ids=["alibi", "soft_cap", "kv_sharing"])
def test_attention_features_neither_backend_implements_are_refused_with_their_values(
    model_dir, backend, option, reason
):
    """As a model with that feature builds its attention layers under `--attention-backend`."""
    config = engine_config(model_dir, backend, "float32")
    with pytest.raises(ValueError, match=rf"{backend} attention cannot serve this model: .*{reason}"):
        attention_layer(config, **option)


# Slim's refusals decided as vLLM builds a layer, through a real Attention under the engine config a server
# would build: (engine args, layer options, reason). tests/test_slim_refusals.py sends one of this kind
# (Whisper's encoder-decoder attention) and a bind-time one through a real server.
SLIM_LAYER_REFUSALS = {
    "gqa": ({}, {"kv_heads": 2}, "grouped-query attention (4 query heads, 2 KV heads)"),
    "mqa": ({}, {"kv_heads": 1}, "grouped-query attention (4 query heads, 1 KV heads)"),
    "fp8_kv_cache": ({"kv_cache_dtype": "fp8"}, {}, "KV-cache dtype 'fp8'"),
    "quantized": ({"quantization": "fp8", "dtype": "bfloat16"}, {}, "quantized weights (fp8)"),
    "tensor_parallel": ({"tensor_parallel_size": 2}, {}, "tensor parallel size 2"),
}


def test_sata_refuses_a_sliding_window_and_says_why(model_dir):
    config = engine_config(model_dir, "sata", "float32")
    with pytest.raises(ValueError, match=r"sliding-window attention \(a SATA state cannot forget the tokens"):
        attention_layer(config, SATA_HEAD_SIZE, per_layer_sliding_window=64)


@pytest.mark.parametrize("case", SLIM_LAYER_REFUSALS)
def test_slim_refuses_what_it_cannot_serve_as_the_layer_is_built(model_dir, case):
    engine_args, options, reason = SLIM_LAYER_REFUSALS[case]
    config = engine_config(model_dir, "slim", **{"dtype": "float32", **engine_args})
    with pytest.raises(ValueError, match=re.escape(reason)):
        attention_layer(config, **options)


@pytest.mark.parametrize("options, reason", [
    ({"sink_tokens": 4}, "sata sink_tokens needs a window"),
    ({"window": -1}, "sata sink_tokens and window must be >= 0, got 0, -1"),
    ({"orders": 3}, "unknown sata option(s) ['orders']; known: ['order', 'sink_tokens', 'window']"),
    ({"order": "3"}, "sata order must be an integer, got '3'"),
    ({"order": 4}, "sata order 4 ends on an odd degree (3)"),
], ids=["sinks_without_window", "negative_window", "unknown_option", "order_not_integer", "even_order"])
def test_sata_refuses_bad_options_as_the_layer_is_built(model_dir, options, reason):
    """Through the layer as a server builds it (tests/test_sata_server.py sends an order too large for the
    cache through one: the refusals' path to the user)."""
    config = engine_config(model_dir, "sata", "float32", {"sata": options})
    with pytest.raises(ValueError, match=re.escape(reason)):
        attention_layer(config, SATA_HEAD_SIZE)


@pytest.mark.parametrize("backend", ["slim", "sata"])
def test_speculative_decoding_is_refused_at_start_up(model_dir, backend):
    config = engine_config(model_dir, backend, "float32", speculative_config={
        "method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 1,
    })
    with pytest.raises(ValueError, match=r"speculative decoding \(ngram, 2 tokens\): .*(rejected draft)"):
        attention_layer(config)


REGISTRATION_FAILS_HALF_WAY = """
import vllm_slim.backends.registration as registration
from vllm.model_executor.model_loader import base_loader
from vllm.platforms import current_platform
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.engine import core

platform = type(current_platform)
def patched():
    return (
        dict(vars(platform)), dict(vars(AttentionBackendEnum)), dict(AttentionBackendEnum._member_map_),
        base_loader.process_weights_after_loading, core.get_kv_cache_configs,
    )
before = patched()
def moved(undo):  # a vLLM whose engine core moved its function away
    raise AttributeError("module 'vllm.v1.engine.core' has no attribute 'get_kv_cache_configs'")
moved.__name__ = "_explain_sata_memory_errors"  # the last step fails, after five that patch vLLM
stock_step, registration._explain_sata_memory_errors = registration._explain_sata_memory_errors, moved
try:
    registration.register_backends()
except RuntimeError as error:
    print(error)
assert patched() == before, "a failed registration left vLLM patched"
registration._explain_sata_memory_errors = stock_step
registration.register_backends()  # nothing was marked done: a later attempt registers everything
assert "SLIM" in AttentionBackendEnum.__members__ and patched() != before
print("registered")
"""


def test_a_registration_that_fails_half_way_undoes_itself_and_says_why():
    """Run in a fresh interpreter: the steps before the failing one (the backends' enum members, the CPU
    selection, the loader hook, sata's config check) are undone, and the error names the step."""
    result = subprocess.run([sys.executable, "-c", REGISTRATION_FAILS_HALF_WAY], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        f"vllm-slim could not register with vLLM {vllm.__version__}: explain_sata_memory_errors failed "
        "(AttributeError: module 'vllm.v1.engine.core' has no attribute 'get_kv_cache_configs'); every earlier "
        "step was undone, so neither the slim nor the sata backend is available in this process",
        "registered",
    ]
