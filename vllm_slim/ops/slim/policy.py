"""Slim's storage policy: how many spill coordinates make a 16-bit K cache safe.

The cached K row is rounded to the cache dtype; rebuilding V multiplies that
rounding by W_KV. With isotropic unit-variance X (K_j has variance ‖W_K[:, j]‖²),
element-wise relative rounding u gives a V error, relative to the stock cache's
own u on V, of

    ratio² = (Σ_j ‖W_K[:, j]‖²·‖W_KV[j, :]‖²          (rounded K through W_KV)
              + ‖W_SV‖_F²                              (rounded spill)
              + Σ_j ‖[W_K | W_V][:, j]‖²·‖(spill_in·W_SV)[j, :]‖²)   (spill estimate)
             / ‖W_V‖_F²

independent of the dtype. The policy picks the fewest spill coordinates per head
(one width for every layer, since vLLM pages every layer alike) that keep every
layer's predicted V error within `max_error_ratio` × the stock cache's error in
the same dtype, as long as the capacity gain stays at or above
`min_capacity_gain`. The budget is never tighter than ERROR_FLOOR: a float32
cache's own error (6e-8) is far below anything that moves a token. Real
activations are not isotropic: the end-to-end teacher-forced tests check the
budget on trained weights.
"""

import functools
from dataclasses import dataclass, field

import torch

from vllm_slim.ops.slim.projection import SlimProjection, solve_projection

ERROR_FLOOR = 1e-4  # relative V error no budget needs to go below


@dataclass(frozen=True)
class SlimPolicy:
    """User knobs (vLLM `--additional-config '{"slim": {...}}'`)."""

    max_error_ratio: float = 2.0
    min_capacity_gain: float = 1.8
    spill_per_head: int | None = None  # a fixed width instead of the search
    allow_over_budget: bool = False  # serve (with a warning) instead of refusing

    @classmethod
    def from_config(cls, options: dict) -> "SlimPolicy":
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown slim option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**options)


@functools.cache
def stock_rounding_error(dtype: torch.dtype) -> float:
    """Relative L2 error of rounding N(0, 1) values to `dtype` (the stock cache's)."""
    x = torch.randn(1 << 14, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return ((x.to(dtype).double() - x).norm() / x.norm()).item()


@dataclass(frozen=True)
class LayerNumerics:
    name: str
    cond: float
    ratio_without_spill: float
    ratio: float


@dataclass
class PolicyDecision:
    spill_per_head: int
    capacity_gain: float
    cache_dtype: torch.dtype
    max_error_ratio: float
    layers: list[LayerNumerics] = field(default_factory=list)

    @property
    def error_budget(self) -> float:
        """Largest relative V error allowed for this cache dtype."""
        return max(self.max_error_ratio * stock_rounding_error(self.cache_dtype), ERROR_FLOOR)

    @property
    def within_budget(self) -> bool:
        stock = stock_rounding_error(self.cache_dtype)
        return all(layer.ratio * stock <= self.error_budget for layer in self.layers)

    def table(self) -> str:
        """Per-layer numerics as a fixed-width table for the start-up log."""
        bf16, fp16 = stock_rounding_error(torch.bfloat16), stock_rounding_error(torch.float16)
        lines = [
            f"{'layer':<32} {'cond(W_K)':>10} {'V err x stock':>14} {'with spill':>11}"
            f" {'pred V err bf16':>16} {'fp16':>9}"
        ]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<32} {layer.cond:>10.3g} {layer.ratio_without_spill:>14.3g}"
                f" {layer.ratio:>11.3g} {layer.ratio * bf16:>16.2e} {layer.ratio * fp16:>9.2e}"
            )
        lines.append(
            f"spill {self.spill_per_head}/head -> capacity {self.capacity_gain:.3f}x stock;"
            f" {self.cache_dtype} cache, V error budget {self.error_budget:.2e}:"
            f" {'met' if self.within_budget else 'EXCEEDED'}"
        )
        return "\n".join(lines)


def capacity_gain(head_size: int, spill_per_head: int) -> float:
    """Tokens slim holds per stock token in the same memory (stock stores K and V)."""
    return 2 * head_size / (head_size + spill_per_head)


def predicted_error_ratio(w_k: torch.Tensor, w_v: torch.Tensor, proj: SlimProjection) -> float:
    """Slim's V error over the stock cache's, for isotropic X (see module doc)."""
    w_k, w_v = w_k.double(), w_v.double()
    w_kv, w_sv = proj.w_kv.double(), proj.w_sv.double()
    through_k = (w_k.norm(dim=0) ** 2 * w_kv.norm(dim=1) ** 2).sum()
    through_spill = (w_sv**2).sum()
    stacked = torch.cat((w_k, w_v), dim=1)
    spill_estimate = (stacked.norm(dim=0) ** 2 * (proj.spill_in.double() @ w_sv).norm(dim=1) ** 2).sum()
    return ((through_k + through_spill + spill_estimate) / (w_v**2).sum()).sqrt().item()


def choose_spill(
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
    num_heads: int,
    head_size: int,
    cache_dtype: torch.dtype,
    policy: SlimPolicy,
) -> tuple[PolicyDecision, dict[str, SlimProjection]]:
    """Pick the spill width and solve every layer's projection with it.

    layers: name -> (w_k [hidden, d], w_v, k_bias, v_bias) in K = X·W_K form.
    """
    if policy.spill_per_head is not None:
        candidates = [policy.spill_per_head]
    else:
        most = max(r for r in range(head_size) if capacity_gain(head_size, r) >= policy.min_capacity_gain)
        candidates = list(range(most + 1))
    baseline: dict[str, tuple[float, float]] = {}
    for spill_per_head in candidates:
        projections, numerics = {}, []
        for name, (w_k, w_v, b_k, b_v) in layers.items():
            proj = solve_projection(w_k, w_v, b_k, b_v, num_heads, spill_per_head * num_heads)
            ratio = predicted_error_ratio(w_k, w_v, proj)
            if name not in baseline:
                unspilled = ratio if spill_per_head == 0 else predicted_error_ratio(
                    w_k, w_v, solve_projection(w_k, w_v, b_k, b_v, num_heads, 0)
                )
                baseline[name] = (proj.cond, unspilled)
            projections[name] = proj
            numerics.append(LayerNumerics(name, baseline[name][0], baseline[name][1], ratio))
        decision = PolicyDecision(
            spill_per_head, capacity_gain(head_size, spill_per_head), cache_dtype,
            policy.max_error_ratio, numerics,
        )
        if decision.within_budget:
            break
    return decision, projections
