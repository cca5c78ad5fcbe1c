"""Rotary position embedding, applied and undone in float32.

The engine hands the backend K *after* RoPE; slim's V = K_raw·W_KV needs the
raw (un-rotated) K, so cached K is rotated back by the same angles.
"""

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Rotary:
    """The rotation one attention layer applies to its keys.

    cos_sin: [max_position, rotary_dim] float32, cos in the first half and sin
    in the second (vLLM's `cos_sin_cache` layout). neox=True rotates the two
    halves of the rotary slice against each other; False rotates interleaved
    pairs (GPT-J). Dimensions past rotary_dim pass through (partial rotary). Un-RoPE reads
    `inverse_cos_sin`, which also removes a scaled table's magnitude.
    """

    cos_sin: torch.Tensor
    rotary_dim: int
    neox: bool
    # The table that undoes the rotation exactly: (cos, sin) / (cos² + sin²), same layout. Scaled rotary
    # embeddings multiply both by a magnitude (YaRN's and longrope's mscale), so rotating back by the same
    # angles would leave every key times mscale²; a plain table divides by 1.
    inverse_cos_sin: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        cos, sin = self.cos_sin.double().chunk(2, dim=-1)
        norm = cos.square() + sin.square()
        inverse = torch.cat((cos / norm, sin / norm), dim=-1)
        object.__setattr__(self, "inverse_cos_sin", inverse.to(torch.promote_types(self.cos_sin.dtype, torch.float32)))

    def to(self, device) -> "Rotary":
        return Rotary(self.cos_sin.to(device), self.rotary_dim, self.neox)


def rotate(x: torch.Tensor, positions: torch.Tensor, rotary: Rotary, inverse: bool = False):
    """Rotate x [..., H, D] by the angles of `positions` (shape x.shape[:-2], or one that broadcasts
    to it); `inverse` undoes it. Computes in float32 (float64 inputs stay float64), writing each half
    of every pair once into the result (no temporaries the size of x)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    table = rotary.inverse_cos_sin if inverse else rotary.cos_sin
    table = table.index_select(0, positions.flatten()).view(*positions.shape, 1, -1).to(dtype)
    cos, sin = table.chunk(2, dim=-1)
    x = x.to(dtype)
    dim = rotary.rotary_dim
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if dim < x.shape[-1]:
        out[..., dim:] = x[..., dim:]  # partial rotary: the tail passes through
    if rotary.neox:
        pairs = (slice(0, dim // 2), slice(dim // 2, dim))
    else:
        pairs = (slice(0, dim, 2), slice(1, dim, 2))
    x1, x2 = x[..., pairs[0]], x[..., pairs[1]]
    out1, out2 = out[..., pairs[0]], out[..., pairs[1]]
    sign = -1 if inverse else 1  # the inverse table's angles are the same: rotate the other way
    torch.mul(x1, cos, out=out1)
    out1.addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out2)
    out2.addcmul_(x1, sin, value=sign)
    return out


def unrope(k: torch.Tensor, positions: torch.Tensor, rotary: Rotary | None) -> torch.Tensor:
    """Raw keys [..., H, D] (float32 or wider) from post-RoPE keys; identity without RoPE."""
    if rotary is None:
        return k.to(torch.promote_types(k.dtype, torch.float32))
    # The paged forms un-RoPE whole pages: a last page's slots past the sequence may lie past the table
    # (max_model_len not a multiple of the block size); their keys are masked, any angle serves them.
    return rotate(k, positions.clamp_max(rotary.cos_sin.shape[0] - 1), rotary, inverse=True)
