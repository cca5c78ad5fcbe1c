"""Slim's storage policy: the cache dtype and spill width that make a 16-bit K cache safe.

With isotropic unit-variance X (so coordinate j of K|V has variance
‖[W_K | W_V][:, j]‖²) and element-wise relative rounding, V rebuilt from the
cache has relative error e with

    e²·‖W_V‖_F² = u_model²·Σ_j var_j·‖P[j, :]‖²              (the model's own K, V rounding)
               + u_cache²·(Σ_j var_j·‖W_KV[j, :]‖² + ‖W_SV‖_F²)   (the cache's rounding)

where P maps the model's [K, V] to the rebuilt V (through W_KV unless the key
is refined, see `projection.py`), and the K term of the cache's rounding drops
when the cache stores the model's K unchanged in a dtype at least as fine.

The policy:
- stores K in float16 for bfloat16 models (8x finer mantissa, same bytes) and
  refines it from K and V, unless the user fixed `--kv-cache-dtype`;
- picks the fewest spill coordinates per head (one width for every layer:
  vLLM pages every layer alike) keeping every layer within `max_error_ratio` x
  the stock cache's own V error (never tighter than ERROR_FLOOR), as long as
  the capacity gain stays at or above `min_capacity_gain`; otherwise refuses
  (or, if allowed, serves with a warning).
Real activations are not isotropic: the end-to-end teacher-forced tests check
the budget on trained weights.
"""

import functools
from dataclasses import dataclass, field

import torch

from vllm_slim.ops.options import policy_from_options
from vllm_slim.ops.slim.projection import SlimProjection, solve_projection

ERROR_FLOOR = 1e-4  # relative V error no budget needs to go below (float32 caches)
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class SlimPolicy:
    """User knobs (vLLM `--additional-config '{"slim": {...}}'`)."""

    max_error_ratio: float = 1.5  # predicted; real activations measured up to 2x it
    min_capacity_gain: float = 1.8
    spill_per_head: int | None = None  # a fixed width instead of the search
    store_dtype: str = "auto"  # or a name in STORE_DTYPES
    allow_over_budget: bool = False  # serve (with a warning) instead of refusing

    @classmethod
    def from_config(cls, options: dict) -> "SlimPolicy":
        policy = policy_from_options(cls, options, "slim")
        number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
        if not (number(policy.max_error_ratio) and policy.max_error_ratio > 0):
            raise ValueError(f"slim max_error_ratio must be a number > 0, got {policy.max_error_ratio!r}")
        if not (number(policy.min_capacity_gain) and 0 < policy.min_capacity_gain <= 2):
            raise ValueError(
                f"slim min_capacity_gain must be a number in (0, 2], got {policy.min_capacity_gain!r}: "
                "a cache of K alone (no spill) holds 2x the stock cache's tokens, and no layout holds more"
            )
        spill = policy.spill_per_head
        if spill is not None and not (isinstance(spill, int) and not isinstance(spill, bool) and spill >= 0):
            raise ValueError(f"slim spill_per_head must be an integer >= 0 (or absent: searched), got {spill!r}")
        if policy.store_dtype != "auto" and policy.store_dtype not in STORE_DTYPES:
            raise ValueError(f"slim store_dtype must be auto or one of {sorted(STORE_DTYPES)}, got {policy.store_dtype!r}")
        if not isinstance(policy.allow_over_budget, bool):
            raise ValueError(f"slim allow_over_budget must be true or false, got {policy.allow_over_budget!r}")
        return policy


@functools.cache
def stock_rounding_error(dtype: torch.dtype) -> float:
    """Relative L2 error of rounding N(0, 1) values to `dtype`."""
    x = torch.randn(1 << 14, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return ((x.to(dtype).double() - x).norm() / x.norm()).item()


def store_dtype_for(model_dtype: torch.dtype, stock_cache_dtype: torch.dtype, user_fixed: bool, policy: SlimPolicy) -> torch.dtype:
    """The dtype slim's cache stores: float16 for bfloat16 unless fixed by the user."""
    if policy.store_dtype != "auto":
        return STORE_DTYPES[policy.store_dtype]
    if user_fixed or stock_cache_dtype != torch.bfloat16:
        return stock_cache_dtype
    return torch.float16


def capacity_gain(head_size: int, spill_per_head: int) -> float:
    """Tokens slim holds per stock token in the same memory (stock stores K and V)."""
    return 2 * head_size / (head_size + spill_per_head)


def predicted_v_error(
    w_k: torch.Tensor, w_v: torch.Tensor, proj: SlimProjection,
    model_dtype: torch.dtype, store_dtype: torch.dtype,
) -> float:
    """Relative error of the rebuilt V for isotropic X (see module doc)."""
    w_k, w_v = w_k.double(), w_v.double()
    w_kv, w_sv = proj.w_kv.double(), proj.w_sv.double()
    d = w_k.shape[1]
    u_model, u_store = stock_rounding_error(model_dtype), stock_rounding_error(store_dtype)
    var = torch.cat((w_k, w_v), dim=1).norm(dim=0) ** 2
    through_spill = proj.spill_in.double() @ w_sv
    if proj.refine is not None:
        path = proj.refine.double() @ w_kv + through_spill
    else:
        path = through_spill.clone()
        path[:d] += w_kv
    model_term = u_model**2 * (var * path.norm(dim=1) ** 2).sum()
    key_stored_again = proj.refine is not None or u_store > u_model
    store_term = u_store**2 * ((w_sv**2).sum() + key_stored_again * (var[:d] * w_kv.norm(dim=1) ** 2).sum())
    return ((model_term + store_term) / (w_v**2).sum()).sqrt().item()


@dataclass(frozen=True)
class LayerNumerics:
    name: str
    cond: float
    error_naive: float  # the paper's cache: stock dtype, no spill, no refinement
    error: float  # under the chosen layout


@dataclass
class SlimLayout:
    """The cache layout chosen for a model, with the numbers behind it."""

    spill_per_head: int
    store_dtype: torch.dtype
    refine: bool
    capacity_gain: float
    stock_error: float  # the stock cache's relative V error
    error_budget: float
    layers: list[LayerNumerics] = field(default_factory=list)
    map_bytes: int = 0  # every layer's value maps: memory the KV cache no longer has

    @property
    def within_budget(self) -> bool:
        return all(layer.error <= self.error_budget for layer in self.layers)

    def table(self) -> str:
        """Per-layer numerics as a fixed-width table for logs and `inspect`."""
        lines = [
            f"{'layer':<36} {'cond(W_K)':>10} {'naive V err':>12} {'slim V err':>11} {'x stock':>8}"
        ]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<36} {layer.cond:>10.3g} {layer.error_naive:>12.2e}"
                f" {layer.error:>11.2e} {layer.error / self.stock_error:>8.2f}"
            )
        lines.append(
            f"value maps (float32 W_KV{', refinement' if self.refine else ''}, spill maps): "
            f"{self.map_bytes / 2**20:.2f} MiB over {len(self.layers)} layers, taken from the KV cache's memory"
        )
        lines.append(
            f"layout: {self.describe()} -> capacity {self.capacity_gain:.3f}x stock; stock V err"
            f" {self.stock_error:.2e}, budget {self.error_budget:.2e}:"
            f" {'met' if self.within_budget else 'EXCEEDED'}"
        )
        return "\n".join(lines)

    def describe(self) -> str:
        """What each cached row holds, e.g. `K in float16 (refined from K and V), spill 2/head`."""
        dtype = str(self.store_dtype).removeprefix("torch.")
        refined = " (refined from K and V)" if self.refine else ""
        return f"K in {dtype}{refined}, spill {self.spill_per_head}/head"


def choose_layout(
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
    num_heads: int,
    head_size: int,
    model_dtype: torch.dtype,
    stock_cache_dtype: torch.dtype,
    user_fixed_cache_dtype: bool,
    policy: SlimPolicy,
) -> tuple[SlimLayout, dict[str, SlimProjection]]:
    """Pick the layout and solve every layer's projection under it.

    layers: name -> (w_k [hidden, d], w_v, k_bias, v_bias) in K = X·W_K form.
    """
    store = store_dtype_for(model_dtype, stock_cache_dtype, user_fixed_cache_dtype, policy)
    refine = torch.finfo(store).eps < torch.finfo(model_dtype).eps
    stock_error = stock_rounding_error(stock_cache_dtype)
    budget = max(policy.max_error_ratio * stock_error, ERROR_FLOOR)
    if policy.spill_per_head is not None:
        if policy.spill_per_head >= head_size:
            raise ValueError(
                f"slim spill_per_head must be below the head size ({head_size}), got {policy.spill_per_head}"
            )
        candidates = [policy.spill_per_head]
    else:
        most = max(r for r in range(head_size) if capacity_gain(head_size, r) >= policy.min_capacity_gain)
        candidates = list(range(most + 1))
    naive: dict[str, tuple[float, float]] = {}
    for name, (w_k, w_v, b_k, b_v) in layers.items():
        proj = solve_projection(w_k, w_v, b_k, b_v, num_heads, 0)
        naive[name] = (proj.cond, predicted_v_error(w_k, w_v, proj, model_dtype, stock_cache_dtype))
    for spill_per_head in candidates:
        projections, numerics = {}, []
        for name, (w_k, w_v, b_k, b_v) in layers.items():
            proj = solve_projection(w_k, w_v, b_k, b_v, num_heads, spill_per_head * num_heads, refine)
            projections[name] = proj
            error = predicted_v_error(w_k, w_v, proj, model_dtype, store)
            numerics.append(LayerNumerics(name, naive[name][0], naive[name][1], error))
        layout = SlimLayout(
            spill_per_head, store, refine, capacity_gain(head_size, spill_per_head),
            stock_error, budget, numerics, sum(proj.map_bytes for proj in projections.values()),
        )
        if layout.within_budget:
            break
    return layout, projections


def net_capacity_gain(layout: SlimLayout, slim_bytes_per_token: int, stock_bytes_per_token: int, cache_bytes: int) -> float:
    """Tokens slim holds per stock token when both have `cache_bytes` of memory and slim's value maps
    come out of it."""
    return (cache_bytes - layout.map_bytes) / slim_bytes_per_token / (cache_bytes / stock_bytes_per_token)
