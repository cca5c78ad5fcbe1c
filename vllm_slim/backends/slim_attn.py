"""Slim attention backend (arXiv 2503.05840): the paged cache holds only K.

Each cached row is a head's post-RoPE key (what the scores need) followed by
`spill_per_head` spill coordinates, in the dtype the layout chose (what makes
16-bit storage safe, see `vllm_slim.ops.slim.policy`). Values are never
stored: V = K_raw·W_KV + S·W_SV.
"""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger
from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
from vllm.v1.attention.backend import (
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from vllm_slim.backends.common import DecoderAttentionBackend, unsupported_features
from vllm_slim.ops.slim import (
    Rotary,
    SlimNotApplicable,
    SlimProjection,
    cache_rows,
    decode_slim_attention,
    parallel_slim_attention,
    rebuild_values,
    rotate,
    unrope,
)
from vllm_slim.ops.slim.policy import SlimLayout, SlimPolicy

logger = init_logger(f"vllm.{__name__}")


class SlimAttentionBackend(DecoderAttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    # The stored K must be the model's K: quantized caches would be amplified into V.
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]
    kv_cache_dtype_reason = (
        "slim stores K in 16 bits or more: a quantized K's error reaches every value amplified by cond(W_K)"
    )
    sliding_window_reason = "not implemented by slim"

    # Decided once per worker after the weights load (one layout pages every layer alike).
    layout: ClassVar[SlimLayout | None] = None

    @staticmethod
    def get_name() -> str:
        return "SLIM"

    @staticmethod
    def get_impl_cls() -> type["SlimAttentionImpl"]:
        return SlimAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["SlimAttentionMetadataBuilder"]:
        return SlimAttentionMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """K-only page: the V slot shrinks to the spill coordinates."""
        if cls.layout is None:
            raise RuntimeError(
                "slim: KV cache spec requested before the weights were bound "
                "(the model loader hook did not run in this process)"
            )
        return dataclasses.replace(
            spec, head_size_v=cls.layout.spill_per_head, dtype=cls.layout.store_dtype
        )


@dataclass
class SlimAttentionMetadata:
    num_actual_tokens: int
    query_start_loc: list[int]  # [B + 1], host
    seq_lens: list[int]  # [B], host
    block_table: torch.Tensor  # [B, max_blocks]
    slot_mapping: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]


class SlimAttentionMetadataBuilder(AttentionMetadataBuilder[SlimAttentionMetadata]):
    # The base declares __init__ abstract: every builder must define one.
    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> SlimAttentionMetadata:
        cam = common_attn_metadata
        return SlimAttentionMetadata(
            num_actual_tokens=cam.num_actual_tokens,
            query_start_loc=cam.query_start_loc_cpu[: cam.num_reqs + 1].tolist(),
            seq_lens=cam.seq_lens[: cam.num_reqs].cpu().tolist(),
            block_table=cam.block_table_tensor,
            slot_mapping=cam.slot_mapping,
            positions=cam.positions,
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
            num_heads, num_kv_heads, sliding_window, alibi_slopes, logits_soft_cap,
            kv_sharing_target_layer_name, extra_impl_args, vllm_config,
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
        self.policy = SlimPolicy.from_config((vllm_config.additional_config or {}).get("slim", {}))
        self.projection: SlimProjection | None = None
        self.rotary: Rotary | None = None
        self.layer_name = ""
        self.expected_error = 0.0
        self.verified = False

    def bind(self, layer_name: str, projection: SlimProjection, rotary: Rotary | None, expected_error: float) -> None:
        """Attach the layer's value map and RoPE (from the loader hook)."""
        self.layer_name = layer_name
        self.projection = projection
        self.rotary = rotary
        self.expected_error = expected_error

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
        if self.projection is None:
            raise RuntimeError("slim: attention ran before W_KV was bound")
        if self.projection.w_kv.device != query.device:
            self.projection = self.projection.to(query.device)
            self.rotary = self.rotary and Rotary(
                self.rotary.cos_sin.to(query.device), self.rotary.rotary_dim, self.rotary.neox
            )
        n = attn_metadata.num_actual_tokens
        key, value = key[:n], value[:n]
        self._write_cache(key, value, kv_cache, attn_metadata)
        cache_values = value.to(self.cache_torch_dtype)  # what a stock cache would hand back
        qsl = attn_metadata.query_start_loc
        for i, seq_len in enumerate(attn_metadata.seq_lens):
            q = query[qsl[i] : qsl[i + 1]]
            keys, spill = self._gather(kv_cache, attn_metadata.block_table[i], seq_len)
            # Reordered (softmax·K)·W_KV while it is cheaper than rebuilding V (Lq < head_size).
            form = decode_slim_attention if q.shape[0] < self.head_size else parallel_slim_attention
            out = form(q, keys, spill, self.projection, self.rotary, self.scale, cache_values[qsl[i] : qsl[i + 1]])
            output[qsl[i] : qsl[i + 1]] = out.to(output.dtype)
        return output

    def _write_cache(self, key, value, kv_cache, md: SlimAttentionMetadata) -> None:
        """Store each token's K (and spill) row at its slot; slot -1 is padding."""
        valid = md.slot_mapping[: key.shape[0]] >= 0
        slots = md.slot_mapping[: key.shape[0]][valid]
        key, value = key[valid], value[valid]
        row = key
        proj = self.projection
        positions = md.positions[: valid.shape[0]][valid]
        if not self.verified:
            self._verify_binding(key, value, positions)
        if proj.spill or proj.refine is not None:
            keys, spill = cache_rows(unrope(key, positions, self.rotary), value, proj)
            if proj.refine is None:
                keys = key.float()  # stored as the model made it: no round trip through RoPE
            elif self.rotary is not None:
                keys = rotate(keys, positions, self.rotary)
            row = torch.cat((keys, spill.view(key.shape[0], self.num_heads, -1)), dim=-1)
        block_size = kv_cache.shape[2]
        kv_cache[slots // block_size, :, slots % block_size] = row.to(kv_cache.dtype)

    def _verify_binding(self, key, value, positions) -> None:
        """Refuse to serve if values rebuilt from the first real keys do not match
        the model's: the projections or RoPE found for this layer are not the ones
        the model computes with, and every later answer would be silently wrong."""
        k_raw = unrope(key, positions, self.rotary)
        keys, spill = cache_rows(k_raw, value, self.projection)
        rebuilt = rebuild_values(keys if self.projection.refine is not None else k_raw, spill, self.projection)
        error = ((rebuilt - value.float()).norm() / value.float().norm().clamp_min(1e-30)).item()
        if error > max(0.05, 10 * self.expected_error):
            raise SlimNotApplicable(
                f"slim: {self.layer_name}: values rebuilt from the first keys differ from the "
                f"model's by {error:.1%} (expected {self.expected_error:.1e}): the K/V projections "
                "or RoPE found for this architecture are not the ones it computes with"
            )
        self.verified = True

    def _gather(self, kv_cache, block_ids, seq_len):
        """A sequence's cached K [L, H, D] and spill [L, r] from its blocks."""
        block_size = kv_cache.shape[2]
        blocks = kv_cache[block_ids[: -(-seq_len // block_size)]]  # [nb, H, bs, D + r_h]
        rows = blocks.transpose(1, 2).reshape(-1, self.num_heads, blocks.shape[-1])[:seq_len]
        spill = rows[..., self.head_size :].flatten(1) if self.projection.spill else None
        return rows[..., : self.head_size], spill


def _refuse_unsupported(
    num_heads, num_kv_heads, sliding_window, alibi_slopes, logits_soft_cap,
    kv_sharing_target_layer_name, extra_impl_args, vllm_config: VllmConfig,
) -> None:
    """Start-up errors for models slim cannot serve exactly; never a silent fallback."""
    reasons = []
    if num_kv_heads != num_heads:
        reasons.append(
            f"grouped-query attention ({num_heads} query heads, {num_kv_heads} KV heads): "
            "K has fewer columns than the hidden state, so V is not a function of K"
        )
    if sliding_window is not None:
        reasons.append(f"sliding-window attention (window {sliding_window})")
    reasons += unsupported_features(
        alibi_slopes, logits_soft_cap, kv_sharing_target_layer_name, extra_impl_args, vllm_config,
        "every head's V needs every head's K, which a head-sharded rank does not hold (use TP=1)",
    )
    quantization = vllm_config.model_config.quantization if vllm_config.model_config else None
    if quantization:
        reasons.append(f"quantized weights ({quantization}): W_K must be dense to solve W_KV")
    if reasons:
        raise SlimNotApplicable("slim attention cannot serve this model: " + "; ".join(reasons))
