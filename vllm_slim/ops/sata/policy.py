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
    # The hybrid (off at 0): exact attention over the first sink_tokens and the `window` most recent tokens.
    sink_tokens: int = 0
    window: int = 0

    @classmethod
    def from_config(cls, options: dict) -> "SataPolicy":
        policy = policy_from_options(cls, options, "sata", SataNotApplicable)
        for key in ("order", "sink_tokens", "window"):
            value = getattr(policy, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise SataNotApplicable(f"sata {key} must be an integer, got {value!r}")
        if not is_positive_order(policy.order):
            raise SataNotApplicable(
                f"sata order {policy.order} ends on an odd degree ({policy.order - 1}): its attention weights "
                "go negative (below logit -1.6 for order 4) and a row's normalizer can reach 0; "
                f"use an odd order such as {max(1, policy.order - 1)} or {policy.order + 1}"
            )
        if policy.sink_tokens < 0 or policy.window < 0:
            raise SataNotApplicable(f"sata sink_tokens and window must be >= 0, got {policy.sink_tokens}, {policy.window}")
        if policy.sink_tokens and not policy.window:
            raise SataNotApplicable(
                "sata sink_tokens needs a window: exact sink attention is part of the hybrid, which "
                "\"window\": W (W >= 1 recent tokens attended exactly) turns on"
            )
        return policy

    @property
    def exact_tokens(self) -> int:
        """Tokens per sequence the hybrid keeps exact keys and values of (0: plain SATA)."""
        return self.sink_tokens + self.window

    def describe(self) -> str:
        hybrid = f", exact {self.sink_tokens} sink + {self.window} recent tokens" if self.window else ""
        return f"order {self.order} (degrees 0..{self.order - 1}){hybrid}, float32 state"


def sequence_state_bytes(layer_shapes: list[tuple[int, int, int]], order: int, exact_tokens: int = 0) -> int:
    """One sequence's state, in bytes, over layers of (KV heads, d, d_v)."""
    return sum(heads * state_bytes(d, d_v, order, exact_tokens) for heads, d, d_v in layer_shapes)


def stock_bytes_per_token(num_kv_heads: int, head_size: int, head_size_v: int, dtype: torch.dtype) -> int:
    """What the stock paged cache stores per token and layer: K and V of every KV head."""
    return num_kv_heads * (head_size + head_size_v) * dtype.itemsize


def break_even_tokens(
    num_kv_heads: int, head_size: int, head_size_v: int, dtype: torch.dtype, order: int, exact_tokens: int = 0
) -> int:
    """Context length from which one SATA state is smaller than the stock cache of the same sequence."""
    per_token = stock_bytes_per_token(num_kv_heads, head_size, head_size_v, dtype)
    return -(-num_kv_heads * state_bytes(head_size, head_size_v, order, exact_tokens) // per_token)


def state_report(
    num_layers: int, num_kv_heads: int, head_size: int, head_size_v: int, dtype: torch.dtype, policy: SataPolicy
) -> str:
    """One log line: the state per sequence, and the context length below which the stock cache is smaller."""
    shapes = [(num_kv_heads, head_size, head_size_v)] * num_layers
    per_sequence = sequence_state_bytes(shapes, policy.order, policy.exact_tokens)
    break_even = break_even_tokens(num_kv_heads, head_size, head_size_v, dtype, policy.order, policy.exact_tokens)
    return (
        f"{policy.describe()}: state {per_sequence / 2**20:.2f} MiB ({per_sequence:,} B) "
        f"per sequence ({num_layers} layers x {num_kv_heads} KV heads of {head_size}); the stock "
        f"{str(dtype).removeprefix('torch.')} KV cache of a sequence is smaller below {break_even:,} tokens of context"
    )


def largest_fitting_order(
    layer_shapes: list[tuple[int, int, int]], available_bytes: int, exact_tokens: int = 0
) -> int | None:
    """The largest positive (odd) order whose per-sequence state, over layers of (KV heads, d, d_v), fits."""
    fitting = None
    for order in range(1, 64, 2):
        if sequence_state_bytes(layer_shapes, order, exact_tokens) > available_bytes:
            return fitting
        fitting = order
    return fitting
