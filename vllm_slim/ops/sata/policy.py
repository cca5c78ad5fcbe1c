"""SATA's start-up choices: the order, what its state costs, and where it pays off against a KV cache."""

from dataclasses import dataclass

import torch

from vllm_slim.ops.options import policy_from_options
from vllm_slim.ops.sata.basis import DEFAULT_ORDER, is_positive_order, state_bytes


class SataNotApplicable(ValueError):
    """The model or configuration cannot be served with SATA; the message says why."""


@dataclass(frozen=True)
class SataPolicy:
    """User knobs (vLLM `--additional-config '{"sata": {...}}'`)."""

    order: int = DEFAULT_ORDER  # Taylor terms: degrees 0..order−1

    @classmethod
    def from_config(cls, options: dict) -> "SataPolicy":
        policy = policy_from_options(cls, options, "sata", SataNotApplicable)
        if not is_positive_order(policy.order):
            raise SataNotApplicable(
                f"sata order {policy.order} ends on an odd degree ({policy.order - 1}): its attention weights "
                "go negative (below logit -1.6 for order 4) and a row's normalizer can reach 0; "
                f"use an odd order such as {max(1, policy.order - 1)} or {policy.order + 1}"
            )
        return policy

    def describe(self) -> str:
        return f"order {self.order} (degrees 0..{self.order - 1}), float32 state"


def sequence_state_bytes(layer_shapes: list[tuple[int, int, int]], order: int) -> int:
    """One sequence's state, in bytes, over layers of (KV heads, d, d_v)."""
    return sum(heads * state_bytes(d, d_v, order) for heads, d, d_v in layer_shapes)


def stock_bytes_per_token(num_kv_heads: int, head_size: int, head_size_v: int, dtype: torch.dtype) -> int:
    """What the stock paged cache stores per token and layer: K and V of every KV head."""
    return num_kv_heads * (head_size + head_size_v) * dtype.itemsize


def break_even_tokens(num_kv_heads: int, head_size: int, head_size_v: int, dtype: torch.dtype, order: int) -> int:
    """Context length from which one SATA state is smaller than the stock cache of the same sequence."""
    per_token = stock_bytes_per_token(num_kv_heads, head_size, head_size_v, dtype)
    return -(-num_kv_heads * state_bytes(head_size, head_size_v, order) // per_token)


def state_report(
    num_layers: int, num_kv_heads: int, head_size: int, head_size_v: int, dtype: torch.dtype, order: int
) -> str:
    """One log line: the state per sequence, and the context length below which the stock cache is smaller."""
    per_sequence = sequence_state_bytes([(num_kv_heads, head_size, head_size_v)] * num_layers, order)
    return (
        f"order {order} (degrees 0..{order - 1}): state {per_sequence / 2**20:.2f} MiB ({per_sequence:,} B) "
        f"per sequence ({num_layers} layers x {num_kv_heads} KV heads of {head_size}); the stock "
        f"{str(dtype).removeprefix('torch.')} KV cache of a sequence is smaller below "
        f"{break_even_tokens(num_kv_heads, head_size, head_size_v, dtype, order):,} tokens of context"
    )


def largest_fitting_order(layer_shapes: list[tuple[int, int, int]], available_bytes: int) -> int | None:
    """The largest positive (odd) order whose per-sequence state, over layers of (KV heads, d, d_v), fits."""
    fitting = None
    for order in range(1, 64, 2):
        if sequence_state_bytes(layer_shapes, order) > available_bytes:
            return fitting
        fitting = order
    return fitting
