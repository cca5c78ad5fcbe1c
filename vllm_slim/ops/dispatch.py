"""Which form of an op runs: the Triton kernels on CUDA, and on the CPU when VLLM_SLIM_TRITON=1 (under
Triton's interpreter: for tests, it gives no speed); otherwise the CPU's fused C loops or torch forms.
Kept apart from the kernels so that choosing never imports triton."""

import os

import torch

TRITON_ENV = "VLLM_SLIM_TRITON"


def uses_triton(device: torch.device) -> bool:
    """Whether tensors on `device` go through the Triton kernels."""
    return device.type == "cuda" or os.environ.get(TRITON_ENV) == "1"


def kernel_path(device: torch.device) -> str:
    """What a start-up log line says runs on `device`."""
    if device.type == "cuda":
        return "Triton kernels"
    if uses_triton(device):
        return f"Triton kernels under Triton's interpreter ({TRITON_ENV}=1)"
    return "the CPU forms"
