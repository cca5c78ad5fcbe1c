"""Slim's value map: V rebuilt from the cached key row, solved once per layer.

Row-vector convention, as in the paper: K = X·W_K + b_K, V = X·W_V + b_V with
W_K square (multi-head attention, one head block of K per head of V). Then
V = (K − b_K)·W_K⁻¹·W_V + b_V exactly. A W_K wider than the hidden state (heads ×
head_size > hidden, Gemma-7B) of full rank serves the same way, W_K⁻¹ read as the
pseudo-inverse W_K⁺ (X·W_K·W_K⁺ = X).

Storage is not exact: the cached K carries its dtype's rounding, and W_K⁻¹
amplifies it along W_K's weakest singular directions. *Spill* stores, next to
K, the r coordinates of X along those weakest directions (u_j = left singular
vectors of W_K with the smallest σ_j); V then needs W_K⁻¹ only on the strong
part of W_K, where it amplifies little:

    V = (K − b_K)·W_KV + S·W_SV + b_V,   S = X·U_weak
    W_SV = U_weakᵀ·W_V,                  W_KV = W_K⁻¹·(W_V − U_weak·W_SV)

X is not visible to the attention backend, but K and V both are at write time,
so S comes from the least-squares X̂ of the stacked projection [W_K | W_V],
which V conditions well: S = [K − b_K, V − b_V]·pinv([W_K | W_V])·U_weak.

*Refinement*: a 16-bit model hands over K already rounded to its dtype, and
that rounding is amplified like any other. When the cache stores K in a finer
dtype than the model's (float16 for a bfloat16 model), the stored key is
K̃ = X̂·W_K + b_K instead, whose V = X̂·W_V carries only the stacked fit's
small error. Then only the cache's own (finer) rounding is amplified.
"""

from dataclasses import dataclass

import torch


class SlimNotApplicable(ValueError):
    """A layer whose V is not a function of its K (the backend must refuse it)."""


@dataclass(frozen=True)
class SlimProjection:
    """One layer's float32 maps between a cached key row and its values.

    w_kv [d, dv], w_sv [r, dv], spill_in [d + dv, r], refine [d + dv, d] or
    None; d = num_heads·head_size, dv = num_heads·head_size_v, r = number of
    spill coordinates (may be 0).
    """

    w_kv: torch.Tensor
    w_sv: torch.Tensor
    spill_in: torch.Tensor
    refine: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    num_heads: int
    cond: float

    @property
    def spill(self) -> int:
        return self.w_sv.shape[0]

    @property
    def map_bytes(self) -> int:
        """Memory the layer's maps hold (all float32: `benchmarks/results/slim_map_precision.md`
        measured float16 W_KV at up to 2.3x and float16 refinement at up to 1.7x the stock cache's
        error, against 1.33x in float32; bfloat16 at 8-15x)."""
        maps = (self.w_kv, self.w_sv, self.spill_in, self.refine)
        return sum(m.numel() * m.element_size() for m in maps if m is not None)

    def to(self, device) -> "SlimProjection":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SlimProjection(
            move(self.w_kv), move(self.w_sv), move(self.spill_in), move(self.refine),
            move(self.k_bias), move(self.v_bias), self.num_heads, self.cond,
        )


def solve_projection(
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    k_bias: torch.Tensor | None,
    v_bias: torch.Tensor | None,
    num_heads: int,
    spill: int,
    refine: bool = False,
) -> SlimProjection:
    """Solve W_KV (and the spill and refinement maps) in float64 from W_K's SVD.

    w_k: [hidden, d] and w_v: [hidden, dv], so that K = X·w_k (row vectors).
    """
    hidden, d = w_k.shape
    if hidden > d:
        raise SlimNotApplicable(
            f"W_K is {hidden}x{d}: K has fewer columns than the hidden state, so K does not determine X and "
            "V is not a function of K (slim needs heads x head_size >= hidden, as in multi-head attention)"
        )
    if not 0 <= spill < hidden:
        raise ValueError(f"spill must be in [0, {hidden}), got {spill}")
    w_k64, w_v64 = w_k.double(), w_v.double()
    # W_K = U·diag(σ)·Vᵀ (thin: U [hidden, hidden], Vᵀ [hidden, d]). A wider W_K (Gemma-7B: 16 x 256 columns
    # on a 3072 hidden state) of full rank still gives X = (K − b_K)·W_K⁺ exactly, W_K⁺ = V·diag(1/σ)·Uᵀ.
    u, sigma, vh = torch.linalg.svd(w_k64, full_matrices=False)
    if sigma[-1] <= sigma[0] * torch.finfo(torch.float64).eps * d:
        raise SlimNotApplicable(
            f"W_K is singular (smallest singular value {sigma[-1].item():.3g}, "
            f"largest {sigma[0].item():.3g}): V cannot be rebuilt from K"
        )
    u_weak = u[:, hidden - spill :]
    w_sv = u_weak.T @ w_v64
    w_kv = vh.T @ ((u.T @ (w_v64 - u_weak @ w_sv)) / sigma[:, None])  # W_K⁺·(W_V − U_weak·W_SV)
    least_squares_x = torch.linalg.pinv(torch.cat((w_k64, w_v64), dim=1))  # [d + dv, hidden]
    as32 = lambda t: None if t is None else t.detach().float().contiguous()  # noqa: E731
    return SlimProjection(
        as32(w_kv), as32(w_sv), as32(least_squares_x @ u_weak),
        as32(least_squares_x @ w_k64) if refine else None,
        as32(k_bias), as32(v_bias), num_heads, (sigma[0] / sigma[-1]).item(),
    )


def rebuild_values(k_raw: torch.Tensor, spill: torch.Tensor | None, proj: SlimProjection) -> torch.Tensor:
    """V [..., H, Dv] float32 from raw keys [..., H, D] and spill [..., r] (left form)."""
    k0 = k_raw.flatten(-2).float()
    if proj.k_bias is not None:
        k0 = k0 - proj.k_bias
    v = k0 @ proj.w_kv
    if proj.spill:
        v = v + spill.float() @ proj.w_sv
    if proj.v_bias is not None:
        v = v + proj.v_bias
    return v.unflatten(-1, (proj.num_heads, -1))
