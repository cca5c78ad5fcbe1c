"""Slim attention backend (arXiv 2503.05840): the paged cache holds only K.

Each cached row is a head's post-RoPE key (what the scores need) followed by
`spill_per_head` spill coordinates, in the dtype the layout chose (what makes
16-bit storage safe, see `vllm_slim.ops.slim.policy`). Values are never
stored: V = K_raw·W_KV + S·W_SV.

Per step: the builder splits the batch once (decodes first, as the runner orders it for
`reorder_batch_threshold = 1`) and derives every token's position on the device; the rows are
written through `do_kv_cache_update`; `forward` runs the batched decode form for the decodes and
the batched prefill form for the rest. Neither builds nor forward reads a device tensor back to the
host. The layout is per model: the loader hook binds it to each layer (`registration.bind_slim_layers`).
"""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_slim.backends.common import (
    DecoderAttentionBackend,
    bind_cache_spec,
    building_stock_spec,
    host_max_seq_len,
    unsupported_features,
)
from vllm_slim.ops.slim import (
    Rotary,
    SlimNotApplicable,
    SlimProjection,
    paged_decode_slim_attention,
    paged_prefill_slim_attention,
    store_rows,
)
from vllm_slim.ops.slim.decode import pages_per_split
from vllm_slim.ops.slim.policy import SlimLayout, SlimPolicy
from vllm_slim.ops.varlen import token_positions


class SlimAttentionBackend(DecoderAttentionBackend):
    # K|spill rows go to the cache through do_kv_cache_update, before forward.
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    # The stored K must be the model's K: quantized caches would be amplified into V.
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]
    kv_cache_dtype_reason = (
        "slim stores K in 16 bits or more: a quantized K's error reaches every value amplified by cond(W_K)"
    )

    @staticmethod
    def get_name() -> str:
        return "SLIM"

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True  # keys out of a query's window are masked, and pages wholly out of it never read

    @staticmethod
    def get_impl_cls() -> type["SlimAttentionImpl"]:
        return SlimAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["SlimAttentionMetadataBuilder"]:
        return SlimAttentionMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """The K-only page each bound layer already asked for (`SlimAttentionImpl.bind`): the layout
        belongs to the model, which this class method does not see."""
        if spec.head_size_v >= spec.head_size and not building_stock_spec():
            raise RuntimeError(
                "slim: KV cache spec requested before the weights were bound "
                "(the model loader hook did not run for this layer)"
            )
        return spec


@dataclass
class SlimAttentionMetadata:
    num_tokens: int  # real tokens this step (the runner may pad the batch past them)
    positions: torch.Tensor  # [num_tokens] each token's position in its sequence
    # Decodes: the first num_decodes requests, one token each.
    num_decodes: int
    decode_seq_lens: torch.Tensor  # [num_decodes]
    decode_block_table: torch.Tensor  # [num_decodes, >= decode_pages]
    decode_pages: int  # pages the longest decode spans
    decode_split_pages: int  # pages per split of the decode form's working set
    # Prefills (and chunked prefills): the requests after the decodes.
    num_prefills: int
    prefill_query_start_loc: torch.Tensor  # [num_prefills + 1], from 0
    prefill_seq_lens: torch.Tensor  # [num_prefills]
    prefill_block_table: torch.Tensor
    prefill_pages: int
    prefill_max_query_len: int


class SlimAttentionMetadataBuilder(AttentionMetadataBuilder[SlimAttentionMetadata]):
    # FULL CUDA graphs for steps of decodes only; mixed steps run attention eagerly between the captured
    # pieces (PIECEWISE). A captured decode replays the launches of its capture, so nothing in them may
    # depend on the step: the decode is sized by max_model_len's pages (`build_for_cudagraph_capture`),
    # each sequence reads its own length on the device, every tensor the graph reads is a view of a
    # persistent buffer (the runner's, or `positions` here), and a padded row (seq_len 0, slot −1)
    # writes nothing and gives a finite row nobody reads.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Decodes first, so that one split serves every layer.
        self._init_reorder_batch_threshold(1)
        self.block_size = kv_cache_spec.block_size
        self.row_size = kv_cache_spec.head_size + kv_cache_spec.head_size_v
        self.num_heads = kv_cache_spec.num_kv_heads
        self.max_pages = -(-vllm_config.model_config.max_model_len // self.block_size)
        # Each token's position, refreshed in place every step: a captured graph reads this buffer.
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.positions = torch.zeros(max_tokens, dtype=torch.long, device=device)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> SlimAttentionMetadata:
        """A decode step as a FULL graph captures it: sized for any lengths up to max_model_len, since every
        replay runs these launches whatever its sequences' lengths."""
        return dataclasses.replace(self.build(0, common_attn_metadata), decode_pages=self.max_pages)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> SlimAttentionMetadata:
        cam = common_attn_metadata
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(cam, decode_threshold=1)
        query_start_loc_cpu = cam.query_start_loc_cpu[: cam.num_reqs + 1]
        num_tokens = int(query_start_loc_cpu[-1])
        seq_lens = cam.seq_lens[: cam.num_reqs]
        block_table = cam.block_table_tensor[: cam.num_reqs]
        positions = self.positions[:num_tokens]
        positions.copy_(token_positions(cam.query_start_loc[: cam.num_reqs + 1], seq_lens, num_tokens))
        decode_pages = -(-host_max_seq_len(cam, 0, num_decodes) // self.block_size)
        prefill_query_lens = query_start_loc_cpu[num_decodes + 1 :] - query_start_loc_cpu[num_decodes:-1]
        return SlimAttentionMetadata(
            num_tokens=num_tokens,
            positions=positions,
            num_decodes=num_decodes,
            decode_seq_lens=seq_lens[:num_decodes],
            decode_block_table=block_table[:num_decodes],
            decode_pages=decode_pages,
            decode_split_pages=pages_per_split(num_decodes, self.block_size, self.num_heads, self.row_size),
            num_prefills=num_prefills,
            prefill_query_start_loc=cam.query_start_loc[num_decodes : cam.num_reqs + 1] - num_decode_tokens,
            prefill_seq_lens=seq_lens[num_decodes:],
            prefill_block_table=block_table[num_decodes:],
            prefill_pages=-(-host_max_seq_len(cam, num_decodes, cam.num_reqs) // self.block_size),
            prefill_max_query_len=int(prefill_query_lens.max()) if num_prefills else 0,
        )


class SlimAttentionImpl(AttentionImpl):
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
        _refuse_unsupported(
            num_heads, num_kv_heads, alibi_slopes, logits_soft_cap, kv_sharing_target_layer_name, extra_impl_args,
            vllm_config,
        )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.kv_cache_dtype = kv_cache_dtype
        # The stock cache's dtype; slim's own store dtype comes from the layout.
        self.cache_torch_dtype = kv_cache_dtype_str_to_dtype(kv_cache_dtype, vllm_config.model_config)
        self.model_dtype = vllm_config.model_config.dtype
        self.attn_type = attn_type
        self.sliding_window = sliding_window  # vLLM's: a query at p sees keys p − W < k ≤ p
        self.policy = SlimPolicy.from_config((vllm_config.additional_config or {}).get("slim", {}))
        self.layer_name = ""
        self.layout: SlimLayout | None = None
        self.projection: SlimProjection | None = None
        self.rotary: Rotary | None = None

    def bind(
        self, layer: torch.nn.Module, layout: SlimLayout, projection: SlimProjection, rotary: Rotary | None
    ) -> None:
        """Attach the layer's value map and RoPE (from the loader hook), and page it by the model's
        layout: K plus the spill, in the layout's dtype."""
        self.layer_name = layer.layer_name
        self.layout = layout
        self.projection = projection
        self.rotary = rotary
        bind_cache_spec(
            layer, lambda spec: dataclasses.replace(spec, head_size_v=layout.spill_per_head, dtype=layout.store_dtype)
        )

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Store each new token's K|spill row at its slot (slot −1, padding, never reaches a real block)."""
        metadata = step_metadata(layer.layer_name)
        if metadata is None:  # profiling / warm-up
            return
        n = metadata.num_tokens
        store_rows(kv_cache, key[:n], value[:n], metadata.positions, slot_mapping[:n], self._projection(), self.rotary)

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: SlimAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("slim: fused output quantization is not supported")
        if attn_metadata is None:  # profiling / warm-up
            return output
        md, proj = attn_metadata, self._projection()
        # Every token attends to the rows just cached for it, never to the V it was handed: the
        # output is a function of the cache alone, however the sequence was batched or recomputed.
        if md.num_decodes:
            output[: md.num_decodes] = paged_decode_slim_attention(
                query[: md.num_decodes], kv_cache, md.decode_block_table, md.decode_seq_lens, md.decode_pages,
                proj, self.rotary, self.scale, md.decode_split_pages, window=self.sliding_window,
            ).to(output.dtype)
        if md.num_prefills:
            output[md.num_decodes : md.num_tokens] = paged_prefill_slim_attention(
                query[md.num_decodes : md.num_tokens], md.prefill_query_start_loc, md.prefill_seq_lens, kv_cache,
                md.prefill_block_table, md.prefill_pages, md.prefill_max_query_len, proj, self.rotary, self.scale,
                window=self.sliding_window,
            ).to(output.dtype)
        return output

    def _projection(self) -> SlimProjection:
        if self.projection is None:
            raise RuntimeError("slim: attention ran before W_KV was bound (the model loader hook did not run)")
        return self.projection


def step_metadata(layer_name: str) -> SlimAttentionMetadata | None:
    """This step's metadata for one layer, from vLLM's forward context (None while profiling)."""
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # speculative decoding's per-draft dicts: refused at start-up
        metadata = metadata[0]
    return metadata.get(layer_name) if isinstance(metadata, dict) else metadata


def _refuse_unsupported(
    num_heads, num_kv_heads, alibi_slopes, logits_soft_cap, kv_sharing_target_layer_name, extra_impl_args,
    vllm_config: VllmConfig,
) -> None:
    """Start-up errors for models slim cannot serve exactly; never a silent fallback."""
    reasons = []
    if num_kv_heads != num_heads:
        reasons.append(
            f"grouped-query attention ({num_heads} query heads, {num_kv_heads} KV heads): "
            "K has fewer columns than the hidden state, so V is not a function of K"
        )
    reasons += unsupported_features(
        alibi_slopes, logits_soft_cap, kv_sharing_target_layer_name, extra_impl_args, vllm_config,
        "every head's V needs every head's K, which a head-sharded rank does not hold (use TP=1)",
        "verification would write rejected draft tokens' rows that slim has not been shown to overwrite "
        "like the stock cache, and a draft model would page the target's cache with its own layout",
    )
    quantization = vllm_config.model_config.quantization if vllm_config.model_config else None
    if quantization:
        reasons.append(f"quantized weights ({quantization}): W_K must be dense to solve W_KV")
    if reasons:
        raise SlimNotApplicable("slim attention cannot serve this model: " + "; ".join(reasons))
