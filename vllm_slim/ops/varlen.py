"""Packed variable-length batches, as vLLM hands them to attention: sequence i's tokens are rows
query_start_loc[i]:query_start_loc[i + 1] of [T, ...] tensors. Device-side, no host sync."""

import torch


def token_layout(query_start_loc: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For packed tokens 0..num_tokens-1: each one's sequence and its offset in that sequence
    ([num_tokens] each). Tokens past the last sequence (padding) are given to the last one."""
    tokens = torch.arange(num_tokens, device=query_start_loc.device, dtype=query_start_loc.dtype)
    sequence = torch.searchsorted(query_start_loc[1:], tokens, right=True)
    sequence = sequence.clamp_max(query_start_loc.shape[0] - 2)
    return sequence, tokens - query_start_loc[sequence]


def token_positions(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_tokens] each packed token's position in its sequence: the new tokens of a sequence of
    seq_len tokens (its queries' own included) sit at seq_len − query_len onwards. Padding gets 0."""
    sequence, offset = token_layout(query_start_loc, num_tokens)
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    positions = (seq_lens - query_lens)[sequence] + offset
    return positions.where(offset < query_lens[sequence], 0)


def pad_sequences(x: torch.Tensor, layout: tuple[torch.Tensor, torch.Tensor], num_sequences: int, max_len: int):
    """Packed x [T, ...] as zero-padded [num_sequences, max_len, ...] (float32)."""
    sequence, offset = layout
    padded = x.new_zeros(num_sequences, max_len, *x.shape[1:], dtype=torch.float32)
    padded[sequence, offset] = x.float()
    return padded
