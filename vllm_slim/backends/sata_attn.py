"""SATA backend (arXiv 2602.00294): a fixed-size attention state per sequence instead of a KV cache.

Each layer keeps, per sequence and KV head, Σ φ(k)·[v, 1]ᵀ over the sequence's tokens, where φ is
the symmetric Taylor feature map of `vllm_slim.ops.sata` (float32, [m, d_v + 1]). vLLM pages it
through a Mamba-style spec: one state block per request, handed out by the engine's MambaManager.
The order (number of Taylor terms) comes from `--additional-config '{"sata": {"order": P}}'`; adding
`"window": W` (and `"sink_tokens": S`) serves the hybrid: exact attention over the first S and the W most
recent tokens, kept in the same fixed-size state, and the series for everything older.

Per step the builder gathers each request's state block into a persistent index buffer and the
tokens each state already holds (all on the device); `forward` runs one batched chunk form over
every sequence of the step, prefills and decodes alike. Decodes run a fused form instead, each state read
and written once in place: on CUDA the Triton kernels of `ops/sata/triton_decode.py` (the hybrid's too), on
the CPU the loop of `ops/sata/cpu_decode.c` (plain sata). On CUDA the prefills, plain and the hybrid's, run
the Triton kernels of `ops/sata/triton_prefill.py` (a step's new tokens as one chunk).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config, get_layers_from_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import AttentionSpec, MambaSpec

from vllm_slim.backends.common import DecoderAttentionBackend, bind_cache_spec, unsupported_features
from vllm_slim.ops.dispatch import uses_triton
from vllm_slim.ops.sata import chunk_sata_varlen, state_size
from vllm_slim.ops.sata import cpu_kernel as sata_cpu
from vllm_slim.ops.sata.basis import feature_tables
from vllm_slim.ops.sata.policy import SataNotApplicable, SataPolicy, state_report
from vllm_slim.ops.slim.cache import NULL_BLOCK

logger = init_logger(f"vllm.{__name__}")


class SataAttentionBackend(DecoderAttentionBackend):
    # The state update needs the whole chunk's queries, keys and values: it happens in forward().
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]
    kv_cache_dtype_reason = "the SATA state is float32 whatever the cache dtype"
    sliding_window_reason = "a SATA state cannot forget the tokens that leave the window"

    @staticmethod
    def get_name() -> str:
        return "SATA"

    @staticmethod
    def get_impl_cls() -> type["SataAttentionImpl"]:
        return SataAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["SataAttentionMetadataBuilder"]:
        return SataAttentionMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Never reached for a bound layer: it hands the runner a MambaSpec (`SataAttentionImpl.bind`)."""
        raise RuntimeError(
            "sata: KV cache spec requested before the layer was bound (the model loader hook did not run)"
        )


def state_spec(spec: AttentionSpec, policy: SataPolicy, max_model_len: int) -> MambaSpec:
    """One float32 state block per request, per KV head: Σ φ(k)vᵀ beside Σ φ(k) ([m, d_v + 1]), then the
    hybrid's exact keys and values ([S + W, d] and [S + W, d_v]; none without a window)."""
    floats = state_size(spec.head_size, spec.head_size_v, policy.order, policy.exact_tokens)
    return MambaSpec(
        # One block must cover a whole request: the block table holds a single column.
        block_size=max_model_len,
        shapes=((spec.num_kv_heads, floats),),
        dtypes=(torch.float32,),
        mamba_cache_mode="none",
    )


@dataclass
class SataAttentionMetadata:
    num_tokens: int  # real tokens this step (the runner may pad the batch past them)
    context_lens: torch.Tensor  # [B] tokens each request's state already holds
    state_indices: torch.Tensor  # [B] each request's state block (a view of a persistent buffer)
    reset: torch.Tensor  # [B] bool: states that start empty (new or recomputed requests)
    # Decodes are the first num_decodes requests (one token each); the prefills follow, apart, so
    # that a long prompt never pads the decodes' rows to its length.
    num_decodes: int
    decode_query_start_loc: torch.Tensor  # [num_decodes + 1]
    prefill_query_start_loc: torch.Tensor  # [num_prefills + 1], from the first prefill token
    prefill_max_query_len: int


class SataAttentionMetadataBuilder(AttentionMetadataBuilder[SataAttentionMetadata]):
    # No FULL CUDA graphs: with them vLLM 0.33 refuses to start unless every one of max_num_seqs has a
    # state block (config/compilation.py:1510-1531), and a state is gigabytes a sequence on a 7B model,
    # so the default start would fail; and a decode step is bound by its states' bytes, not by launches.
    # Under vLLM's default cudagraph mode sata's attention runs eagerly between the captured pieces.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        # Rows past the step's requests point at the null block, never at another request's state.
        self.state_indices = torch.full(
            (vllm_config.scheduler_config.max_num_seqs,), NULL_BLOCK, dtype=torch.long, device=device
        )
        # φ's tables on the device now rather than inside a step. Here, not at bind: builders are made
        # once the cache is sized, after an order too large for memory has been refused (at order 13
        # the tables alone would take gigabytes).
        for layer in get_layers_from_vllm_config(vllm_config, Attention, layer_names).values():
            feature_tables(layer.impl.head_size, layer.impl.policy.order, layer.impl.scale, torch.device(device))

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> SataAttentionMetadata:
        cam = common_attn_metadata
        num_reqs = cam.num_reqs
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(cam, decode_threshold=1)
        query_start_loc_cpu = cam.query_start_loc_cpu[: num_reqs + 1]
        prefill_query_lens = query_start_loc_cpu[num_decodes + 1 :] - query_start_loc_cpu[num_decodes:-1]
        query_start_loc = cam.query_start_loc[: num_reqs + 1]
        context_lens = cam.seq_lens[:num_reqs] - (query_start_loc[1:] - query_start_loc[:-1])
        self.state_indices[:num_reqs].copy_(cam.block_table_tensor[:num_reqs, 0], non_blocking=True)
        self.state_indices[num_reqs:].fill_(NULL_BLOCK)
        return SataAttentionMetadata(
            num_tokens=int(query_start_loc_cpu[-1]),
            context_lens=context_lens,
            state_indices=self.state_indices[:num_reqs],
            # A new request, or one preempted and recomputed: its block may hold another's state.
            reset=context_lens == 0,
            num_decodes=num_decodes,
            decode_query_start_loc=query_start_loc[: num_decodes + 1],
            prefill_query_start_loc=query_start_loc[num_decodes:] - num_decode_tokens,
            prefill_max_query_len=int(prefill_query_lens.max()) if num_prefills else 0,
        )


class SataAttentionImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra_impl_args,
    ) -> None:
        vllm_config = get_current_vllm_config()
        reasons = unsupported_features(
            alibi_slopes, logits_soft_cap, kv_sharing_target_layer_name, extra_impl_args, vllm_config,
            "not yet verified with sata (use TP=1)",
            "a state folds in every token it is given, so rejected draft tokens could not be taken out",
        )
        if reasons:
            raise SataNotApplicable("sata attention cannot serve this model: " + "; ".join(reasons))
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.kv_cache_dtype = kv_cache_dtype
        self.policy = SataPolicy.from_config((vllm_config.additional_config or {}).get("sata", {}))
        # The worker has no current vLLM config when it asks for the cache spec (shared notes,
        # vllm-internals §3.2): what the spec needs is kept from here.
        self.max_model_len = vllm_config.model_config.max_model_len

    def bind(self, layer: torch.nn.Module) -> None:
        """Page this layer as one fixed-size state per request (from the loader hook)."""
        bind_cache_spec(layer, lambda spec: state_spec(spec, self.policy, self.max_model_len))

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: SataAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("sata: fused output quantization is not supported")
        if attn_metadata is None:  # profiling / warm-up
            return output
        md, n, d = attn_metadata, attn_metadata.num_tokens, attn_metadata.num_decodes
        pages = kv_cache.view(kv_cache.shape[0], self.num_kv_heads, -1).view(torch.float32)  # raw int8 pages
        if d:
            output[:d] = self._attend(query[:d], key[:d], value[:d], pages, md, slice(0, d), 1).reshape_as(output[:d])
        if n > d:
            output[d:n] = self._attend(
                query[d:n], key[d:n], value[d:n], pages, md, slice(d, None), md.prefill_max_query_len
            ).reshape_as(output[d:n])
        return output

    def _attend(
        self, q, k, v, pages, md: SataAttentionMetadata, requests: slice, max_query_len: int
    ) -> torch.Tensor:
        """[tokens, H, d_v] for the step's decodes (max_query_len 1) or its prefills: `requests`."""
        indices, reset, context_lens = md.state_indices[requests], md.reset[requests], md.context_lens[requests]
        if max_query_len == 1:
            # Decodes: each state read and written once, in place (on the CPU, plain sata's only).
            if uses_triton(pages.device):
                from vllm_slim.ops.sata.triton_decode import triton_decode_sata  # imports triton: only when used

                return triton_decode_sata(
                    q, k, v, pages, indices, reset, self.scale, self.policy.order, context_lens,
                    self.policy.sink_tokens, self.policy.window,
                )
            if sata_cpu.supports(pages, self.policy.window):
                return sata_cpu.fused_decode_sata(q, k, v, pages, indices, reset, self.scale, self.policy.order)
        elif uses_triton(pages.device):
            # Prefills (plain and the hybrid's): the step's new tokens of a sequence as one chunk, its state
            # updated once.
            from vllm_slim.ops.sata.triton_prefill import triton_prefill_sata  # imports triton: only when used

            return triton_prefill_sata(
                q, k, v, md.prefill_query_start_loc, max_query_len, pages, indices, reset, self.scale,
                self.policy.order, context_lens, self.policy.sink_tokens, self.policy.window,
            )
        query_start_loc = md.decode_query_start_loc if max_query_len == 1 else md.prefill_query_start_loc
        return chunk_sata_varlen(
            q, k, v, query_start_loc, context_lens, max_query_len, pages, indices, reset, self.scale,
            self.policy.order, self.policy.sink_tokens, self.policy.window,
        )


def log_state(layers: list[torch.nn.Module]) -> None:
    """One start-up line: the state per sequence over the model's sata layers, and its break-even."""
    first = layers[0]
    logger.info(
        "sata: %s",
        state_report(
            len(layers), first.num_kv_heads, first.head_size, first.head_size_v, first.kv_cache_torch_dtype,
            first.impl.policy,
        ),
    )
