"""Rotary position embedding, applied and undone in float32.

The engine hands the backend K *after* RoPE; slim's V = K_raw·W_KV needs the
raw (un-rotated) K, so cached K is rotated back by the same angles.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rotary:
    """The rotation one attention layer applies to its keys.

    cos_sin: [max_position, rotary_dim] float32, cos in the first half and sin
    in the second (vLLM's `cos_sin_cache` layout). neox=True rotates the two
    halves of the rotary slice against each other; False rotates interleaved
    pairs (GPT-J). Dimensions past rotary_dim pass through (partial rotary).
    """

    cos_sin: torch.Tensor
    rotary_dim: int
    neox: bool

    def to(self, device) -> "Rotary":
        return Rotary(self.cos_sin.to(device), self.rotary_dim, self.neox)


def rotate(x: torch.Tensor, positions: torch.Tensor, rotary: Rotary, inverse: bool = False):
    """Rotate x [..., H, D] by the angles of `positions` (shape x.shape[:-2], or one that broadcasts
    to it); `inverse` undoes it. Computes in float32 (float64 inputs stay float64)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    table = rotary.cos_sin.index_select(0, positions.flatten()).view(*positions.shape, -1)
    cos, sin = table.to(dtype).unsqueeze(-2).chunk(2, dim=-1)
    if inverse:
        sin = -sin
    rot, rest = x[..., : rotary.rotary_dim].to(dtype), x[..., rotary.rotary_dim :].to(dtype)
    if rotary.neox:
        x1, x2 = rot.chunk(2, dim=-1)
        rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((rot, rest), dim=-1)


def unrope(k: torch.Tensor, positions: torch.Tensor, rotary: Rotary | None) -> torch.Tensor:
    """Raw keys [..., H, D] (float32 or wider) from post-RoPE keys; identity without RoPE."""
    if rotary is None:
        return k.to(torch.promote_types(k.dtype, torch.float32))
    return rotate(k, positions, rotary, inverse=True)
