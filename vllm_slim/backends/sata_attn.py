"""SATA backend (arXiv 2602.00294): a fixed-size attention state per sequence instead of a KV cache.

Each layer keeps, per sequence and KV head, Σ φ(k)·[v, 1]ᵀ over the sequence's tokens, where φ is
the symmetric Taylor feature map of `vllm_slim.ops.sata` (float32, [m, d_v + 1]). vLLM pages it
through a Mamba-style spec: one state block per request, handed out by the engine's MambaManager.
The order (number of Taylor terms) comes from `--additional-config '{"sata": {"order": P}}'`; adding
`"window": W` (and `"sink_tokens": S`) serves the hybrid: exact attention over the first S and the W most
recent tokens, kept in the same fixed-size state, and the series for everything older.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec, MambaSpec

from vllm_slim.backends.common import DecoderAttentionBackend, unsupported_features
from vllm_slim.ops.sata import (
    HybridSataState,
    SataState,
    chunk_hybrid_sata_attention,
    chunk_sata_attention,
    feature_size,
    recurrent_sata_attention,
    state_size,
)
from vllm_slim.ops.sata.policy import SataNotApplicable, SataPolicy, state_report

logger = init_logger(f"vllm.{__name__}")


class SataAttentionBackend(DecoderAttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]
    kv_cache_dtype_reason = "the SATA state is float32 whatever the cache dtype"
    sliding_window_reason = "a SATA state cannot forget the tokens that leave the window"

    # Set by the impl during model construction: the worker has no current vLLM config when it
    # asks for the cache spec (shared notes, vllm-internals §3.2).
    policy: ClassVar[SataPolicy | None] = None
    max_model_len: ClassVar[int] = 0
    num_layers: ClassVar[int] = 0  # built so far in this process: all of them once the cache is planned

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
    def customize_spec(cls, spec: AttentionSpec) -> MambaSpec:
        """One float32 state block per request, per KV head: Σ φ(k)vᵀ beside Σ φ(k) ([m, d_v + 1]), then
        the hybrid's exact keys and values ([S + W, d] and [S + W, d_v]; none without a window)."""
        if cls.policy is None:
            raise RuntimeError("sata: KV cache spec requested before the attention layers were built")
        head_size_v = getattr(spec, "head_size_v", spec.head_size)
        logger.info_once(
            "sata: %s",
            state_report(cls.num_layers, spec.num_kv_heads, spec.head_size, head_size_v, spec.dtype, cls.policy),
        )
        floats = state_size(spec.head_size, head_size_v, cls.policy.order, cls.policy.exact_tokens)
        return MambaSpec(
            # One block must cover a whole request: the block table holds a single column.
            block_size=cls.max_model_len,
            shapes=((spec.num_kv_heads, floats),),
            dtypes=(torch.float32,),
            mamba_cache_mode="none",
        )


@dataclass
class SataAttentionMetadata:
    num_actual_tokens: int
    query_start_loc: list[int]  # [B + 1], host
    context_lens: list[int]  # [B] tokens already folded into each request's state, host
    state_indices: torch.Tensor  # [B] each request's state block


class SataAttentionMetadataBuilder(AttentionMetadataBuilder[SataAttentionMetadata]):
    # The base declares __init__ abstract: every builder must define one.
    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> SataAttentionMetadata:
        cam = common_attn_metadata
        query_start_loc = cam.query_start_loc_cpu[: cam.num_reqs + 1].tolist()
        seq_lens = cam.seq_lens[: cam.num_reqs].cpu().tolist()
        query_lens = [end - start for start, end in zip(query_start_loc, query_start_loc[1:])]
        return SataAttentionMetadata(
            num_actual_tokens=cam.num_actual_tokens,
            query_start_loc=query_start_loc,
            context_lens=[seq - query for seq, query in zip(seq_lens, query_lens)],
            state_indices=cam.block_table_tensor[: cam.num_reqs, 0],
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
        )
        if reasons:
            raise SataNotApplicable("sata attention cannot serve this model: " + "; ".join(reasons))
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.policy = SataPolicy.from_config((vllm_config.additional_config or {}).get("sata", {}))
        SataAttentionBackend.policy = self.policy
        SataAttentionBackend.max_model_len = vllm_config.model_config.max_model_len
        SataAttentionBackend.num_layers += 1

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
        n = attn_metadata.num_actual_tokens
        query = query[:n].view(n, self.num_heads, self.head_size)
        key = key[:n].view(n, self.num_kv_heads, self.head_size)
        value = value[:n].view(n, self.num_kv_heads, -1)
        pages = kv_cache.view(kv_cache.shape[0], -1).view(torch.float32)  # raw int8 pages as float32
        qsl = attn_metadata.query_start_loc
        for i, block in enumerate(attn_metadata.state_indices.tolist()):
            tokens = slice(qsl[i], qsl[i + 1])
            series, keys, values = self._state_views(pages[block], value.shape[-1])
            seen = attn_metadata.context_lens[i]
            if seen == 0:
                # A new request, or one preempted and recomputed: its block may hold another's state.
                pages[block].zero_()
            carried = SataState(series[..., :-1], series[..., -1])
            q, k, v = query[tokens], key[tokens], value[tokens]
            if self.policy.window:
                out, new = chunk_hybrid_sata_attention(
                    q, k, v, HybridSataState(carried, keys, values), seen, self.scale, self.policy.order,
                    self.policy.sink_tokens, self.policy.window,
                )
                keys.copy_(new.keys)
                values.copy_(new.values)
                new = new.series
            else:
                form = recurrent_sata_attention if q.shape[0] == 1 else chunk_sata_attention
                out, new = form(q, k, v, carried, self.scale, self.policy.order)
            series[..., :-1] = new.numerator
            series[..., -1] = new.normalizer
            output[tokens] = out.to(output.dtype)
        return output

    def _state_views(self, page: torch.Tensor, head_size_v: int) -> tuple[torch.Tensor, ...]:
        """One request's float32 page as its series state [KV heads, m, d_v + 1] and the hybrid's exact
        keys [KV heads, S + W, d] and values [KV heads, S + W, d_v] (empty without a window)."""
        m, exact = feature_size(self.head_size, self.policy.order), self.policy.exact_tokens
        per_head = page.view(self.num_kv_heads, -1)
        series, keys, values = per_head.split((m * (head_size_v + 1), exact * self.head_size, exact * head_size_v), -1)
        return (
            series.view(self.num_kv_heads, m, head_size_v + 1),
            keys.view(self.num_kv_heads, exact, self.head_size),
            values.view(self.num_kv_heads, exact, head_size_v),
        )
