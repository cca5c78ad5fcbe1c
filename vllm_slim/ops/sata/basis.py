"""The minimal symmetric-tensor basis, the feature map φ built on it, and the state φ accumulates.

(q·k)^p = ⟨q^{⊗p}, k^{⊗p}⟩, and both tensors are symmetric: only the C(d+p−1, p) entries with sorted
indices i1 ≤ … ≤ ip are distinct, each standing for p!/Π n_j! ordered ones (its multinomial weight).
φ concatenates degrees 0..order−1 with sqrt(weight · scale^p / p!) folded in, so that
⟨φ(q), φ(k)⟩ = Σ_{p<order} (q·k·scale)^p / p!.
"""

import functools
import itertools
import math
from dataclasses import dataclass

import torch

# An odd number of terms ends on an even degree, which keeps the series > 0 for every real logit;
# the paper's default of 4 terms goes negative below x ≈ −1.596. Degree 3 costs C(d+2, 3)·d_v more
# state per KV head (45,760·d_v at d = 64), so the default stops at degree 2.
DEFAULT_ORDER = 3


def is_positive_order(order: int) -> bool:
    """Whether Σ_{p<order} x^p/p! > 0 for every real x: true exactly when the highest degree is even."""
    # At a minimum x*, the derivative Σ_{p<order−1} x*^p/p! is 0, leaving the value x*^{order−1}/(order−1)!.
    return order >= 1 and order % 2 == 1


def truncated_exp(x: torch.Tensor, order: int) -> torch.Tensor:
    """Σ_{p<order} x^p / p! (Horner's scheme), the weight SATA gives a logit x."""
    result = torch.ones_like(x)
    for p in range(order - 1, 0, -1):
        result = 1 + x * result / p
    return result


def basis_size(head_size: int, degree: int) -> int:
    """Distinct degree-p monomials in d variables: C(d+p−1, p)."""
    return math.comb(head_size + degree - 1, degree)


def feature_size(head_size: int, order: int) -> int:
    """Length m of φ over degrees 0..order−1: Σ_p C(d+p−1, p) = C(d+order−1, order−1)."""
    return math.comb(head_size + order - 1, order - 1)


def state_size(head_size: int, head_size_v: int, order: int, exact_tokens: int = 0) -> int:
    """Floats per KV head: numerator m·d_v plus normalizer m, and the hybrid's exact keys and values."""
    return feature_size(head_size, order) * (head_size_v + 1) + exact_tokens * (head_size + head_size_v)


def state_bytes(head_size: int, head_size_v: int, order: int, exact_tokens: int = 0) -> int:
    """Bytes per KV head; the state is float32."""
    return 4 * state_size(head_size, head_size_v, order, exact_tokens)


@functools.cache
def basis_indices(head_size: int, degree: int) -> torch.Tensor:
    """[m_p, p] int64: the sorted index tuples i1 ≤ … ≤ ip, one row per basis monomial (do not modify)."""
    rows = itertools.combinations_with_replacement(range(head_size), degree)
    flat = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long)
    return flat.view(basis_size(head_size, degree), degree)


@functools.cache
def multinomial_weights(head_size: int, degree: int) -> torch.Tensor:
    """[m_p] float64: p!/Π n_j!, how many of the d^p ordered index tuples each sorted row stands for."""
    rows = basis_indices(head_size, degree)
    # Position i counts the positions j ≤ i holding the same index; over a run of n equal indices
    # that gives 1·2·…·n, so the product along the row is Π n_j!.
    earlier = torch.ones(degree, degree, dtype=torch.bool).tril()
    run_ranks = ((rows[:, :, None] == rows[:, None, :]) & earlier).sum(-1)
    return (math.factorial(degree) // run_ranks.prod(-1)).double()


@functools.cache
def feature_tables(head_size: int, order: int, scale: float, device: torch.device):
    """All degrees' index rows padded to order−1 columns with index d (a constant 1), and φ's coefficients,
    on `device`: built on the host once per device (call it before a step to keep the copy out of it)."""
    width = order - 1
    index = torch.cat([
        torch.cat((basis_indices(head_size, p), torch.full((basis_size(head_size, p), width - p), head_size)), 1)
        for p in range(order)
    ])
    coefficient = torch.cat([
        (multinomial_weights(head_size, p) * scale**p / math.factorial(p)).sqrt() for p in range(order)
    ])
    return index.to(device), coefficient.float().to(device)


@functools.cache
def suffix_starts(head_size: int, degree: int) -> tuple[int, ...]:
    """For each index i, the first of the sorted degree-p rows whose indices are all ≥ i: they form a
    suffix of the list (degree 0: its one row, the constant)."""
    if degree == 0:
        return (0,) * head_size
    first = basis_indices(head_size, degree)[:, 0]
    return tuple(int((first < i).sum()) for i in range(head_size))


def feature_map(x: torch.Tensor, order: int, scale: float, by_slices: bool | None = None) -> torch.Tensor:
    """φ(x) [..., m] float32 for x [..., d], with ⟨φ(q), φ(k)⟩ = Σ_{p<order} (q·k·scale)^p / p!.

    Two forms, the same products in `basis_indices` order (up to float32 rounding). by_slices (the
    CPU's default): degree by degree, the rows that start with index i are x_i times the degree-(p−1)
    rows whose indices are all ≥ i, a suffix of that list, so each degree is d products into slices of
    the output (7× faster than the gather on the CPU). Otherwise one gather of every row's indices and
    a product: two kernels where the slices take d per degree, which a GPU would pay in launches on
    every decode step."""
    head_size = x.shape[-1]
    index, coefficient = feature_tables(head_size, order, scale, x.device)
    if not (x.device.type == "cpu" if by_slices is None else by_slices):
        padded = torch.cat((x.float(), x.new_ones(x.shape[:-1] + (1,), dtype=torch.float32)), -1)
        return padded[..., index].prod(-1) * coefficient
    x = x.float()
    out = x.new_empty(x.shape[:-1] + (feature_size(head_size, order),))
    out[..., 0] = 1
    previous, offset = out[..., :1], 1
    for degree in range(1, order):
        begin, starts = offset, suffix_starts(head_size, degree - 1)
        for i in range(head_size):
            tail = previous[..., starts[i]:]
            torch.mul(tail, x[..., i : i + 1], out=out[..., offset : offset + tail.shape[-1]])
            offset += tail.shape[-1]
        previous = out[..., begin:offset]
    return out.mul_(coefficient)


@dataclass
class SataState:
    """What a sequence's tokens leave behind, per KV head, float32.

    numerator [Hkv, m, d_v] = Σ_t φ(k_t) v_tᵀ, normalizer [Hkv, m] = Σ_t φ(k_t).
    """

    numerator: torch.Tensor
    normalizer: torch.Tensor


def initial_state(num_kv_heads: int, head_size: int, head_size_v: int, order: int, device=None) -> SataState:
    """The state of an empty sequence."""
    m = feature_size(head_size, order)
    return SataState(
        torch.zeros(num_kv_heads, m, head_size_v, device=device),
        torch.zeros(num_kv_heads, m, device=device),
    )


def prepare_state(state: SataState | None, k: torch.Tensor, v: torch.Tensor, order: int) -> SataState:
    """`state` checked against k [T, Hkv, d] and v [T, Hkv, d_v], or an empty one if None."""
    num_kv_heads, head_size, head_size_v = k.shape[1], k.shape[2], v.shape[2]
    if state is None:
        return initial_state(num_kv_heads, head_size, head_size_v, order, k.device)
    m = feature_size(head_size, order)
    if state.numerator.shape != (num_kv_heads, m, head_size_v) or state.normalizer.shape != (num_kv_heads, m):
        raise ValueError(
            f"state numerator {tuple(state.numerator.shape)} / normalizer {tuple(state.normalizer.shape)} does not"
            f" fit {num_kv_heads} KV heads, d_v {head_size_v} and feature size {m} (head size {head_size},"
            f" order {order})"
        )
    return state


def group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[T, H, d] → [T, Hkv, H/Hkv, d]: consecutive query heads share a KV head, as vLLM lays out GQA."""
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {num_kv_heads} KV heads")
    return q.unflatten(1, (num_kv_heads, -1))
