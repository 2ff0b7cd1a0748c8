"""Triton kernels for the CUDA fast path, one per file, each with its launcher and a pure-torch reference.

Importing this package does not import triton; the kernel modules do. dgemma runs without triton (CPU users):
callers check `available(device)` first and import the kernel module only then.
"""

from __future__ import annotations

import importlib.util
import os

import torch

ATTENTION_HEAD_DIMS = (16, 32, 64, 128, 256, 512)  # what attention.py's canvas_attention takes


def available(device: torch.device | str) -> bool:
    """True where the Triton kernels can run: triton is installed and the device is CUDA (or, for tests, CPU
    tensors under TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
